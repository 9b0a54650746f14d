"""Codec figures on a store's real arrays: `python -m infra.bench.codecs STORE [STORE ...]`.

For every per-sample array of each store (up to `--units` shards, decoded once), each codec of
`cache.codec` with each of Blosc's byte orders (`lz4:bitshuffle`, `lz4:shuffle`, `lz4:noshuffle`, the same
for zstd) is applied chunk by chunk as the store applies it (the configured level, one thread):
compression ratio, encode MB/s and decode MB/s of uncompressed bytes. For float16
features it also reports what `cache.feature_dtype: int8` would keep: the cosine similarity of the
dequantised tokens to the float16 ones (mean and minimum over tokens) and the relative error.
Prints one JSON line per store, and a Markdown table with --table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from teacher_cache.codecs import SHUFFLES, blosc, dequantize, parse_codec, quantize, token_axis
from teacher_cache.store import CacheStore


SPECS = ("none", *(f"{c}:{sh}" for c in ("lz4", "zstd") for sh in SHUFFLES[1:]))  # every codec and byte order


def _best_seconds(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def codec_figures(chunks: list[np.ndarray], spec: str, clevel: int) -> dict:
    raw = sum(c.nbytes for c in chunks)
    cname, shuffle = parse_codec(spec)
    if cname == "none":
        return {"ratio": 1.0, "encode_mb_s": None, "decode_mb_s": None}
    b = blosc(cname, shuffle or "bitshuffle", clevel, chunks[0].dtype.itemsize)
    encoded = [b.encode(c) for c in chunks]
    enc = _best_seconds(lambda: [b.encode(c) for c in chunks])
    dec = _best_seconds(lambda: [b.decode(e) for e in encoded])
    return {"ratio": round(raw / sum(len(e) for e in encoded), 4), "encode_mb_s": round(raw / enc / 1e6),
            "decode_mb_s": round(raw / dec / 1e6)}


def int8_figures(x: np.ndarray, view_ndim: int) -> dict:
    t = torch.from_numpy(x.reshape(-1, *x.shape[2:]))  # (image-views, *per-view shape)
    q, scale = quantize(t, view_ndim)
    y = dequantize(q, scale, view_ndim).float()
    t = t.float()
    axis = token_axis(view_ndim)
    live = t.abs().amax(dim=axis) > 0  # an all-zero token is reproduced exactly; cosine is undefined there
    cos = torch.nn.functional.cosine_similarity(y, t, dim=axis)[live]
    rel = float((y - t).norm() / t.norm())
    return {"cosine_mean": round(float(cos.mean()), 6), "cosine_min": round(float(cos.min()), 6),
            "relative_error": round(rel, 5)}


def measure(path: str, units: int, clevel: int) -> dict:
    store = CacheStore.open(path)
    lay = store.layout
    hi = lay.unit_range(min(units, lay.units) - 1)[1]
    out = {"store": str(path), "teacher": store.attrs["identity"]["teacher"], "samples": hi, "arrays": {}}
    torch.set_num_threads(1)
    for name, (shape, dtype) in lay.arrays().items():
        data = store.group[name][:hi]
        chunks = [np.ascontiguousarray(data[i:i + lay.chunk_size]) for i in range(0, hi, lay.chunk_size)]
        row = {"dtype": dtype, "mb": round(data.nbytes / 1e6, 2),
               "codecs": {c: codec_figures(chunks, c, clevel) for c in SPECS}}
        if name.startswith("features/") and dtype == "float16":
            row["int8"] = int8_figures(data, len(shape) - 2)
        out["arrays"][name] = row
    return out


def table(results: list[dict]) -> str:
    def three(a: dict, cname: str, key: str) -> str:
        return " / ".join(f"{a['codecs'][f'{cname}:{sh}'][key]:{'.3f' if key == 'ratio' else ''}}" for sh in SHUFFLES[1:])
    lines = ["| teacher | array | MB | lz4 ratio | lz4 encode MB/s | zstd ratio | zstd encode MB/s | "
             "int8 cosine mean (min) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, a in r["arrays"].items():
            i8 = a.get("int8")
            lines.append(f"| {r['teacher']} | {name} | {a['mb']} | {three(a, 'lz4', 'ratio')} | "
                         f"{three(a, 'lz4', 'encode_mb_s')} | {three(a, 'zstd', 'ratio')} | "
                         f"{three(a, 'zstd', 'encode_mb_s')} | "
                         + (f"{i8['cosine_mean']:.5f} ({i8['cosine_min']:.4f}) |" if i8 else "|"))
    return "\n".join(lines) + "\n\n(each cell: bitshuffle / shuffle / noshuffle)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.bench.codecs", description=__doc__.split("\n")[0])
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--units", type=int, default=4, help="shards read per store (default 4)")
    ap.add_argument("--clevel", type=int, default=3)
    ap.add_argument("--table", action="store_true", help="also print a Markdown table")
    args = ap.parse_args(argv)
    results = [measure(p, args.units, args.clevel) for p in args.stores]
    for r in results:
        print(json.dumps(r))
    if args.table:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
