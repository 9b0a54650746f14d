"""Stream (image, view, teacher outputs) batches from the packed FFCV file.

`ViewOrder` decides, each epoch, which of its K cached views every image contributes (seeded,
different per epoch) and shuffles them; with `distributed` each rank takes its own slice of that
order, as torch's DistributedSampler would. `StudentLoader` wraps FFCV's loader so that a dead
loader thread or a stall becomes an exception within a bounded time, never a silent hang, and
hands out torch tensors with float16 features reinterpreted from their int16 bits (coded features,
int8 or PCA codes, and their scales as they are; `teacher_output` decodes them on the device: for
PCA codes one matmul with the basis copied beside the packed file).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from queue import Empty

import numpy as np
import torch

from infra.codec_spec import parse_feature_codec
from student_train.pack import packed_params
from teacher_cache.basis import PARAMS as BASIS, check_basis
from teacher_cache.codecs import token_axis
from teacher_cache.feature_codec import decode_features
from teacher_cache.store import StoreError

_THREAD_ERRORS: dict[int, BaseException] = {}
_previous_hook = threading.excepthook


def _record_thread_error(args):
    # FFCV's loader thread dies with its exception printed and the consumer blocked: remember it
    _THREAD_ERRORS[args.thread.ident] = args.exc_value
    _previous_hook(args)


threading.excepthook = _record_thread_error
_previous_unraisable = sys.unraisablehook


def _quiet_numba_finalizer(args):
    # numba's dispatcher finalizer raises a harmless KeyError at exit for FFCV's compiled stages
    tb = args.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if isinstance(args.exc_value, KeyError) and tb is not None and "numba" in tb.tb_frame.f_code.co_filename:
        return
    _previous_unraisable(args)


sys.unraisablehook = _quiet_numba_finalizer


# importing ffcv sets torch to 1 thread, and its loader sets it to the worker count at every epoch:
# the student's own thread count is restored after each, from what torch chose before ffcv came in
_TORCH_THREADS = torch.get_num_threads() if "ffcv" not in sys.modules else len(os.sched_getaffinity(0))


class LoaderError(RuntimeError):
    """The data loader failed or stalled; the message names the cause."""


def view_order(n_images: int, k: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
               use: int = 0) -> np.ndarray:
    """Row indices (image * k + view) for one epoch: one of the first `use` views per image (0: all k),
    shuffled, this rank's share. View 0 is the plain image, so use=1 trains without augmentation."""
    rng = np.random.default_rng([seed, epoch, 0x71E3])
    rows = np.arange(n_images, dtype=np.int64) * k + rng.integers(0, use or k, n_images)
    rows = rng.permutation(rows)
    if world > 1:  # pad like DistributedSampler so every rank gets the same number of rows
        total = -(-len(rows) // world) * world
        rows = np.concatenate([rows, rows[: total - len(rows)]])
        rows = rows[rank::world]
    return rows.astype(np.uint64)


def _make_order_class():
    from ffcv.traversal_order.base import TraversalOrder

    class ViewOrder(TraversalOrder):
        def __init__(self, loader, n_images: int, k: int, use: int):
            super().__init__(loader)
            self.n_images, self.k, self.use = n_images, k, use
            if self.distributed:
                self.rank = torch.distributed.get_rank()
                self.world = torch.distributed.get_world_size()
            else:
                self.rank, self.world = 0, 1

        def sample_order(self, epoch: int):
            return view_order(self.n_images, self.k, self.seed, epoch, self.rank, self.world, self.use)

    return ViewOrder


class StudentLoader:
    """Iterate one epoch at a time: dicts of tensors (image uint8 NHWC, label, index, view, fields)."""

    def __init__(self, beton: Path, meta: dict, fields: list[str], batch_size: int, workers: int, seed: int,
                 timeout_s: float = 120.0, distributed: bool = False, drop_last: bool = True, shuffle: bool = True,
                 views: int = 0):
        from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToTensor

        # an int8 field comes with the field of its scales
        fields = list(fields) + [meta["fields"][f]["scale"] for f in fields if "scale" in meta["fields"][f]]
        self.meta, self.fields, self.timeout_s = meta, fields, timeout_s
        pipelines = {"image": [NDArrayDecoder(), ToTensor()], "view": [NDArrayDecoder(), ToTensor()],
                     "label": [IntDecoder(), ToTensor(), Squeeze()], "index": [IntDecoder(), ToTensor(), Squeeze()]}
        for f in meta["fields"]:
            pipelines[f] = [NDArrayDecoder(), ToTensor()] if f in fields else None
        self.names = ["image", "label", "index", "view"]  # FFCV returns fields in file order
        self.names += [f for f in meta["fields"] if f in fields]
        self.torch_threads = _TORCH_THREADS
        try:
            self.loader = Loader(str(beton), batch_size=batch_size, num_workers=workers,
                                 order=OrderOption.SEQUENTIAL, pipelines=pipelines, drop_last=drop_last, seed=seed,
                                 distributed=distributed)
        except (ValueError, AssertionError, OSError, IndexError) as e:  # a damaged file: FFCV's errors are cryptic
            raise LoaderError(f"cannot read the packed file {beton} ({type(e).__name__}: {e}); delete it and "
                              f"its data.json so that `hakd train` packs it again") from e
        self.bases = self._bases(Path(beton).parent, fields)
        self._on_device: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        torch.set_num_threads(self.torch_threads)
        if shuffle:
            # FFCV 1.0.2 cannot take a custom order class in its constructor; install ours after
            order = _make_order_class()(self.loader, meta["images"], meta["views"], views)  # views: the first k used
            self.loader.traversal_order = order
            self.loader.first_traversal_order = order.sample_order(0)
        else:  # evaluation: view 0 of every image, in order
            rows = (np.arange(meta["images"], dtype=np.uint64) * meta["views"])
            self.loader.traversal_order.sample_order = lambda epoch: rows
            self.loader.first_traversal_order = rows

    def __len__(self) -> int:
        return len(self.loader)

    def _bases(self, pack_dir: Path, fields: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """field -> (mean, components) of each PCA-coded field asked for, checked before any training."""
        out = {}
        for f in fields:
            info = self.meta["fields"][f]
            if parse_feature_codec(info.get("codec", info["dtype"])).kind != "pca":
                continue
            shape = info["feature_shape"]
            try:
                out[f] = check_basis(packed_params(pack_dir, self.meta, info["role"], BASIS), info["layer"],
                                     shape[len(shape) + token_axis(len(shape))], info["rank"])
            except ValueError as e:
                raise StoreError(f"the packed cache in {pack_dir} does not fit its codes: {e}; delete {pack_dir} "
                                 f"and re-run `hakd train`, which packs it again") from None
        return out

    def teacher_output(self, batch: dict, field: str, device) -> torch.Tensor:
        """A cached teacher output of the batch on `device` as float16. Coded fields move as their codes (int8:
        half the bytes of float16, PCA codes: fewer still) and are decoded there with their per-token scales."""
        x = batch[field].to(device, non_blocking=True)
        info = self.meta["fields"][field]
        codec = parse_feature_codec(info.get("codec", info["dtype"]))
        scale = batch[info["scale"]].to(device, non_blocking=True) if codec.kind != "float16" else None
        key = (field, str(device))
        if codec.kind == "pca" and key not in self._on_device:
            self._on_device[key] = tuple(torch.from_numpy(a).to(device) for a in self.bases[field])
        return decode_features(x, scale, codec, len(info["shape"]), self._on_device.get(key))

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch

    def __iter__(self):
        it = iter(self.loader)
        torch.set_num_threads(self.torch_threads)
        last = time.monotonic()
        try:
            while True:
                try:
                    item = it.output_queue.get(timeout=0.2)
                except Empty:
                    if not it.is_alive():
                        err = _THREAD_ERRORS.pop(it.ident, None)
                        raise LoaderError(f"the FFCV loader thread died: {type(err).__name__}: {err}") from err
                    if time.monotonic() - last > self.timeout_s:
                        raise LoaderError(f"the FFCV loader produced nothing for {self.timeout_s:.0f} s "
                                          f"(train.loader_timeout_s); check the file {self.loader.fname}")
                    continue
                if item is None:
                    return
                slot, result = item
                if hasattr(it, "current_stream"):  # CUDA: wait for the loader's copy stream
                    it.current_stream.wait_stream(it.cuda_streams[slot])
                last = time.monotonic()
                batch = dict(zip(self.names, result))
                for f in self.names[4:]:
                    if self.meta["fields"][f].get("dtype", "float16") == "float16":
                        batch[f] = batch[f].view(torch.float16)
                yield batch
        finally:
            it.close()
