"""A feature codec's two directions, whatever its kind (`cache.feature_codec`): what the cache worker stores for
a batch of a layer's features, and what every reader (the student's loader, the fidelity check, the probe, the
benches) decodes it back to.

float16 is stored as it is; int8 is quantised per token (teacher_cache/codecs.py); pca stores a fitted basis's
quantised coefficients (teacher_cache/basis.py), for which `basis` is the layer's (mean, components) on the
tensors' device. The coded kinds come with a float16 scale per token.
"""
from __future__ import annotations

import torch

from infra.codec_spec import FeatureCodec
from teacher_cache.basis import decode, encode
from teacher_cache.codecs import dequantize, quantize

Basis = tuple[torch.Tensor, torch.Tensor]  # a layer's (mean (D,), components (r, D)), float32


def encode_features(x: torch.Tensor, codec: FeatureCodec, view_ndim: int,
                    basis: Basis | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored values, per-token scales or None for float16) of features (B, *view_shape): contiguous, on x's
    device."""
    if codec.kind == "pca":
        q, scale = encode(x, *basis, view_ndim, codec.bits)
    elif codec.kind == "int8":
        q, scale = quantize(x, view_ndim)
    else:
        return x.to(torch.float16, memory_format=torch.contiguous_format), None
    return q.contiguous(), scale.contiguous()


def decode_features(values: torch.Tensor, scale: torch.Tensor | None, codec: FeatureCodec, view_ndim: int,
                    basis: Basis | None = None) -> torch.Tensor:
    """float16 features (B, *view_shape) from what `encode_features` stored, on values' device."""
    if codec.kind == "pca":
        return decode(values, scale, *basis, view_ndim, codec.bits)
    if codec.kind == "int8":
        return dequantize(values, scale, view_ndim)
    return values
