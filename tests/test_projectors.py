"""Projectors (PCA, GL, hint), the grid rule and the per-kind KD objectives, on tiny tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from student_train.losses import KDObjective, logit_kd_loss
from student_train.projectors import QKV_MAPS, GLProjector, HintRegressor, PCAProjector, match_grid

B, C_S, D, HEADS = 3, 6, 8, 2

# (student H_S x W_S, teacher grid): larger, smaller, equal, and non-square mismatched.
GRIDS = [((16, 16), (8, 8)), ((4, 4), (8, 8)), ((8, 8), (8, 8)), ((9, 13), (4, 6))]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def vit_teacher(grid, batch=B, dim=D, heads=HEADS, dtype=torch.float32):
    """Random last-block Q, K, V (B, heads, N, d) and tokens h (B, N, D), prefix dropped."""
    n = grid[0] * grid[1]
    qkv = [torch.randn(batch, heads, n, dim // heads).to(dtype) for _ in range(3)]
    return {"q": qkv[0], "k": qkv[1], "v": qkv[2], "h": torch.randn(batch, n, dim).to(dtype)}


def assert_every_param_has_grad(module):
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --- match_grid -------------------------------------------------------------------------------


def test_match_grid_rule():
    x = torch.randn(2, 3, 16, 16)
    assert match_grid(x, (16, 16)) is x
    assert torch.equal(match_grid(x, (8, 8)), F.adaptive_avg_pool2d(x, (8, 8)))
    small = torch.randn(2, 3, 4, 4)
    grown = F.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.equal(match_grid(small, (8, 8)), grown)
    # Longer on one axis, shorter on the other: pool the long one, then interpolate.
    mixed = torch.randn(2, 3, 16, 4)
    expected = F.interpolate(F.adaptive_avg_pool2d(mixed, (8, 4)), size=(8, 8), mode="bilinear")
    assert torch.equal(match_grid(mixed, (8, 8)), expected)


# --- shapes and scalar losses ------------------------------------------------------------------


@pytest.mark.parametrize("qkv", QKV_MAPS)
@pytest.mark.parametrize(("student_hw", "grid"), GRIDS)
def test_pca_scalar_losses(student_hw, grid, qkv):
    pca = PCAProjector(C_S, D, HEADS, grid=grid, qkv=qkv)
    assert pca.project(torch.randn(B, C_S, *student_hw), grid)[0].shape == (B, HEADS, grid[0] * grid[1], D // HEADS)
    t = vit_teacher(grid)
    for loss in pca(torch.randn(B, C_S, *student_hw), t["q"], t["k"], t["v"]):
        assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert pca.last_swap.shape == (3, B) and pca.last_swap.dtype == torch.bool


def test_pca_square_grid_inferred_and_non_square_needs_grid():
    t = vit_teacher((8, 8))
    assert all(torch.isfinite(x) for x in PCAProjector(C_S, D, HEADS)(torch.randn(B, C_S, 16, 16), t["q"], t["k"], t["v"]))
    t = vit_teacher((4, 6))
    with pytest.raises(ValueError, match="grid"):
        PCAProjector(C_S, D, HEADS)(torch.randn(B, C_S, 4, 6), t["q"], t["k"], t["v"])


@pytest.mark.parametrize(("student_hw", "grid"), GRIDS)
def test_gl_shapes_and_scalar_loss(student_hw, grid):
    gl = GLProjector(C_S, D, grid, groups=4)
    h_s = torch.randn(B, C_S, *student_hw)
    assert gl.project(h_s).shape == (B, grid[0] * grid[1], D)
    loss = gl(h_s, vit_teacher(grid)["h"])
    assert loss.shape == () and loss.dtype == torch.float32


@pytest.mark.parametrize(("student_hw", "grid"), GRIDS)
def test_hint_scalar_loss(student_hw, grid):
    hint = HintRegressor(C_S, 5)
    loss = hint(torch.randn(B, C_S, *student_hw), torch.randn(B, 5, *grid))
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)


# --- gradients reach every parameter -----------------------------------------------------------


@pytest.mark.parametrize(("student_hw", "grid"), GRIDS)
def test_gradients_reach_every_parameter(student_hw, grid):
    t = vit_teacher(grid)
    pcas = [PCAProjector(C_S, D, HEADS, swap_prob=0.0, grid=grid, qkv=qkv) for qkv in QKV_MAPS]
    modules_and_losses = [(pca, lambda h, pca=pca: sum(pca(h, t["q"], t["k"], t["v"]))) for pca in pcas] + [
        (gl := GLProjector(C_S, D, grid, groups=4), lambda h: gl(h, t["h"])),
        (hint := HintRegressor(C_S, 5), lambda h: hint(h, torch.randn(B, 5, *grid))),
    ]
    for module, loss_of in modules_and_losses:
        h_s = torch.randn(B, C_S, *student_hw, requires_grad=True)
        loss_of(h_s).backward()
        assert_every_param_has_grad(module)
        assert h_s.grad.abs().sum() > 0


# --- a perfect match costs nothing ------------------------------------------------------------


@pytest.mark.parametrize("qkv", QKV_MAPS)
def test_pca_full_swap_is_exactly_zero(qkv):
    pca = PCAProjector(C_S, D, HEADS, swap_prob=1.0, grid=(8, 8), qkv=qkv).train()
    t = vit_teacher((8, 8))
    attn, value = pca(torch.randn(B, C_S, 16, 16), t["q"], t["k"], t["v"])
    assert pca.last_swap.all()
    assert attn.item() == 0.0 and value.item() == 0.0


def test_gl_identity_maps_tokens_row_major():
    gl = GLProjector(D, D, (4, 6), groups=2)
    with torch.no_grad():
        gl.weight.copy_(torch.eye(D).expand_as(gl.weight))
        gl.bias.zero_()
    h_s = torch.randn(B, D, 4, 6)
    assert gl(h_s, h_s.flatten(2).transpose(1, 2)).item() == 0.0


def test_gl_groups_match_a_per_position_reference():
    grid, groups = (6, 10), 4
    gl = GLProjector(C_S, D, grid, groups)
    h_s = torch.randn(B, C_S, *grid)
    expected = torch.empty(B, grid[0] * grid[1], D)
    with torch.no_grad():
        for r in range(grid[0]):
            for c in range(grid[1]):
                g = (r * groups // grid[0]) * groups + c * groups // grid[1]
                expected[:, r * grid[1] + c] = h_s[:, :, r, c] @ gl.weight[g] + gl.bias[g]
    torch.testing.assert_close(gl.project(h_s), expected)
    assert gl(h_s, expected).item() < 1e-10


def test_gl_uneven_bands_on_the_vit_b16_grid():
    index = GLProjector(C_S, D, (14, 14), groups=4).group_index.view(14, 14)
    assert torch.bincount(index[:, 0] // 4).tolist() == [4, 3, 4, 3]  # group rows
    assert torch.bincount(index[0]).tolist() == [4, 3, 4, 3]  # group columns
    assert index.unique().numel() == 16


def test_hint_identity_regressor_is_zero():
    hint = HintRegressor(C_S, C_S).eval()
    with torch.no_grad():
        hint.conv.weight.copy_(torch.eye(C_S).view(C_S, C_S, 1, 1))
        hint.bn.running_var.fill_(1.0 - hint.bn.eps)
    f = torch.randn(B, C_S, 8, 8)
    assert hint(f, f).item() < 1e-12


def test_logit_kd_zero_for_identical_logits_and_matches_definition():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    assert abs(logit_kd_loss(t, t, 4.0).item()) < 1e-7
    p_t = F.softmax(t / 4.0, dim=-1)
    manual = (p_t * (p_t.log() - F.log_softmax(s / 4.0, dim=-1))).sum(-1).mean() * 16.0
    torch.testing.assert_close(logit_kd_loss(s, t, 4.0), manual)


# --- the partial cross -------------------------------------------------------------------------


def test_swap_rate_matches_swap_prob_and_eval_never_swaps():
    pca = PCAProjector(2, 2, 1, swap_prob=0.3, grid=(2, 2)).train()
    t = vit_teacher((2, 2), batch=20_000, dim=2, heads=1)
    h_s = torch.randn(20_000, 2, 2, 2)
    pca(h_s, t["q"], t["k"], t["v"])
    rates = pca.last_swap.float().mean(dim=1)
    assert (rates - 0.3).abs().max() < 0.03
    both_qk = (pca.last_swap[0] & pca.last_swap[1]).float().mean()
    assert abs(both_qk - 0.09) < 0.01  # Q and K drawn independently
    pca.eval()
    pca(h_s, t["q"], t["k"], t["v"])
    assert not pca.last_swap.any()


@pytest.mark.parametrize("qkv", QKV_MAPS)
def test_partial_swap_uses_the_teacher_matrix_exactly_where_drawn(qkv):
    """Against Q, K, V computed by each convolution on its own (the projector stacks them)."""
    grid, batch = (4, 4), 16
    pca = PCAProjector(C_S, D, HEADS, swap_prob=0.5, grid=grid, qkv=qkv).train()
    t, h_s = vit_teacher(grid, batch=batch), torch.randn(batch, C_S, *grid)
    attn, value = pca(h_s, t["q"], t["k"], t["v"])
    swap = pca.last_swap
    assert swap.any() and not swap.all()

    def heads(x):
        return x.flatten(2).view(batch, HEADS, D // HEADS, -1).transpose(2, 3)

    mixed = pca.depthwise(h_s) if qkv == "dwsep" else h_s
    q, k, v = (
        torch.where(m.view(-1, 1, 1, 1), t[name], heads(conv(mixed)))
        for m, name, conv in zip(swap, "qkv", (pca.to_q, pca.to_k, pca.to_v))
    )
    scale = (D // HEADS) ** -0.5
    expected_attn = F.mse_loss(
        torch.softmax(q @ k.transpose(-1, -2) * scale, -1), torch.softmax(t["q"] @ t["k"].transpose(-1, -2) * scale, -1)
    )
    expected_value = F.mse_loss(v @ v.transpose(-1, -2) * scale, t["v"] @ t["v"].transpose(-1, -2) * scale)
    torch.testing.assert_close(attn, expected_attn)
    torch.testing.assert_close(value, expected_value)


def test_swap_is_reproducible_under_manual_seed():
    pca = PCAProjector(C_S, D, HEADS, grid=(4, 4)).train()
    t, h_s = vit_teacher((4, 4), batch=64), torch.randn(64, C_S, 4, 4)
    masks = []
    for _ in range(2):
        torch.manual_seed(7)
        pca(h_s, t["q"], t["k"], t["v"])
        masks.append(pca.last_swap)
    assert torch.equal(*masks)


@pytest.mark.parametrize("qkv", QKV_MAPS)
def test_qkv_map_layers_and_cost(qkv):
    """The layers of each Q, K, V map, and its forward cost as the comment on QKV_MAPS states it (per image
    and token: conv3x3 27 C D, conv1x1 3 C D, dwsep 9 C + 3 C D multiply-adds), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    channels, dim, grid = 16, 8, (4, 4)
    pca = PCAProjector(channels, dim, HEADS, grid=grid, qkv=qkv)
    kernel = 3 if qkv == "conv3x3" else 1
    assert all(conv.kernel_size == (kernel, kernel) for conv in (pca.to_q, pca.to_k, pca.to_v))
    assert (pca.depthwise is not None) == (qkv == "dwsep")
    with FlopCounterMode(display=False) as counter:
        pca.project(torch.randn(1, channels, *grid), grid)
    macs_per_token = {"conv3x3": 27 * channels * dim, "conv1x1": 3 * channels * dim,
                      "dwsep": 9 * channels + 3 * channels * dim}[qkv]
    assert counter.get_total_flops() == 2 * macs_per_token * grid[0] * grid[1]


def test_unknown_qkv_map_is_refused():
    with pytest.raises(ValueError, match="conv1x1"):
        PCAProjector(C_S, D, HEADS, qkv="conv5x5")


# --- KDObjective -------------------------------------------------------------------------------

VIT_ARGS = dict(student_channels=C_S, kd_lambda=0.5, teacher_dim=D, num_heads=HEADS, grid=(4, 6))
VIT_WEIGHTS = dict(pca_attn_weight=30.0, pca_value_weight=0.25, gl_weight=2.0)
CNN_ARGS = dict(student_channels=C_S, kd_lambda=0.5, teacher_channels=5)
CASES = {
    "student_kd_vit": ({**VIT_ARGS, **VIT_WEIGHTS}, lambda dt: vit_teacher((4, 6), dtype=dt),
                       ("ce", "pca_attn", "pca_value", "gl")),
    "student_kd_cnn": (CNN_ARGS, lambda dt: {"feature": torch.randn(B, 5, 4, 6).to(dt)}, ("ce", "hint")),
    "student_independent": ({}, lambda dt: None, ("ce",)),
    "student_logit_kd": ({}, lambda dt: {"logits": torch.randn(B, 10).to(dt)}, ("ce", "logit_kd")),
}


@pytest.mark.parametrize(("kind", "pca_qkv"), [(kind, "conv3x3") for kind in CASES]
                         + [("student_kd_vit", qkv) for qkv in QKV_MAPS if qkv != "conv3x3"])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.float16])
def test_kd_objective_terms_and_total(kind, pca_qkv, teacher_dtype):
    args, make_teacher, keys = CASES[kind]
    # swap_prob=0 so that no projector layer can go without gradient by chance.
    objective = KDObjective(kind, label_smoothing=0.1, swap_prob=0.0, pca_qkv=pca_qkv, **args)
    logits = torch.randn(B, 10, requires_grad=True)
    feature = torch.randn(B, C_S, 8, 12, requires_grad=True)
    total, terms = objective(logits, torch.randint(0, 10, (B,)), feature, make_teacher(teacher_dtype))
    assert tuple(terms) == keys
    assert all(v.dtype == torch.float32 and v.shape == () for v in [total, *terms.values()])
    if kind == "student_logit_kd":
        expected = 0.1 * terms["ce"] + 0.9 * terms["logit_kd"]
    elif kind == "student_kd_vit":  # L = CE + lambda (w_attn L_attn + w_value L_value + w_gl L_GL)
        expected = terms["ce"] + 0.5 * (30.0 * terms["pca_attn"] + 0.25 * terms["pca_value"] + 2.0 * terms["gl"])
    else:
        expected = terms["ce"] + 0.5 * sum(terms[k] for k in keys[1:])
    torch.testing.assert_close(total, expected)
    total.backward()
    assert logits.grad.abs().sum() > 0
    assert_every_param_has_grad(objective)
    # kd_vit: Q, K, V weights, Q and V biases, GL weight and bias; dwsep adds the depthwise weight
    expected = {"student_kd_vit": 8 if pca_qkv == "dwsep" else 7, "student_kd_cnn": 3}.get(kind, 0)
    assert len(list(objective.parameters())) == expected


@pytest.mark.parametrize(
    ("kind", "missing"),
    [("student_kd_vit", name) for name in VIT_ARGS] + [("student_kd_cnn", name) for name in CNN_ARGS],
)
def test_kd_objective_names_the_missing_argument(kind, missing):
    args = {k: v for k, v in {**VIT_ARGS, **CNN_ARGS}.items() if k != missing}
    with pytest.raises(ValueError, match=missing):
        KDObjective(kind, **args)


def test_kd_objective_rejects_unknown_kind_and_missing_teacher_keys():
    with pytest.raises(ValueError, match="unknown kind"):
        KDObjective("student_kd_swin")
    objective = KDObjective("student_kd_vit", **VIT_ARGS)
    with pytest.raises(ValueError, match="'h'"):
        teacher = vit_teacher((4, 6))
        del teacher["h"]
        objective(torch.randn(B, 10), torch.zeros(B, dtype=torch.long), torch.randn(B, C_S, 4, 6), teacher)
