"""Accuracy under perturbations: patch occlusion, L-inf adversarial attacks, and cue-conflict shape bias.

A model is an eval-mode `nn.Module` mapping float images in [0, 1], (B, 3, H, W), to logits (B, C).
Images may live on the CPU; each batch is moved to the model's device.
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from teacher_cache.bias import occlusion_cells, patch_index, shape_bias  # noqa: F401 (shape_bias: the teacher pretraining measures it too)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Predicted classes (N,) on the CPU; `transform` is applied to each batch on the model's device."""
    device = model_device(model)
    preds = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        if transform is not None:
            x = transform(x)
        preds.append(model(x).argmax(dim=1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
             transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Top-1 accuracy in [0, 1] of the model on (optionally transformed) images."""
    return float((predict(model, images, batch_size, transform) == labels.cpu()).float().mean())


def occlusion_curve(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, fractions: Sequence[float],
                    grid: int = 8, seed: int = 0, batch_size: int = 256) -> dict:
    """Accuracy when `fraction` of a grid x grid patch partition is filled with the per-channel data set mean.

    Patches are drawn independently per image (Naseer et al. 2021). Every fraction restarts the
    same seeded generator, so each image gets the same patch order and the occluded sets are nested
    (fraction 0.5 covers a superset of fraction 0.25). Returns {"fraction": [...], "accuracy": [...]}.
    """
    fill = images.mean(dim=(0, 2, 3), dtype=torch.float64).float()
    accs = []
    for fraction in fractions:
        rng = np.random.default_rng(seed)  # the batches are consumed in order: no dependence on batch_size
        accs.append(accuracy(model, images, labels, batch_size,
                             transform=lambda x: occlude_batch(x, fraction, grid, rng, fill)))
    return {"fraction": list(fractions), "accuracy": accs}


def occlude_batch(x: torch.Tensor, fraction: float, grid: int, rng: np.random.Generator,
                  fill: torch.Tensor) -> torch.Tensor:
    """teacher_cache.bias.occlude_patches for a (B, C, H, W) batch on its own device: the same draws and pixels,
    without taking the batch to the host (the patch choice is B x grid x grid booleans; the rest is one where)."""
    cells = occlusion_cells(len(x), fraction, grid, rng)
    if cells is None:
        return x
    h, w = x.shape[-2:]
    rows = torch.from_numpy(patch_index(h, grid)).to(x.device)
    cols = torch.from_numpy(patch_index(w, grid)).to(x.device)
    mask = torch.from_numpy(cells).to(x.device)[:, rows[:, None], cols[None, :]]  # (B, H, W)
    return torch.where(mask[:, None], fill.to(x.device, x.dtype)[None, :, None, None], x)


def _input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the summed cross-entropy with respect to the input (parameter grads untouched)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="sum")
        return torch.autograd.grad(loss, x)[0]


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """One L-inf step of size eps along the sign of the loss gradient (Goodfellow et al. 2015), clamped to [0, 1]."""
    grad = _input_gradient(model, images, labels)
    return (images + eps * grad.sign()).clamp(0.0, 1.0).detach()


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int = 5,
        step_size: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """L-inf projected gradient descent (Madry et al. 2018) from a uniform random start in the eps ball.

    step_size defaults to 2.5 * eps / steps, so the iterates can cross the ball. Every iterate is
    projected onto the eps ball around `images` and clamped to [0, 1].
    """
    step_size = 2.5 * eps / steps if step_size is None else step_size
    noise = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    x = (images + eps * (2 * noise - 1)).clamp(0.0, 1.0)
    for _ in range(steps):
        x = x + step_size * _input_gradient(model, x, labels).sign()
        x = torch.minimum(torch.maximum(x, images - eps), images + eps).clamp(0.0, 1.0)
    return x.detach()


def adversarial_curve(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps_list: Sequence[float],
                      attack: str = "fgsm", steps: int = 5, step_size: float | None = None,
                      batch_size: int = 128, seed: int = 0) -> dict:
    """Accuracy under an L-inf `attack` ("fgsm" or "pgd") for each eps, in pixel units of [0, 1] images.

    eps 0 is the clean accuracy. PGD's random start uses a generator seeded with `seed` per eps.
    Returns {"eps": [...], "accuracy": [...]}.
    """
    if attack not in ("fgsm", "pgd"):
        raise ValueError(f"attack must be 'fgsm' or 'pgd', got {attack!r}")
    device = model_device(model)
    accs = []
    for eps in eps_list:
        if eps == 0:
            accs.append(accuracy(model, images, labels, batch_size))
            continue
        generator = torch.Generator(device=device).manual_seed(seed)
        correct = 0
        for i in range(0, len(images), batch_size):
            x, y = images[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
            if attack == "fgsm":
                x_adv = fgsm(model, x, y, eps)
            else:
                x_adv = pgd(model, x, y, eps, steps, step_size, generator)
            with torch.no_grad():
                correct += int((model(x_adv).argmax(dim=1) == y).sum())
        accs.append(correct / len(images))
    return {"eps": list(eps_list), "accuracy": accs}
