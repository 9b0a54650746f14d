"""Bias-inducing image operations shared by every dataset (procedural textures, patch occlusion), and shape bias.

Textures are the shortcut cue of the generated dataset and the background of textured
FashionMNIST; occlusion is the paper's STL-10 treatment (drop a fraction of a patch grid and fill
it with the mean, as in Naseer et al. 2021). Everything is a pure function of its seed. Shape bias is
measured on the cue-conflict variant, by the analysis and by the embedded teacher's pretraining.
"""
from __future__ import annotations

import itertools

import numpy as np

TEXTURES = ("hstripes", "vstripes", "diagonal", "checker", "dots", "grid", "noise", "zigzag", "rings", "plain")
# one colour pair per texture: texture = pattern + palette, the cue a texture-biased model can use
PALETTES = np.array([
    [(230, 60, 50), (250, 200, 40)],
    [(40, 90, 220), (140, 220, 250)],
    [(40, 170, 70), (200, 240, 120)],
    [(120, 40, 160), (240, 170, 230)],
    [(240, 130, 20), (90, 40, 10)],
    [(20, 20, 20), (200, 200, 200)],
    [(160, 110, 60), (230, 210, 170)],
    [(0, 140, 140), (250, 120, 120)],
    [(200, 30, 120), (60, 220, 200)],
    [(110, 110, 240), (250, 250, 250)],
], dtype=np.float32)


def texture_images(texture_ids: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Float images in [0, 255], shape (N, size, size, 3), one texture per entry of `texture_ids`.

    Patterns have a period of a few pixels whatever the image size, so they live in the high
    frequencies, while shapes are low-frequency: that is what the Fourier analysis separates.
    """
    n = len(texture_ids)
    period = max(3.0, size / 8.0)
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij")
    phase = rng.uniform(0, period, size=(n, 2)).astype(np.float32)
    y = yy[None] + phase[:, 0, None, None]
    x = xx[None] + phase[:, 1, None, None]
    w = 2 * np.pi / period
    patterns = {
        "hstripes": np.sin(w * y) > 0,
        "vstripes": np.sin(w * x) > 0,
        "diagonal": np.sin(w * (x + y) / 1.4142) > 0,
        "checker": (np.sin(w * x) > 0) ^ (np.sin(w * y) > 0),
        "dots": (np.sin(w * x) > 0.5) & (np.sin(w * y) > 0.5),
        "grid": (np.sin(w * x) > 0.8) | (np.sin(w * y) > 0.8),
        "noise": rng.random((n, size, size)) > 0.5,
        "zigzag": np.sin(w * y + 2.0 * np.abs(((x / period) % 2) - 1) * np.pi) > 0,
        "rings": np.sin(w * np.hypot(x - x.mean(axis=(1, 2), keepdims=True),
                                     y - y.mean(axis=(1, 2), keepdims=True))) > 0,
        "plain": np.zeros((n, size, size), dtype=bool),
    }
    out = np.empty((n, size, size, 3), dtype=np.float32)
    for t, name in enumerate(TEXTURES):
        sel = texture_ids == t
        if not sel.any():
            continue
        on = patterns[name][sel][..., None]
        out[sel] = np.where(on, PALETTES[t, 1], PALETTES[t, 0])
    return out


def occlusion_cells(n: int, fraction: float, grid: int, rng: np.random.Generator) -> np.ndarray | None:
    """(n, grid, grid) bool: the patches each of n images loses, `fraction` of them, drawn independently per
    image (one permutation per image, in order); None when the fraction drops no patch (and draws nothing)."""
    n_drop = int(round(fraction * grid * grid))
    if n_drop == 0:
        return None
    cells = np.zeros((n, grid * grid), dtype=bool)
    for i in range(n):
        cells[i, rng.permutation(grid * grid)[:n_drop]] = True
    return cells.reshape(n, grid, grid)


def patch_index(size: int, grid: int) -> np.ndarray:
    """The patch row (or column) of every pixel row (or column): patches are split at
    np.linspace(0, size, grid + 1).round(), so they tile the image whatever `size` and `grid`."""
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    return np.searchsorted(edges, np.arange(size), side="right") - 1


def occlude_patches(images: np.ndarray, fraction: float, grid: int, rng: np.random.Generator,
                    fill: np.ndarray | None = None) -> np.ndarray:
    """Cover `fraction` of a grid x grid patch partition of each image with `fill` (default: the mean).

    images: uint8 or float (N, H, W, C). The same number of patches is dropped in every image,
    chosen independently per image. Returns a new array of the same dtype.
    """
    n, h, w, c = images.shape
    out = images.copy()
    cells = occlusion_cells(n, fraction, grid, rng)
    if cells is None:
        return out
    if fill is None:
        fill = images.reshape(-1, c).mean(axis=0)
    out[cells[:, patch_index(h, grid)[:, None], patch_index(w, grid)[None, :]]] = fill
    return out


# Datasets whose `texture` variant is cue conflict: every object is filled with the texture that
# another class carries in training, so a texture id is a class label and a prediction can be
# called a shape or a texture decision (Geirhos et al. 2019).
CUE_CONFLICT_DATASETS = ("shapes",)


def shape_bias_note(dataset: str) -> tuple[bool, str]:
    """Whether shape bias is measured on `dataset`, and one sentence saying why (metrics["meta"]["shape_bias_note"])."""
    if dataset in CUE_CONFLICT_DATASETS:
        return True, ("measured on the cue-conflict texture variant: every object is filled with the texture "
                      "another class carries in training, so each texture decision is a class decision")
    if dataset == "fashionmnist":
        return False, ("not measured: the texture variant's background textures belong to no class, so no "
                       "prediction is a texture decision; that variant measures accuracy under texture only")
    return False, f"not measured: {dataset} has no cue-conflict variant (no texture stands for a class)"


def shape_bias(model, images, shape_labels, texture_labels, batch_size: int = 256) -> dict:
    """Shape bias on cue-conflict images (Geirhos et al. 2019): shape / (shape + texture decisions).

    model: an eval-mode module mapping float images in [0, 1], (B, 3, H, W), to logits; each batch of
    `images` is moved to its device. Images whose shape and texture labels agree carry no conflict and
    are skipped; `n` counts the conflicting images evaluated. Predictions matching neither cue are
    ignored. shape_bias is nan when no prediction matches either cue.
    """
    import torch  # here: the datasets import this module and need no torch

    conflict = shape_labels.cpu() != texture_labels.cpu()
    x = images[conflict.to(images.device)]
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    with torch.no_grad():
        preds = [model(x[i:i + batch_size].to(device)).argmax(dim=1).cpu() for i in range(0, len(x), batch_size)]
    preds = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    shape = int((preds == shape_labels.cpu()[conflict]).sum())
    texture = int((preds == texture_labels.cpu()[conflict]).sum())
    bias = shape / (shape + texture) if shape + texture else float("nan")
    return {"shape_bias": bias, "shape_decisions": shape, "texture_decisions": texture, "n": int(conflict.sum())}
