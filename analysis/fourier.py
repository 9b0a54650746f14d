"""Frequency analysis (Wang et al. 2020): accuracy on low-pass and high-pass filtered images.

A model that keeps its accuracy on low-pass images and loses it on high-pass ones relies on
low-frequency content such as shape; the reverse points to texture-like high-frequency cues.
Radii are fractions of the Nyquist frequency, so images of different resolutions compare.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from analysis.robustness import accuracy


def _low_pass_mask(h: int, w: int, radius: float, device: torch.device) -> torch.Tensor:
    """Boolean (h, w) mask of the centred spectrum: True where |f| <= radius, f in Nyquist units per axis."""
    # fftfreq is in cycles per pixel, Nyquist = 0.5; dividing by it maps each axis to [-1, 1)
    fy = torch.fft.fftshift(torch.fft.fftfreq(h, device=device)) / 0.5
    fx = torch.fft.fftshift(torch.fft.fftfreq(w, device=device)) / 0.5
    return torch.hypot(fy[:, None], fx[None, :]) <= radius


def split_frequencies(images: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split images (B, C, H, W) into low- and high-frequency parts, per channel, with low + high = images.

    Convention: the spectrum F = fftshift(fft2(image)) is indexed by frequencies normalised by the
    Nyquist frequency of their own axis, so both axes span [-1, 1) whatever H and W. The low-pass
    mask keeps |f| <= radius: radius 0 keeps only the mean (DC), radius 1 is the circle inscribed
    in the spectrum (touching Nyquist on each axis), and radius >= sqrt(2) keeps everything.
    low = real(ifft2(ifftshift(F * mask))) and high = images - low, which equals the same formula
    with (1 - mask) and makes the split exact.
    """
    h, w = images.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fft2(images), dim=(-2, -1))
    mask = _low_pass_mask(h, w, radius, images.device)
    low = torch.fft.ifft2(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))).real.to(images.dtype)
    return low, images - low


def frequency_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, radii: Sequence[float],
                       batch_size: int = 256) -> dict:
    """Accuracy on low-pass and high-pass versions of the images, one value per radius.

    Filtered images are fed as they are, without clamping to [0, 1]: a high-pass image is centred
    on zero, and clamping it would change its spectrum. Returns {"radius": [...], "low": [...],
    "high": [...], "clean": float}.
    """
    low, high = [], []
    for r in radii:
        low.append(accuracy(model, images, labels, batch_size, transform=lambda x: split_frequencies(x, r)[0]))
        high.append(accuracy(model, images, labels, batch_size, transform=lambda x: split_frequencies(x, r)[1]))
    return {"radius": list(radii), "low": low, "high": high, "clean": accuracy(model, images, labels, batch_size)}


def _retained_area(radii: Sequence[float], accs: Sequence[float], clean_acc: float) -> float:
    """Mean over r in [0, 1] of min(acc(r) / clean_acc, 1), by the trapezoid rule on the measured radii."""
    order = np.argsort(radii)
    r, a = np.asarray(radii, dtype=np.float64)[order], np.asarray(accs, dtype=np.float64)[order]
    # Integrate on [0, 1] exactly: add its endpoints, holding the curve flat beyond the measured range.
    grid = np.union1d(np.clip(r, 0.0, 1.0), [0.0, 1.0])
    retained = np.minimum(np.interp(grid, r, a) / clean_acc, 1.0)
    return float(np.trapezoid(retained, grid))


def low_frequency_reliance(curves: dict, clean_acc: float | None = None) -> float:
    """How much of its clean accuracy a model keeps when it only sees low frequencies, in [0, 1].

    LFR = integral over r in [0, 1] of min(low(r) / clean, 1) dr, trapezoid rule on the measured
    radii (the curve is held flat outside them). 1 means low-pass images up to any radius are as
    good as clean ones (the model needs only coarse content); near 0 means it needs the high
    frequencies. `clean` is `clean_acc`, else curves["clean"]. A model at chance on filtered images
    still scores chance / clean, so compare models on the same task.
    """
    clean = curves["clean"] if clean_acc is None else clean_acc
    return _retained_area(curves["radius"], curves["low"], clean)


def high_frequency_reliance(curves: dict, clean_acc: float | None = None) -> float:
    """The high-pass counterpart of `low_frequency_reliance`, in [0, 1].

    HFR = integral over r in [0, 1] of min(high(r) / clean, 1) dr: 1 means the model still works
    when everything below radius r is removed, for every r up to Nyquist; near 0 means it needs the
    low frequencies.
    """
    clean = curves["clean"] if clean_acc is None else clean_acc
    return _retained_area(curves["radius"], curves["high"], clean)
