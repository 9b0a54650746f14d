"""Projectors that carry a student CNN feature map into a teacher's space and score the match.

Each projector owns its learnable layers and returns scalar float32 losses:

- ``PCAProjector``: partially cross attention, matches the teacher's attention and value
  relations (two terms) (Liu et al. 2022, "Cross-Architecture Knowledge Distillation", arXiv 2207.05273);
- ``GLProjector``: group-wise linear, matches the teacher's output tokens position by position
  (same paper);
- ``HintRegressor``: FitNets hint, matches a CNN teacher's feature map (Romero et al. 2015).

Spatial sizes are reconciled by ``match_grid`` alone, so all three agree on the rule.
Teacher tensors may be float16; every loss is computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def match_grid(h_s: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a student map (B, C, H, W) to the teacher grid ``size`` = (gh, gw).

    The rule, per axis: a student axis longer than the teacher's is shrunk by adaptive average
    pooling; a shorter one is grown by bilinear interpolation (align_corners=False); an equal
    one is untouched. Equal sizes return ``h_s`` itself. A map longer on one axis and shorter on
    the other is pooled first, then interpolated.
    """
    gh, gw = size
    h, w = h_s.shape[-2:]
    if (h, w) == (gh, gw):
        return h_s
    if h > gh or w > gw:
        # Averaging keeps every student position's contribution, as a ViT token summarises a
        # whole patch; pooling an axis to its own length leaves it unchanged.
        h_s = F.adaptive_avg_pool2d(h_s, (min(h, gh), min(w, gw)))
    if h < gh or w < gw:
        h_s = F.interpolate(h_s, size=(gh, gw), mode="bilinear", align_corners=False)
    return h_s


def _to_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, D, gh, gw) -> (B, heads, N, D // heads), tokens row-major as ViT patch tokens.

    Through (B, gh, gw, D): a channels_last map is already laid out so, and needs no copy."""
    b, d = x.shape[:2]
    return x.permute(0, 2, 3, 1).reshape(b, -1, num_heads, d // num_heads).transpose(1, 2)


def relation_losses(q_s: Tensor, k_s: Tensor, v_s: Tensor, q_t: Tensor, k_t: Tensor, v_t: Tensor) -> tuple[Tensor, Tensor]:
    """The two relation terms of L_PCA, each a float32 scalar; all inputs (B, heads, N, d).

        attn  = MSE(softmax(Q_S K_S^T / sqrt d), softmax(Q_T K_T^T / sqrt d))
        value = MSE(V_S V_S^T / sqrt d,          V_T V_T^T / sqrt d)

    Under a caller's reduced-precision autocast (bf16 on GPU) the four N x N matmuls run in that
    precision, accumulating in float32; the softmax, the differences and the means are float32.
    bf16 rounds each matmul input and output to 8 significant bits (relative 2^-8), so an entry of
    the relations is off by about 0.4% of its own size; tests/test_kd_step.py bounds the effect
    on both terms and their gradients against float32. Without autocast everything is float32.
    """
    # 1/sqrt(d) is applied to the (N x d) operands rather than to the (N x N) products: fewer multiplications
    d = q_t.shape[-1]
    attn_t = torch.softmax((q_t * d**-0.5 @ k_t.transpose(-1, -2)).float(), dim=-1)
    attn_s = torch.softmax((q_s * d**-0.5 @ k_s.transpose(-1, -2)).float(), dim=-1)
    v_t, v_s = v_t * d**-0.25, v_s * d**-0.25
    value_t = (v_t @ v_t.transpose(-1, -2)).float()
    value_s = (v_s @ v_s.transpose(-1, -2)).float()
    return F.mse_loss(attn_s, attn_t), F.mse_loss(value_s, value_t)


# How PCAProjector maps the student map to Q_S, K_S, V_S (train.pca_qkv). MACs per image and output
# position, C = student channels, D = teacher_dim: conv3x3 27 C D (the paper's three 3x3 convolutions),
# conv1x1 3 C D (one linear map per token, as the authors' later code), dwsep 9 C + 3 C D (one depthwise
# 3x3 shared by Q, K and V, then a 1x1 each: the 3x3 neighbourhood at about the 1x1 cost).
QKV_MAPS = ("conv3x3", "conv1x1", "dwsep")


class PCAProjector(nn.Module):
    """Partially cross attention (PCA) projector; ``forward`` returns L_PCA's two terms.

    Convolutions map the grid-matched student map to Q_S, K_S, V_S with ``teacher_dim``
    channels, split into (B, heads, N, d) like the teacher's, d = d_head. ``qkv`` (one of
    ``QKV_MAPS``) chooses them: three 3x3 convolutions (padding 1, the paper's), three 1x1, or
    one depthwise 3x3 followed by three 1x1 (``depthwise`` then ``to_q``, ``to_k``, ``to_v``).
    With g the partial cross below, and MSE the mean over batch, heads and N x N entries:

        L_PCA = MSE(softmax(Q_T K_T^T / sqrt d), softmax(g(Q_S) g(K_S)^T / sqrt d))   (attention)
              + MSE(V_T V_T^T / sqrt d,          g(V_S) g(V_S)^T / sqrt d)            (value)

    g (training only): each of Q_S, K_S, V_S is replaced by the teacher's detached matrix,
    independently per sample and per matrix, with probability ``swap_prob``, drawn from the
    global torch RNG (reproducible under ``torch.manual_seed``). The draw is kept in
    ``last_swap``, a (3, B) bool tensor with rows Q, K, V; in eval mode it is all False.

    Why this form (the paper's own text was not at hand; third-party transcriptions were):
    - The paper's eq. (4), as transcribed by third parties, is
      ||Attn_T - PCAttn_S||^2 + ||V_T V_T^T/sqrt d - V_S V_S^T/sqrt d||^2, with g swapping
      student matrices for the teacher's at p = 0.5. We compare softmax attention maps (the
      "attention map" the paper aligns, as reimplementations do).
    - The value term takes g(V_S), where the transcriptions write V_S: with an attention term
      that uses only Q and K, a swapped V would otherwise change nothing. At swap_prob = 0
      both readings agree.
    - g swaps whole matrices per sample. The notation g(M(i, j)) can also be read entry by
      entry, and one reimplementation mixes entries; both swap a fraction swap_prob on average.
    - The authors' later code release, as annotated by third parties, differs from the paper:
      it matches the pre-softmax Q K^T/sqrt d and V V^T averaged over heads, weighted 0.2 and
      0.05, has no swap, and maps h_S to Q, K, V with one linear layer instead of 3x3 convs
      (``qkv="conv1x1"`` is that map; the loss stays the paper's).
    - Means, not sums, so the loss does not grow with B, heads or N^2. The two terms differ in
      scale (attention entries are about 1/N, value relations about sqrt d), so they are
      returned apart and weighted by the caller (``KDObjective``, train.pca_*_weight).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_dim: int,
        num_heads: int,
        swap_prob: float = 0.5,
        grid: tuple[int, int] | None = None,
        qkv: str = "conv3x3",
    ) -> None:
        """``grid`` is the teacher's (gh, gw); None means square, side sqrt(N) of the input."""
        super().__init__()
        if teacher_dim % num_heads:
            raise ValueError(f"teacher_dim {teacher_dim} is not a multiple of num_heads {num_heads}")
        if not 0.0 <= swap_prob <= 1.0:
            raise ValueError(f"swap_prob must lie in [0, 1], got {swap_prob}")
        if qkv not in QKV_MAPS:
            raise ValueError(f"unknown qkv map {qkv!r}; expected one of {QKV_MAPS}")
        self.num_heads = num_heads
        self.swap_prob = swap_prob
        self.grid = grid
        self.qkv = qkv
        # No bias: the 1x1 convolutions' biases that follow absorb it.
        self.depthwise = (nn.Conv2d(student_channels, student_channels, kernel_size=3, padding=1,
                                    groups=student_channels, bias=False) if qkv == "dwsep" else None)
        k = 3 if qkv == "conv3x3" else 1
        self.to_q = nn.Conv2d(student_channels, teacher_dim, kernel_size=k, padding=k // 2)
        # No key bias: it adds q . b to a whole row of scores, which the softmax cancels.
        self.to_k = nn.Conv2d(student_channels, teacher_dim, kernel_size=k, padding=k // 2, bias=False)
        self.to_v = nn.Conv2d(student_channels, teacher_dim, kernel_size=k, padding=k // 2)
        self.last_swap: Tensor | None = None

    def _teacher_grid(self, num_tokens: int) -> tuple[int, int]:
        if self.grid is not None:
            return self.grid
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"{num_tokens} teacher tokens do not form a square grid: pass grid")
        return side, side

    def project(self, h_s: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """Q_S, K_S, V_S (B, heads, N, d) of a student map, grid-matched to the teacher's ``grid``.

        The three convolutions run as one with their weights stacked (3 x teacher_dim outputs):
        the same function, one pass over the input instead of three, and one larger GEMM."""
        h = match_grid(h_s, grid)
        if self.depthwise is not None:
            h = self.depthwise(h)
        k_bias = self.to_q.bias.new_zeros(self.to_k.out_channels)
        weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        out = F.conv2d(h, weight, torch.cat([self.to_q.bias, k_bias, self.to_v.bias]), padding=self.to_q.padding)
        return tuple(_to_heads(m, self.num_heads) for m in out.chunk(3, dim=1))

    def forward(self, h_s: Tensor, q_t: Tensor, k_t: Tensor, v_t: Tensor) -> tuple[Tensor, Tensor]:
        """h_s (B, C_S, H_S, W_S); q_t, k_t, v_t (B, heads, N, d), prefix tokens dropped.

        Returns the attention term and the value term (float32 scalars), L_PCA being their sum."""
        student = self.project(h_s, self._teacher_grid(q_t.shape[2]))
        teacher = [m.detach().float() for m in (q_t, k_t, v_t)]
        if student[0].shape != teacher[0].shape:
            raise ValueError(f"student Q {tuple(student[0].shape)} vs teacher Q {tuple(teacher[0].shape)}")

        batch = h_s.shape[0]
        if self.training:
            swap = torch.rand(3, batch, device=h_s.device) < self.swap_prob
        else:
            swap = torch.zeros(3, batch, dtype=torch.bool, device=h_s.device)
        self.last_swap = swap
        g_q, g_k, g_v = (
            torch.where(mask.view(batch, 1, 1, 1), t.to(s.dtype), s) for mask, s, t in zip(swap, student, teacher)
        )
        return relation_losses(g_q, g_k, g_v, *teacher)


class GLProjector(nn.Module):
    """Group-wise linear (GL) projector; ``forward`` returns L_GL = MSE(h_T, GL(h_S)).

    The teacher grid (gh, gw) is cut into ``groups`` x ``groups`` rectangles of neighbouring
    tokens; all tokens of one rectangle share one linear map student_channels -> teacher_dim
    (16 maps on 14x14 instead of 196, Liu et al. 2022). Row r falls in group row
    floor(r * groups / gh), columns likewise: contiguous bands whose sizes differ by at most one
    when ``groups`` does not divide the grid (14 rows in 4 bands: 4, 3, 4, 3). The authors'
    code release instead cuts fixed 4-token bands with a short last one (4, 4, 4, 2); both give
    16 maps on 14x14. ``group_index`` holds each token's group, row-major.

    The maps are stored as one (groups^2, C, D) weight and (groups^2, D) bias, each group
    initialised like ``nn.Linear``; the projection is one batched matmul over groups.
    """

    def __init__(self, student_channels: int, teacher_dim: int, grid: tuple[int, int], groups: int = 4) -> None:
        super().__init__()
        gh, gw = grid
        if not 1 <= groups <= min(gh, gw):
            raise ValueError(f"groups must lie in [1, {min(gh, gw)}] for grid {grid}, got {groups}")
        self.grid = (gh, gw)
        num_groups = groups * groups
        bound = 1.0 / math.sqrt(student_channels)
        self.weight = nn.Parameter(torch.empty(num_groups, student_channels, teacher_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_groups, teacher_dim).uniform_(-bound, bound))

        group_rows = torch.arange(gh) * groups // gh
        group_cols = torch.arange(gw) * groups // gw
        group_index = (group_rows[:, None] * groups + group_cols[None, :]).flatten()
        # Lay the tokens out group by group in equal-length slots so one bmm serves all groups:
        # slot_token[g, s] is the token in slot s of group g (N, a zero token, pads short
        # groups); token_slot[n] is where token n lands in the flattened (group, slot) order.
        num_tokens = gh * gw
        sizes = torch.bincount(group_index, minlength=num_groups)
        slots = int(sizes.max())
        order = torch.argsort(group_index, stable=True)
        starts = torch.cumsum(sizes, 0) - sizes
        flat_slot = group_index[order] * slots + torch.arange(num_tokens) - starts[group_index[order]]
        slot_token = torch.full((num_groups * slots,), num_tokens, dtype=torch.long)
        slot_token[flat_slot] = order
        token_slot = torch.empty(num_tokens, dtype=torch.long)
        token_slot[order] = flat_slot
        self.register_buffer("group_index", group_index, persistent=False)
        self.register_buffer("slot_token", slot_token.view(num_groups, slots), persistent=False)
        self.register_buffer("token_slot", token_slot, persistent=False)

    def project(self, h_s: Tensor) -> Tensor:
        """GL(h_S): (B, C_S, H_S, W_S) -> (B, N, teacher_dim), tokens row-major."""
        tokens = match_grid(h_s, self.grid).flatten(2).transpose(1, 2)
        batch, _, channels = tokens.shape
        num_groups, slots = self.slot_token.shape
        padded = torch.cat([tokens, tokens.new_zeros(batch, 1, channels)], dim=1)
        grouped = padded[:, self.slot_token].transpose(0, 1).reshape(num_groups, batch * slots, channels)
        out = torch.baddbmm(self.bias.unsqueeze(1), grouped, self.weight)
        out = out.view(num_groups, batch, slots, -1).transpose(0, 1).reshape(batch, num_groups * slots, -1)
        return out[:, self.token_slot]

    def forward(self, h_s: Tensor, h_t: Tensor) -> Tensor:
        """h_s (B, C_S, H_S, W_S); h_t (B, N, teacher_dim), prefix tokens dropped."""
        return F.mse_loss(self.project(h_s).float(), h_t.detach().float())


class HintRegressor(nn.Module):
    """FitNets hint regressor; ``forward`` returns MSE(f_T, BN(conv1x1(h_S))).

    The student map is grid-matched to the teacher map's (H_T, W_T), then a 1x1 convolution and
    BatchNorm map it to the teacher's channels. 1x1 rather than 3x3: the regressor only
    translates channels, so spatial structure has to come from the student itself. BatchNorm
    absorbs the scale gap between student and teacher activations (the 1x1 conv + BN connector
    of OFD, Heo et al. 2019; CRD's FitNet ConvReg without its final ReLU). No ReLU, so the
    regression never loses its gradient on negative outputs.
    """

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        # No conv bias: BatchNorm's shift replaces it.
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(teacher_channels)

    def forward(self, h_s: Tensor, f_t: Tensor) -> Tensor:
        """h_s (B, C_S, H_S, W_S); f_t (B, C_T, H_T, W_T)."""
        projected = self.bn(self.conv(match_grid(h_s, tuple(f_t.shape[-2:]))))
        return F.mse_loss(projected.float(), f_t.detach().float())
