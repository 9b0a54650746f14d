"""bench cache: the cache path's images/s against the bare teacher forward, and where a unit's time goes.

The cache path is the real `CacheWorker` (in this process, no Ray): for each shard-aligned unit,
replay the views, run the teacher, bring the outputs to the host (float16, or int8 + scales) into
shared memory, and hand the unit to a writer process (Zarr shards, checksummed as written, fsynced)
while the next unit is computed. The bare forward is the same loop with the same views, batch and precision,
stopping at the teacher's outputs on the device. "img/s" counts teacher inputs (image-views).

The breakdown is a second, serial pass (one unit at a time, nothing overlapped, written in this
process), in seconds per unit:
  compute    the bare forward of the unit (device synchronised)
  copy       what casting and bringing the outputs to the host adds to it (overlapped on CUDA)
  encode     zarr's chunk encoding (codec + chunk CRC-32C + shard index) of the unit's arrays
  checksum   the XXH3 of each shard file as it is written
  write      writing the shard files and fsyncing them
  verify     what `hakd verify` spends on the unit (the cache path itself re-reads nothing)
With `bare_needs_mb_s` (the stored bytes per second the bare forward would produce), the disk's
own sequential write rate with fsync (`disk_write_mb_s`, a short dd-like write into the store's
folder) and what the worker's writer processes sustain on their own (`writers_img_s`, `writers_mb_s`:
units already in memory, every writer busy, into a scratch store beside the real one; and the same
for 1, 2, 4, ... writers in `writers_scaling`), a shortfall is attributable to the disk, to
encoding, or to the rest of the pipeline, and `cache.writers` can be sized. `store_dir=/dev/shm` puts the
stores in RAM.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from infra.bench.common import ROLES, Context, header, judge, log, median, sig, timed

TARGET = ">= 0.9"
STAGES = ("compute", "copy", "encode", "checksum", "write", "verify")


def bare_unit(worker, u: int) -> None:
    """The teacher forward alone: CacheWorker's own loop without the host copy and the write."""
    for _ in worker.forward(u):
        pass


def disk_write_mb_s(folder: Path, mb: int) -> float:
    """Sequential write rate into `folder` with fsync at the end (like `dd conv=fsync bs=8M`), MB/s."""
    block = os.urandom(8 << 20)
    path = Path(folder) / "disk-probe.bin"
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        written = 0
        while written < mb << 20:
            written += os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    path.unlink()
    return written / seconds / 1e6


def breakdown(ctx: Context, role: str) -> dict[str, float]:
    """Seconds per unit in each stage, from one serial pass over every unit."""
    p, store, w = ctx.p, ctx.store(role), ctx.worker(role)
    units = list(range(store.layout.units))
    spent = dict.fromkeys(STAGES, 0.0)
    for u in units:
        compute = timed(lambda: bare_unit(w, u), p.device)
        out = []
        with_copy = timed(lambda: out.append(w.compute(u)), p.device)  # ends with the host copy complete
        slot, rows = out[0]
        spent["compute"] += compute
        spent["copy"] += max(0.0, with_copy - compute)
        before = dict(store.seconds)
        try:  # as a writer process writes it (checked on the device), here in this process to time its stages
            store.write_unit(u, {k: a[:rows] for k, a in w.slots.arrays[slot].items()}, check_finite=False)
        finally:
            w.slots.release(slot)
        d = {k: store.seconds[k] - before.get(k, 0.0) for k in store.seconds}
        spent["checksum"] += d["checksum"]
        spent["encode"] += d["assign"] - d["checksum"] - d["store_write"]
        spent["write"] += d["store_write"] + d["fsync"]
        spent["verify"] += timed(lambda: store.verify([u]), "cpu")
    return {k: sig(v / len(units)) for k, v in spent.items()}


def writers_alone(ctx: Context, role: str, n: int) -> tuple[float, float]:
    """(image-views/s, stored MB/s) that `n` writer processes sustain with nothing else running: every
    slot holds a computed unit, and units are rewritten into a scratch store of the same layout."""
    from teacher_cache.job import open_store
    from teacher_cache.writers import SharedSlots, WriterPool
    store, w = ctx.store(role), ctx.worker(role)
    lay = store.layout
    scratch = open_store(ctx.cfg, Path(ctx.store_dir) / "scratch" / Path(store.path).name, lay, {"scratch": role},
                         {}, overwrite=True)
    n = min(n, lay.units)  # never two writes of one unit at once
    slots = SharedSlots(lay.unit_spec(), n, pin=False)
    pool = WriterPool(scratch.path, slots, n)
    try:
        slot, _ = w.compute(0)
        for i in range(n):
            for name, a in w.slots.arrays[slot].items():
                np.copyto(slots.arrays[i][name], a)
        w.slots.release(slot)

        def write(units: int) -> None:
            futures = []
            for i in range(units):
                lo, hi = lay.unit_range(i % lay.units)
                futures.append(pool.submit(i % lay.units, slots.acquire(), hi - lo))
            for f in futures:
                pool.result(f)
        write(n)  # starts the processes
        units = max(2 * n, lay.units)
        seconds = timed(lambda: write(units), "cpu")
        per_unit = stored_bytes(scratch.path) / lay.units
    finally:
        pool.close()
        shutil.rmtree(scratch.path, ignore_errors=True)
    return units * lay.shard_size * lay.views / seconds, units * per_unit / seconds / 1e6


def writer_scaling(ctx: Context, role: str) -> dict[str, list[float]]:
    """writers -> [image-views/s, stored MB/s] for 1, 2, 4, ... writer processes up to the worker's own count."""
    top = len(ctx.worker(role).slots.arenas) - 1
    counts = sorted({*(2 ** i for i in range(top.bit_length()) if 2 ** i < top), top})
    return {str(n): [sig(x) for x in writers_alone(ctx, role, n)] for n in counts}


def stored_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def one_teacher(ctx: Context, role: str) -> dict:
    p = ctx.p
    store = ctx.store(role)
    w = ctx.worker(role)
    units = list(range(store.layout.units))
    inputs = store.layout.n * store.layout.views

    def bare():
        for u in units:
            bare_unit(w, u)

    def cache():
        for u in units:
            w.process(u)
        w.drain()

    for _ in range(p.warmup):  # first calls: allocator, cuDNN/oneDNN choices, Blosc and Zarr set-up
        timed(lambda: bare_unit(w, 0), p.device)
        timed(lambda: (w.process(0), w.drain()), p.device)
    t_bare, t_cache = [], []
    for _ in range(p.repeats):  # alternate, so drift hits both alike
        t_bare.append(timed(bare, p.device))
        t_cache.append(timed(cache, p.device))
    stages = breakdown(ctx, role)
    scaling = writer_scaling(ctx, role)
    writers_img_s, writers_mb_s = scaling[max(scaling, key=int)]
    bare_s, cache_s = inputs / median(t_bare), inputs / median(t_cache)
    raw_per_input = sum(store.layout.bytes_per_sample().values()) / store.layout.views
    stored_per_input = stored_bytes(store.path) / inputs
    log(f"cache {w.teacher.spec.name}: bare {bare_s:.0f} img/s, cache {cache_s:.0f} img/s, writers alone "
        f"{writers_img_s:.0f} img/s ({writers_mb_s:.0f} MB/s); s/unit {stages}")
    return {"teacher": w.teacher.spec.name, "bare_forward_img_s": sig(bare_s), "cache_img_s": sig(cache_s),
            "ratio": sig(cache_s / bare_s), "layers": list(store.layout.layers),
            "written_mb_s": sig(cache_s * stored_per_input / 1e6),
            "bare_needs_mb_s": sig(bare_s * stored_per_input / 1e6),
            "writers": len(w.slots.arenas) - 1, "writers_img_s": writers_img_s, "writers_mb_s": writers_mb_s,
            "writers_scaling": scaling,
            "compression_ratio": sig(raw_per_input / stored_per_input),
            "stages_s_per_unit": stages}


def run(ctx: Context) -> dict:
    p = ctx.p
    disk = disk_write_mb_s(ctx.store_dir, p.disk_probe_mb)
    log(f"disk: {disk:.0f} MB/s sequential with fsync into {ctx.store_dir}")
    rows = {}
    for role in ROLES:
        rows[role] = one_teacher(ctx, role)
        if role != "teacher_vit":
            ctx.release(role)  # the store is complete; the ViT teacher stays for `bench train`
    first = rows["teacher_vit"]
    c = ctx.cfg.cache
    line = {**header("cache", p), "teacher": first["teacher"], "bare_forward_img_s": first["bare_forward_img_s"],
            "cache_img_s": first["cache_img_s"], "ratio": first["ratio"], "disk_write_mb_s": sig(disk),
            "teachers": {r["teacher"]: {k: v for k, v in r.items() if k != "teacher"} for r in rows.values()},
            "params": {"images": p.n_images, "views": p.views, "image_size": p.image_size,
                       "batch": p.cache_batch, "shard_size": p.shard_size, "chunk_size": p.chunk_size,
                       "codec": c.codec, "codec_overrides": c.codec_overrides, "clevel": c.clevel,
                       "feature_dtype": c.feature_dtype, "writers": c.writers, "store_dir": p.store_dir or "tmp",
                       "amp_bf16": p.device == "cuda", "repeats": p.repeats,
                       "unit": "teacher inputs (image-views) per second; stages in seconds per unit"}}
    return judge(line, {f"teachers.{r['teacher']}.ratio": TARGET for r in rows.values()})
