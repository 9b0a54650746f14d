"""One cache actor: a teacher in memory, shared unit buffers, writer processes, and the units it is handed.

The byte path of a unit: each batch's outputs are coded on the device (float16, int8 + scales, or PCA
codes + scales: cache.feature_codec) and copied into the unit's shared buffer (on CUDA: pinned, on a
side stream, so the copy of batch i overlaps the compute of batch i + 1); the full unit goes to one of `cache.writers` writer processes
(teacher_cache/writers.py) while the next unit is computed. A unit is marked done by its writer
only once its bytes are fsynced.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from infra import storage
from infra.config import config_from_dict
from infra.codec_spec import parse_feature_codec
from teacher_cache.basis_fit import layer_basis
from teacher_cache.feature_codec import encode_features
from teacher_cache.fit import cached_layers, load_fitted
from teacher_cache.paths import storage_root
from teacher_cache.store import CacheStore, StoreError
from teacher_cache.views import apply_views
from teacher_cache.writers import SharedSlots, WriterPool, writer_count

FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class WorkerSetup:
    """What a cache actor is told besides the shared image arrays: which store it fills and where it runs."""
    cfg: dict                           # the config, Config.to_dict()
    role: str                           # teacher_vit | teacher_cnn
    out: str                            # the output directory, OUT
    path: str                           # the teacher's store
    device: str                         # cpu | cuda
    threads: int                        # torch threads, shared with the writer processes
    mark: tuple[str, str] | None = None  # the driver's mark under the storage location (storage.leave_mark)


class CacheWorker:
    """Computes units of one teacher's store and hands them to its writer processes."""

    def __init__(self, setup: WorkerSetup, images, labels, views):
        role, out, path, device, threads = setup.role, setup.out, setup.path, setup.device, setup.threads
        torch.set_num_threads(threads)
        self.cfg = config_from_dict(setup.cfg)
        self.node = storage.node_name()
        # before anything else: can this node write, read and delete under the location? (names the node if not)
        storage.probe(storage_root(out, self.cfg), self.node, setup.mark)  # mark: the driver's, proves it is shared
        self.device = device
        self.teacher = load_fitted(self.cfg, role, storage_root(out, self.cfg), device)
        if device == "cuda":
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.layers = cached_layers(self.cfg, role, self.teacher)
        self.store = CacheStore.open(path)
        self.images, self.labels, self.views = images, labels, views
        self.codec = parse_feature_codec(self.store.layout.feature_codec)
        # each layer's basis on the device (None unless pca), from the store's basis group, written before any unit
        self.basis = {name: layer_basis(self.store, name, self.device) for name in self.store.layout.layers}
        spec = self.store.layout.unit_spec()
        writers = writer_count(self.cfg.cache.writers, spec, device)
        # one slot per writer, and one being filled by compute
        self.slots = SharedSlots(spec, writers + 1, pin=device == "cuda")
        self.writers = WriterPool(str(path), self.slots, writers, threads=max(1, threads // writers))
        self.pending: list = []
        self.copy_stream = torch.cuda.Stream() if device == "cuda" else None

    def _unit_inputs(self, u: int, slot: dict[str, np.ndarray] | None = None):
        """Unit u's images and views on the device (one copy per unit, not per batch) and its (image, view) pairs.

        With a buffer slot, the unit's images, labels and views are first copied into it (the writer needs
        them there too) and go to the device from there: pinned memory, so an asynchronous copy."""
        lo, hi = self.store.layout.unit_range(u)
        if slot is not None:
            for name, source in (("images", self.images), ("labels", self.labels), ("views", self.views)):
                np.copyto(slot[name][:hi - lo], source[lo:hi])
            images, views = torch.from_numpy(slot["images"][:hi - lo]), torch.from_numpy(slot["views"][:hi - lo])
        else:
            images = torch.from_numpy(np.ascontiguousarray(self.images[lo:hi]))
            views = torch.from_numpy(np.ascontiguousarray(self.views[lo:hi]))
            if self.device == "cuda":
                images, views = images.pin_memory(), views.pin_memory()
        if self.device == "cuda":
            images = images.to(self.device, non_blocking=True)
            views = views.to(self.device, non_blocking=True)
        k = self.store.layout.views
        pairs = torch.stack(torch.meshgrid(torch.arange(hi - lo), torch.arange(k), indexing="ij"), -1).view(-1, 2)
        return images, views, pairs.to(self.device)

    @torch.no_grad()
    def forward(self, u: int, slot: dict[str, np.ndarray] | None = None):
        """Yield the teacher's outputs (on the device) for unit u's (image, view) pairs, batch by batch."""
        images, views, pairs = self._unit_inputs(u, slot)
        bs = self.cfg.cache.batch_size
        cuda = self.device == "cuda"
        for i in range(0, len(pairs), bs):
            idx, view = pairs[i:i + bs, 0], pairs[i:i + bs, 1]
            x = apply_views(images[idx], views[idx, view], self.teacher.input_size)
            with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
                yield self.teacher.extract(x.contiguous(memory_format=torch.channels_last) if cuda else x, self.layers)

    def _stored(self, feats: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One batch's outputs as they are stored, still on the device and contiguous (float16, or int8 +
        per-token scales), and whether all of them fit float16 (a device flag: reading it would synchronise)."""
        out = {"logits": feats["logits"].to(torch.float16, memory_format=torch.contiguous_format)}
        ok = feats["logits"].abs().amax() <= FLOAT16_MAX  # False for NaN too
        for name, shape in self.store.layout.layers.items():
            ok &= feats[name].abs().amax() <= FLOAT16_MAX
            out[f"features/{name}"], scale = encode_features(feats[name], self.codec, len(shape), self.basis[name])
            if scale is not None:
                out[f"scales/{name}"] = scale
        return out, ok

    def compute(self, u: int) -> tuple[int, int]:
        """Fill a free slot with unit u (inputs and teacher outputs, on the host); returns (slot, samples).
        The caller hands the slot to a writer or releases it."""
        slot = self.slots.acquire()
        arrays = self.slots.arrays[slot]
        lo, hi = self.store.layout.unit_range(u)
        rows, ok = 0, []
        try:
            for feats in self.forward(u, arrays):
                stored, batch_ok = self._stored(feats)
                n = len(stored["logits"])  # image-views in this batch
                self._to_host(stored, arrays, rows, n)
                rows += n
                ok.append(batch_ok)
            if self.copy_stream is not None:
                self.copy_stream.synchronize()  # the last batch's copy: the unit is on the host
            if not bool(torch.stack(ok).all()):  # one host synchronisation per unit
                raise StoreError(f"unit {u}: the teacher's outputs hold NaN, Inf or values beyond float16's "
                                 f"range; nothing was written. Check the teacher's weights and inputs")
        except BaseException:
            self.slots.release(slot)
            raise
        return slot, hi - lo

    def _to_host(self, stored: dict[str, torch.Tensor], arrays: dict[str, np.ndarray], row: int, n: int) -> None:
        """Copy one batch (n image-views from flat row `row` of the unit) into the unit's slot."""
        dst = {name: torch.from_numpy(arrays[name]).flatten(0, 1)[row:row + n] for name in stored}
        if self.copy_stream is None:
            for name, t in stored.items():
                dst[name].copy_(t)
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream())  # the batch is computed before it is copied
        with torch.cuda.stream(self.copy_stream):
            for name, t in stored.items():
                dst[name].copy_(t, non_blocking=True)
                t.record_stream(self.copy_stream)  # its memory is not reused before the copy has read it

    def process(self, u: int) -> list[int]:
        """Compute unit u, hand it to a writer process, and report the units whose writes have finished."""
        slot, rows = self.compute(u)
        self.pending.append((u, self.writers.submit(u, slot, rows)))
        return self._finished()

    def where(self) -> str:
        return self.node

    def drain(self) -> list[int]:
        return self._finished(wait=True)

    def close(self) -> None:
        """Stop the writer processes (after their writes) and free the shared buffers."""
        self.writers.close()

    def _finished(self, wait: bool = False) -> list[int]:
        """Units whose writes are done (all of them with `wait`); a failed write re-raises here."""
        done, still = [], []
        for u, fut in self.pending:
            if wait or fut.done():
                self.writers.result(fut)
                done.append(u)
            else:
                still.append((u, fut))
        self.pending = still
        return done
