"""How cached arrays are encoded: the codec of each array, and int8 features with a scale per token.

Codecs (`cache.codec`, `cache.codec_overrides`) are Blosc with bitshuffle and either lz4 or zstd,
or none; every chunk then carries zarr's CRC-32C (`Crc32cCodec`), so zarr itself rejects a
damaged chunk on read. Which codec pays depends on the array: post-ReLU CNN maps (many zeros)
shrink by a third under zstd, ViT residual-stream tokens by a tenth (README, "What the cache
stores"), and the cache is bound by bytes per second, so the choice is a measured trade.

int8 features (`cache.feature_dtype: int8`) are symmetric per token: a token is one feature vector
(a ViT token's D values, a CNN map's C channels at one position), scale = max|x| / 127 stored as
float16, q = round(x / scale). Half the bytes of float16; dequantised on the device in the student
step (`dequantize`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from zarr.codecs import BloscCodec, Crc32cCodec

if TYPE_CHECKING:
    import torch

CODECS = ("none", "lz4", "zstd")
FEATURE_DTYPES = ("float16", "int8")


def zarr_compressors(codec: str, clevel: int) -> list:
    """The bytes-to-bytes codecs of one array's chunks: the compressor (if any), then CRC-32C."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    crc = Crc32cCodec()
    if codec == "none":
        return [crc]
    return [BloscCodec(cname=codec, clevel=clevel, shuffle="bitshuffle"), crc]


def codec_for(name: str, default: str, overrides: dict[str, str]) -> str:
    """The codec of array `name`: the override of the longest matching name or group prefix, else `default`.

    `features` matches every `features/<layer>` (and `scales/<layer>` follows its layer's features).
    """
    key = name.replace("scales/", "features/", 1) if name.startswith("scales/") else name
    best, best_len = default, -1
    for pattern, codec in overrides.items():
        if (key == pattern or key.startswith(pattern + "/")) and len(pattern) > best_len:
            best, best_len = codec, len(pattern)
    return best


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`["features=lz4", "features/layer3=zstd"]` -> mapping; raises ValueError naming a bad item."""
    out = {}
    for item in items:
        name, sep, codec = item.partition("=")
        if not sep or not name or codec not in CODECS:
            raise ValueError(f"{item!r} is not NAME=CODEC with CODEC one of {', '.join(CODECS)}")
        out[name] = codec
    return out


def token_axis(view_ndim: int) -> int:
    """Axis (from the end) that holds one token's values: D of ViT tokens (T, D), C of CNN maps (C, H, W)."""
    return -1 if view_ndim <= 2 else -3


def scale_shape(view_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-view shape of the scales of a feature with per-view shape `view_shape`."""
    axis = len(view_shape) + token_axis(len(view_shape))
    return tuple(s for i, s in enumerate(view_shape) if i != axis)


def quantize(x: torch.Tensor, view_ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float16 scale per token) of a batch of features, on x's device."""
    import torch  # here, not above: the cache's writer processes import this module and need no torch
    axis = token_axis(view_ndim)
    x = x.float()
    scale = (x.abs().amax(dim=axis, keepdim=True) / 127).half()
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero token: q = 0 whatever the divisor
    q = torch.round(x / s).clamp_(-127, 127).to(torch.int8)
    return q, scale.squeeze(axis)


def dequantize(q: torch.Tensor, scale: torch.Tensor, view_ndim: int) -> torch.Tensor:
    """float16 features from int8 values and their per-token float16 scales."""
    axis = token_axis(view_ndim)
    return (q.float() * scale.float().unsqueeze(axis)).half()
