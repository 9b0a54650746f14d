"""The shard files hakd encodes itself (teacher_cache/shards.py) are byte for byte what zarr writes, and
zarr reads them back: every array of the store's layouts, every codec, full units and short last units."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr

from teacher_cache.layout import Layout
from teacher_cache.shards import ShardEncoder, write_file
from teacher_cache.store import CacheStore, file_checksum, shard_key

LAYERS = {"blocks.2": (5, 6), "layer3": (4, 3, 3)}  # a ViT's tokens, a CNN's map


def layout(n: int, feature_codec: str = "float16") -> Layout:
    return Layout(n=n, views=2, image_size=8, num_classes=10, layers=LAYERS, shard_size=16, chunk_size=4,
                  feature_codec=feature_codec)


def unit_arrays(lay: Layout, u: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    lo, hi = lay.unit_range(u)
    out = {}
    for name, (shape, dtype) in lay.arrays().items():
        shape = (hi - lo, *shape[1:])
        if np.dtype(dtype).kind in "iu":
            out[name] = rng.integers(-100 if dtype == "int8" else 0, 100, shape).astype(dtype)
        else:  # half zeros: the codecs see runs to compress, as post-ReLU maps give them
            out[name] = (rng.normal(size=shape) * (rng.random(shape) < 0.5)).astype(dtype)
    return out


def shard_bytes(store: CacheStore, name: str, u: int) -> bytes:
    return Path(store.path, shard_key(name, len(store.layout.arrays()[name][0]), u)).read_bytes()


# n=40: the last unit holds 8 of 16 rows (whole chunks); n=37: 5 rows (a padded chunk, then absent chunks)
@pytest.mark.parametrize("n", [40, 37])
@pytest.mark.parametrize("codec", ["none", "lz4", "zstd", "lz4:shuffle", "zstd:noshuffle"])
@pytest.mark.parametrize("feature_codec", ["float16", "int8"])
def test_shards_are_zarrs_own_bytes(tmp_path, n, codec, feature_codec):
    lay = layout(n, feature_codec)
    ours = CacheStore.create_or_open(tmp_path / "ours.zarr", lay, {"x": 1}, {}, codec=codec)
    zarrs = CacheStore.create_or_open(tmp_path / "zarr.zarr", lay, {"x": 1}, {}, codec=codec)
    rng = np.random.default_rng(0)
    with ThreadPoolExecutor(2) as pool:
        for u in range(lay.units):
            arrays = unit_arrays(lay, u, rng)
            ours.write_unit(u, arrays, pool=pool if u % 2 else None)  # threaded and serial encoding alike
            lo, hi = lay.unit_range(u)
            for name, a in arrays.items():  # zarr's own assignment, writing every chunk as ours does
                zarrs.group[name].with_config({"write_empty_chunks": True})[lo:hi] = a
                assert shard_bytes(ours, name, u) == shard_bytes(zarrs, name, u), (name, u)
                np.testing.assert_array_equal(ours.group[name][lo:hi], a)  # and zarr reads ours back
    assert ours.verify() == []


def test_recorded_checksum_is_the_files(tmp_path):
    lay = layout(37)
    store = CacheStore.create_or_open(tmp_path / "s.zarr", lay, {"x": 1}, {}, codec="lz4")
    rng = np.random.default_rng(1)
    for u in range(lay.units):
        store.write_unit(u, unit_arrays(lay, u, rng))
    sums = store.array("units/xxh3")[:]
    for u in range(lay.units):
        for j, name in enumerate(store.names):
            assert sums[u, j] == file_checksum(shard_bytes(store, name, u))
    assert set(store.seconds) == {"encode", "checksum", "write"}


def test_encoder_refuses_a_layout_it_does_not_reproduce(tmp_path):
    g = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)
    chunked_on_two_axes = g.create_array("a", shape=(8, 4), dtype="float32", chunks=(2, 2), shards=(4, 4))
    with pytest.raises(ValueError, match="does not encode"):
        ShardEncoder(chunked_on_two_axes)
    big_endian = g.create_array("b", shape=(8, 4), dtype="float32", chunks=(2, 4), shards=(4, 4),
                                serializer=zarr.codecs.BytesCodec(endian="big"))
    with pytest.raises(ValueError, match="does not encode"):
        ShardEncoder(big_endian)
    filled_with_ones = g.create_array("c", shape=(8, 4), dtype="float32", chunks=(2, 4), shards=(4, 4), fill_value=1)
    with pytest.raises(ValueError, match="does not encode"):  # a short unit's last chunk is padded with zeros
        ShardEncoder(filled_with_ones)


def test_write_file_replaces_the_file_whole(tmp_path):
    """A new file under the old name (renamed over it): a hard-linked copy keeps the old bytes, a reader never
    sees half a file, and no temporary file is left."""
    path = tmp_path / "d" / "f"
    write_file(str(path), [b"x" * 100])
    (tmp_path / "snapshot").hardlink_to(path)
    write_file(str(path), [b"ab", np.arange(3, dtype=np.uint8), memoryview(b"cd")])
    assert path.read_bytes() == b"ab\x00\x01\x02cd"
    assert (tmp_path / "snapshot").read_bytes() == b"x" * 100
    assert sorted(p.name for p in path.parent.iterdir()) == ["f"]
