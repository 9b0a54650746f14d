"""Accuracy under occlusion, adversarial attacks and cue conflict, with toy models whose cues are known."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from analysis.robustness import accuracy, adversarial_curve, fgsm, occlusion_curve, pgd, shape_bias

EPS = [0.0, 0.02, 0.05, 0.1]


class _ChannelReader(nn.Module):
    """Predicts the class encoded as (class / 10) in the mean of one channel."""

    def __init__(self, channel):
        super().__init__()
        self.channel = channel

    def forward(self, x):
        value = x[:, self.channel].mean(dim=(1, 2)) * 10
        return -(value[:, None] - torch.arange(10.0)).abs()  # nearest class wins


def test_shape_bias_of_shape_and_texture_models():
    torch.manual_seed(0)
    shape = torch.randint(0, 8, (40,))
    texture = (shape + torch.randint(1, 8, (40,))) % 8  # always a conflict
    texture[:5] = shape[:5]  # ...except five images, which must be skipped
    images = torch.zeros(40, 3, 8, 8)
    images[:, 0] = shape.float()[:, None, None] / 10
    images[:, 1] = texture.float()[:, None, None] / 10
    images[:, 2] = 0.9  # class 9: neither cue
    by_shape = shape_bias(_ChannelReader(0), images, shape, texture, batch_size=16)
    by_texture = shape_bias(_ChannelReader(1), images, shape, texture, batch_size=16)
    assert by_shape == {"shape_bias": 1.0, "shape_decisions": 35, "texture_decisions": 0, "n": 35}
    assert by_texture == {"shape_bias": 0.0, "shape_decisions": 0, "texture_decisions": 35, "n": 35}
    # a model that matches neither cue has no shape bias to report
    assert math.isnan(shape_bias(_ChannelReader(2), images, shape, texture)["shape_bias"])


class _PixelReader(nn.Module):
    """Class 1 iff the top-left pixel of channel 0 is bright."""

    def forward(self, x):
        score = x[:, 0, 0, 0] - 0.5
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_occlusion_is_measured_on_occluded_images():
    torch.manual_seed(0)
    labels = torch.arange(64) % 2
    images = torch.rand(64, 3, 16, 16)
    images[:, 0] = 0.0
    images[:, 0, 0, 0] = labels.float()  # the only cue; the channel mean is ~0.002
    model = _PixelReader()
    curve = occlusion_curve(model, images, labels, [0.0, 0.25, 0.5, 1.0], grid=4, seed=0, batch_size=16)
    assert curve["fraction"] == [0.0, 0.25, 0.5, 1.0]
    assert curve["accuracy"][0] == accuracy(model, images, labels) == 1.0
    assert curve["accuracy"][-1] == 0.5  # the pixel is always covered: class 0 for everyone
    assert 0.5 < curve["accuracy"][2] < curve["accuracy"][1] < 1.0  # nested occlusions: monotone
    # same seed, same patches: deterministic and independent of the batch size
    assert occlusion_curve(model, images, labels, [0.25, 0.5], grid=4, batch_size=7)["accuracy"] == curve["accuracy"][1:3]


def _linear_setup(hidden=False):
    """A random linear (or small MLP) classifier and images labelled by its own clean predictions."""
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 5)] if hidden \
        else [nn.Flatten(), nn.Linear(3 * 8 * 8, 5)]
    model = nn.Sequential(*layers).eval()
    images = torch.rand(96, 3, 8, 8)
    with torch.no_grad():
        labels = model(images).argmax(dim=1)
    return model, images, labels


def test_fgsm_stays_in_eps_ball_and_image_range():
    model, images, labels = _linear_setup()
    adv = fgsm(model, images, labels, 0.05)
    assert (adv - images).abs().max() <= 0.05 + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    torch.manual_seed(123)  # pgd must not depend on the global generator when given its own
    adv_pgd = pgd(model, images, labels, 0.05, steps=5, generator=torch.Generator().manual_seed(0))
    assert (adv_pgd - images).abs().max() <= 0.05 + 1e-6
    assert adv_pgd.min() >= 0.0 and adv_pgd.max() <= 1.0


def test_fgsm_curve_reduces_accuracy():
    model, images, labels = _linear_setup()
    curve = adversarial_curve(model, images, labels, EPS, attack="fgsm", batch_size=32)
    assert curve["eps"] == EPS
    assert curve["accuracy"][0] == accuracy(model, images, labels) == 1.0
    assert curve["accuracy"][-1] < 0.5
    assert all(a >= b for a, b in zip(curve["accuracy"], curve["accuracy"][1:]))


def test_pgd_at_least_as_strong_as_fgsm():
    model, images, labels = _linear_setup(hidden=True)
    eps = [0.0, 0.15, 0.3]
    by_fgsm = adversarial_curve(model, images, labels, eps, attack="fgsm")["accuracy"]
    by_pgd = adversarial_curve(model, images, labels, eps, attack="pgd", steps=5, seed=0)["accuracy"]
    assert by_pgd[0] == by_fgsm[0] == 1.0
    assert all(p <= f for p, f in zip(by_pgd, by_fgsm))
    assert by_pgd[-1] < by_fgsm[-1] - 0.2
    # seeded random start: the same numbers again
    assert adversarial_curve(model, images, labels, eps[-1:], attack="pgd", steps=5, seed=0)["accuracy"] == by_pgd[-1:]


def _occlude_reference(images, fraction, grid, rng, fill):
    """The per-image, per-patch loop occlude_patches was written as: the definition the fast one must keep."""
    n, h, w, c = images.shape
    out = images.copy()
    n_drop = int(round(fraction * grid * grid))
    if n_drop == 0:
        return out
    ys = np.linspace(0, h, grid + 1).round().astype(int)
    xs = np.linspace(0, w, grid + 1).round().astype(int)
    for i in range(n):
        for p in rng.permutation(grid * grid)[:n_drop]:
            r, q = divmod(int(p), grid)
            out[i, ys[r]:ys[r + 1], xs[q]:xs[q + 1]] = fill
    return out


@pytest.mark.parametrize("dtype, h, w, grid, fraction", [(np.uint8, 32, 32, 8, 0.5), (np.float32, 10, 13, 8, 0.3),
                                                          (np.uint8, 5, 6, 8, 0.75), (np.float32, 9, 9, 3, 0.0)])
def test_occlusion_is_the_patch_loop_on_host_and_device(dtype, h, w, grid, fraction):
    """occlude_patches (datasets) and occlude_batch (analysis, on the batch's device) drop the same patches as
    the reference loop, draw the same numbers (the generator ends in the same state) and fill the same pixels."""
    from analysis.robustness import occlude_batch
    from teacher_cache.bias import occlude_patches
    rng = np.random.default_rng(3)
    images = (rng.random((6, h, w, 3)) * 255).astype(dtype)
    fill = np.array([10.7, 120.2, 240.9], dtype=np.float32)
    want_rng, got_rng, batch_rng = (np.random.default_rng(9) for _ in range(3))
    want = _occlude_reference(images, fraction, grid, want_rng, fill)
    np.testing.assert_array_equal(occlude_patches(images, fraction, grid, got_rng, fill=fill), want)
    assert got_rng.random() == want_rng.random()
    if dtype == np.float32:
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        got = occlude_batch(x, fraction, grid, batch_rng, torch.from_numpy(fill)).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(got, want)
