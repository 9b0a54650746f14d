"""bench codecs: what each codec of `cache.codec` does to a store's own arrays.

For every per-sample array of each store (the first `codec_units` shards; `stores=PATH,...` names stores,
e.g. those of a finished `hakd run`, else the bench's own two), every codec with each of Blosc's byte orders
(`lz4:bitshuffle`, `lz4:shuffle`, `lz4:noshuffle`, the same for zstd) is applied chunk by chunk as the store
applies it (the configured level): compression ratio, and encode and decode MB/s of raw bytes, the best of 3.
What the writer processes sustain with a codec, hashing and fsync included, is the cache bench's `writers_mb_s`.
"""
from __future__ import annotations

import timeit

import numpy as np

from infra.bench.common import Context, header, log
from teacher_cache.codecs import SHUFFLES, blosc, parse_codec
from teacher_cache.job import ROLES
from teacher_cache.store import CacheStore

SPECS = tuple(f"{c}:{sh}" for c in ("lz4", "zstd") for sh in SHUFFLES[1:])  # every codec and byte order


def codec_figures(chunks: list[np.ndarray], spec: str, clevel: int) -> dict:
    raw = sum(c.nbytes for c in chunks)
    cname, shuffle = parse_codec(spec)
    b = blosc(cname, shuffle, clevel, chunks[0].dtype.itemsize)
    encoded = [b.encode(c) for c in chunks]
    enc = min(timeit.repeat(lambda: [b.encode(c) for c in chunks], number=1, repeat=3))
    dec = min(timeit.repeat(lambda: [b.decode(e) for e in encoded], number=1, repeat=3))
    return {"ratio": round(raw / sum(len(e) for e in encoded), 4), "encode_mb_s": round(raw / enc / 1e6),
            "decode_mb_s": round(raw / dec / 1e6)}


def store_figures(path, units: int, clevel: int) -> dict:
    store = CacheStore.open(path)
    lay, arrays = store.layout, {}
    hi = lay.unit_range(min(units, lay.units) - 1)[1]
    for name, (_, dtype) in lay.arrays().items():
        data = store.group[name][:hi]
        chunks = [np.ascontiguousarray(data[i:i + lay.chunk_size]) for i in range(0, hi, lay.chunk_size)]
        arrays[name] = {"dtype": dtype, "mb": round(data.nbytes / 1e6, 2),
                        "codecs": {spec: codec_figures(chunks, spec, clevel) for spec in SPECS}}
        best = max(arrays[name]["codecs"].items(), key=lambda kv: kv[1]["ratio"])
        log(f"codecs {store.attrs['identity']['teacher']} {name}: best ratio {best[1]['ratio']} ({best[0]})")
    return {"store": str(path), "samples": hi, "arrays": arrays}


def run(ctx: Context) -> dict:
    p, clevel = ctx.p, ctx.cfg.cache.clevel
    paths = [s for s in p.stores.split(",") if s] or [ctx.filled_store(role).path for role in ROLES]
    stores = {CacheStore.open(s).attrs["identity"]["teacher"]: store_figures(s, p.codec_units, clevel)
              for s in paths}
    return {**header("codecs", p), "stores": stores,
            "params": {"clevel": clevel, "units": p.codec_units, "own_stores": not p.stores}}
