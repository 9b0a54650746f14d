"""What the cache format guarantees: every file a store holds is covered by `verify` (parameter groups
included), parameter groups are written as a unit, zarr rejects damaged chunks on read, stores of the
old format are refused with the fix, and file checksums see rewrites that CRC-32C cannot.

Store-level tests on the synthetic layout of tests/cache_helpers.py: no teacher, no Ray, well under a second each.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from infra.cli import main as cli_main
from teacher_cache.store import NO_FILE, CacheStore, StoreError, file_checksum
from cache_helpers import IDENTITY, LAYOUT, PROVENANCE, corrupt_middle, random_unit, shard_files

PARAMS = {"attn.qkv.weight": np.random.default_rng(3).normal(size=(18, 6)),
          "attn.qkv.bias": np.zeros(18), "norm1.weight": np.ones(6)}


def params_store(path, codec: str = "zstd") -> CacheStore:
    store = CacheStore.create_or_open(path, LAYOUT, IDENTITY, PROVENANCE, codec=codec, params=("live_block",))
    rng = np.random.default_rng(0)
    for u in range(LAYOUT.units):
        store.write_unit(u, random_unit(LAYOUT, u, rng))
    store.write_params("live_block", PARAMS)
    return store


def param_chunk(path):
    return path / "live_block" / "attn.qkv.weight" / "c" / "0" / "0"


def test_random_bytes_in_live_block_are_reported(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    store = params_store(path)
    assert store.verify() == []
    f = param_chunk(path)
    f.write_bytes(np.random.default_rng(1).integers(0, 256, f.stat().st_size, dtype=np.uint8).tobytes())
    problems = CacheStore.open(path).verify()
    assert problems == ["parameters live_block/: file live_block/attn.qkv.weight/c/0/0 checksum mismatch (damaged)"]
    assert cli_main(["verify", str(path)]) == 1
    assert "live_block/attn.qkv.weight" in capsys.readouterr().out
    with pytest.raises(Exception):  # and zarr's own CRC-32C refuses to hand the damaged weights out
        CacheStore.open(path).read_params("live_block")


def test_every_file_is_covered(tmp_path):
    """A file that no recorded checksum covers (another array, a stray chunk) is reported, wherever it is."""
    path = tmp_path / "s.zarr"
    params_store(path)
    stray = zarr.open_group(str(path), mode="r+")
    stray.create_array("live_block/extra", data=np.arange(4, dtype=np.float32))
    (path / "logits" / "c" / "9").write_bytes(b"junk")
    problems = CacheStore.open(path).verify()
    assert "file live_block/extra/c/0 is covered by no recorded checksum (left by an interrupted write)" in problems
    assert "file logits/c/9 is covered by no recorded checksum (left by an interrupted write)" not in problems
    assert len(problems) == 1  # logits/c/9 lies in the logits array's shard grid: zarr never reads it
    store = CacheStore.open(path)
    assert store.param_problems("live_block") == problems  # so `hakd cache` rewrites the group, stray file gone
    store.write_params("live_block", PARAMS)
    assert store.verify() == [] and not (path / "live_block" / "extra").exists()


def test_live_block_written_as_a_unit(tmp_path):
    """A run that died while writing the parameters leaves them unrecorded: verify says so, and writing
    them again (what `hakd cache` does on resume) gives the same files and a clean store."""
    path = tmp_path / "s.zarr"
    store = params_store(path)
    want = {str(f.relative_to(path)): f.read_bytes() for f in (path / "live_block").rglob("*") if f.is_file()}
    record = store.attrs["params"]["live_block"]
    assert set(record) >= {"live_block/attn.qkv.weight/c/0/0", "live_block/norm1.weight/c/0"}
    assert all(record[k] == file_checksum((path / k).read_bytes()) for k in record)

    # died mid-write: the record is dropped first, so half-written weights are never taken as complete
    store.group.attrs["params"] = {}
    param_chunk(path).write_bytes(param_chunk(path).read_bytes()[:10])
    store = CacheStore.open(path)
    assert store.param_problems("live_block") == ["parameters live_block/ are missing or were not completely written"]
    assert "parameters live_block/ are missing or were not completely written" in store.verify()
    with pytest.raises(StoreError, match="no complete live_block/ group; re-run `hakd cache`"):
        store.read_params("live_block")

    store.write_params("live_block", PARAMS)
    assert CacheStore.open(path).verify() == []
    got = {str(f.relative_to(path)): f.read_bytes() for f in (path / "live_block").rglob("*") if f.is_file()}
    assert got == want
    np.testing.assert_array_equal(store.read_params("live_block")["attn.qkv.weight"],
                                  PARAMS["attn.qkv.weight"].astype(np.float32))


def test_zarr_rejects_a_damaged_chunk_on_read(tmp_path):
    path = tmp_path / "s.zarr"
    params_store(path)
    (f,) = shard_files(path, "features/layer3", 1)
    corrupt_middle(f)
    g = zarr.open_group(str(path), mode="r")
    lo, hi = LAYOUT.unit_range(1)
    with pytest.raises(Exception, match="(?i)checksum"):
        g["features/layer3"][lo:hi]
    g["features/layer3"][:lo]  # the other units read fine


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd"])
def test_file_checksum_sees_a_consistent_rewrite(tmp_path, codec):
    """A value rewritten through zarr leaves a file of valid CRC-32C chunks of the same length; the file's
    CRC-32C would not change (CRC(m + CRC(m)) is a constant), its recorded XXH3 does."""
    path = tmp_path / "s.zarr"
    store = params_store(path, codec)
    (f,) = shard_files(path, "views", 0)
    before = f.read_bytes()
    store.group["views"][0, 0, 0] = 0.123
    after = f.read_bytes()
    assert after != before
    assert store.verify() == ["unit 0 array views: checksum mismatch (shard damaged)"]
    if len(after) == len(before):  # always with codec none: the property that rules out CRC-32C
        import google_crc32c
        assert google_crc32c.value(after) == google_crc32c.value(before)


def test_old_format_store_is_refused_with_the_fix(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    params_store(path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["format"] = "hakd-cache/1"
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"format 'hakd-cache/1', this hakd reads hakd-cache/2; re-run "
                                         r"`hakd cache --overwrite`"):
        CacheStore.open(path)
    assert cli_main(["verify", str(path)]) == 2
    assert "hakd cache --overwrite" in capsys.readouterr().err


def test_all_zero_shard_is_written_and_checked(tmp_path):
    """A shard whose values all equal the fill value is written and checksummed like any other (zarr would skip
    it by default); one that an older writer of this format skipped (recorded as no file) is still accepted."""
    path = tmp_path / "s.zarr"
    store = params_store(path)
    arrays = random_unit(LAYOUT, 2, np.random.default_rng(5))
    arrays["labels"][:] = 0
    store.write_unit(2, arrays)
    shard = path / "labels" / "c" / "2"
    assert shard.exists() and store.verify() == []
    column = store.names.index("labels")
    shard.unlink()
    assert store.verify() == ["unit 2 array labels: shard file missing"]
    sums = store.array("units/xxh3")[2]
    sums[column] = NO_FILE
    store.array("units/xxh3")[2] = sums
    assert store.verify() == []
    np.testing.assert_array_equal(store.array("labels")[LAYOUT.unit_range(2)[0]:LAYOUT.unit_range(2)[1]], 0)
    shard.write_bytes(b"x")
    assert store.verify() == ["unit 2 array labels: checksum mismatch (shard damaged)"]


def test_worker_refuses_outputs_beyond_float16(tmp_path, monkeypatch):
    """NaN, Inf or values float16 cannot hold are caught on the device, before anything is written."""
    from infra.bench.common import Context
    from infra.bench.profiles import PROFILES
    ctx = Context(PROFILES["tiny"], tmp_path)
    w = ctx.worker("teacher_cnn")
    extract = w.teacher.extract

    def overflowing(x, layers):
        out = extract(x, layers)
        return {**out, "logits": out["logits"] * 1e6}
    monkeypatch.setattr(w.teacher, "extract", overflowing)
    with pytest.raises(StoreError, match="unit 0: the teacher's outputs hold NaN, Inf or values beyond float16"):
        w.process(0)
    assert w.slots.free.qsize() == len(w.slots.arenas)  # its buffer slot went back to the pool
    assert ctx.store("teacher_cnn").pending_units() == list(range(ctx.store("teacher_cnn").layout.units))
