"""The cache store on its own: layout, codecs and chunking on disk, and what `verify` reports of a damaged,
incomplete or NaN-holding store (the end-to-end runs: tests/test_cache.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from infra.cli import main as cli_main
from teacher_cache.store import CacheStore, StoreError, file_checksum

from cache_helpers import IDENTITY, LAYOUT, PROVENANCE, corrupt_middle, make_store, random_unit, shard_files

# ---------------------------------------------------------------- 1. store round trip

def test_store_round_trip_layout_and_codec(tmp_path):
    path = tmp_path / "s.zarr"
    _, want = make_store(path)
    store = CacheStore.open(path)
    assert store.layout == LAYOUT
    assert store.done_units().all() and store.pending_units() == []
    for name, (shape, dtype) in LAYOUT.arrays().items():
        got = store.group[name][...]
        assert got.shape == shape and str(got.dtype) == dtype, name
        np.testing.assert_array_equal(got, want[name], err_msg=name)
    for layer in LAYOUT.layers:
        assert store.group[f"features/{layer}"].dtype == np.float16
    assert store.group["logits"].dtype == np.float16
    # column j of unit u is the checksum of array j's shard file of that unit, as written
    sums = store.group["units/xxh3"][...]
    for u in range(LAYOUT.units):
        assert [file_checksum(shard_files(path, n, u)[0].read_bytes()) for n in store.names] == sums[u].tolist()

    attrs = store.attrs
    assert attrs["format"] == "hakd-cache/2"
    assert attrs["identity"] == json.loads(json.dumps(IDENTITY))  # tuples stored as lists
    assert attrs["provenance"] == PROVENANCE
    assert attrs["layout"] == {"n": 40, "views": 3, "image_size": 8, "num_classes": 10,
                               "layers": {"blocks.2": [5, 6], "layer3": [4, 3, 3]},
                               "shard_size": 16, "chunk_size": 8, "feature_codec": "float16", "ranks": {}}

    # chunks, shards and codec, from the arrays' own metadata and from zarr.json on disk
    for name, (shape, _) in LAYOUT.arrays().items():
        a = store.group[name]
        assert a.shards == (16, *shape[1:]), name
        assert a.chunks == (8, *shape[1:]), name
        meta = json.loads((path / name / "zarr.json").read_text())
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [16, *shape[1:]]
        (sharding,) = meta["codecs"]
        assert sharding["name"] == "sharding_indexed"
        assert sharding["configuration"]["chunk_shape"] == [8, *shape[1:]]
        inner = [c["name"] for c in sharding["configuration"]["codecs"]]
        assert inner == ["bytes", "blosc", "crc32c"], name  # zarr checks every chunk on read
        assert [c["name"] for c in sharding["configuration"]["index_codecs"]] == ["bytes", "crc32c"]
        blosc = [c for c in sharding["configuration"]["codecs"] if c["name"] == "blosc"]
        assert blosc[0]["configuration"]["cname"] == "zstd"
        cnn_map = name.startswith("features/") and len(shape) == 5  # (N, K, C, H, W): shuffle auto keeps byte order
        assert blosc[0]["configuration"]["shuffle"] == ("noshuffle" if cnn_map else "bitshuffle"), name
        assert blosc[0]["configuration"]["clevel"] == 5
    # one shard file per unit: the unit of writing is the shard
    assert len(shard_files(path, "features/layer3", 2)) == 1
    assert not (path / "features" / "layer3" / "c" / "3").exists()

    with pytest.raises(StoreError, match="unit 0: array labels has shape"):
        bad = random_unit(LAYOUT, 0, np.random.default_rng(1))
        bad["labels"] = bad["labels"][:-1]
        store.write_unit(0, bad)
    assert store.done_units().all() and store.verify() == []  # a refused write changes nothing


# ---------------------------------------------------------------- 2. verify

def test_verify_reports_damage_incomplete_and_nan(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    store, _ = make_store(path)
    assert store.verify() == []
    assert cli_main(["verify", str(path)]) == 0
    assert f"{path}: ok" in capsys.readouterr().out

    # damaged bytes in the middle of unit 1's feature shard
    (f,) = shard_files(path, "features/blocks.2", 1)
    corrupt_middle(f)
    problems = store.verify()
    assert problems and all(p.startswith("unit 1 array features/blocks.2") for p in problems), problems
    assert store.bad_units() == [1]

    assert cli_main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "unit 1 array features/blocks.2" in out
    assert "re-run `hakd cache`" in out

    # a unit whose done flag is 0 is incomplete, whatever its bytes
    store.group["units/done"][2] = 0
    assert "unit 2 (samples 32:40) is incomplete" in store.verify()
    assert store.bad_units() == [1, 2]

    # a value changed through zarr (the recorded checksum is not updated) is reported
    store.group["logits"][3, 1, 4] = 7.0
    assert "unit 0 array logits: checksum mismatch (shard damaged)" in store.verify()
    assert store.bad_units() == [0, 1, 2]
    # NaN or Inf from a teacher is refused before anything is written
    bad = random_unit(LAYOUT, 0, np.random.default_rng(2))
    bad["features/layer3"][0, 0, 0, 0, 0] = np.inf
    with pytest.raises(StoreError, match="unit 0: array features/layer3 holds NaN or Inf"):
        store.write_unit(0, bad)
    assert store.done_units().tolist() == [True, True, False]


def test_write_unit_replaces_truncated_shards(tmp_path):
    """A killed writer leaves truncated shards; rewriting the unit must not trip over them (also the partial last one)."""
    path = tmp_path / "s.zarr"
    store, _ = make_store(path)
    for u in (1, 2):
        for name in store.names:
            for f in shard_files(path, name, u):
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert store.bad_units() == [1, 2]
    rng = np.random.default_rng(7)
    for u in (1, 2):
        arrays = random_unit(LAYOUT, u, rng)
        store.write_unit(u, arrays)
        lo, hi = LAYOUT.unit_range(u)
        np.testing.assert_array_equal(store.group["features/layer3"][lo:hi],
                                      arrays["features/layer3"].astype(np.float16))
    assert store.verify() == []
