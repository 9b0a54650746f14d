"""Accuracy under occlusion, adversarial attacks and cue conflict, with toy models whose cues are known."""
import math

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
