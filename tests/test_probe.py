"""The linear probe on cached teacher features: pooling, the fit and its held-out choice, and a real tiny cache."""
import contextlib
import json
import math

import numpy as np
import pytest
import torch

from analysis.probe import L2_GRID, cached_pooled, fit_probe, pool, probe_measures


def test_pool_tokens_leave_the_prefix_out_and_maps_average_positions():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float16).reshape(2, 5, 3)  # 2 views, CLS + 4 patches, width 3
    assert torch.equal(pool(tokens, 2, prefix=1), tokens[:, 1:].float().mean(dim=1))
    maps = torch.rand(2, 4, 3, 3)
    assert torch.allclose(pool(maps, 3, prefix=0), maps.mean(dim=(2, 3)))


def _clusters(n_images=120, views=3, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, 8, generator=g)
    y = torch.arange(n_images) % classes
    image = torch.arange(n_images).repeat_interleave(views)
    x = centres[y].repeat_interleave(views, 0) + torch.randn(n_images * views, 8, generator=g) + 5.0
    return x, y.repeat_interleave(views), image


@pytest.mark.slow  # ten L-BFGS fits: about 7 s on 2 cores
def test_fit_probe_learns_a_linear_rule_and_chooses_on_held_out_images():
    x, y, image = _clusters()
    probe = fit_probe(x, y, image, 3)
    assert probe["l2"] in L2_GRID and probe["holdout_accuracy"] > 0.95
    logits = ((x - probe["mean"]) / probe["std"]) @ probe["weight"].T + probe["bias"]
    assert (logits.argmax(1) == y).float().mean() > 0.95
    # labels unrelated to the features: the held-out images say so
    noise = fit_probe(x, torch.randint(0, 3, (len(y) // 3,), generator=torch.Generator().manual_seed(1))
                      .repeat_interleave(3), image, 3)
    assert noise["holdout_accuracy"] < 0.6


@pytest.mark.parametrize("codec", ["float16", "int8"])
def test_cached_features_are_read_decoded_and_pooled(tmp_path, codec):
    """Every view of every image, across shards (the last one partial), int8 features dequantised with their
    per-token scales before pooling, as the student's loader decodes them."""
    from cache_helpers import IDENTITY, PROVENANCE
    from teacher_cache.codecs import dequantize
    from teacher_cache.layout import Layout
    from teacher_cache.store import CacheStore
    layout = Layout(n=40, views=3, image_size=8, num_classes=10, layers={"blocks.2": (5, 6)}, shard_size=16,
                    chunk_size=8, feature_codec=codec)
    store = CacheStore.create_or_open(tmp_path / "s.zarr", layout, IDENTITY, PROVENANCE)
    rng = np.random.default_rng(0)
    want = []
    for u in range(layout.units):
        lo, hi = layout.unit_range(u)
        arrays = {"images": rng.integers(0, 256, (hi - lo, 8, 8, 3), dtype=np.uint8),
                  "labels": np.arange(lo, hi) % 10, "views": rng.random((hi - lo, 3, 5), dtype=np.float32),
                  "logits": rng.normal(size=(hi - lo, 3, 10)).astype(np.float16)}
        if codec == "int8":
            q, scale = rng.integers(-127, 128, (hi - lo, 3, 5, 6), dtype=np.int8), rng.random((hi - lo, 3, 5)) + 0.5
            arrays.update({"features/blocks.2": q, "scales/blocks.2": scale.astype(np.float16)})
            feats = dequantize(torch.from_numpy(q), torch.from_numpy(scale.astype(np.float16)), 2)
        else:
            feats = torch.from_numpy(rng.normal(size=(hi - lo, 3, 5, 6)).astype(np.float16))
            arrays["features/blocks.2"] = feats.numpy()
        store.write_unit(u, arrays)
        want.append(feats.float()[..., 1:, :].mean(dim=-2).reshape(-1, 6))
    x, y, image, layer = cached_pooled(tmp_path / "s.zarr", prefix=1)
    assert layer == "blocks.2" and x.shape == (120, 6)
    assert torch.allclose(x, torch.cat(want), atol=1e-6)
    assert torch.equal(y, (torch.arange(40) % 10).repeat_interleave(3))
    assert torch.equal(image, torch.arange(40).repeat_interleave(3))


@pytest.mark.slow
def test_probe_on_a_tiny_cache(tiny_cache):
    """Every view of every training image is read back and pooled; the probe is measured through the fitted teacher."""
    from analysis.evaluate import _split
    from analysis.models import load_model
    from student_cache import K, N
    from teacher_cache.datasets import load_split
    from teacher_cache.paths import store_path
    cfg, out = tiny_cache
    for role in ("teacher_vit", "teacher_cnn"):
        teacher = load_model(cfg, out, role)
        prefix = teacher.net.num_prefix_tokens if role == "teacher_vit" else 0
        x, y, image, layer = cached_pooled(store_path(out, cfg, role), prefix)
        assert x.shape == (N * K, 96) and len(y) == len(image) == N * K and torch.equal(image[:K], torch.zeros(K).long())
        # view 0 is the plain image: the cached feature pools to what the teacher gives at analysis time
        first = torch.from_numpy(load_split(cfg.data, "train")["images"][:1]).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            live = teacher.extract(first, [layer])[layer].half()
        assert torch.allclose(pool(live, live.ndim - 1, prefix)[0], x[0], atol=2e-2)
        cfg_json = json.dumps(cfg.to_dict(), sort_keys=True)
        result = probe_measures(cfg, out, teacher, role, _split(cfg_json, "clean"), _split(cfg_json, "texture"),
                                contextlib.nullcontext)
        assert result["train_samples"] == N * K and result["l2"] in L2_GRID
        assert 0 <= result["accuracy.clean"] <= 1 and 0 <= result["low_frequency_reliance"] <= 1
        bias = result["shape_bias"]  # nan when no prediction matches either cue
        assert math.isnan(bias) or 0 <= bias <= 1
