"""Codecs per array and int8 features: the config, the store's codecs, quantisation, and int8 through
the whole byte path (CacheWorker -> store -> pack -> FFCV loader -> dequantised on the device)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from infra.config import ConfigError, load_config
from teacher_cache.codecs import codec_for, dequantize, parse_codec, parse_overrides, quantize, resolve, scale_shape
from teacher_cache.store import CacheStore
from cache_helpers import IDENTITY, LAYOUT, PROVENANCE, random_unit

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizer


def test_codec_for_takes_the_longest_match():
    ov = parse_overrides(["features=lz4", "features/layer3=zstd", "logits=none"])
    assert codec_for("features/blocks.2", "zstd", ov) == "lz4"
    assert codec_for("features/layer3", "none", ov) == "zstd"
    assert codec_for("scales/layer3", "none", ov) == "zstd"  # scales follow their layer
    assert codec_for("logits", "zstd", ov) == "none"
    assert codec_for("images", "lz4", ov) == "lz4"
    assert codec_for("features2", "none", {"features": "lz4"}) == "none"  # a group, not a name prefix


def test_shuffle_auto_keeps_byte_order_for_cnn_maps_only():
    ov = parse_overrides(["features/blocks.2=zstd:shuffle", "logits=none"])
    assert resolve("features/layer3", 3, "lz4", "auto", ov) == ("lz4", "noshuffle")  # C x H x W per view
    assert resolve("features/blocks.2", 2, "lz4", "auto", ov) == ("zstd", "shuffle")  # its own shuffle wins
    assert resolve("features/blocks.2", 2, "lz4", "auto", {}) == ("lz4", "bitshuffle")  # ViT tokens
    assert resolve("scales/layer3", 2, "lz4", "auto", ov) == ("lz4", "bitshuffle")
    assert resolve("images", 3, "lz4:shuffle", "auto", ov) == ("lz4", "shuffle")
    assert resolve("features/layer3", 3, "lz4", "bitshuffle", ov) == ("lz4", "bitshuffle")
    assert resolve("logits", 1, "lz4", "auto", ov) == ("none", "noshuffle")
    for bad in ("lz4:bits", "none:shuffle", "lz4:", "gzip"):
        with pytest.raises(ValueError, match="is not CODEC or CODEC:SHUFFLE"):
            parse_codec(bad)


@pytest.mark.parametrize("key,value,match", [
    ("cache.codec", "gzip", "cache.codec: 'gzip' is not CODEC or CODEC:SHUFFLE, CODEC one of none, lz4, zstd"),
    ("cache.codec", "lz4:bits", "cache.codec: 'lz4:bits' is not CODEC or CODEC:SHUFFLE"),
    ("cache.shuffle", "bits", "cache.shuffle: 'bits' is not one of auto, bitshuffle, shuffle, noshuffle"),
    ("cache.codec_overrides", "[features]", "cache.codec_overrides: 'features' is not NAME=CODEC"),
    ("cache.codec_overrides", "[features=brotli]", "cache.codec_overrides: 'features=brotli'"),
    ("cache.codec_overrides", "[features=none:shuffle]", "cache.codec_overrides: 'features=none:shuffle'"),
    ("cache.feature_codec", "bfloat16", "cache.feature_codec: 'bfloat16' is not float16, int8, or pca:"),
    ("cache.feature_codec", "pca:1.5:int8", "cache.feature_codec: 'pca:1.5:int8' is not"),
    ("cache.feature_codec", "pca:0.99:int2", "cache.feature_codec: 'pca:0.99:int2' is not"),
    ("cache.feature_codec", "pca:0.99:int8:0", "cache.feature_codec: 'pca:0.99:int8:0' is not"),
    ("cache.feature_dtype", "int8", "cache.feature_dtype is now cache.feature_codec"),
    ("cache.codec_max_error", "0", "cache.codec_max_error: must be positive"),
    ("cache.writers", "-1", "cache.writers: must be >= 0"),
])
def test_config_refuses_bad_cache_values(key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"{key}={value}"])


def test_store_writes_each_array_with_its_codec(tmp_path):
    path = tmp_path / "s.zarr"
    store = CacheStore.create_or_open(path, LAYOUT, IDENTITY, PROVENANCE, codec="none",
                                      codec_overrides={"features": "lz4", "features/layer3": "zstd", "logits": "lz4:shuffle"})
    want = {"images": "none", "labels": "none", "views": "none", "logits": ("lz4", "shuffle"),
            "features/blocks.2": ("lz4", "bitshuffle"), "features/layer3": ("zstd", "noshuffle")}  # shuffle auto
    for name, codec in want.items():
        meta = json.loads((path / name / "zarr.json").read_text())
        inner = meta["codecs"][0]["configuration"]["codecs"]
        blosc = [(c["configuration"]["cname"], c["configuration"]["shuffle"]) for c in inner if c["name"] == "blosc"]
        assert blosc == ([] if codec == "none" else [codec]), name
        assert inner[-1]["name"] == "crc32c", name
    rng = np.random.default_rng(0)
    units = [random_unit(LAYOUT, u, rng) for u in range(LAYOUT.units)]
    for u, arrays in enumerate(units):
        store.write_unit(u, arrays)
    assert store.verify() == []
    lo, hi = LAYOUT.unit_range(1)
    np.testing.assert_array_equal(store.group["features/blocks.2"][lo:hi], units[1]["features/blocks.2"].astype(np.float16))


@pytest.mark.parametrize("view_shape", [(17, 24), (8, 4, 4)])  # ViT tokens (T, D), CNN map (C, H, W)
def test_quantize_per_token(view_shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, *view_shape, generator=g) * torch.rand(6, *view_shape[:-1], 1, generator=g) * 4).half()
    if len(view_shape) == 3:
        x = torch.relu(x)  # post-ReLU maps: many zeros
    x[0] = 0  # an all-zero view: scale 0, values 0
    q, scale = quantize(x, len(view_shape))
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert tuple(scale.shape) == (6, *scale_shape(view_shape))
    assert q.abs().max() <= 127 and q[1:].abs().amax() == 127
    y = dequantize(q, scale, len(view_shape))
    assert y.dtype == torch.float16 and y.shape == x.shape and (y[0] == 0).all()
    axis = -1 if len(view_shape) == 2 else -3
    cos = torch.nn.functional.cosine_similarity(y[1:].float(), x[1:].float(), dim=axis)
    nonzero = x[1:].float().abs().amax(dim=axis) > 0
    assert cos[nonzero].min() > 0.999
    # the error of each value is at most half a step of its token's scale (plus float16 rounding)
    step = scale.float().unsqueeze(axis)
    assert ((y.float() - x.float()).abs() <= step * 0.5 + x.float().abs() * 2e-3 + 1e-6).all()


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["int8", "pca:1.0:int8"])
def test_int8_features_through_pack_and_loader(tmp_path, codec):
    """The bench's tiny cache (random-weight demo teachers, real CacheWorker) written twice, float16 and
    coded: the coded file's features, decoded by the loader, match the float16 store's (cosine). pca at full
    rank keeps every direction: int8 codes in a rotated frame, as many bytes as int8."""
    from infra.bench.common import Context
    from infra.bench.profiles import PROFILES
    from student_train.loader import StudentLoader
    profile = PROFILES["tiny"]
    ref = Context(profile, tmp_path / "f16").filled_store("teacher_vit")
    ctx = Context(dataclasses.replace(profile, feature_codec=codec, writers=3), tmp_path / "i8")
    store = ctx.filled_store("teacher_vit")
    (layer,) = store.layout.layers
    assert store.group[f"features/{layer}"].dtype == np.int8 and store.verify() == []
    assert store.layout.bytes_per_sample()[f"features/{layer}"] * 2 == ref.layout.bytes_per_sample()[f"features/{layer}"]
    beton, meta, field = ctx.packed()
    assert meta["fields"][field]["dtype"] == "int8" and meta["fields"][meta["fields"][field]["scale"]]["array"] == \
        f"scales/{layer}"
    loader = StudentLoader(beton, meta, [field], batch_size=8, workers=1, seed=0, timeout_s=60, drop_last=False,
                           shuffle=False)  # view 0 of every image, in order
    want = torch.from_numpy(ref.group[f"features/{layer}"][:, 0]).float()
    got = torch.cat([loader.teacher_output(b, field, "cpu") for b in loader])
    assert got.dtype == torch.float16 and got.shape == want.shape
    cos = torch.nn.functional.cosine_similarity(got.float(), want, dim=-1)
    assert cos.min() > 0.999, cos.min()
    # the logits (float16 fields) are untouched by the codec
    np.testing.assert_array_equal(store.group["logits"][...], ref.group["logits"][...])
