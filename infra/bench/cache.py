"""bench cache: the cache path's images/s against the bare teacher forward, and what limits it.

The cache path is the real `CacheWorker` (in this process, no Ray): per unit, replay the views, run the teacher,
copy its outputs to shared host memory and hand the unit to a writer process (Zarr shards, checksummed, fsynced)
while the next unit is computed. The bare forward is the same loop stopping at the outputs on the device. img/s
counts image-views over the bench's own stores of `cache_images` images (the context's, repeated, fresh views).

Judged: `steady_ratio`, of the marginal rates (each path timed over half the units and over all: extra inputs /
extra seconds, so fill and tail cancel; the median over `cache_repeats`), or, where the disk cannot take what the
bare forward produces (`bound: "disk"`), `steady_over_disk` (steady_written_mb_s / disk_write_mb_s). Also `ratio`
over one whole run, the disk's fsynced write rate (one stream, and `disk_streams` at once, as the writers write),
and what the writer processes sustain alone on units already in memory (`writers_img_s`, `writers_mb_s`)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median

import numpy as np

from infra.bench.common import Context, free_device_memory, header, judge, log, sig, timed
from infra.bench.profiles import cores
from teacher_cache.job import ROLES
from teacher_cache.shards import write_file

TARGET = ">= 0.9"


def disk_write_mb_s(folder: Path, mb: int, streams: int = 1) -> float:
    """MB/s into `folder` of `streams` files written at once as a writer writes a shard (write_file: written,
    fsynced, renamed), `mb` MB in all (one stream: like `dd conv=fsync bs=8M`)."""
    block = os.urandom(8 << 20)
    blocks = max(1, (mb << 20) // streams // len(block))
    files = [str(Path(folder) / f"disk-probe-{i}.bin") for i in range(streams)]
    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:  # os.write releases the GIL
        list(pool.map(lambda f: write_file(f, [block] * blocks), files))
    seconds = time.perf_counter() - start
    for f in files:
        os.unlink(f)
    return streams * blocks * len(block) / seconds / 1e6


def stored_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def writers_alone(ctx: Context, store, w, n: int) -> tuple[float, float]:
    """(image-views/s, stored MB/s) that `n` writer processes sustain alone: every slot holds a computed unit,
    and max(2n, 8) units are written into a scratch store of the same layout."""
    from teacher_cache.job import open_store
    from teacher_cache.writers import SharedSlots, WriterPool
    lay = store.layout
    scratch = open_store(ctx.cfg, Path(store.path).parent.parent / "scratch" / Path(store.path).name, lay,
                         {"scratch": 1}, {}, overwrite=True)
    n = min(n, lay.units)
    slots = SharedSlots(lay.unit_spec(), n, pin=False)
    pool = WriterPool(scratch.path, slots, n)
    try:
        slot, _ = w.compute(0)
        for i in range(n):
            for key, a in w.slots.arrays[slot].items():
                np.copyto(slots.arrays[i][key], a)
        w.slots.release(slot)
        rows = [hi - lo for lo, hi in map(lay.unit_range, range(lay.units))]

        def write(count: int) -> None:
            for start in range(0, count, lay.units):  # rounds of distinct units: a unit is never written twice at once
                futures = [pool.submit(u, slots.acquire(), rows[u]) for u in range(min(lay.units, count - start))]
                for f in futures:
                    pool.result(f)
        write(n)  # warm-up: each writer's first unit (zarr and Blosc set-up)
        units = max(2 * n, 8)
        seconds = timed(lambda: write(units), "cpu")
        per_unit = stored_bytes(scratch.path) / min(units, lay.units)
    finally:
        pool.close()
        shutil.rmtree(scratch.path, ignore_errors=True)
    return units * lay.shard_size * lay.views / seconds, units * per_unit / seconds / 1e6


def plausible(steady_cache: float | None, steady_bare: float | None) -> bool:
    """Whether marginal rates can be true: the cache path runs the same forward and more, so a steady rate well above
    the bare one means the half run held a cost the whole run did not (once, the writers' start-up: 157,600 img/s
    against 8,408 on the H200). 25% for noise: a marginal rate over a unit or two moves 10-15% on a CPU."""
    return bool(steady_cache and steady_bare and steady_cache <= 1.25 * steady_bare)


def one_teacher(ctx: Context, role: str, folder: Path, disk: float) -> dict:
    """The figures of one teacher over its own bench store in `folder` (removed afterwards)."""
    p, c, d = ctx.p, ctx.cfg.cache, ctx.data()
    from teacher_cache.views import sample_views
    n = p.cache_images or p.n_images
    data = {"images": np.resize(d["images"], (n, *d["images"].shape[1:])), "labels": np.resize(d["labels"], n),
            "views": sample_views(n, c.views, ctx.cfg.data.seed, c.crop_scale, c.crop_ratio, c.flip_prob)}
    store = ctx.new_store(role, folder / "cache-bench" / f"{ctx.teacher(role).spec.name}.zarr", n)
    w = ctx.worker(role, store, data)
    try:
        return measure(ctx, store, w, disk)
    finally:
        w.close()
        shutil.rmtree(store.path, ignore_errors=True)
        free_device_memory(ctx.p.device)


def measure(ctx: Context, store, w, disk: float) -> dict:
    p, lay = ctx.p, store.layout
    units = list(range(lay.units))
    half = units[:len(units) // 2]

    def inputs(us: list[int]) -> int:
        return sum(hi - lo for lo, hi in map(lay.unit_range, us)) * lay.views

    def bare(us: list[int]) -> None:  # the teacher forward alone: the worker's loop without the host copy and write
        for u in us:
            for _ in w.forward(u):
                pass

    def cache(us: list[int]) -> None:
        for u in us:
            w.process(u)
        w.drain()

    bare([0])  # first calls: allocator, cuDNN/oneDNN choices, Blosc and Zarr set-up
    cache([0])
    seconds = {(path, part): [] for path in ("bare", "cache") for part in ("half", "all")}
    for _ in range(p.cache_repeats or p.repeats):  # alternate, so drift hits both alike
        for path, fn in (("bare", bare), ("cache", cache)):
            for part, us in (("half", half), ("all", units)):
                seconds[path, part].append(timed(lambda: fn(us), p.device))
    whole, steady = {}, {}
    for path in ("bare", "cache"):
        whole[path] = inputs(units) / median(seconds[path, "all"])
        extra = median(a - h for a, h in zip(seconds[path, "all"], seconds[path, "half"]))
        steady[path] = sig((inputs(units) - inputs(half)) / extra) if extra > 0 else None  # fill and tail cancel
    valid = plausible(steady["cache"], steady["bare"])
    if not valid:
        log(f"cache: steady-state rates {steady} are not plausible; not judged")
    writers = len(w.slots.arenas) - 1  # the worker's writer processes
    writers_img_s, writers_mb_s = writers_alone(ctx, store, w, writers)
    mb_per_input = stored_bytes(store.path) / inputs(units) / 1e6
    bare_needs = whole["bare"] * mb_per_input
    steady_mb = steady["cache"] and steady["cache"] * mb_per_input
    fig = {"teacher": w.teacher.spec.name, "bare_forward_img_s": sig(whole["bare"]), "cache_img_s": sig(whole["cache"]),
           "ratio": sig(whole["cache"] / whole["bare"]),
           "steady_bare_img_s": steady["bare"], "steady_cache_img_s": steady["cache"],
           "steady_ratio": sig(steady["cache"] / steady["bare"]) if steady["cache"] and steady["bare"] else None,
           "steady_written_mb_s": steady_mb and sig(steady_mb), "steady_over_disk": steady_mb and sig(steady_mb / disk),
           "bound": "disk" if bare_needs > disk else "compute", "steady_valid": valid,
           "layers": list(lay.layers), "units": lay.units,
           "written_mb_s": sig(whole["cache"] * mb_per_input), "bare_needs_mb_s": sig(bare_needs),
           "writers": writers, "writers_img_s": sig(writers_img_s), "writers_mb_s": sig(writers_mb_s),
           "compression_ratio": sig(sum(lay.bytes_per_sample().values()) / lay.views / (mb_per_input * 1e6))}
    log(f"cache {fig['teacher']}: bare {fig['bare_forward_img_s']} img/s, cache {fig['cache_img_s']} img/s; steady "
        f"{steady}, {fig['bound']}-bound; writers alone {fig['writers_mb_s']} MB/s")
    return fig


def run(ctx: Context, store_dir: str = "") -> dict:
    """The cache line; `store_dir` (default: the profile's; e.g. /dev/shm) holds the bench's stores."""
    p, store_dir = ctx.p, store_dir or ctx.p.store_dir
    with tempfile.TemporaryDirectory(prefix="hakd-bench-", dir=store_dir or ctx.dir) as tmp:
        folder = Path(tmp)
        disk = disk_write_mb_s(folder, p.disk_probe_mb)
        streams = max(2, cores() - 1)  # as many as auto writers on a one-GPU node
        parallel = disk_write_mb_s(folder, p.disk_probe_mb, streams)
        log(f"disk: {disk:.0f} MB/s as one fsynced stream into {folder}; {parallel:.0f} MB/s as {streams}")
        rows = [one_teacher(ctx, role, folder, disk) for role in ROLES]
    c = ctx.cfg.cache
    line = {**header("cache", p), "disk_write_mb_s": sig(disk), "disk_parallel_write_mb_s": sig(parallel),
            "disk_streams": streams,
            "teachers": {r["teacher"]: {k: v for k, v in r.items() if k != "teacher"} for r in rows},
            "params": {"images": p.cache_images or p.n_images, "views": p.views, "image_size": p.image_size,
                       "batch": p.cache_batch, "shard_size": p.shard_size, "chunk_size": p.chunk_size,
                       "codec": c.codec, "codec_overrides": c.codec_overrides, "shuffle": c.shuffle, "clevel": c.clevel,
                       "feature_codec": c.feature_codec, "writers": c.writers, "store_dir": store_dir or "tmp",
                       "amp_bf16": p.device == "cuda", "repeats": p.cache_repeats or p.repeats}}
    target = {"compute": "steady_ratio", "disk": "steady_over_disk"}
    return judge(line, {f"teachers.{r['teacher']}.{target[r['bound']]}": TARGET for r in rows
                        if r["steady_valid"]})
