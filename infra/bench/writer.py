"""One cache writer's cost per unit: `python -m infra.bench.writer [--codec lz4,none] [--threads 1] [--dir DIR,...]`.

A writer process's work is CPU: encode, checksum, write. This times hakd's `write_unit` (shard files encoded
by teacher_cache/shards.py, XXH3 of each file, written and fsynced) on units shaped like ViT-B/16's at 224 px
(256 images x 2 views of 197x768 float16 tokens, 194 MB raw), in this process, and, for comparison, zarr's
own assignment of the same arrays into a store of the same layout (`array[lo:hi] = data`, every chunk
written, each shard file then fsynced; no file checksum: the cheaper side of the comparison). Wall and CPU seconds per unit
(CPU counts every thread of the process) and MB/s of raw bytes, the median over `--units` units after one
warm-up, for each codec and folder named (default: the temp dir, on disk, and /dev/shm, in RAM). Prints one
JSON line, {"bench": "writer", "runs": [...]}; the features are random normal (lz4 barely compresses them, as
it barely compresses real ViT tokens: ratio 1.11, README). infra/bench/gpu.sh runs it as its `writer` extra.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from infra.provenance import commit, now, versions
from teacher_cache.codecs import GRAMMAR, parse_codec
from teacher_cache.layout import Layout
from teacher_cache.store import CacheStore, shard_key

VIT_B16 = dict(views=2, image_size=224, num_classes=1000, layers={"blocks.10": (197, 768)})


def unit_arrays(lay: Layout, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for name, (shape, dtype) in lay.unit_spec().items():
        if np.dtype(dtype).kind == "f":
            out[name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        else:
            out[name] = rng.integers(0, 100, shape).astype(dtype)
    return out


def per_unit(write, units: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of write(u) over `units` units, after one warm-up write."""
    write(0)
    wall, cpu = [], []
    for u in range(1, units + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        write(u)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def measure(codec: str, threads: int, units: int, directory: str, shard_size: int, chunk_size: int) -> dict:
    lay = Layout(n=(units + 1) * shard_size, shard_size=shard_size, chunk_size=chunk_size, **VIT_B16)
    arrays = unit_arrays(lay, np.random.default_rng(0))
    raw = sum(a.nbytes for a in arrays.values())
    root = Path(tempfile.mkdtemp(prefix="hakd-writer-", dir=directory))
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        ours = CacheStore.create_or_open(root / "hakd.zarr", lay, {"bench": 1}, {}, codec=codec)
        hakd = per_unit(lambda u: ours.write_unit(u, arrays, check_finite=False, pool=pool), units)
        stages = {k: round(v / (units + 1), 4) for k, v in ours.seconds.items()}
        theirs = CacheStore.create_or_open(root / "zarr.zarr", lay, {"bench": 1}, {}, codec=codec)
        handles = {name: theirs.group[name].with_config({"write_empty_chunks": True}) for name in arrays}

        def zarr_write(u: int) -> None:
            lo, hi = lay.unit_range(u)
            for name, a in arrays.items():
                handles[name][lo:hi] = a
            for name in arrays:  # durable, as hakd's files are (the store did this after zarr's assignment)
                fd = os.open(Path(theirs.path, shard_key(name, arrays[name].ndim, u)), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
        zarr = per_unit(zarr_write, units)
    finally:
        if pool:
            pool.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    figures = lambda wall, cpu: {"wall_s": round(wall, 4), "cpu_s": round(cpu, 4), "mb_s": round(raw / wall / 1e6),
                                 "mb_per_cpu_s": round(raw / cpu / 1e6)}
    return {"unit_mb": round(raw / 1e6, 1), "codec": codec, "threads": threads, "dir": directory,
            "shard_size": shard_size, "chunk_size": chunk_size, "units": units,
            "hakd": {**figures(*hakd), "stages_s": stages}, "zarr_assignment": figures(*zarr),
            "cpu_saved": round(1 - hakd[1] / zarr[1], 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.bench.writer", description=__doc__.splitlines()[0])
    ap.add_argument("--codec", default="lz4,none", help=f"comma-separated, each {GRAMMAR}")
    ap.add_argument("--threads", type=int, default=1, help="encoding threads of the writer (cache actors: CPUs per writer)")
    ap.add_argument("--units", type=int, default=4)
    ap.add_argument("--dir", default=f"{tempfile.gettempdir()},/dev/shm", help="comma-separated folders for the "
                    "scratch stores (/dev/shm: RAM)")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=64)
    a = ap.parse_args(argv)
    codecs = a.codec.split(",")
    for c in codecs:
        try:
            parse_codec(c)
        except ValueError as e:
            ap.error(str(e))
    runs = [measure(c, a.threads, a.units, d, a.shard_size, a.chunk_size) for d in a.dir.split(",") for c in codecs]
    print(json.dumps({"bench": "writer", "created": now(), "commit": commit(), "versions": versions(), "runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
