"""The paper's premise measured on what is distilled: a linear probe on each teacher's cached features.

The students learn from the teachers' cached features (the ViT's residual stream entering its last
block, from which the trainer computes Q, K, V and h_T; the CNN's `layer3`), never from their heads.
A head can be shape-biased while the features under it carry texture (the demo ViT's embedded head
has shape bias 0.88 where a probe on its features has 0.35), so the premise is measured here on the
features themselves:

- every cached view of the training split is read from OUT/cache/<teacher>.zarr (coded features,
  int8 or PCA, decoded as the student's loader decodes them), pooled to one vector (the mean over patch tokens, prefix tokens
  left out as the trainer leaves them out; the mean over positions of a CNN map), and standardised;
- a multinomial logistic regression with an L2 penalty is fitted full-batch with L-BFGS, its strength
  chosen from L2_GRID on a held-out fifth of the training images (all views of an image on one side),
  then refitted on every view;
- test images go through the fitted teacher to the same layer, are rounded to float16 as the cache
  stores them, pooled the same way, and the probe is measured like a model: clean accuracy, shape
  bias on the cue-conflict variant, low-frequency reliance (analysis/fourier.py).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # penalty on the summed squared weights, beside the mean cross-entropy
HOLDOUT = 0.2                        # share of training images held out to choose the strength
STEPS = 100                          # L-BFGS iterations per fit


def pool(features: torch.Tensor, view_ndim: int, prefix: int) -> torch.Tensor:
    """One vector per view: ViT tokens (..., T, D) -> the mean over patch tokens (..., D), the `prefix` tokens
    (CLS, registers) left out as the trainer leaves them out; CNN maps (..., C, H, W) -> the mean over positions."""
    features = features.float()
    return features[..., prefix:, :].mean(dim=-2) if view_ndim == 2 else features.mean(dim=(-2, -1))


def cached_pooled(path, prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(pooled features (N*K, D) float32, labels (N*K,), image index (N*K,), layer) from a cache store, one
    shard-aligned unit at a time (only the pooled vectors are kept). Coded features are decoded first, as the
    student's loader decodes them: int8 with its per-token scales, PCA codes with the store's basis."""
    from infra.codec_spec import parse_feature_codec
    from teacher_cache.basis_fit import layer_basis
    from teacher_cache.feature_codec import decode_features
    from teacher_cache.store import CacheStore
    store = CacheStore.open(path)
    layout = store.layout
    layer, shape = next(iter(layout.layers.items()))
    codec, ndim = parse_feature_codec(layout.feature_codec), len(shape)
    features = store.array(f"features/{layer}")
    scales = store.array(f"scales/{layer}") if codec.kind != "float16" else None
    basis = layer_basis(store, layer)
    pooled = []
    for u in range(layout.units):
        lo, hi = layout.unit_range(u)
        scale = torch.from_numpy(np.asarray(scales[lo:hi])) if scales is not None else None
        f = decode_features(torch.from_numpy(np.asarray(features[lo:hi])), scale, codec, ndim, basis)
        pooled.append(pool(f, ndim, prefix))
    x = torch.cat(pooled)  # (N, K, D)
    n, k = x.shape[:2]
    labels = torch.from_numpy(np.asarray(store.array("labels")[:])).long()
    return x.reshape(n * k, -1), labels.repeat_interleave(k), torch.arange(n).repeat_interleave(k), layer


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=STEPS, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach(), b.detach()


def fit_probe(x: torch.Tensor, y: torch.Tensor, image: torch.Tensor, num_classes: int, seed: int = 0) -> dict:
    """Standardise, choose the L2 strength on held-out images, refit on all. Returns the probe's parameters
    {"mean", "std", "weight", "bias"} (on raw features) with "l2" and "holdout_accuracy"."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = (x - mu) / sd
    images = torch.unique(image)
    held = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:int(len(images) * HOLDOUT)]]
    test = torch.isin(image, held)
    scores = []
    for l2 in L2_GRID:
        w, b = _fit(xs[~test], y[~test], num_classes, l2)
        scores.append(float(((xs[test] @ w.T + b).argmax(1) == y[test]).float().mean()))
    best = max(range(len(L2_GRID)), key=lambda i: (scores[i], i))  # ties: the stronger penalty
    w, b = _fit(xs, y, num_classes, L2_GRID[best])
    return {"mean": mu, "std": sd, "weight": w, "bias": b, "l2": L2_GRID[best], "holdout_accuracy": scores[best]}


class ProbedTeacher(nn.Module):
    """The fitted teacher up to the cached layer, then the probe: float images in [0, 1] -> logits."""

    def __init__(self, teacher: nn.Module, layer: str, prefix: int, probe: dict):
        super().__init__()
        self.teacher, self.layer, self.prefix = teacher, layer, prefix
        for key in ("mean", "std", "weight", "bias"):
            self.register_buffer(key, probe[key].float())

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.teacher.extract(x, [self.layer])[self.layer].half().float()  # as the cache stores it
        pooled = pool(f, f.ndim - 1, self.prefix)
        return ((pooled.to(self.mean.device) - self.mean) / self.std) @ self.weight.T + self.bias


def probe_measures(cfg, out, teacher: nn.Module, role: str, clean: dict, texture: dict | None, precision) -> dict:
    """The probe of one teacher fitted on its cache, and its figures beside the head's; one Ray task."""
    from analysis.fourier import low_frequency_reliance, split_frequencies
    from analysis.robustness import accuracy, model_device, shape_bias
    from teacher_cache.paths import store_path
    prefix = getattr(teacher.net, "num_prefix_tokens", 0) if teacher.spec.kind == "vit" else 0
    x, y, image, layer = cached_pooled(store_path(out, cfg, role), prefix)
    probe = fit_probe(x, y, image, int(teacher.head().out_features), seed=cfg.seed)
    model = ProbedTeacher(teacher, layer, prefix, probe).to(model_device(teacher)).eval()
    batch, radii = cfg.analysis.eval_batch_size, cfg.analysis.fourier_radii
    with precision():
        result = {"layer": layer, "pooling": "mean over patch tokens" if teacher.spec.kind == "vit" else
                  "mean over positions", "train_samples": len(y), "l2": probe["l2"],
                  "holdout_accuracy": probe["holdout_accuracy"],
                  "accuracy.clean": accuracy(model, clean["x"], clean["y"], batch)}
        # the low-pass curve only (analysis/fourier.py's frequency_accuracy also runs the high-pass one)
        low = [accuracy(model, clean["x"], clean["y"], batch, transform=lambda b, r=r: split_frequencies(b, r)[0])
               for r in radii]
        result["low_frequency_reliance"] = low_frequency_reliance({"radius": list(radii), "low": low},
                                                                  result["accuracy.clean"])
        if texture is not None:
            result["shape_bias"] = shape_bias(model, texture["x"], texture["y"], texture["tex"], batch)["shape_bias"]
    return result
