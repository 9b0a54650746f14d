"""Augmented views: sampled once when the cache is written, replayed exactly when the student trains.

A view is five numbers (y0, x0, h, w, flip): a crop box in fractions of the image side and a
mirror flag. View 0 of every image is the plain image; the others follow torchvision's
RandomResizedCrop (area and log-aspect uniform, 10 tries, then the whole image) plus a flip.
`apply_views` turns images and views into the network input with one batched affine resample, on
whatever device the images are on; the teacher's input at cache time and the student's input at
training time both come from it, so they are the same tensor when the input sizes agree.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

VIEW_FIELDS = ("y0", "x0", "h", "w", "flip")


def sample_views(n: int, k: int, seed: int, scale=(0.35, 1.0), ratio=(0.75, 4 / 3), flip_prob=0.5,
                 tries: int = 10) -> np.ndarray:
    """(n, k, 5) float32 view parameters for n images; deterministic in (n, k, seed, ...)."""
    rng = np.random.default_rng([seed, 0x51EE])
    views = np.zeros((n, k, 5), dtype=np.float32)
    views[:, :, 2:4] = 1.0
    m = k - 1
    if m == 0:
        return views
    area = rng.uniform(scale[0], scale[1], (n, m, tries))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, m, tries)))
    w, h = np.sqrt(area * aspect), np.sqrt(area / aspect)
    ok = (w <= 1) & (h <= 1)
    first = np.where(ok.any(-1), ok.argmax(-1), -1)
    idx = np.clip(first, 0, None)[..., None]
    w = np.where(first >= 0, np.take_along_axis(w, idx, -1)[..., 0], 1.0)
    h = np.where(first >= 0, np.take_along_axis(h, idx, -1)[..., 0], 1.0)
    views[:, 1:, 0] = rng.uniform(0, 1, (n, m)) * (1 - h)
    views[:, 1:, 1] = rng.uniform(0, 1, (n, m)) * (1 - w)
    views[:, 1:, 2] = h
    views[:, 1:, 3] = w
    views[:, 1:, 4] = rng.random((n, m)) < flip_prob
    return views


def to_float_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]; float NCHW passes through."""
    if images.dtype == torch.uint8:
        return images.permute(0, 3, 1, 2).float().div_(255.0)
    return images


def apply_views(images: torch.Tensor, views: torch.Tensor, size: int) -> torch.Tensor:
    """Crop, resize to size x size and flip each image by its view: float (B, 3, size, size) in [0, 1].

    images: uint8 (B, H, W, 3) or float (B, 3, H, W); views: (B, 5). Bilinear resampling of the
    crop box with align_corners=False (pixel-centre convention), borders clamped.
    """
    x = to_float_nchw(images)
    v = views.to(device=x.device, dtype=torch.float32)
    y0, x0, h, w, flip = v.unbind(1)
    sign = 1.0 - 2.0 * flip
    theta = torch.zeros(len(v), 2, 3, device=x.device)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = 2 * x0 + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * y0 + h - 1
    grid = F.affine_grid(theta, [len(v), 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
