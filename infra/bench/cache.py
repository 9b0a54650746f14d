"""bench cache: the cache path's images/s against the bare teacher forward, and where a unit's time goes.

The cache path is the real `CacheWorker` (in this process, no Ray): for each shard-aligned unit,
replay the views, run the teacher, bring the outputs to the host (float16, or int8 + scales) into
shared memory, and hand the unit to a writer process (Zarr shards, checksummed as written, fsynced)
while the next unit is computed. The bare forward is the same loop with the same views, batch and precision,
stopping at the teacher's outputs on the device. "img/s" counts teacher inputs (image-views).

The stores are the bench's own (removed when it has measured them): `cache_images` images, the
context's generated images repeated in order with freshly sampled views, so the cache bench can run over
many more units than the store the train and loader benches read (which `Context` fills itself, from
`n_images`); a repeated image costs the teacher and the writers what a new one would.

Two rates of each path. `ratio` (cache_img_s / bare_forward_img_s) times one run over every unit and so
includes the pipeline's fill and the last units' encode and write; a real job, with hundreds of units
per actor, pays those once. `steady_ratio` is the marginal rate, the one judged: each path is timed over
the first half of the units and over all of them (each run ends drained, so no unit is ever written by
two writers at once), and steady img/s = (inputs(all) - inputs(half)) / (t(all) - t(half)), the median
of that difference over `cache_repeats` repeats. Where the disk cannot take the bytes the bare forward
would produce (`bare_needs_mb_s` > `disk_write_mb_s`, `bound: "disk"`), the judged figure is
`steady_over_disk` (steady_written_mb_s / disk_write_mb_s) instead (`bound: "compute"` otherwise).

The breakdown is a second, serial pass over the first `breakdown_units` units (one unit at a time,
nothing overlapped, written in this process), in seconds per unit:
  compute    the bare forward of the unit (device synchronised)
  copy       what casting and bringing the outputs to the host adds to it (overlapped on CUDA)
  encode     encoding the unit's shard files (codec + chunk CRC-32C + shard index, teacher_cache/shards.py)
  checksum   the XXH3 of each shard file as it is written
  write      writing the shard files and fsyncing them
  verify     what `hakd verify` spends on the unit (the cache path itself re-reads nothing)
With `bare_needs_mb_s` (the stored bytes per second the bare forward would produce), the disk's
own sequential write rate with fsync (`disk_write_mb_s`, a short dd-like write into the store's
folder; `disk_parallel_write_mb_s`: the same bytes as `disk_streams` files written at once, as writer
processes write) and what the worker's writer processes sustain on their own (`writers_img_s`, `writers_mb_s`:
max(2n, 8) units already in memory, every writer busy, into a scratch store beside the real one; and the same
for 1, 2, 4, ... writers in `writers_scaling`), a shortfall is attributable to the disk, to
encoding, or to the rest of the pipeline, and `cache.writers` can be sized. `store_dir=/dev/shm` puts the
stores in RAM.
"""
from __future__ import annotations

import gc
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from infra.bench.common import ROLES, Context, header, judge, log, median, sig, timed
from infra.bench.profiles import cores
from teacher_cache.shards import write_file

TARGET = ">= 0.9"
STAGES = ("compute", "copy", "encode", "checksum", "write", "verify")


def bare_unit(worker, u: int) -> None:
    """The teacher forward alone: CacheWorker's own loop without the host copy and the write."""
    for _ in worker.forward(u):
        pass


def disk_write_mb_s(folder: Path, mb: int, streams: int = 1) -> float:
    """Write rate into `folder` of `streams` files written at once (threads: os.write releases the GIL),
    `mb` MB in all, each fsynced at its end (one stream: like `dd conv=fsync bs=8M`), MB/s. Each file is
    written as a writer process writes a shard (teacher_cache/shards.py: write_file). Several streams are
    how the writer processes write: whether the disk takes them as fast as one is the disk's."""
    block = os.urandom(8 << 20)
    blocks = max(1, (mb << 20) // streams // len(block))

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(lambda i: write_file(str(Path(folder) / f"disk-probe-{i}.bin"), [block] * blocks),
                      range(streams)))
    seconds = time.perf_counter() - start
    written = streams * blocks * len(block)
    for i in range(streams):
        (Path(folder) / f"disk-probe-{i}.bin").unlink()
    return written / seconds / 1e6


def bench_store(ctx: Context, role: str):
    """The cache bench's own store of `role` (cache_images images: the context's images repeated, fresh
    views) and a CacheWorker over it, as `hakd cache` creates them."""
    from infra.provenance import provenance
    from teacher_cache.job import identity, open_store, plan
    from teacher_cache.views import sample_views
    from teacher_cache.worker import CacheWorker
    p, c, d = ctx.p, ctx.cfg.cache, ctx.data()
    n = p.cache_images or p.n_images
    t = ctx.teacher(role)  # calibrated and saved where the worker loads it
    images = np.resize(d["images"], (n, *d["images"].shape[1:]))  # whole images, repeated in order
    labels = np.resize(d["labels"], n)
    views = sample_views(n, c.views, ctx.cfg.data.seed, c.crop_scale, c.crop_ratio, c.flip_prob)
    layout = plan(ctx.cfg, role, n, t)
    path = Path(ctx.store_dir) / "cache-bench" / f"{t.spec.name}.zarr"
    store = open_store(ctx.cfg, path, layout, identity(ctx.cfg, role, t, layout, f"{d['fingerprint']} repeated to {n}"),
                       provenance(ctx.cfg), overwrite=True)
    return store, CacheWorker(ctx.cfg.to_dict(), role, str(ctx.out), str(path), images, labels, views, p.device,
                              ctx.threads)


def breakdown(p, store, w) -> dict[str, float]:
    """Seconds per unit in each stage, from one serial pass over the first `breakdown_units` units."""
    units = list(range(min(p.breakdown_units, store.layout.units)))
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
        for stage in ("encode", "checksum", "write"):
            spent[stage] += d[stage]
        spent["verify"] += timed(lambda: store.verify([u]), "cpu")
    return {k: sig(v / len(units)) for k, v in spent.items()}


def writers_alone(ctx: Context, store, w, n: int) -> tuple[float, float]:
    """(image-views/s, stored MB/s) that `n` writer processes sustain with nothing else running: every
    slot holds a computed unit, and max(2n, 8) units are rewritten into a scratch store of the same layout."""
    from teacher_cache.job import open_store
    from teacher_cache.writers import SharedSlots, WriterPool
    lay = store.layout
    name = Path(store.path).name
    scratch = open_store(ctx.cfg, Path(ctx.store_dir) / "scratch" / name, lay, {"scratch": name}, {}, overwrite=True)
    n = min(n, lay.units)
    slots = SharedSlots(lay.unit_spec(), n, pin=False)
    pool = WriterPool(scratch.path, slots, n)
    try:
        slot, _ = w.compute(0)
        for i in range(n):
            for key, a in w.slots.arrays[slot].items():
                np.copyto(slots.arrays[i][key], a)
        w.slots.release(slot)

        def rows(u: int) -> int:
            lo, hi = lay.unit_range(u)
            return hi - lo

        def write(count: int) -> None:
            for start in range(0, count, lay.units):  # rounds of distinct units: never two writes of one unit at once
                futures = [pool.submit(u, slots.acquire(), rows(u)) for u in range(min(lay.units, count - start))]
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


def writer_scaling(ctx: Context, store, w) -> dict[str, list[float]]:
    """writers -> [image-views/s, stored MB/s] for 1, 2, 4, ... writer processes up to the worker's own count."""
    top = len(w.slots.arenas) - 1
    counts = sorted({*(2 ** i for i in range(top.bit_length()) if 2 ** i < top), top})
    return {str(n): [sig(x) for x in writers_alone(ctx, store, w, n)] for n in counts}


def stored_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def rate(inputs: int, seconds: float) -> float | None:
    """inputs / seconds; None where a difference of timings is not positive (noise larger than the signal)."""
    return sig(inputs / seconds) if seconds > 0 else None


def plausible(steady_cache: float | None, steady_bare: float | None) -> bool:
    """Whether marginal rates can be true: the cache path runs the same forward and more, so a steady rate well
    above the bare one means the half run held a cost the whole run did not (writer start-up once did, on the
    H200: 157,600 img/s against 8,408), and the marginal method measured nothing. 25% for noise: where the
    writers keep up, the two rates are equal, and a marginal rate over a unit or two on a CPU moves by 10-15%."""
    return bool(steady_cache and steady_bare and steady_cache <= 1.25 * steady_bare)


def one_teacher(ctx: Context, role: str, disk: float) -> dict:
    store, w = bench_store(ctx, role)
    try:
        return measure(ctx, store, w, disk)
    finally:  # the store is the bench's alone: its writers and its bytes go now
        w.close()
        shutil.rmtree(store.path, ignore_errors=True)


def measure(ctx: Context, store, w, disk: float) -> dict:
    p, lay = ctx.p, store.layout
    units = list(range(lay.units))
    half = units[:len(units) // 2]

    def inputs(us: list[int]) -> int:
        return sum(hi - lo for lo, hi in map(lay.unit_range, us)) * lay.views

    def bare(us: list[int]) -> None:
        for u in us:
            bare_unit(w, u)

    def cache(us: list[int]) -> None:  # every timed run ends drained: a unit is never written twice at once
        for u in us:
            w.process(u)
        w.drain()

    for _ in range(p.warmup):  # first calls: allocator, cuDNN/oneDNN choices, Blosc and Zarr set-up
        timed(lambda: bare_unit(w, 0), p.device)
        timed(lambda: cache([0]), p.device)
    seconds = {(path, part): [] for path in ("bare", "cache") for part in ("half", "all")}
    for _ in range(p.cache_repeats or p.repeats):  # alternate, so drift hits both alike
        for path, fn in (("bare", bare), ("cache", cache)):
            for part, us in (("half", half), ("all", units)):
                seconds[path, part].append(timed(lambda: fn(us), p.device))
    whole = {path: inputs(units) / median(seconds[path, "all"]) for path in ("bare", "cache")}
    steady = {path: rate(inputs(units) - inputs(half),  # the marginal rate: fill and tail cancel
                         median(a - h for a, h in zip(seconds[path, "all"], seconds[path, "half"])))
              for path in ("bare", "cache")}
    steady_valid = plausible(steady["cache"], steady["bare"])
    if not steady_valid:
        log(f"cache: the steady-state rates ({steady}) are not plausible (the cache path above the bare forward, or a "
            f"run over all units no longer than over half); not judged")
    stages = breakdown(p, store, w)
    scaling = writer_scaling(ctx, store, w)
    writers_img_s, writers_mb_s = scaling[max(scaling, key=int)]
    raw_per_input = sum(lay.bytes_per_sample().values()) / lay.views
    mb_per_input = stored_bytes(store.path) / inputs(units) / 1e6
    bare_needs = whole["bare"] * mb_per_input
    steady_mb = steady["cache"] and steady["cache"] * mb_per_input
    fig = {"teacher": w.teacher.spec.name, "bare_forward_img_s": sig(whole["bare"]), "cache_img_s": sig(whole["cache"]),
           "ratio": sig(whole["cache"] / whole["bare"]),
           "steady_bare_img_s": steady["bare"], "steady_cache_img_s": steady["cache"],
           "steady_ratio": sig(steady["cache"] / steady["bare"]) if steady["cache"] and steady["bare"] else None,
           "steady_written_mb_s": steady_mb and sig(steady_mb),
           "steady_over_disk": steady_mb and sig(steady_mb / disk),
           "bound": "disk" if bare_needs > disk else "compute", "steady_valid": steady_valid,
           "layers": list(lay.layers), "units": lay.units,
           "written_mb_s": sig(whole["cache"] * mb_per_input), "bare_needs_mb_s": sig(bare_needs),
           "writers": len(w.slots.arenas) - 1, "writers_img_s": writers_img_s, "writers_mb_s": writers_mb_s,
           "writers_scaling": scaling,
           "compression_ratio": sig(raw_per_input / (mb_per_input * 1e6)),
           "stages_s_per_unit": stages}
    log(f"cache {fig['teacher']} ({lay.units} units): bare {whole['bare']:.0f} img/s, cache {whole['cache']:.0f} "
        f"img/s; steady bare {steady['bare']} img/s, cache {steady['cache']} img/s ({fig['steady_written_mb_s']} "
        f"MB/s, {fig['bound']}-bound); writers alone {writers_img_s:.0f} img/s ({writers_mb_s:.0f} MB/s); "
        f"s/unit {stages}")
    return fig


def run(ctx: Context) -> dict:
    p = ctx.p
    disk = disk_write_mb_s(ctx.store_dir, p.disk_probe_mb)
    streams = max(2, cores() - 1)  # as many as auto writers on a one-GPU node
    disk_parallel = disk_write_mb_s(ctx.store_dir, p.disk_probe_mb, streams)
    log(f"disk: {disk:.0f} MB/s sequential with fsync into {ctx.store_dir}; {disk_parallel:.0f} MB/s as "
        f"{streams} files written at once")
    rows = {}
    for role in ROLES:
        rows[role] = one_teacher(ctx, role, disk)
        gc.collect()  # the bench worker's teacher: its device memory goes back
        if p.device == "cuda":
            import torch
            torch.cuda.empty_cache()
        if role != "teacher_vit":
            ctx.release(role)  # the ViT teacher stays for `bench train`
    first = rows["teacher_vit"]
    c = ctx.cfg.cache
    line = {**header("cache", p), "teacher": first["teacher"], "bare_forward_img_s": first["bare_forward_img_s"],
            "cache_img_s": first["cache_img_s"], "ratio": first["ratio"], "steady_ratio": first["steady_ratio"],
            "disk_write_mb_s": sig(disk), "disk_parallel_write_mb_s": sig(disk_parallel), "disk_streams": streams,
            "teachers": {r["teacher"]: {k: v for k, v in r.items() if k != "teacher"} for r in rows.values()},
            "params": {"images": p.cache_images or p.n_images, "views": p.views, "image_size": p.image_size,
                       "batch": p.cache_batch, "shard_size": p.shard_size, "chunk_size": p.chunk_size,
                       "codec": c.codec, "codec_overrides": c.codec_overrides, "shuffle": c.shuffle, "clevel": c.clevel,
                       "feature_dtype": c.feature_dtype, "writers": c.writers, "store_dir": p.store_dir or "tmp",
                       "amp_bf16": p.device == "cuda", "repeats": p.cache_repeats or p.repeats,
                       "breakdown_units": p.breakdown_units,
                       "unit": "teacher inputs (image-views) per second; stages in seconds per unit"}}
    # judged: the steady-state rate against the bare forward, or against the disk where it cannot take those bytes
    target = {"compute": "steady_ratio", "disk": "steady_over_disk"}
    return judge(line, {f"teachers.{r['teacher']}.{target[r['bound']]}": TARGET for r in rows.values()
                        if r["steady_valid"]})
