"""The cache format: one Zarr v3 group per (dataset, teacher), written shard by shard.

Layout of `OUT/cache/<teacher>.zarr` (N images, K views, C classes):
  images        (N, S, S, 3) uint8     the stored images the views are cut from
  labels        (N,)         int64
  views         (N, K, 5)    float32   (y0, x0, h, w, flip) per view, see views.py
  logits        (N, K, C)    float16
  features/<l>  (N, K, ...)  float16   one array per cached layer
  live_block/<p>             float32   ViT only: weights of the block the trainer runs live
  units/done    (U,)         uint8     1 once unit u is durably written (one chunk per unit)
  units/crc32   (U, A)       int64     crc32 of each array's bytes in unit u, recorded at write time
A unit is one shard along N: the unit of work, of writing (one writer per shard, as zarr requires)
and of repair. Group attributes hold the identity (what must match for the store to be reused)
and the provenance (versions, commit, config).
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from infra.errors import UserError

FORMAT = "hakd-cache/1"


class StoreError(UserError, RuntimeError):
    """A store that cannot be used as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Layout:
    n: int
    views: int
    image_size: int
    num_classes: int
    layers: dict[str, tuple[int, ...]]   # per-view feature shape of each cached layer
    shard_size: int
    chunk_size: int

    @property
    def units(self) -> int:
        return -(-self.n // self.shard_size)

    def unit_range(self, u: int) -> tuple[int, int]:
        return u * self.shard_size, min(self.n, (u + 1) * self.shard_size)

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype) of every per-sample array, in checksum-column order."""
        s, k = self.image_size, self.views
        out = {"images": ((self.n, s, s, 3), "uint8"), "labels": ((self.n,), "int64"),
               "views": ((self.n, k, 5), "float32"), "logits": ((self.n, k, self.num_classes), "float16")}
        for name, shape in self.layers.items():
            out[f"features/{name}"] = ((self.n, k, *shape), "float16")
        return out

    def bytes_per_sample(self) -> dict[str, int]:
        return {name: int(np.prod(shape[1:])) * np.dtype(dt).itemsize for name, (shape, dt) in self.arrays().items()}


def crc32(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).tobytes())


class CacheStore:
    """Create, open, write and verify one teacher's cache group."""

    def __init__(self, path: Path, group: zarr.Group, layout: Layout):
        self.path, self.group, self.layout = Path(path), group, layout
        self.names = list(layout.arrays())

    # ------------------------------------------------------------------ opening
    @classmethod
    def create_or_open(cls, path: str | Path, layout: Layout, identity: dict, provenance: dict,
                       clevel: int = 3, overwrite: bool = False) -> "CacheStore":
        """Open the store at `path` if it was written for the same identity, else create it.

        A store for another identity is refused (never mixed) unless `overwrite`.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            return cls.check_identity(path, identity)
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        compressor = BloscCodec(cname="zstd", clevel=clevel, shuffle="bitshuffle")
        for name, (shape, dtype) in layout.arrays().items():
            chunks = (layout.chunk_size, *shape[1:])
            shards = (layout.shard_size, *shape[1:])
            group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                               compressors=compressor, fill_value=0)
        group.create_array("units/done", shape=(layout.units,), dtype="uint8", chunks=(1,), fill_value=0)
        group.create_array("units/crc32", shape=(layout.units, len(layout.arrays())), dtype="int64",
                           chunks=(1, len(layout.arrays())), fill_value=-1)
        group.attrs.update({"format": FORMAT, "identity": _jsonable(identity), "layout": _layout_json(layout),
                            "provenance": _jsonable(provenance)})
        return cls(path, group, layout)

    @classmethod
    def check_identity(cls, path: str | Path, identity: dict, ignore: tuple[str, ...] = ()) -> "CacheStore":
        """Open the store at `path` if its identity (less the keys in `ignore`) is `identity`, else refuse."""
        store = cls.open(path)
        old = {k: v for k, v in store.group.attrs.get("identity", {}).items() if k not in ignore}
        new = {k: v for k, v in _jsonable(identity).items() if k not in ignore}
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise StoreError(
                f"cache store {path} was written for a different {', '.join(diff)} than this config asks for; "
                f"it is left untouched. Use another --out, or re-run with --overwrite to replace it.")
        return store

    @classmethod
    def open(cls, path: str | Path) -> "CacheStore":
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path} is not a hakd cache store (no zarr.json); run `hakd cache` to write one")
        try:
            group = zarr.open_group(str(path), mode="r+", zarr_format=3)
            attrs = dict(group.attrs)
        except Exception as e:  # unreadable metadata: say so instead of a zarr traceback
            raise StoreError(f"cannot read cache store {path}: {e}; delete it and re-run `hakd cache`") from None
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{path} is not a {FORMAT} store (format {attrs.get('format')!r}); re-run `hakd cache`")
        lj = attrs["layout"]
        layout = Layout(lj["n"], lj["views"], lj["image_size"], lj["num_classes"],
                        {k: tuple(v) for k, v in lj["layers"].items()}, lj["shard_size"], lj["chunk_size"])
        return cls(path, group, layout)

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    # ------------------------------------------------------------------ writing
    def done_units(self) -> np.ndarray:
        return self.group["units/done"][:].astype(bool)

    def pending_units(self) -> list[int]:
        return [int(u) for u in np.flatnonzero(~self.done_units())]

    def write_unit(self, u: int, arrays: dict[str, np.ndarray]) -> None:
        """Write every array of unit u, make it durable, then (and only then) mark it done."""
        lo, hi = self.layout.unit_range(u)
        datas = {}  # read and checked before anything on disk changes
        for name in self.names:
            shape, dtype = self.layout.arrays()[name]
            data = np.asarray(arrays[name]).astype(dtype, copy=False)
            if data.shape != (hi - lo, *shape[1:]):
                raise StoreError(f"unit {u}: array {name} has shape {data.shape}, expected {(hi - lo, *shape[1:])}")
            datas[name] = data
        self.group["units/done"][u] = 0
        self._remove_unit(u)  # zarr reads an existing shard before rewriting it: a damaged one would block repair
        crcs = []
        for name in self.names:
            self.group[name][lo:hi] = datas[name]
            crcs.append(crc32(datas[name]))
        self._fsync_unit(u, self.names)
        self.group["units/crc32"][u] = np.array(crcs, dtype=np.int64)
        self.group["units/done"][u] = 1
        self._fsync_unit(u, ["units/crc32", "units/done"])

    def _remove_unit(self, u: int) -> None:
        for name in self.names:
            shard = self.path / name / "c" / str(u)  # the one shard of unit u (shards span all other axes)
            if shard.is_dir():
                shutil.rmtree(shard)
            elif shard.exists():
                shard.unlink()

    def _fsync_unit(self, u: int, arrays: list[str]) -> None:
        """fsync the files of unit u in the given arrays (only those: cost stays per unit)."""
        for name in arrays:
            chunk = self.path / name / "c" / str(u)
            for f in (chunk.rglob("*") if chunk.is_dir() else [chunk]):
                if f.is_file():
                    fd = os.open(f, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)

    def write_params(self, prefix: str, state: dict[str, np.ndarray]) -> None:
        for k, v in state.items():
            self.group.create_array(f"{prefix}/{k}", data=np.asarray(v, dtype=np.float32), overwrite=True)

    def read_params(self, prefix: str) -> dict[str, np.ndarray]:
        if prefix not in self.group:
            raise StoreError(f"cache store {self.path} has no {prefix}/ group; re-run `hakd cache --overwrite`")
        g = self.group[prefix]
        return {k: g[k][...] for k in g.array_keys()}

    def update_attrs(self, **kw) -> None:
        self.group.attrs.update(_jsonable(kw))

    # ------------------------------------------------------------------ checking
    def verify(self, units: list[int] | None = None) -> list[str]:
        """Problems found (empty = healthy): incomplete units, shape/dtype drift, NaN/Inf, checksum mismatch."""
        problems = []
        for name, (shape, dtype) in self.layout.arrays().items():
            if name not in self.group:
                problems.append(f"array {name} is missing")
                continue
            a = self.group[name]
            if tuple(a.shape) != shape or str(a.dtype) != dtype:
                problems.append(f"array {name} is {a.dtype}{tuple(a.shape)}, expected {dtype}{shape}")
        if problems:
            return problems
        done = self.done_units()
        crc = self.group["units/crc32"][:]
        for u in (range(self.layout.units) if units is None else units):
            lo, hi = self.layout.unit_range(u)
            if not done[u]:
                problems.append(f"unit {u} (samples {lo}:{hi}) is incomplete")
                continue
            for j, name in enumerate(self.names):
                try:
                    data = self.group[name][lo:hi]
                except Exception as e:
                    problems.append(f"unit {u} array {name}: unreadable ({type(e).__name__}: {e})")
                    continue
                if data.dtype.kind == "f" and not np.isfinite(data).all():
                    problems.append(f"unit {u} array {name}: NaN or Inf values")
                if crc32(data) != crc[u, j]:
                    problems.append(f"unit {u} array {name}: checksum mismatch (shard damaged)")
        return problems

    def bad_units(self) -> list[int]:
        """Units that fail verification (to be marked pending and rewritten)."""
        return sorted({int(p.split()[1]) for p in self.verify() if p.startswith("unit ")})

    def mark_pending(self, units: list[int]) -> None:
        for u in units:
            self.group["units/done"][u] = 0


def _layout_json(layout: Layout) -> dict:
    return {"n": layout.n, "views": layout.views, "image_size": layout.image_size,
            "num_classes": layout.num_classes, "layers": {k: list(v) for k, v in layout.layers.items()},
            "shard_size": layout.shard_size, "chunk_size": layout.chunk_size}


def _jsonable(d):
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
