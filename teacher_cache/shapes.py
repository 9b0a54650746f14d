"""The embedded default dataset: ten global shapes filled with textures, generated from a seed.

Each image holds one shape (its class) at a random position, scale and rotation, filled with a
texture and set on a dimmer textured background. In the training split and the `clean` test
split the fill texture is the class's own texture with probability `texture_correlation`: a
shortcut that a texture-biased model can take. The other test variants mirror the paper's bias
datasets: `occluded` covers part of the image with mean-grey patches (STL-10 treatment) and
`texture` fills every shape with another class's texture (cue conflict, FashionMNIST treatment;
it also serves the shape-bias measure, with `texture_labels`).
"""
from __future__ import annotations

import numpy as np

from teacher_cache.bias import TEXTURES, occlude_patches, texture_images

SHAPES = ("circle", "triangle", "square", "star", "cross", "ring", "half_disc", "bar", "crescent", "l_shape")
VARIANTS = ("train", "clean", "occluded", "texture")
_SPLIT_SEED = {"train": 0, "clean": 1, "occluded": 1, "texture": 2}  # occluded = clean images, then occluded


def _shape_masks(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean masks (N, size, size): shape `labels[i]` at a random centre, radius and rotation."""
    n = len(labels)
    radius = rng.uniform(0.32, 0.45, n) * size
    cy = rng.uniform(0.5 * radius + 1, size - 0.5 * radius - 1)
    cx = rng.uniform(0.5 * radius + 1, size - 0.5 * radius - 1)
    cy = np.clip(cy, radius * 0.8, size - radius * 0.8)
    cx = np.clip(cx, radius * 0.8, size - radius * 0.8)
    theta = rng.uniform(0, 2 * np.pi, n)
    grid = np.arange(size, dtype=np.float32) + 0.5
    y = (grid[None, :, None] - cy[:, None, None]) / radius[:, None, None]
    x = (grid[None, None, :] - cx[:, None, None]) / radius[:, None, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u, v = c * x + s * y, -s * x + c * y
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    tri = r * np.cos((phi % (2 * np.pi / 3)) - np.pi / 3) <= 0.5  # regular polygon: apothem 0.5
    masks = {
        0: r <= 0.9,
        1: tri,
        2: (np.abs(u) <= 0.7) & (np.abs(v) <= 0.7),
        3: r <= 0.55 + 0.45 * np.cos(5 * phi),
        4: ((np.abs(u) <= 0.28) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.28) & (np.abs(u) <= 1.0)),
        5: (r <= 1.0) & (r >= 0.55),
        6: (r <= 1.0) & (v >= -0.15),
        7: (np.abs(u) <= 1.0) & (np.abs(v) <= 0.3),
        8: (r <= 1.0) & (np.hypot(u - 0.5, v) > 0.75),
        9: ((u >= -0.8) & (u <= -0.25) & (np.abs(v) <= 0.9)) | ((u >= -0.8) & (u <= 0.8) & (v >= 0.35) & (v <= 0.9)),
    }
    out = np.zeros((n, size, size), dtype=bool)
    for k, m in masks.items():
        sel = labels == k
        out[sel] = m[sel]
    return out


def make_shapes(n: int, size: int, seed: int, variant: str = "train", texture_correlation: float = 0.85,
                occlusion_fraction: float = 0.4) -> dict[str, np.ndarray]:
    """Generate one split. Returns images uint8 (n, size, size, 3), labels, texture_labels, masks.

    Deterministic in (n, size, seed, variant, texture_correlation, occlusion_fraction); classes are
    balanced (n // 10 each, the remainder spread over the first classes) and shuffled.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown shapes variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    rng = np.random.default_rng([seed, _SPLIT_SEED[variant]])
    labels = rng.permutation(np.arange(n) % len(SHAPES))
    masks = _shape_masks(labels, size, rng)
    if variant == "texture":  # always another class's texture: shape and texture cues conflict
        fill_tex = (labels + rng.integers(1, len(TEXTURES), n)) % len(TEXTURES)
    else:
        matched = rng.random(n) < texture_correlation
        fill_tex = np.where(matched, labels, rng.integers(0, len(TEXTURES), n))
    back_tex = rng.integers(0, len(TEXTURES), n)
    fill = texture_images(fill_tex, size, rng)
    back = 0.2 * texture_images(back_tex, size, rng) + 0.8 * 128.0  # dim: the shape stands out
    images = np.where(masks[..., None], fill, back)
    images = np.clip(images + rng.normal(0, 6.0, images.shape), 0, 255).round().astype(np.uint8)
    if variant == "occluded":
        images = occlude_patches(images, occlusion_fraction, grid=8, rng=rng)
    return {"images": images, "labels": labels.astype(np.int64),
            "texture_labels": fill_tex.astype(np.int64), "masks": masks}
