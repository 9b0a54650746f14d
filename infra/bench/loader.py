"""bench loader: samples/s of the FFCV StudentLoader against a torch DataLoader over the Zarr store.

Both produce what the trainer consumes (uint8 image, label, index, view, the cached ViT tokens of
that view), with the same batch size, the same number of workers (FFCV threads, DataLoader
processes) and the same per-epoch view order, and both hand each batch to the device. The torch
side reads the store sample by sample, as a map-style Dataset does: every read decodes the chunk
that holds the sample (chunk_size images x K views), which is the cost the packed file removes.
`student_samples_s` is the rate at which the student consumes samples with resident teacher
tensors (bench train): the loader is not the bottleneck while ffcv_samples_s exceeds it.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from infra.bench.common import Context, header, judge, log, median, sig, timed
from student_train.loader import StudentLoader, view_order


class ZarrRows(torch.utils.data.Dataset):
    """Row image * K + view of the store, read on demand (each worker opens its own handles)."""

    def __init__(self, path: str, layer: str, n: int, k: int):
        self.path, self.layer, self.n, self.k = path, layer, n, k
        self.arrays = None

    def __len__(self) -> int:
        return self.n * self.k

    def __getitem__(self, row: int) -> dict:
        if self.arrays is None:
            import zarr
            g = zarr.open_group(self.path, mode="r")
            self.arrays = {name: g[name] for name in ("images", "labels", "views", f"features/{self.layer}")}
        i, v = divmod(int(row), self.k)
        a = self.arrays
        return {"image": torch.from_numpy(a["images"][i]), "label": int(a["labels"][i]), "index": i,
                "view": torch.from_numpy(a["views"][i, v]),
                "feature": torch.from_numpy(a[f"features/{self.layer}"][i, v])}


def _measure(batches, feature_key: str, p, per_repeat: int, ahead: int) -> float:
    """Median samples/s over `repeats` consecutive runs of `per_repeat` batches.

    Untimed first: `loader_warmup` batches plus the `ahead` batches a loader can hold ready, so the
    timed runs see its steady rate, not a queue filled while it was warming up.
    """
    dev = p.device

    def take(count: int) -> None:
        for _ in range(count):
            b = next(batches)
            b["image"].to(dev, non_blocking=True)
            b[feature_key].to(dev, non_blocking=True)

    take(p.loader_warmup + ahead)  # FFCV: numba JIT and the first epoch's start; torch: worker start-up
    return median([per_repeat * p.train_batch / timed(lambda: take(per_repeat), dev) for _ in range(p.repeats)])


def ffcv_samples_s(ctx: Context) -> float:
    from infra.bench.train import epochs_of
    p = ctx.p
    beton, meta, field = ctx.packed()
    loader = StudentLoader(beton, meta, [field], p.train_batch, p.loader_workers, seed=0,
                           timeout_s=ctx.cfg.train.loader_timeout_s)
    batches = epochs_of(loader)
    try:
        return _measure(batches, field, p, p.loader_batches, ahead=loader.loader.batches_ahead + 2)
    finally:
        batches.close()
        torch.set_num_threads(ctx.threads)  # FFCV set it to its worker count


def torch_zarr_samples_s(ctx: Context) -> float:
    p = ctx.p
    store = ctx.filled_store("teacher_vit")
    lay = store.layout
    layer = next(iter(lay.layers))
    needed = (p.loader_warmup + 3 * p.loader_workers + 1 + p.repeats * p.zarr_batches + 1) * p.train_batch
    epochs = -(-needed // lay.n)
    order = np.concatenate([view_order(lay.n, lay.views, 0, e) for e in range(epochs)]).astype(np.int64).tolist()
    # fork is the default, but never fork a process that runs Ray (its threads do not survive a fork)
    ray_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    dl = torch.utils.data.DataLoader(ZarrRows(str(store.path), layer, lay.n, lay.views), batch_size=p.train_batch,
                                     sampler=order, num_workers=p.loader_workers, drop_last=True,
                                     multiprocessing_context="spawn" if ray_up else None)
    it = iter(dl)
    try:
        return _measure(it, "feature", p, p.zarr_batches, ahead=(dl.prefetch_factor or 2) * p.loader_workers + 1)
    finally:
        del it


def student_rate(ctx: Context) -> float:
    if "student_samples_s" not in ctx.memo:  # `bench loader` alone: measure the resident KD step here
        from infra.bench.train import resident_rate
        ctx.memo["student_samples_s"] = resident_rate(ctx)
    return ctx.memo["student_samples_s"]


def run(ctx: Context) -> dict:
    p = ctx.p
    ff = ffcv_samples_s(ctx)
    log(f"loader: ffcv {ff:.0f} samples/s")
    tz = torch_zarr_samples_s(ctx)
    log(f"loader: torch over zarr {tz:.0f} samples/s")
    st = student_rate(ctx)
    store = ctx.filled_store("teacher_vit")
    row = store.layout.bytes_per_sample()
    layer = next(iter(store.layout.layers))
    line = {**header("loader", p), "ffcv_samples_s": sig(ff), "torch_zarr_samples_s": sig(tz), "ratio": sig(ff / tz),
            "student_samples_s": sig(st), "ffcv_over_student": sig(ff / st),
            "params": {"batch": p.train_batch, "workers": p.loader_workers, "images": p.n_images, "views": p.views,
                       "image_size": p.image_size, "feature": f"teacher_vit features/{layer}",
                       "row_kib": sig((row["images"] + row[f"features/{layer}"] / p.views) / 1024),
                       "zarr_chunk": f"{p.chunk_size} images x {p.views} views",
                       "repeats": p.repeats, "ffcv_batches_per_repeat": p.loader_batches,
                       "zarr_batches_per_repeat": p.zarr_batches}}
    return judge(line, {"ratio": ">= 3", "ffcv_over_student": ">= 1"})
