"""GradCAM maps on the layer's own grid, unscaled, and measures of how spread out they are.

The `grad-cam` package min-max scales every map to [0, 1] and resizes it to the input, which hides
how strong a map is and makes a flat map look as peaked as a focused one. Here the map is the raw
ReLU(sum_k w_k A_k) on the target layer's grid, and the measures below (all per image) are computed
on those raw maps.

Maps of different models (a 7x7 ResNet-50 `layer4`, a 14x14 ViT-B/16 token grid; 4x4 and 8x8 in
the demo) are compared on one common grid: the coarsest of their grids (`common_grid`), the finer
maps area-averaged down onto it (`to_grid`). Upsampling the coarse map instead would interpolate
its few cells into smooth blobs, which the spread measures would read as more global attention.
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from scipy.special import xlogy
from scipy.stats import rankdata
from torch import nn


class _RawGradCAM(GradCAM):
    """GradCAM that returns ReLU(sum_k w_k A_k) for its single target layer, without scaling or resizing."""

    def __init__(self, model: nn.Module, target_layer: nn.Module, reshape_transform: Callable | None = None):
        super().__init__(model, [target_layer], reshape_transform)
        # Ask for input gradients so the target layer's output requires grad even in a frozen model.
        self.compute_input_gradient = True

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
        activations = self.activations_and_grads.activations[0].numpy()
        grads = self.activations_and_grads.gradients[0].numpy()
        cam = self.get_cam_image(input_tensor, self.target_layers[0], targets, activations, grads, eigen_smooth)
        return [np.maximum(cam, 0)[:, None]]

    def aggregate_multi_layers(self, cam_per_target_layer):
        return cam_per_target_layer[0][:, 0]


def vit_reshape_transform(grid_h: int, grid_w: int, prefix_tokens: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reshape for timm ViT tokens: drop the `prefix_tokens` (CLS, registers), (B, N, D) -> (B, D, grid_h, grid_w)."""

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix_tokens:]
        return patches.reshape(patches.shape[0], grid_h, grid_w, patches.shape[-1]).permute(0, 3, 1, 2)

    return reshape


def gradcam_maps(model: nn.Module, target_layer: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 reshape_transform: Callable | None = None, batch_size: int = 32) -> np.ndarray:
    """Raw GradCAM maps (B, h, w), float32 and non-negative, for the class in `labels` (the true class, or the
    model's prediction: analysis.robustness.predict), on the target layer's grid.

    Not min-max scaled: scaling the class logit by 10 scales the map by 10. A ViT layer needs
    `reshape_transform` (see `vit_reshape_transform`) to turn its tokens into a grid.
    """
    maps = []
    with torch.enable_grad(), _RawGradCAM(model, target_layer, reshape_transform) as cam:
        for i in range(0, len(images), batch_size):
            targets = [ClassifierOutputTarget(int(c)) for c in labels[i:i + batch_size]]
            maps.append(cam(images[i:i + batch_size], targets))
    # grad-cam's context manager swallows IndexError (e.g. a label out of range), ending the loop early
    if sum(len(m) for m in maps) != len(images):
        raise RuntimeError("GradCAM stopped early; see the message printed by pytorch_grad_cam")
    return np.concatenate(maps).astype(np.float32)


@torch.no_grad()
def layer_grid(model: nn.Module, target_layer: nn.Module, image_size: int,
               reshape_transform: Callable | None = None) -> tuple[int, int]:
    """The (h, w) grid of `target_layer`'s GradCAM map for image_size inputs: one forward of a blank image."""
    out = {}
    hook = target_layer.register_forward_hook(lambda m, i, o: out.__setitem__("a", o))
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        hook.remove()
        model.train(was_training)
    a = out["a"] if reshape_transform is None else reshape_transform(out["a"])
    return int(a.shape[-2]), int(a.shape[-1])


def common_grid(grids) -> tuple[int, int]:
    """The grid that maps of the given (h, w) grids are compared on: the coarsest (smallest h, smallest w)."""
    grids = [tuple(int(v) for v in g) for g in grids]
    if not grids:
        raise ValueError("common_grid needs at least one grid")
    return min(h for h, _ in grids), min(w for _, w in grids)


def to_grid(maps: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Area-average maps (B, h, w) down onto `grid` (each cell: the mean of the finer cells it covers).

    Boolean masks become the fraction of each cell they cover. Refuses to upsample: a map coarser than
    the grid would have to be interpolated, which smooths it (see the module docstring).
    """
    maps = np.asarray(maps)
    h, w = maps.shape[-2:]
    if h < grid[0] or w < grid[1]:
        raise ValueError(f"a {h}x{w} map cannot be compared on the finer {grid[0]}x{grid[1]} grid without "
                         f"interpolating it; use the coarsest grid of the maps compared (common_grid)")
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(maps.astype(np.float64))[:, None], tuple(grid))
    return pooled[:, 0].numpy()


def _distributions(maps: np.ndarray) -> np.ndarray:
    """Maps (B, h, w) -> (B, h*w) float64 distributions summing to 1; all-zero maps become rows of nan."""
    flat = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    total = flat.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, flat / total, np.nan)


def normalized_entropy(maps: np.ndarray) -> np.ndarray:
    """Per-image entropy of map / sum(map), divided by log(#pixels): 1 for a uniform map, 0 for a single pixel.

    Higher means more global attention. An all-zero map has no distribution and gives nan.
    """
    p = _distributions(maps)
    return -xlogy(p, p).sum(axis=1) / np.log(p.shape[1])  # xlogy: 0 log 0 = 0


def mass_fraction(maps: np.ndarray, q: float) -> np.ndarray:
    """Per-image smallest fraction of pixels that together hold at least q of the map's mass.

    q = 0.5 gives about 0.5 for a uniform map and 1/#pixels for a single pixel. nan for all-zero maps.
    """
    p = _distributions(maps)
    cumulative = np.cumsum(-np.sort(-p, axis=1), axis=1)  # largest pixels first
    # The tolerance keeps float rounding of the cumulative sum (e.g. 0.4999999 for q = 0.5) from adding a pixel.
    n_pixels = (cumulative < q - 1e-9).sum(axis=1) + 1
    return np.where(np.isnan(p).any(axis=1), np.nan, n_pixels / p.shape[1])


def energy_inside(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per-image fraction of the map's mass on the object (energy pointing game).

    masks: on the maps' grid, (B, h, w) or one (h, w) for all images; boolean, or the fraction of each
    cell the object covers (`to_grid` of a pixel mask), in which case a cell's mass counts in
    proportion to its object fraction. nan for all-zero maps.
    """
    p = _distributions(maps)
    inside = np.broadcast_to(np.asarray(masks, dtype=np.float64), np.shape(maps)).reshape(len(p), -1)
    return (p * inside).sum(axis=1)


def rank_correlation(maps_a: np.ndarray, maps_b: np.ndarray) -> np.ndarray:
    """Per-image Spearman correlation between two sets of maps on the same grid (ties get average ranks).

    1 for the same ranking of pixels, -1 for the reversed one; nan when either map is constant.
    """
    if np.shape(maps_a) != np.shape(maps_b):
        raise ValueError(f"maps must share one grid, got {np.shape(maps_a)} and {np.shape(maps_b)}")
    ranks_a = rankdata(np.reshape(maps_a, (len(maps_a), -1)), axis=1)
    ranks_b = rankdata(np.reshape(maps_b, (len(maps_b), -1)), axis=1)
    # Spearman = Pearson correlation of the ranks
    ranks_a -= ranks_a.mean(axis=1, keepdims=True)
    ranks_b -= ranks_b.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ranks_a * ranks_b).sum(axis=1) / np.sqrt((ranks_a ** 2).sum(axis=1) * (ranks_b ** 2).sum(axis=1))


def dropped_maps(maps: np.ndarray) -> int:
    """How many maps have no mass (all zero after the ReLU): they have no distribution, so every measure
    leaves them out, and two models are then scored on different images."""
    return int((np.asarray(maps, dtype=np.float64).reshape(len(maps), -1).sum(axis=1) <= 0).sum())


def summarize_gradcam(maps: np.ndarray, masks: np.ndarray | None = None,
                      reference: np.ndarray | None = None) -> dict[str, float]:
    """Means over images (ignoring nan) of the measures above, for maps on one common grid.

    Keys: "entropy", "mass50", "mass90", plus "energy_inside" when `masks` is given and
    "rank_corr_teacher" when `reference` (e.g. the teacher's maps of the same images) is given; "maps"
    counts the maps and "dropped" those left out of every mean for having no mass (`dropped_maps`).
    """
    summary = {
        "entropy": normalized_entropy(maps),
        "mass50": mass_fraction(maps, 0.5),
        "mass90": mass_fraction(maps, 0.9),
    }
    if masks is not None:
        summary["energy_inside"] = energy_inside(maps, masks)
    if reference is not None:
        summary["rank_corr_teacher"] = rank_correlation(maps, reference)
    with warnings.catch_warnings():  # every map dropped: the means are nan, and "dropped" says why
        warnings.simplefilter("ignore", RuntimeWarning)
        means = {name: float(np.nanmean(values)) for name, values in summary.items()}
    return {**means, "maps": len(maps), "dropped": dropped_maps(maps)}
