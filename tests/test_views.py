"""The K views of each image: sampled crops and flips (sample_views) and their replay on images (apply_views)."""
from __future__ import annotations

import numpy as np
import torch

from teacher_cache.views import apply_views, sample_views, to_float_nchw


def test_sample_views_properties():
    a = sample_views(3000, 4, seed=3)
    assert a.shape == (3000, 4, 5) and a.dtype == np.float32
    np.testing.assert_array_equal(a, sample_views(3000, 4, seed=3))
    assert not np.array_equal(a, sample_views(3000, 4, seed=4))
    np.testing.assert_array_equal(a[:, 0], np.broadcast_to([0, 0, 1, 1, 0], (3000, 5)))
    y0, x0, h, w, flip = np.moveaxis(a[:, 1:], -1, 0)
    assert (y0 >= 0).all() and (x0 >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (y0 + h <= 1 + 1e-6).all() and (x0 + w <= 1 + 1e-6).all()
    area = h * w
    assert ((area >= 0.35 - 1e-5) & (area <= 1 + 1e-5)).all()
    ratio = w / h
    fallback = (h == 1) & (w == 1)
    assert ((ratio[~fallback] >= 0.75 - 1e-4) & (ratio[~fallback] <= 4 / 3 + 1e-4)).all()
    assert area.std() > 0.1 and y0.std() > 0.05  # really random crops
    assert set(np.unique(flip)) == {0.0, 1.0}
    assert abs(flip.mean() - 0.5) < 0.03  # 9000 draws: sd 0.005
    assert abs(sample_views(3000, 4, 3, flip_prob=0.2)[:, 1:, 4].mean() - 0.2) < 0.03
    assert sample_views(50, 4, 3, flip_prob=0.0)[..., 4].max() == 0
    np.testing.assert_array_equal(sample_views(7, 1, 0), np.broadcast_to([0, 0, 1, 1, 0], (7, 1, 5)))


def test_apply_views_matches_slicing_and_flip():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=g)
    x = to_float_nchw(images)
    plain = apply_views(images, torch.tensor([[0, 0, 1, 1, 0.0]] * 2), 32)
    torch.testing.assert_close(plain, x, atol=1e-5, rtol=0)
    # box rows 8:24, cols 4:20 (integer pixels), resized 16 -> 16: a plain slice, mirrored when flip = 1
    views = torch.tensor([[8 / 32, 4 / 32, 16 / 32, 16 / 32, 0.0], [8 / 32, 4 / 32, 16 / 32, 16 / 32, 1.0]])
    out = apply_views(images, views, 16)
    torch.testing.assert_close(out[0], x[0, :, 8:24, 4:20], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], x[1, :, 8:24, 4:20].flip(-1), atol=1e-5, rtol=0)
    assert not torch.allclose(out[1], x[1, :, 8:24, 4:20], atol=1e-3)
    # a non-square box at half resolution: every output pixel is the mean of a 2x2 input block
    view = torch.tensor([[0.25, 0.0, 0.5, 0.75, 0.0]])
    out = apply_views(images[:1], view, 8)
    crop = x[:1, :, 8:24, 0:24]
    expect = torch.nn.functional.interpolate(crop, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=0)
