"""`hakd cache`: fit each teacher once, then run it over K views of every training image on Ray.

Work is cut into shard-aligned units; each unit is computed and written by exactly one Ray actor
(zarr loses data when two writers touch one shard). An actor copies each batch's outputs into a
reused host buffer (pinned, on a side CUDA stream) and hands a finished unit to one of its writer
threads (`cache.writers`) while it computes the next, so encoding and disk writes overlap compute.
A unit is marked done only after its bytes are fsynced, with each shard file's checksum taken as it
was written; nothing is read back. Re-running verifies those checksums, rewrites damaged or missing
units (and the ViT's `live_block/` weights, a unit of their own), and skips the rest, so a killed job
resumes and ends with the same store as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import queue
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from infra import storage
from infra.config import Config, config_from_dict
from infra.provenance import provenance
from teacher_cache.datasets import class_names, fingerprint, load_split
from teacher_cache.embedded import embedded_identity
from teacher_cache.fit import build_teacher, fit_teacher, head_mode, load_fitted
from teacher_cache.codecs import parse_overrides, quantize, scale_shape
from teacher_cache.store import CacheStore, Layout, StoreError
from teacher_cache.views import apply_views, sample_views

ROLES = ("teacher_vit", "teacher_cnn")
FLOAT16_MAX = 65504.0


def storage_root(out: Path | str, cfg: Config) -> str:
    """Where stores and fitted teachers live: cache.location (a shared path or a URL), else OUT."""
    return storage.root(cfg.cache.location, out)


def store_path(out: Path | str, cfg: Config, role: str) -> Path | str:
    """A teacher's store: a Path under a local location, a URL under an object store."""
    return storage.join(storage_root(out, cfg), "cache", f"{getattr(cfg, role).name}.zarr")


def teacher_file(out: Path | str, cfg: Config, role: str, suffix: str = ".pt") -> Path | str:
    """The fitted teacher's weights (.pt) or its fit record (.json)."""
    return storage.join(storage_root(out, cfg), "teachers", f"{role}{suffix}")


def teacher_loads(path: Path | str) -> bool:
    """True when the teacher file at `path` loads with weights_only=True (never unpickles anything else)."""
    try:
        storage.load_tensors(path)
    except storage.StorageError:
        raise  # an unreachable location is not a damaged teacher
    except Exception:  # missing, truncated, foreign or unsafe: not a whole output
        return False
    return True


def cached_layers(cfg: Config, role: str, teacher=None) -> list[str]:
    tc = getattr(cfg, role)
    teacher = teacher or build_teacher(cfg, role)
    return list(tc.layers) or teacher.default_layers()


def layer_shapes(teacher, layers: list[str]) -> dict[str, tuple[int, ...]]:
    with torch.no_grad():
        out = teacher.eval().extract(torch.zeros(1, 3, teacher.input_size, teacher.input_size), layers)
    return {l: tuple(out[l].shape[1:]) for l in layers}


def plan(cfg: Config, role: str, n: int | None = None, teacher=None) -> Layout:
    teacher = teacher or build_teacher(cfg, role)
    layers = cached_layers(cfg, role, teacher)
    n = n if n is not None else len(load_split(cfg.data, "train")["labels"])
    return Layout(n, cfg.cache.views, cfg.data.image_size, len(class_names(cfg.data)),
                  layer_shapes(teacher, layers), cfg.cache.shard_size, cfg.cache.chunk_size, cfg.cache.feature_dtype)


def open_store(cfg: Config, path: Path, layout: Layout, ident: dict, prov: dict, params: tuple[str, ...] = (),
               overwrite: bool = False) -> CacheStore:
    """The store at `path` as `hakd cache` creates it (codecs from cache.*), or the existing one for `ident`."""
    c = cfg.cache
    return CacheStore.create_or_open(path, layout, ident, prov, codec=c.codec,
                                     codec_overrides=parse_overrides(c.codec_overrides), clevel=c.clevel,
                                     params=params, overwrite=overwrite)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def identity(cfg: Config, role: str, teacher, layout: Layout, data_fp: str) -> dict:
    """Everything a cached value depends on; a store whose identity differs is never reused."""
    c = cfg.cache
    return {"teacher": teacher.spec.name, "weights_sha256": state_digest(teacher.state_dict()),
            "layers": {k: list(v) for k, v in layout.layers.items()},
            "preprocessing": {"input_size": teacher.input_size, "mean": list(teacher.spec.mean),
                              "std": list(teacher.spec.std), "resample": "bilinear, align_corners=False"},
            "views": {"k": c.views, "scale": list(c.crop_scale), "ratio": list(c.crop_ratio),
                      "flip_prob": c.flip_prob, "seed": cfg.data.seed},
            "dataset": {"name": cfg.data.name, "fingerprint": data_fp, "n": layout.n,
                        "image_size": cfg.data.image_size, "num_classes": layout.num_classes},
            "shards": {"shard_size": layout.shard_size, "chunk_size": layout.chunk_size},
            "feature_dtype": layout.feature_dtype}


def ensure_teacher(cfg: Config, role: str, out: Path, device: str) -> dict:
    """Fit the teacher unless a fit for the same teacher and data config is already saved."""
    info_path = teacher_file(out, cfg, role, ".json")
    c = cfg.cache  # the fit also depends on the seed and on the augmentation it trains with
    key = (cfg.digest(role, "data", "seed") + f":{list(c.crop_scale)}:{list(c.crop_ratio)}:{c.flip_prob}:"
           + head_mode(getattr(cfg, role), cfg.data) + embedded_identity(getattr(cfg, role), cfg.data))
    if storage.exists(info_path):  # a fit for this key is reused, also under --overwrite: only another key refits
        info = json.loads(storage.read_bytes(info_path))
        if info.get("key") == key and teacher_loads(teacher_file(out, cfg, role)):
            return info
    info = fit_teacher(cfg, role, storage_root(out, cfg), device=device)
    info["key"] = key
    storage.write_bytes(info_path, json.dumps(info, indent=2).encode())
    return info


class UnitBuffers:
    """Reused host buffers for the teacher outputs of whole units (pinned on CUDA), handed out one
    unit at a time: a unit's buffer returns to the pool once its write has finished."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], rows: int, slots: int, pin: bool):
        self.free: queue.Queue = queue.Queue()
        for _ in range(slots):
            self.free.put({name: torch.empty((rows, *shape), dtype=dtype, pin_memory=pin)
                           for name, (shape, dtype) in shapes.items()})

    def acquire(self) -> dict[str, torch.Tensor]:
        return self.free.get()  # blocks while every buffer is being written: back-pressure on compute

    def release(self, slot: dict[str, torch.Tensor]) -> None:
        self.free.put(slot)


class CacheWorker:
    """One Ray actor: a teacher in memory, reused host buffers, writer threads, and the units it is handed.

    The byte path of a unit: each batch's outputs are cast on the device (float16, or int8 + scales),
    copied into the unit's host buffer (on CUDA: on a side stream, so the copy of batch i overlaps the
    compute of batch i + 1), and the full unit goes to a writer thread while the next unit is computed.
    `cache.writers` units are encoded and written at once, each by one thread (its own shards), and
    zarr encodes a shard's chunks on its own thread pool.
    """

    def __init__(self, cfg_dict: dict, role: str, out: str, path: str, images, labels, views, device: str,
                 threads: int, mark: tuple[str, str] | None = None):
        torch.set_num_threads(threads)
        self.cfg = config_from_dict(cfg_dict)
        self.node = storage.node_name()
        # before anything else: can this node write, read and delete under the location? (names the node if not)
        storage.probe(storage_root(out, self.cfg), self.node, mark)  # mark: the driver's, proves it is shared
        self.device = device
        self.teacher = load_fitted(self.cfg, role, storage_root(out, self.cfg), device)
        if device == "cuda":
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.layers = cached_layers(self.cfg, role, self.teacher)
        self.store = CacheStore.open(path)
        self.images, self.labels, self.views = images, labels, views
        writers = self.cfg.cache.writers
        self.writer = ThreadPoolExecutor(writers, thread_name_prefix="cache-writer")
        self.pending: list = []
        lay = self.store.layout
        self.int8 = lay.feature_dtype == "int8"
        shapes = {"logits": ((lay.views, lay.num_classes), torch.float16)}
        for name, shape in lay.layers.items():
            shapes[f"features/{name}"] = ((lay.views, *shape), torch.int8 if self.int8 else torch.float16)
            if self.int8:
                shapes[f"scales/{name}"] = ((lay.views, *scale_shape(shape)), torch.float16)
        self.buffers = UnitBuffers(shapes, lay.shard_size, writers + 1, pin=device == "cuda")
        self.copy_stream = torch.cuda.Stream() if device == "cuda" else None

    def _unit_inputs(self, u: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit u's images and views on the device (one copy per unit, not per batch) and its (image, view) pairs."""
        lo, hi = self.store.layout.unit_range(u)
        images = torch.from_numpy(np.ascontiguousarray(self.images[lo:hi]))
        views = torch.from_numpy(np.ascontiguousarray(self.views[lo:hi]))
        if self.device == "cuda":  # from pinned memory: an asynchronous copy that does not stall the stream
            images = images.pin_memory().to(self.device, non_blocking=True)
            views = views.pin_memory().to(self.device, non_blocking=True)
        k = self.store.layout.views
        pairs = torch.stack(torch.meshgrid(torch.arange(hi - lo), torch.arange(k), indexing="ij"), -1).view(-1, 2)
        return images, views, pairs.to(self.device)

    @torch.no_grad()
    def forward(self, u: int):
        """Yield the teacher's outputs (on the device) for unit u's (image, view) pairs, batch by batch."""
        images, views, pairs = self._unit_inputs(u)
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
        fp16 = {"dtype": torch.float16, "memory_format": torch.contiguous_format}
        out = {"logits": feats["logits"].to(**fp16)}
        ok = feats["logits"].abs().amax() <= FLOAT16_MAX  # False for NaN too
        for name, shape in self.store.layout.layers.items():
            ok &= feats[name].abs().amax() <= FLOAT16_MAX
            if self.int8:
                q, scale = quantize(feats[name], len(shape))
                out[f"features/{name}"], out[f"scales/{name}"] = q.contiguous(), scale.contiguous()
            else:
                out[f"features/{name}"] = feats[name].to(**fp16)
        return out, ok

    def compute(self, u: int) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
        """Unit u's arrays on the host, ready to write, and the buffer slot holding them (release it after)."""
        slot = self.buffers.acquire()
        rows, ok = 0, []
        try:
            for feats in self.forward(u):
                stored, batch_ok = self._stored(feats)
                n = len(stored["logits"])  # image-views in this batch
                self._to_host(stored, slot, rows, n)
                rows += n
                ok.append(batch_ok)
            if self.copy_stream is not None:
                self.copy_stream.synchronize()  # the last batch's copy: the unit is on the host
            if not bool(torch.stack(ok).all()):  # one host synchronisation per unit
                raise StoreError(f"unit {u}: the teacher's outputs hold NaN, Inf or values beyond float16's "
                                 f"range; nothing was written. Check the teacher's weights and inputs")
        except BaseException:
            self.buffers.release(slot)
            raise
        lo, hi = self.store.layout.unit_range(u)
        arrays = {"images": self.images[lo:hi], "labels": self.labels[lo:hi], "views": self.views[lo:hi]}
        k = self.store.layout.views
        for name, buf in slot.items():
            arrays[name] = buf.view(-1, *buf.shape[2:])[:rows].view(hi - lo, k, *buf.shape[2:]).numpy()
        return arrays, slot

    def _to_host(self, stored: dict[str, torch.Tensor], slot: dict[str, torch.Tensor], row: int, n: int) -> None:
        """Copy one batch (n image-views from flat row `row` of the unit) into the unit's host buffer."""
        if self.copy_stream is None:
            for name, t in stored.items():
                slot[name].view(-1, *slot[name].shape[2:])[row:row + n].copy_(t)
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream())  # the batch is computed before it is copied
        with torch.cuda.stream(self.copy_stream):
            for name, t in stored.items():
                slot[name].view(-1, *slot[name].shape[2:])[row:row + n].copy_(t, non_blocking=True)
                t.record_stream(self.copy_stream)  # its memory is not reused before the copy has read it

    def _write(self, u: int, arrays: dict[str, np.ndarray], slot: dict[str, torch.Tensor]) -> None:
        try:
            self.store.write_unit(u, arrays, check_finite=False)  # checked on the device in `compute`
        finally:
            self.buffers.release(slot)

    def process(self, u: int) -> list[int]:
        """Compute unit u, queue its write, and report the units whose writes have finished."""
        arrays, slot = self.compute(u)
        self.pending.append((u, self.writer.submit(self._write, u, arrays, slot)))
        return self._finished()

    def where(self) -> str:
        return self.node

    def drain(self) -> list[int]:
        return self._finished(wait=True)

    def _finished(self, wait: bool = False) -> list[int]:
        """Units whose writes are done (all of them with `wait`); a failed write re-raises here."""
        done, still = [], []
        for u, fut in self.pending:
            if wait or fut.done():
                fut.result()
                done.append(u)
            else:
                still.append((u, fut))
        self.pending = still
        return done


def written_for(path: Path, ident: dict) -> bool:
    """True when the store at `path` exists and was written for exactly `ident`."""
    try:
        CacheStore.check_identity(path, ident)
    except StoreError:
        return False
    return True


def run_cache(cfg: Config, out: Path, overwrite: bool = False, log=print) -> dict:
    """Fit both teachers and write both stores; returns a summary per role."""
    import ray
    from infra.ray_cluster import ensure_ray, gpus_available

    out = Path(out)
    ensure_ray(cfg.ray)
    storage.probe(storage_root(out, cfg), f"{storage.node_name()} (the driver)")  # it fits and saves the teachers
    gpus = gpus_available()
    device = "cuda" if gpus else "cpu"
    train = load_split(cfg.data, "train")
    data_fp = fingerprint(train)
    views = sample_views(len(train["labels"]), cfg.cache.views, cfg.data.seed, cfg.cache.crop_scale,
                         cfg.cache.crop_ratio, cfg.cache.flip_prob)
    refs = [ray.put(train["images"]), ray.put(train["labels"]), ray.put(views)]
    summary = {}
    for role in ROLES:
        start = time.time()
        path = store_path(out, cfg, role)
        if storage.exists(path) and not overwrite:  # refuse a store for another config before (re)fitting its teacher
            fresh = build_teacher(cfg, role)
            CacheStore.check_identity(path, identity(cfg, role, fresh, plan(cfg, role, len(train["labels"]), fresh),
                                                     data_fp), ignore=("weights_sha256",))
        info = ensure_teacher(cfg, role, out, device if torch.cuda.is_available() else "cpu")
        teacher = load_fitted(cfg, role, storage_root(out, cfg))
        layout = plan(cfg, role, len(train["labels"]), teacher)
        vit = teacher.spec.kind == "vit"
        ident = identity(cfg, role, teacher, layout, data_fp)
        # --overwrite replaces a store written for another identity; one for this identity is kept and resumed
        store = open_store(cfg, path, layout, ident, provenance(cfg), params=("live_block",) if vit else (),
                           overwrite=overwrite and not written_for(path, ident))
        if vit and store.param_problems("live_block"):  # never written, or a run died while writing it
            store.write_params("live_block", {k: v.numpy() for k, v in teacher.net.blocks[-1].state_dict().items()})
        store.mark_pending(store.bad_units())  # repair: damaged shards are rewritten
        todo = store.pending_units()
        nodes = []
        if todo:
            nodes = _run_units(cfg, role, out, path, todo, refs, gpus, desc=f"cache {role} ({teacher.spec.name})")
        # each unit was checksummed as written and marked done only once durable: nothing is read back
        left = store.pending_units()
        if left:
            raise RuntimeError(f"cache store {path}: units {left} were not written; re-run `hakd cache`")
        store.update_attrs(teacher_accuracy={"clean": info["clean_accuracy"], "head": info["mode"]},
                           complete=True)
        summary[role] = {"store": str(path), "units_written": len(todo), "units": layout.units,
                         "teacher_clean_accuracy": info["clean_accuracy"], "seconds": round(time.time() - start, 1),
                         "nodes": nodes}
    return summary


def _run_units(cfg: Config, role: str, out: Path, path: Path | str, todo: list[int], refs, gpus: int,
               desc: str) -> list[str]:
    """Write the units `todo` from Ray actors; returns the nodes the actors ran on."""
    import ray
    n_workers = max(1, min(cfg.cache.workers, len(todo), gpus or cfg.cache.workers))
    cpus = ray.cluster_resources().get("CPU", 1)
    threads = max(1, int(cpus // n_workers))
    actor_cls = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
                           resources=dict(cfg.cache.actor_resources) or None)(CacheWorker)
    mark = storage.leave_mark(storage_root(out, cfg))
    actors = [actor_cls.remote(cfg.to_dict(), role, str(out), str(path), *refs, "cuda" if gpus else "cpu", threads,
                               mark) for _ in range(n_workers)]
    try:
        nodes = sorted(set(ray.get([a.where.remote() for a in actors])))
    except ray.exceptions.RayActorError as e:
        for a in actors:
            ray.kill(a)
        raise _startup_error(e) from None
    finally:
        storage.delete(mark[0])
    waiting = list(todo)
    inflight = {}
    bar = tqdm(total=len(todo), desc=desc, unit="shard")
    try:
        for a in actors:
            if waiting:
                inflight[a.process.remote(waiting.pop(0))] = a
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            actor = inflight.pop(ready[0])
            bar.update(len(ray.get(ready[0])))
            if waiting:
                inflight[actor.process.remote(waiting.pop(0))] = actor
        for done in ray.get([a.drain.remote() for a in actors]):
            bar.update(len(done))
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)
    return nodes


def _startup_error(e: Exception) -> Exception:
    """The user's one-line error out of an actor that died starting (Ray keeps only its text): a location
    the actor's node cannot use, or a store or teacher it cannot open; anything else as it came."""
    for line in reversed(str(e).splitlines()):
        m = re.match(r"\S*(StorageError|StoreError|FileNotFoundError): (.+)", line.strip())
        if m:
            return (storage.StorageError if m[1] == "StorageError" else StoreError)(m[2])
    return e
