"""Raw GradCAM maps on tiny models, and the spread measures on hand-made maps."""
import copy

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from analysis.gradcam import (common_grid, energy_inside, gradcam_maps, layer_grid, mass_fraction, normalized_entropy,
                              rank_correlation, summarize_gradcam, to_grid, vit_reshape_transform)

N_PIXELS = 64


def _uniform_and_point():
    uniform = np.full((8, 8), 0.3)
    point = np.zeros((8, 8))
    point[2, 5] = 4.0
    return np.stack([uniform, point])


def test_entropy_uniform_is_one_point_is_zero():
    np.testing.assert_allclose(normalized_entropy(_uniform_and_point()), [1.0, 0.0], atol=1e-12)


def test_mass_fractions():
    maps = _uniform_and_point()
    np.testing.assert_allclose(mass_fraction(maps, 0.5), [0.5, 1 / N_PIXELS])
    np.testing.assert_allclose(mass_fraction(maps, 0.9), [0.9, 1 / N_PIXELS], atol=1 / N_PIXELS)


def test_all_zero_map_gives_nan():
    zero = np.zeros((1, 4, 4))
    assert np.isnan(normalized_entropy(zero)).all()
    assert np.isnan(mass_fraction(zero, 0.5)).all()
    assert np.isnan(energy_inside(zero, np.ones((4, 4), bool))).all()


def test_energy_inside_mask():
    rng = np.random.default_rng(0)
    mask = np.zeros((8, 8), bool)
    mask[2:6, 1:5] = True
    inside_only = rng.random((3, 8, 8)) * mask
    np.testing.assert_allclose(energy_inside(inside_only, mask), 1.0)
    np.testing.assert_allclose(energy_inside(np.ones((1, 8, 8)), mask), 16 / 64)  # uniform: the mask's area


def test_rank_correlation_self_and_negation():
    maps = np.random.default_rng(1).random((4, 7, 7))
    np.testing.assert_allclose(rank_correlation(maps, maps), 1.0)
    np.testing.assert_allclose(rank_correlation(maps, -maps), -1.0)
    with pytest.raises(ValueError):
        rank_correlation(maps, maps[:, :6])


def test_summary_keys_and_values():
    maps = _uniform_and_point()
    summary = summarize_gradcam(maps, masks=np.ones((8, 8), bool), reference=maps)
    assert set(summary) == {"entropy", "mass50", "mass90", "energy_inside", "rank_corr_teacher", "maps", "dropped"}
    assert summary["entropy"] == pytest.approx(0.5)
    assert summary["energy_inside"] == pytest.approx(1.0)
    assert summary["rank_corr_teacher"] == pytest.approx(1.0)
    assert set(summarize_gradcam(maps)) == {"entropy", "mass50", "mass90", "maps", "dropped"}


def test_dropped_maps_are_counted():
    """An all-zero map has no distribution: the means leave it out, and the summary says how many were left out."""
    maps = np.concatenate([_uniform_and_point(), np.zeros((3, 8, 8))])
    summary = summarize_gradcam(maps)
    assert summary["maps"] == 5 and summary["dropped"] == 3
    assert summary["entropy"] == pytest.approx(0.5)  # the mean of the two maps with mass
    nothing = summarize_gradcam(np.zeros((2, 8, 8)))
    assert nothing["dropped"] == 2 and np.isnan(nothing["entropy"])


def test_one_map_against_a_hand_computation():
    """GradCAM by hand on a tiny conv net: A = the target layer's activations, g = d logit_c / d A; the map is
    ReLU(sum over channels k of mean-over-space(g_k) * A_k). Checked for every class of one image."""
    torch.manual_seed(3)
    model = _TinyCNN().eval()
    image = torch.rand(1, 3, 8, 8)
    acts = {}
    hook = model.features[-1].register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    logits = model(image)[0]
    hook.remove()
    a = acts["a"][0]                                                        # (K, h, w)
    mixed = 0
    for c in range(10):
        g = torch.autograd.grad(logits[c], acts["a"], retain_graph=True)[0][0]  # (K, h, w)
        by_hand = torch.relu((g.mean(dim=(1, 2))[:, None, None] * a).sum(dim=0)).detach().numpy()
        maps = gradcam_maps(model, model.features[-1], image, torch.tensor([c]))
        np.testing.assert_allclose(maps[0], by_hand, rtol=1e-5, atol=1e-7)
        mixed += bool(by_hand.max() > 0 and (by_hand == 0).any())
    assert mixed  # some map has cells the ReLU cut and cells it kept


def test_common_grid_is_the_coarsest():
    assert common_grid([(14, 14), (7, 7)]) == (7, 7)
    assert common_grid([(8, 8), (4, 4), (4, 4)]) == (4, 4)
    assert common_grid([(6, 10), (8, 5)]) == (6, 5)


def test_to_grid_area_averages_and_never_upsamples():
    fine = np.random.default_rng(2).random((3, 8, 8))
    coarse = to_grid(fine, (4, 4))
    np.testing.assert_allclose(coarse, fine.reshape(3, 4, 2, 4, 2).mean(axis=(2, 4)))  # mean of each 2x2 block
    np.testing.assert_allclose(to_grid(fine, (8, 8)), fine)  # already on the grid: unchanged
    with pytest.raises(ValueError, match="interpolating"):
        to_grid(coarse, (8, 8))
    mask = np.zeros((1, 8, 8), bool)
    mask[0, :3, :] = True  # the top 3 pixel rows: all of cell row 0, half of cell row 1
    np.testing.assert_allclose(to_grid(mask, (4, 4))[0, :, 0], [1.0, 0.5, 0.0, 0.0])


def test_coarse_focused_map_is_not_made_global():
    # A 4x4 map with all its mass in one cell, against an 8x8 map with its mass in the matching 2x2 block:
    # on the common (coarse) grid both are one cell. Upsampling the coarse map instead (bilinear to 8x8)
    # spreads it over many pixels and makes it look more global than the fine map.
    coarse = np.zeros((1, 4, 4))
    coarse[0, 1, 2] = 1.0
    fine = np.zeros((1, 8, 8))
    fine[0, 2:4, 4:6] = 1.0
    grid = common_grid([coarse.shape[1:], fine.shape[1:]])
    a, b = to_grid(coarse, grid), to_grid(fine, grid)
    np.testing.assert_allclose(normalized_entropy(a), normalized_entropy(b))
    np.testing.assert_allclose(normalized_entropy(a), 0.0, atol=1e-12)
    upsampled = torch.nn.functional.interpolate(torch.from_numpy(coarse)[:, None], size=(8, 8), mode="bilinear",
                                                align_corners=False)[:, 0].numpy()
    assert normalized_entropy(upsampled)[0] > normalized_entropy(fine)[0] + 0.2


def test_energy_inside_fractional_mask():
    maps = np.ones((1, 2, 2))
    np.testing.assert_allclose(energy_inside(maps, np.array([[1.0, 0.5], [0.0, 0.0]])), 0.375)


def test_layer_grid_of_cnn_and_vit():
    torch.manual_seed(0)
    cnn = _TinyCNN()
    assert layer_grid(cnn, cnn.features[-1], 16) == (8, 8)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    assert layer_grid(vit, vit.blocks[-1].norm1, 32, vit_reshape_transform(4, 4)) == (4, 4)


def test_demo_models_share_the_student_grid(tiny_cfg):
    from analysis.evaluate import gradcam_grid_meta
    meta = gradcam_grid_meta(tiny_cfg)
    # demo at 32 px: ViT tokens 8x8, every ResNet layer4 4x4 -> compared on 4x4, the ViT maps area-averaged
    assert meta["native"]["teacher_vit"] == [8, 8] and meta["native"]["teacher_cnn"] == [4, 4]
    assert meta["size"] == [4, 4] and "area" in meta["resampling"]


class _TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _batch(n=6, size=16):
    torch.manual_seed(0)
    return torch.rand(n, 3, size, size), torch.arange(n) % 10


def test_cnn_maps_are_raw_not_minmax_scaled():
    torch.manual_seed(0)
    model = _TinyCNN().eval()
    images, labels = _batch()
    maps = gradcam_maps(model, model.features[-1], images, labels, batch_size=4)
    assert maps.shape == (6, 8, 8) and maps.dtype == np.float32
    assert (maps >= 0).all() and maps.max() > 0

    louder = copy.deepcopy(model)
    with torch.no_grad():
        louder.fc.weight.mul_(10.0)
    # raw maps scale with the logit; the package's min-max scaled maps cannot tell the two models apart
    np.testing.assert_allclose(gradcam_maps(louder, louder.features[-1], images, labels), 10 * maps, rtol=1e-4,
                               atol=1e-7)
    targets = [ClassifierOutputTarget(int(c)) for c in labels]
    scaled = []
    for m in (model, louder):
        with GradCAM(m, [m.features[-1]]) as cam:
            scaled.append(cam(images, targets))
    np.testing.assert_allclose(scaled[0], scaled[1], atol=1e-4)


def test_frozen_model_under_no_grad():
    torch.manual_seed(0)
    model = _TinyCNN().eval().requires_grad_(False)
    images, labels = _batch(3)
    with torch.no_grad():
        maps = gradcam_maps(model, model.features[-1], images, labels)
    assert maps.shape == (3, 8, 8) and maps.max() > 0


def test_vit_maps_with_reshape_transform():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    images, labels = _batch(4, size=32)
    maps = gradcam_maps(vit, vit.blocks[-1].norm1, images, labels, reshape_transform=vit_reshape_transform(4, 4))
    assert maps.shape == (4, 4, 4)
    assert np.isfinite(maps).all() and (maps >= 0).all() and maps.max() > 0
