"""The cache format: one Zarr v3 group per (dataset, teacher), written shard by shard.

Layout of `OUT/cache/<teacher>.zarr` (N images, K views, C classes):
  images        (N, S, S, 3) uint8     the stored images the views are cut from
  labels        (N,)         int64
  views         (N, K, 5)    float32   (y0, x0, h, w, flip) per view, see views.py
  logits        (N, K, C)    float16
  features/<l>  (N, K, ...)  float16   one array per cached layer; int8 with cache.feature_codec int8,
                                       PCA codes (int8, or uint8 holding two int4) with pca:... codecs
  scales/<l>    (N, K, ...)  float16   int8 and pca: one scale per token of features/<l> (codecs.py, basis.py)
  live_block/<p>             float32   ViT only: weights of the block the trainer runs live
  basis/<l>.mean, .components float32  pca only: each layer's fitted basis (attribute `basis`: its provenance)
  units/done    (U,)         uint8     1 once unit u is durably written (one chunk per unit)
  units/xxh3    (U, A)       uint64    XXH3-64 of the shard FILE of array a in unit u, as it was written
                                       (0: no file; every shard is written, but older stores of this
                                       format skipped all-zero ones)
A unit is one shard along N: the unit of work, of writing (one writer per shard, as zarr requires)
and of repair; its shard files are encoded by teacher_cache/shards.py, byte for byte as zarr would
write them. Every chunk, every shard index and the unit tables carry zarr's own CRC-32C, so zarr
rejects a damaged chunk when it reads it; the recorded file checksums let `verify` check the whole
store at disk speed without decoding anything. The file checksum is XXH3-64, not CRC-32C: a file made
of CRC-32C-terminated chunks has the same CRC-32C whatever the chunks hold (CRC(m + CRC(m)) is a
constant), so a file CRC-32C would miss every consistent rewrite; XXH3 is also twice as fast. Parameter groups (`live_block/`) are written as a
unit too: their files' checksums are recorded in the group attributes only once they are durable.
Group attributes hold the identity (what must match for the store to be reused), the provenance
(versions, commit, config) and the parameter groups' checksums.
"""
from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections import defaultdict
from concurrent.futures import Executor
from pathlib import Path

import numpy as np
import xxhash
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from infra import storage
from infra.errors import UserError
from teacher_cache import shards
from teacher_cache.codecs import resolve, zarr_compressors
from teacher_cache.layout import Layout

FORMAT = "hakd-cache/2"
UNIT_TABLES = ("units/done", "units/xxh3")
NO_FILE = 0  # recorded checksum of a shard zarr did not write: every value equals the fill value (0)


class StoreError(UserError, RuntimeError):
    """A store that cannot be used as asked; the message says why and what to do."""


def file_checksum(data) -> int:
    """XXH3-64 of a file's bytes (a bytes-like object or a contiguous uint8 array)."""
    return xxhash.xxh3_64_intdigest(data)


class _ChecksummingStore(WrapperStore):
    """A zarr store that records the checksum of every value zarr writes through it (key -> XXH3-64): the
    unit tables and the parameter groups (the shard files are written by CacheStore itself)."""

    def __init__(self, store):
        super().__init__(store)
        self.written: dict[str, int] = {}

    async def set(self, key, value) -> None:
        self.written[key] = file_checksum(value.as_numpy_array())
        await self._store.set(key, value)


def shard_key(name: str, ndim: int, u: int) -> str:
    """The store key of unit u's one shard of array `name` (shards span every other axis)."""
    return f"{name}/c/{u}" + "/0" * (ndim - 1)


class CacheStore:
    """Create, open, write and verify one teacher's cache group."""

    def __init__(self, path: str | Path, group: zarr.Group, layout: Layout, zstore: _ChecksummingStore):
        # a local or shared path, or an object-store URL (infra/storage.py)
        self.path, self.group, self.layout, self._zstore = str(path), group, layout, zstore
        self.names = list(layout.arrays())
        # seconds spent writing units, by stage, summed over threads: encode (codec, chunk CRC-32C, shard
        # index), checksum (each shard file's XXH3), write (the file written and fsynced, or PUT)
        self.seconds: dict[str, float] = defaultdict(float)
        self._handles: dict[str, zarr.Array] = {}
        self._encoders: dict[str, shards.ShardEncoder] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ opening
    @staticmethod
    def _open_zarr(path: str, mode: str) -> tuple[zarr.Group, _ChecksummingStore]:
        zstore = _ChecksummingStore(storage.zarr_store(path))
        with storage.reported(f"cannot open cache store {path}"):
            return zarr.open_group(store=zstore, mode=mode, zarr_format=3), zstore

    @classmethod
    def create_or_open(cls, path: str | Path, layout: Layout, identity: dict, provenance: dict,
                       codec: str = "zstd", codec_overrides: dict[str, str] | None = None, clevel: int = 3,
                       shuffle: str = "auto", params: tuple[str, ...] = (), overwrite: bool = False) -> "CacheStore":
        """Open the store at `path` if it was written for the same identity, else create it.

        `codec` is every array's codec unless `codec_overrides` (array or group name -> codec) says
        otherwise, with Blosc's `shuffle` where a codec names none (teacher_cache/codecs.py: resolve);
        `params` names the parameter groups the store must hold to be complete.
        A store for another identity is refused (never mixed) unless `overwrite`.
        """
        path = str(path)
        if storage.exists(path) and not overwrite:
            return cls.check_identity(path, identity)
        group, zstore = cls._open_zarr(path, "w")
        for name, (shape, dtype) in layout.arrays().items():
            group.create_array(name, shape=shape, dtype=dtype, chunks=(layout.chunk_size, *shape[1:]),
                               shards=(layout.shard_size, *shape[1:]), fill_value=0,
                               compressors=zarr_compressors(*resolve(name, len(shape) - 2, codec, shuffle,
                                                                     codec_overrides or {}), clevel))
        group.create_array("units/done", shape=(layout.units,), dtype="uint8", chunks=(1,), fill_value=0,
                           compressors=[Crc32cCodec()])
        group.create_array("units/xxh3", shape=(layout.units, len(layout.arrays())), dtype="uint64",
                           chunks=(1, len(layout.arrays())), fill_value=NO_FILE, compressors=[Crc32cCodec()])
        group.attrs.update({"format": FORMAT, "identity": _jsonable(identity), "layout": layout.to_json(),
                            "provenance": _jsonable(provenance), "params_expected": list(params), "params": {}})
        return cls(path, group, layout, zstore)

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
        path = str(path)
        if not storage.exists(storage.join(path, "zarr.json")):
            raise StoreError(f"{path} is not a hakd cache store (no zarr.json); run `hakd cache` to write one")
        try:
            group, zstore = cls._open_zarr(path, "r+")
            attrs = dict(group.attrs)
        except storage.StorageError:  # an unreachable location, not a damaged store
            raise
        except Exception as e:  # unreadable metadata: say so instead of a zarr traceback
            raise StoreError(f"cannot read cache store {path}: {e}; delete it and re-run `hakd cache`") from None
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{path} is a cache store of format {attrs.get('format')!r}, this hakd reads {FORMAT}; "
                             f"re-run `hakd cache --overwrite` (or delete {path}) to write it again")
        return cls(path, group, Layout.from_json(attrs["layout"]), zstore)

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    def array(self, name: str) -> zarr.Array:
        """The zarr array `name`, opened once (each opening reads its metadata)."""
        with self._lock:
            if name not in self._handles:
                self._handles[name] = self.group[name]
            return self._handles[name]

    # ------------------------------------------------------------------ writing
    def done_units(self) -> np.ndarray:
        return self.array("units/done")[:].astype(bool)

    def pending_units(self) -> list[int]:
        return [int(u) for u in np.flatnonzero(~self.done_units())]

    def write_unit(self, u: int, arrays: dict[str, np.ndarray], check_finite: bool = True,
                   pool: Executor | None = None) -> None:
        """Write every array of unit u, make it durable, then (and only then) mark it done.

        Each shard file is encoded here (teacher_cache/shards.py), its checksum taken from the bytes as
        they go to the file, so nothing is read back. Several units may be written at once from
        different threads or processes (each its own shards); one unit must never be written by two.
        `pool` encodes a shard's chunks in parallel. `check_finite=False` skips the NaN/Inf check (slow
        on float16 host arrays) for callers that checked on the device.
        """
        lo, hi = self.layout.unit_range(u)
        datas = {}  # read and checked before anything on disk changes
        for name in self.names:
            shape, dtype = self.layout.arrays()[name]
            data = np.asarray(arrays[name]).astype(dtype, copy=False)
            if data.shape != (hi - lo, *shape[1:]):
                raise StoreError(f"unit {u}: array {name} has shape {data.shape}, expected {(hi - lo, *shape[1:])}")
            if check_finite and data.dtype.kind == "f" and not np.isfinite(data).all():
                raise StoreError(f"unit {u}: array {name} holds NaN or Inf values (the teacher's output "
                                 f"overflowed); nothing was written")
            datas[name] = data
        try:
            self._write_unit(u, datas, pool)
        except OSError as e:  # the unit stays pending: done is cleared first and set only after every file
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            fix = ("free space there (`hakd cache --dry-run` estimates what the stores need) or set cache.location "
                   "to a larger disk" if full else "check that location (permissions, mount, a file where a "
                   "folder should be)")
            what = f"{e.filename}: {e.strerror}" if e.filename else (e.strerror or str(e))
            raise StoreError(f"cannot write unit {u} of cache store {self.path} ({what}); {fix}, then re-run "
                             f"`hakd cache` with the same config and --out: finished units are kept") from None

    def _write_unit(self, u: int, datas: dict[str, np.ndarray], pool: Executor | None) -> None:
        self.array("units/done")[u] = 0
        sums = []
        for name in self.names:  # each file replaces the old one whole: a damaged old shard is never read
            t0 = time.perf_counter()
            parts = self._encoder(name).parts(datas[name], pool)
            t1 = time.perf_counter()
            sums.append(shards.checksum(parts))
            t2 = time.perf_counter()
            self._put(shard_key(name, len(self.layout.arrays()[name][0]), u), parts)
            self._add("encode", t1 - t0)
            self._add("checksum", t2 - t1)
            self._add("write", time.perf_counter() - t2)
        tables = [f"units/xxh3/c/{u}/0", f"units/done/c/{u}"]
        self.array("units/xxh3")[u] = np.array(sums, dtype=np.uint64)
        self.array("units/done")[u] = 1
        self._fsync(tables)
        for key in tables:
            self._zstore.written.pop(key, None)

    def _encoder(self, name: str) -> shards.ShardEncoder:
        with self._lock:
            if name not in self._encoders:
                self._encoders[name] = shards.ShardEncoder(self.group[name])
            return self._encoders[name]

    def _put(self, key: str, parts: list) -> None:
        """One shard file, durable when this returns: written and fsynced locally, one PUT to an object store."""
        if storage.is_url(self.path):
            with storage.reported(f"cannot write {key} of cache store {self.path}"):
                buf = default_buffer_prototype().buffer.from_bytes(b"".join(parts))
                sync(self._zstore._store.set(key, buf))  # its checksum is taken already
        else:
            shards.write_file(os.path.join(self.path, key), parts)

    def _add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    def _fsync(self, keys: list[str]) -> None:
        """fsync the files of the given keys (only those: the cost stays per unit). An object store's PUT
        is durable once it returns: nothing to do there."""
        if storage.is_url(self.path):
            return
        for key in keys:
            f = Path(self.path, key)
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def params_complete(self, prefix: str) -> bool:
        return prefix in self.group.attrs.get("params", {})

    def write_params(self, prefix: str, state: dict[str, np.ndarray]) -> None:
        """Write a parameter group as one unit: unmarked, rewritten, fsynced, then recorded with checksums."""
        record = dict(self.group.attrs.get("params", {}))
        record.pop(prefix, None)
        self.group.attrs["params"] = record  # not complete until the end
        sync(self._zstore.delete_dir(prefix))  # whatever an interrupted write left there
        for k, v in state.items():
            self.group.create_array(f"{prefix}/{k}", data=np.asarray(v, dtype=np.float32), overwrite=True,
                                    compressors=[Crc32cCodec()])
        files = {key: self._zstore.written.pop(key) for key in list(self._zstore.written)
                 if key.startswith(prefix + "/")}
        self._fsync(list(files))
        self.group.attrs["params"] = {**record, prefix: files}
        self._fsync(["zarr.json"])

    def read_params(self, prefix: str) -> dict[str, np.ndarray]:
        if not self.params_complete(prefix) or prefix not in self.group:
            raise StoreError(f"cache store {self.path} has no complete {prefix}/ group; re-run `hakd cache` "
                             f"with the same config and --out to write it")
        g = self.group[prefix]
        return {k: g[k][...] for k in g.array_keys()}

    def update_attrs(self, **kw) -> None:
        self.group.attrs.update(_jsonable(kw))

    # ------------------------------------------------------------------ checking
    def _keys(self, prefix: str = "") -> list[str]:
        async def collect():
            return [k async for k in self._zstore.list_prefix(prefix)]
        return sync(collect())

    def _read(self, key: str):
        buf = sync(self._zstore.get(key, prototype=default_buffer_prototype()))
        return None if buf is None else buf.as_numpy_array()

    def verify(self, units: list[int] | None = None) -> list[str]:
        """Problems found (empty = healthy): incomplete units, shape/dtype drift, damaged or unverified files.

        Every file the store holds is checked: each unit's shard files and each parameter group's files
        against the checksum recorded when they were written (read at disk speed, nothing decoded); the
        unit tables by zarr's own CRC-32C as they are read. A file covered by none of these (for
        example one left by a run killed while writing parameters) is reported too.
        """
        problems = []
        for name, (shape, dtype) in self.layout.arrays().items():
            if name not in self.group:
                problems.append(f"array {name} is missing")
                continue
            a = self.array(name)
            if tuple(a.shape) != shape or str(a.dtype) != dtype:
                problems.append(f"array {name} is {a.dtype}{tuple(a.shape)}, expected {dtype}{shape}")
        if problems:
            return problems
        try:
            done = self.done_units()
            sums = self.array("units/xxh3")[:]
        except Exception as e:  # zarr's CRC-32C rejects a damaged table chunk
            return [f"the unit tables are unreadable ({type(e).__name__}: {e})"]
        for u in (range(self.layout.units) if units is None else units):
            lo, hi = self.layout.unit_range(u)
            if not done[u]:
                problems.append(f"unit {u} (samples {lo}:{hi}) is incomplete")
                continue
            for j, name in enumerate(self.names):
                data = self._read(shard_key(name, len(self.layout.arrays()[name][0]), u))
                if data is None:
                    if sums[u, j] != NO_FILE:
                        problems.append(f"unit {u} array {name}: shard file missing")
                elif file_checksum(data) != sums[u, j]:
                    problems.append(f"unit {u} array {name}: checksum mismatch (shard damaged)")
        if units is None:
            problems += self.param_problems() + self._uncovered()
        return problems

    def param_problems(self, prefix: str | None = None) -> list[str]:
        """Problems of the parameter groups (all, or the one named): missing, incomplete or damaged files."""
        attrs = self.group.attrs
        record, expected = attrs.get("params", {}), attrs.get("params_expected", [])
        problems = []
        for p in ([prefix] if prefix else sorted(set(expected) | set(record))):
            if p not in record:
                problems.append(f"parameters {p}/ are missing or were not completely written")
                continue
            for key, want in record[p].items():
                data = self._read(key)
                if data is None:
                    problems.append(f"parameters {p}/: file {key} missing")
                elif file_checksum(data) != want:
                    problems.append(f"parameters {p}/: file {key} checksum mismatch (damaged)")
            problems += self._uncovered(p + "/")  # e.g. an array left by an interrupted write
        return problems

    def _uncovered(self, prefix: str = "") -> list[str]:
        """Files under `prefix` that no recorded checksum covers (parameter groups' own: with `prefix` only)."""
        attrs = self.group.attrs
        groups = tuple(p + "/" for p in set(attrs.get("params_expected", [])) | set(attrs.get("params", {})))
        shards = tuple(f"{name}/c/" for name in [*self.names, *UNIT_TABLES])
        recorded = {k for files in attrs.get("params", {}).values() for k in files}
        return [f"file {key} is covered by no recorded checksum (left by an interrupted write)"
                for key in self._keys(prefix)
                if not (key.endswith("zarr.json") or key in recorded or key.startswith(shards)
                        or (not prefix and key.startswith(groups)))]

    def bad_units(self) -> list[int]:
        """Units that fail verification (to be marked pending and rewritten)."""
        return sorted({int(p.split()[1]) for p in self.verify(list(range(self.layout.units)))
                       if p.startswith("unit ")})

    def mark_pending(self, units: list[int]) -> None:
        for u in units:
            self.array("units/done")[u] = 0


def _jsonable(d):
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
