"""bench loader: samples/s of the FFCV StudentLoader from the page cache and from the disk, against the student
step and a torch DataLoader over the Zarr store.

Whole epochs of what the trainer consumes (image, label, index, view, the ViT's cached tokens), each batch handed
to the device. `cold`: each epoch after the packed file's pages are dropped (FFCV's map released with MADV_DONTNEED,
then fsync and POSIX_FADV_DONTNEED, no root needed); `resident_before`, by mincore(2), must stay under 5% for
`valid` (gVisor may ignore the advice). `warm`: the epoch after each (`ffcv_samples_s`, against the train bench's
`student_samples_s`). `cold_over_kd_step`: cold MB/s over what the compiled KD step consumes on a GPU (this run's
train bench there, else the newest clean GPU results under --results). `ratio`: warm over a torch DataLoader on
the same rows, batch, workers and order, which reads and decodes a chunk per sample: the cost packing removes."""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path
from statistics import median

import numpy as np
import torch

from infra.bench.common import Context, header, judge, log, sig, timed
from student_train.loader import StudentLoader, view_order


class ZarrRows(torch.utils.data.Dataset):
    """Row image * K + view of a cache store, read on demand (each worker opens its own handles)."""

    def __init__(self, path: str, layer: str, n: int, views: int):
        self.path, self.names, self.n, self.views = path, ("images", "labels", "views", f"features/{layer}"), n, views
        self.arrays = None

    def __len__(self) -> int:
        return self.n * self.views

    def __getitem__(self, row: int) -> dict:
        if self.arrays is None:
            import zarr
            group = zarr.open_group(self.path, mode="r")
            self.arrays = [group[name] for name in self.names]
        images, labels, views, features = self.arrays
        i, v = divmod(int(row), self.views)
        return {"image": torch.from_numpy(images[i]), "label": int(labels[i]), "index": i,
                "view": torch.from_numpy(views[i, v]), "feature": torch.from_numpy(features[i, v])}


def resident(path: Path) -> float:
    """Fraction of the file's pages in the page cache (mincore on a fresh read-only map)."""
    size = os.path.getsize(path)
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        view = np.frombuffer(m, dtype=np.uint8)
        pages = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
        rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), pages)
        del view
    if rc != 0:
        raise OSError(ctypes.get_errno(), f"mincore on {path}")
    return float(np.mean(np.frombuffer(pages, dtype=np.uint8) & 1))


def drop_pages(path: Path, maps=()) -> float:
    """Drop the file's pages from the page cache, releasing `maps` (its np.memmaps) first; the fraction left."""
    for m in maps:
        m._mmap.madvise(mmap.MADV_DONTNEED)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are never dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident(path)


def epoch_rate(loader, key: str, dev: str, epoch: int | None = None) -> float:
    """Samples/s of one whole epoch (of a StudentLoader, set to `epoch`), each batch handed to the device."""
    if epoch is not None:
        loader.set_epoch(epoch)
    seen = [0]

    def one_epoch() -> None:
        for b in loader:
            b["image"].to(dev, non_blocking=True)
            b[key].to(dev, non_blocking=True)
            seen[0] += len(b["image"])
    seconds = timed(one_epoch, dev)
    return seen[0] / seconds


def torch_zarr_rate(ctx: Context) -> float:
    """Samples/s of a torch DataLoader over the ViT store: the median of `repeats` epochs after the first."""
    p, lay = ctx.p, ctx.filled_store("teacher_vit").layout
    rows = ZarrRows(str(ctx.store("teacher_vit").path), next(iter(lay.layers)), lay.n, lay.views)
    ray_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # never fork a process that runs Ray
    dl = torch.utils.data.DataLoader(rows, p.train_batch, sampler=view_order(lay.n, lay.views, 0, 0).tolist(),
                                     num_workers=p.loader_workers, drop_last=True, persistent_workers=True,
                                     multiprocessing_context="spawn" if ray_up else None)
    rates = [epoch_rate(dl, "feature", p.device) for _ in range(1 + p.repeats)]
    return median(rates[1:])


def ffcv_rates(ctx: Context) -> tuple[dict, dict]:
    """Cold and warm epochs of one StudentLoader; the packed file's row and size."""
    p = ctx.p
    beton, meta, field = ctx.packed()
    row_bytes = meta["row_bytes"]
    loader = StudentLoader(beton, meta, [field], p.train_batch, p.loader_workers, seed=0,
                           timeout_s=ctx.cfg.train.loader_timeout_s)
    try:
        epoch_rate(loader, field, p.device, 0)  # numba JIT, FFCV's first epoch
        cold, warm, before = [], [], []
        ffcv_map = getattr(loader.loader.memory_manager, "context", None)  # FFCV's np.memmap of the file
        maps = [ffcv_map.mmap] if getattr(ffcv_map, "mmap", None) is not None else []
        for r in range(p.repeats):
            before.append(drop_pages(beton, maps))
            cold.append(epoch_rate(loader, field, p.device, 1 + 2 * r))
            warm.append(epoch_rate(loader, field, p.device, 2 + 2 * r))
    finally:
        torch.set_num_threads(ctx.threads)  # FFCV set it to its worker count
    figures = {name: {"samples_s": sig(median(runs)), "mb_s": sig(median(runs) * row_bytes / 1e6)}
               for name, runs in (("cold", cold), ("warm", warm))}
    figures["cold"].update(resident_before=sig(max(before)), valid=max(before) < 0.05)
    log(f"loader: cold {figures['cold']}, warm {figures['warm']}")
    return figures, {"row_kib": sig(row_bytes / 1024), "file_mb": sig(os.path.getsize(beton) / 1e6)}


def kd_step_needs(ctx: Context, row_kib: float) -> tuple[float | None, str]:
    """MB/s of rows the compiled KD step consumes on a GPU, and where the figure comes from."""
    if "compiled_kd_samples_s" in ctx.memo:
        return ctx.memo["compiled_kd_samples_s"] * row_kib * 1024 / 1e6, "this run's train bench"
    from infra.bench.table import latest
    found = latest(sorted(Path(ctx.results or ".").glob("*.json")))  # the newest clean line per machine and bench
    for (device, bench), (t, name) in sorted(found.items(), key=lambda kv: kv[1][0]["created"], reverse=True):
        step = bench == "train" and t["profile"] == "gpu" and (t.get("compiled_offline_kd_step_s")
                                                               or t.get("compiled_kd_step_s"))
        row = found.get((device, "loader"), ({},))[0].get("params", {}).get("row_kib")
        if step and row:
            return t["params"]["batch"] / step * row * 1024 / 1e6, name
    return None, f"no GPU results file under {ctx.results} with a clean compiled KD step and loader row size"


def run(ctx: Context) -> dict:
    p = ctx.p
    rates, packed = ffcv_rates(ctx)
    tz = torch_zarr_rate(ctx)
    log(f"loader: torch over zarr {tz:.0f} samples/s")
    ff, st = rates["warm"]["samples_s"], ctx.memo.get("student_samples_s")  # measured by the train bench
    needs, source = kd_step_needs(ctx, packed["row_kib"])
    line = {**header("loader", p), "ffcv_samples_s": ff, "torch_zarr_samples_s": sig(tz), "ratio": sig(ff / tz),
            "student_samples_s": st, "ffcv_over_student": st and sig(ff / st),
            **rates, "kd_step_needs_mb_s": needs and sig(needs), "kd_step_from": source,
            "cold_over_kd_step": needs and sig(rates["cold"]["mb_s"] / needs),
            "params": {"batch": p.train_batch, "workers": p.loader_workers, "images": p.n_images, "views": p.views,
                       "image_size": p.image_size, "epochs": p.repeats, **packed}}
    return judge(line, {"ratio": ">= 3", "ffcv_over_student": ">= 1"})
