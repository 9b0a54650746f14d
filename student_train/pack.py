"""Pack the teacher caches into one FFCV file that the student loaders stream from.

One row per (image, view): the raw uint8 image, its label and index, the view parameters, and
every cached teacher output for that view. A row per view (rather than a row per image with all
K views) means an epoch reads only the view it trains on: K times fewer feature bytes.
FFCV's numba pipeline cannot decode float16, so features are stored as their int16 bit pattern
and reinterpreted as float16 on the torch side (`loader.py`). Coded features (cache.feature_codec
int8 or pca:...) are packed as their codes beside their float16 scales, so a row shrinks by the
codec's factor, and decoded on the device in the student step; a pca store's basis is copied beside
the file with the other parameter groups.

The file is rebuilt only when a cache changes or the file is damaged: `data.json` beside it records
the identity and per-shard checksums of the stores it was packed from, and the file's own size and
CRC-32C. The stores' parameter groups (the ViT's frozen last block) are copied beside it, checksummed
too, so training reads nothing from the stores. The stores are checked by their recorded file
checksums (disk speed), not by decoding them.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from infra.integrity import file_crc32c
from infra.storage import is_url, write_bytes
from teacher_cache.store import CacheStore, StoreError

FFCV_NAME, META_NAME = "data.beton", "data.json"


def field_name(i: int) -> str:
    return f"f{i}"  # FFCV keeps only 16 characters of a field name: short names, the mapping in data.json


def _source_digest(stores: dict[str, CacheStore]) -> str:
    h = hashlib.sha256()
    for role, s in sorted(stores.items()):
        h.update(role.encode())
        h.update(json.dumps(s.attrs["identity"], sort_keys=True).encode())
        h.update(s.array("units/xxh3")[:].tobytes())
    return h.hexdigest()


class _Rows:
    """Indexable (image, view) rows for FFCV's writer; reads one shard at a time per process."""

    def __init__(self, paths: dict[str, str], arrays: dict[str, list[str]]):
        self.paths, self.arrays = paths, arrays
        first = CacheStore.open(next(iter(paths.values())))
        self.k, self.n, self.shard = first.layout.views, first.layout.n, first.layout.shard_size
        self._stores, self._cached_unit, self._cache = None, -1, {}

    def __len__(self):
        return self.n * self.k

    def _load(self, unit: int):
        if self._stores is None:  # opened lazily: each writer process has its own handles
            self._stores = {r: CacheStore.open(p) for r, p in self.paths.items()}
        lo, hi = unit * self.shard, min(self.n, (unit + 1) * self.shard)
        base = next(iter(self._stores.values())).group
        self._cache = {"images": base["images"][lo:hi], "labels": base["labels"][lo:hi],
                       "views": base["views"][lo:hi]}
        for role, names in self.arrays.items():
            g = self._stores[role].group
            for a in names:
                data = g[a][lo:hi]
                self._cache[(role, a)] = data.view(np.int16) if data.dtype == np.float16 else data
        self._cached_unit, self._lo = unit, lo

    def __getitem__(self, row: int):
        i, k = divmod(int(row), self.k)
        unit = i // self.shard
        if unit != self._cached_unit:
            self._load(unit)
        j = i - self._lo
        c = self._cache
        out = [c["images"][j], int(c["labels"][j]), i, c["views"][j, k]]
        out += [c[(role, a)][j, k] for role, names in self.arrays.items() for a in names]
        return tuple(out)


def _whole_pack(out_dir: Path, digest: str) -> dict | None:
    """The recorded meta when out_dir holds a file packed from stores of this digest, of the recorded size and CRC."""
    beton, meta_path = Path(out_dir) / FFCV_NAME, Path(out_dir) / META_NAME
    if not (beton.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        return None
    if meta.get("source_digest") != digest or meta.get("beton_bytes") != beton.stat().st_size or "params" not in meta:
        return None
    if not all(_copy_whole(out_dir, entry) for entry in meta["params"].values()):
        return None
    return meta if meta.get("beton_crc32c") == file_crc32c(beton) else None


def _copy_whole(out_dir: Path, entry: dict) -> bool:
    """A parameter file beside the packed one is there with its recorded CRC-32C."""
    f = Path(out_dir) / entry["file"]
    return f.is_file() and file_crc32c(f) == entry["crc32c"]


def _write_params(opened: dict[str, CacheStore], out_dir: Path) -> dict[str, dict]:
    """Copy each store's parameter groups (the ViT's live_block/) beside the packed file, so that training
    reads nothing from the stores, which may be remote or gone; returns "role/prefix" -> file and CRC-32C."""
    out = {}
    for role, store in opened.items():
        for prefix in store.attrs.get("params", {}):
            name = f"params-{role}-{prefix}.npz"
            tmp = Path(out_dir) / (name + ".tmp")
            with open(tmp, "wb") as f:
                np.savez(f, **store.read_params(prefix))
            os.replace(tmp, Path(out_dir) / name)
            out[f"{role}/{prefix}"] = {"file": name, "crc32c": file_crc32c(Path(out_dir) / name)}
    return out


def packed_params(out_dir: Path, meta: dict, role: str, prefix: str) -> dict[str, np.ndarray]:
    """A parameter group as `pack` copied it beside the packed file (checked against its recorded CRC-32C)."""
    entry = meta.get("params", {}).get(f"{role}/{prefix}")
    if entry is None or not _copy_whole(out_dir, entry):
        raise StoreError(f"the packed cache in {out_dir} has no whole copy of {role}'s {prefix}/ weights; delete "
                         f"{out_dir} and re-run `hakd train`, which packs it again")
    with np.load(Path(out_dir) / entry["file"], allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def packed_file(stores: dict[str, str | Path], out_dir: Path) -> dict | None:
    """The meta of out_dir's packed file if it is whole and was packed from `stores` as they are now, else None."""
    return _whole_pack(out_dir, _source_digest({role: CacheStore.open(p) for role, p in stores.items()}))


def pack(stores: dict[str, str | Path], out_dir: Path, workers: int = 2, log=print) -> tuple[Path, dict]:
    """Write (or reuse) `out_dir/data.beton` from the role -> store mapping; returns (path, meta).

    The stores may be remote (cache.location: a URL or a shared path); `out_dir` is local scratch, since
    FFCV maps its file: each node that trains packs its own copy."""
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    opened = {role: CacheStore.open(p) for role, p in stores.items()}
    for role, s in opened.items():  # file checksums at disk speed: nothing is decoded twice
        problems = s.verify()
        if problems:
            raise StoreError(f"cache store {s.path} ({role}) is not usable: {problems[0]}. "
                               f"Run `hakd verify {s.path}` and re-run `hakd cache` to repair it.")
    layouts = {role: s.layout for role, s in opened.items()}
    first = next(iter(layouts.values()))
    for role, lay in layouts.items():
        ident = opened[role].attrs["identity"]
        if (lay.n, lay.views, lay.image_size) != (first.n, first.views, first.image_size) or \
                ident["dataset"]["fingerprint"] != next(iter(opened.values())).attrs["identity"]["dataset"]["fingerprint"]:
            raise StoreError(f"cache stores {', '.join(str(s.path) for s in opened.values())} were written for "
                               f"different data or views; re-run `hakd cache` with one config")
    digest = _source_digest(opened)
    out_dir = Path(out_dir)
    beton = out_dir / FFCV_NAME
    meta = _whole_pack(out_dir, digest)
    if meta is not None:
        return beton, meta
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / META_NAME

    arrays = {role: lay.per_view_arrays() for role, lay in layouts.items()}
    s = first.image_size
    fields = {"image": NDArrayField(np.dtype("uint8"), (s, s, 3)), "label": IntField(), "index": IntField(),
              "view": NDArrayField(np.dtype("float32"), (5,))}
    meta_fields = {}
    row_bytes = s * s * 3 + 5 * 4 + 16
    for role, names in arrays.items():
        for a in names:
            shape, dtype = layouts[role].arrays()[a]
            fname = field_name(len(meta_fields))
            stored = np.dtype("int16") if dtype == "float16" else np.dtype(dtype)  # float16 as its bit pattern
            fields[fname] = NDArrayField(stored, tuple(shape[2:]))
            meta_fields[fname] = {"role": role, "array": a, "shape": list(shape[2:]), "dtype": dtype}
            if a.startswith("features/"):  # how it is coded, and the shape it decodes to (loader.teacher_output)
                lay, layer = layouts[role], a[len("features/"):]
                meta_fields[fname].update(codec=lay.feature_codec, feature_shape=list(lay.layers[layer]), layer=layer)
                if layer in lay.ranks:
                    meta_fields[fname]["rank"] = lay.ranks[layer]
            row_bytes += int(np.prod(shape[2:])) * stored.itemsize
        for fname, info in meta_fields.items():  # a coded feature names the field of its scales
            if info["role"] == role and info.get("codec", "float16") != "float16":
                scales = "scales/" + info["array"][len("features/"):]
                info["scale"] = next(f for f, i in meta_fields.items() if i["role"] == role and i["array"] == scales)
    # every field of a row must fit in one page
    page_size = max(1 << 22, 1 << int(np.ceil(np.log2(row_bytes * 2 + 4096))))
    tmp = beton.with_suffix(".beton.tmp")
    rows = _Rows({r: str(p) for r, p in stores.items()}, arrays)
    # ffcv's writer processes die on a full disk and leave it waiting for them forever: the room is checked
    # first (its file: whole pages, one partly filled per writer, then the metadata)
    need = (math.ceil(len(rows) * row_bytes / page_size) + workers) * page_size + len(rows) * 64 + (1 << 20)
    free = shutil.disk_usage(tmp.parent).free
    if free < need:
        raise OSError(errno.ENOSPC, f"packing needs about {need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free",
                      str(tmp))
    writer = DatasetWriter(str(tmp), fields, num_workers=workers, page_size=page_size)
    log(f"packing {len(rows)} rows ({row_bytes / 1024:.1f} KiB each) into {beton}")
    writer.from_indexed_dataset(rows, chunksize=first.shard_size * first.views)  # one shard read per chunk
    os.replace(tmp, beton)  # a half-written file never takes the real name
    params = _write_params(opened, out_dir)
    meta = {"source_digest": digest, "beton_bytes": beton.stat().st_size, "beton_crc32c": file_crc32c(beton),
            "rows": len(rows), "row_bytes": row_bytes, "images": first.n, "views": first.views,
            "image_size": s, "num_classes": first.num_classes, "fields": meta_fields,
            "stores": {r: p if is_url(p) else str(Path(p).resolve()) for r, p in stores.items()},
            "identities": {r: o.attrs["identity"] for r, o in opened.items()}, "params": params}
    write_bytes(meta_path, json.dumps(meta, indent=2).encode())
    return beton, meta
