"""The fitted-basis feature codec (`cache.feature_codec: pca:FRACTION:BITS[:MAX_RANK]`).

A teacher layer's tokens (a ViT token's D values, a CNN map's C channels at one position) live
mostly in a low-dimensional subspace. At cache time a basis is fitted per layer on a seeded sample
of that layer's own features: the mean and the top r principal directions, r the smallest rank that
keeps FRACTION of the variance (at most MAX_RANK). A token x is stored as its r coefficients
c = (x - mean) @ B^T, quantised per token like int8 features: scale = max|c| / qmax as float16,
q = round(c / scale), qmax 127 (int8) or 7 (int4, two codes per byte). Decoding is one matmul:
x ~ (q * scale) @ B + mean.

B's rows are the principal directions turned by a seeded random rotation of the r-dimensional
subspace (B = R V_r, R orthogonal): the subspace and the reconstruction are the same, but each
token's coefficients share its energy evenly instead of piling it on the first direction, so the
per-token scale, set by the largest coefficient, is smaller and the quantisation finer. The
rotation costs nothing at decode time, being folded into B.

The maths only: the cache job fits (`fit_basis`) and the worker encodes (`encode`), the student
step decodes (`decode`), on whatever device the tensors are on.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from infra.codec_spec import FeatureCodec
from teacher_cache.codecs import token_axis

if TYPE_CHECKING:  # the writer processes read the shape helpers and need no torch
    import torch

PARAMS = "basis"  # the store's parameter group holding every layer's basis (arrays <layer>.mean, <layer>.components)


def qmax(bits: int) -> int:
    return 127 if bits == 8 else 7


def code_width(rank: int, bits: int) -> int:
    """Values per token stored for `rank` coefficients: one int8 each, or two int4 per uint8."""
    return rank if bits == 8 else -(-rank // 2)


def code_shape(view_shape: tuple[int, ...], rank: int, bits: int) -> tuple[int, ...]:
    """Per-view shape of a layer's codes: its token axis (D of (T, D), C of (C, H, W)) cut to the codes."""
    shape = list(view_shape)
    shape[len(shape) + token_axis(len(shape))] = code_width(rank, bits)
    return tuple(shape)


def code_dtype(bits: int) -> str:
    return "int8" if bits == 8 else "uint8"


def planned_rank(codec: FeatureCodec, dim: int) -> int:
    """The most components a layer of `dim` values per token can keep under `codec` (before any fit)."""
    return min(dim, codec.max_rank or dim)


def tokens(x: torch.Tensor, view_ndim: int) -> torch.Tensor:
    """A batch of features (B, *view_shape) as rows of token values (B * tokens, D)."""
    t = x.movedim(token_axis(view_ndim), -1)
    return t.reshape(-1, t.shape[-1])


def fit_basis(rows: np.ndarray, codec: FeatureCodec, seed: int,
              rank: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mean (D,), components (r, D), info) fitted on token rows (M, D); `rank` forces r (a store's own).

    info: rank, the variance fraction the r directions keep on these rows, the rows and the seed."""
    x = np.asarray(rows, dtype=np.float64)
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / max(1, len(x) - 1)
    values, vectors = np.linalg.eigh(cov)  # ascending
    values, vectors = np.clip(values[::-1], 0, None), vectors[:, ::-1]
    kept = np.cumsum(values) / max(values.sum(), np.finfo(np.float64).tiny)
    if rank is None:
        rank = min(int(np.searchsorted(kept, codec.fraction - 1e-12) + 1), planned_rank(codec, x.shape[1]))
    rank = min(rank, x.shape[1])
    g = np.random.default_rng([seed, 0xBA515]).standard_normal((rank, rank))
    rotation, r = np.linalg.qr(g)
    rotation *= np.sign(np.diag(r))  # a uniformly random orthogonal matrix
    components = rotation @ vectors[:, :rank].T
    info = {"rank": int(rank), "variance_kept": float(kept[rank - 1]), "fraction_asked": codec.fraction,
            "sample_tokens": int(len(x)), "seed": int(seed)}
    return mean.astype(np.float32), components.astype(np.float32), info


def encode(x: torch.Tensor, mean: torch.Tensor, components: torch.Tensor, view_ndim: int,
           bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, float16 scale per token) of a batch of features (B, *view_shape), on x's device."""
    import torch
    t = x.float().movedim(token_axis(view_ndim), -1)
    c = (t - mean.float()) @ components.float().T
    scale = (c.abs().amax(-1, keepdim=True) / qmax(bits)).half()
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # a token at the mean: codes 0 whatever the divisor
    q = torch.round(c / s).clamp_(-qmax(bits), qmax(bits))
    if bits == 8:
        codes = q.to(torch.int8)
    else:  # two per byte: (q + 8) in 1..15, the even coefficient in the low nibble
        u = (q + 8).to(torch.uint8)
        if u.shape[-1] % 2:
            u = torch.cat([u, torch.full_like(u[..., :1], 8)], -1)
        codes = u[..., 0::2] | (u[..., 1::2] << 4)
    return codes.movedim(-1, token_axis(view_ndim)).contiguous(), scale.squeeze(-1)


def decode(codes: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, components: torch.Tensor,
           view_ndim: int, bits: int) -> torch.Tensor:
    """float16 features (B, *view_shape) from codes and scales; mean and components on codes' device."""
    import torch
    c = codes.movedim(token_axis(view_ndim), -1)
    if bits == 8:
        c = c.float()
    else:
        c = torch.stack([c & 15, c >> 4], -1).flatten(-2)[..., :components.shape[0]].float() - 8
    x = torch.addmm(mean.float(), (c * scale.float().unsqueeze(-1)).reshape(-1, c.shape[-1]), components.float())
    return x.reshape(*c.shape[:-1], -1).half().movedim(-1, token_axis(view_ndim))


def check_basis(params: dict[str, np.ndarray], layer: str, dim: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, components) of `layer` from a basis group, checked against the codes' shape; ValueError if not."""
    mean, comps = params.get(f"{layer}.mean"), params.get(f"{layer}.components")
    if mean is None or comps is None:
        raise ValueError(f"it holds no basis for layer {layer}")
    if mean.shape != (dim,) or comps.shape != (rank, dim) or not (np.isfinite(mean).all() and np.isfinite(comps).all()):
        raise ValueError(f"its basis of layer {layer} is {comps.shape} (mean {mean.shape}), expected ({rank}, {dim}) "
                         f"of finite values")
    return mean, comps
