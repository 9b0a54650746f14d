"""Frequency split conventions and the accuracy curves of toy low- and high-frequency models."""
import pytest
import torch
from torch import nn

from analysis.fourier import frequency_accuracy, high_frequency_reliance, low_frequency_reliance, split_frequencies

RADII = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]


def _checkerboard(h, w):
    """+-1 pattern at the Nyquist frequency of both axes, zero mean."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return 1.0 - 2.0 * ((yy + xx) % 2).float()


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 3, 12, 20), (1, 1, 9, 7)])
def test_low_plus_high_reconstructs(shape):
    torch.manual_seed(0)
    images = torch.rand(shape)
    for radius in (0.0, 0.3, 1.0, 2.0):
        low, high = split_frequencies(images, radius)
        assert low.shape == high.shape == images.shape
        torch.testing.assert_close(low + high, images, atol=1e-6, rtol=0)
    low, high = split_frequencies(images, 1.5)  # beyond sqrt(2), the corners of the spectrum: keeps everything
    torch.testing.assert_close(low, images, atol=1e-5, rtol=0)


def test_constant_image_is_all_low():
    images = torch.full((1, 3, 8, 10), 0.7)
    low, high = split_frequencies(images, 0.05)
    torch.testing.assert_close(low, images, atol=1e-6, rtol=0)
    assert high.abs().max() < 1e-6


def test_nyquist_checkerboard_is_all_high():
    for h, w in [(8, 8), (10, 6)]:
        images = (0.5 + 0.25 * _checkerboard(h, w)).expand(1, 3, h, w)
        for radius in (0.0, 0.5, 0.99):
            low, high = split_frequencies(images, radius)
            torch.testing.assert_close(low, torch.full_like(images, 0.5), atol=1e-6, rtol=0)  # only the mean
            torch.testing.assert_close(high, images - 0.5, atol=1e-6, rtol=0)


def test_radius_zero_keeps_only_the_mean():
    torch.manual_seed(1)
    images = torch.rand(2, 3, 12, 12)
    low, _ = split_frequencies(images, 1e-6)
    torch.testing.assert_close(low, images.mean(dim=(2, 3), keepdim=True).expand_as(images), atol=1e-6, rtol=0)


class _BrightnessModel(nn.Module):
    """Low-frequency toy: class 1 iff the blurred (here: mean) brightness exceeds 0.5."""

    def forward(self, x):
        score = x.mean(dim=(1, 2, 3)) - 0.5
        return torch.stack([torch.zeros_like(score), score], dim=1)


class _CheckerModel(nn.Module):
    """High-frequency toy: class 1 iff the image correlates positively with a Nyquist checkerboard."""

    def forward(self, x):
        score = (x * _checkerboard(*x.shape[-2:])).mean(dim=(1, 2, 3))
        # the margin makes "no checkerboard left" (score ~ 0 up to float error) a deterministic class 0
        return torch.stack([torch.zeros_like(score), score - 0.05], dim=1)


def _data(n=64):
    """Both cues agree with the label: brightness 0.3 / 0.7 and a checkerboard of sign -1 / +1."""
    torch.manual_seed(2)
    labels = torch.arange(n) % 2
    sign = 2.0 * labels.float() - 1.0
    images = 0.5 + 0.2 * sign[:, None, None, None] + 0.1 * sign[:, None, None, None] * _checkerboard(16, 16)
    images = images.expand(n, 3, 16, 16) + 0.01 * torch.randn(n, 3, 16, 16)
    return images, labels


def test_toy_models_separate_low_and_high_reliance():
    images, labels = _data()
    low_model = frequency_accuracy(_BrightnessModel(), images, labels, RADII, batch_size=16)
    high_model = frequency_accuracy(_CheckerModel(), images, labels, RADII, batch_size=16)
    assert low_model["radius"] == RADII
    assert low_model["clean"] == high_model["clean"] == 1.0
    # the brightness model keeps its accuracy on low-pass images and falls to chance on high-pass ones
    assert low_model["low"] == [1.0] * len(RADII)
    assert max(low_model["high"]) <= 0.5
    # the checkerboard model does the opposite (the checkerboard sits beyond radius 1)
    assert max(high_model["low"]) <= 0.5
    assert high_model["high"] == [1.0] * len(RADII)
    assert low_frequency_reliance(low_model) == pytest.approx(1.0)
    assert low_frequency_reliance(high_model) == pytest.approx(0.5)  # chance / clean
    assert high_frequency_reliance(high_model) > high_frequency_reliance(low_model)
    assert low_frequency_reliance(low_model) > low_frequency_reliance(high_model)


def test_reliance_is_an_area_on_unit_interval():
    curves = {"radius": [0.0, 0.5, 1.0, 1.5], "low": [0.0, 0.4, 0.8, 0.8], "high": [0.8, 0.8, 0.8, 0.8], "clean": 0.8}
    # trapezoid of 0, 0.5, 1 on [0, 1]: (0 + 0.5) / 4 + (0.5 + 1) / 4
    assert low_frequency_reliance(curves) == pytest.approx(0.5)
    assert high_frequency_reliance(curves) == pytest.approx(1.0)
    assert low_frequency_reliance(curves, clean_acc=0.4) == pytest.approx(0.75)  # capped at 1 per radius
