"""How cached arrays are encoded: the codec of each array, and int8 features with a scale per token.

Codecs (`cache.codec`, `cache.codec_overrides`) are Blosc with lz4 or zstd, or none; every chunk then
carries zarr's CRC-32C (`Crc32cCodec`), so zarr itself rejects a damaged chunk on read. Blosc first
reorders each chunk's bytes (`cache.shuffle`): bitshuffle (the bits of 8 values at a time), shuffle
(byte planes) or noshuffle. Which pays depends on the array (docs/cache-format.md, "Codecs and byte order"; measured
on the demo teachers' features, lz4): ViT residual-stream tokens shrink by a tenth with bitshuffle and
not at all without it; post-ReLU CNN maps, whose zeros come in runs, shrink by 1.14x with bitshuffle and
1.38x without any (zstd: 1.48x and 1.82x). `auto`, the default, is therefore noshuffle for CNN feature
maps (per-view shape C x H x W) and bitshuffle for everything else. The cache is bound by bytes per
second, so the choice is a measured trade.

int8 features (`cache.feature_codec: int8`) are symmetric per token: a token is one feature vector
(a ViT token's D values, a CNN map's C channels at one position), scale = max|x| / 127 stored as
float16, q = round(x / scale). Half the bytes of float16; dequantised on the device in the student
step (`dequantize`). The fitted-basis codec (`pca:...`) quantises a token's PCA coefficients the same
way: teacher_cache/basis.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

# the spec grammar lives in the base, where the config validates with it; the cache's code reads it from here
from infra.codec_spec import GRAMMAR, SHUFFLES, parse_codec, parse_overrides  # noqa: F401

if TYPE_CHECKING:
    import torch
    from numcodecs import Blosc


def codec_for(name: str, default: str, overrides: dict[str, str]) -> str:
    """The codec spec of array `name`: the override of the longest matching name or group prefix, else `default`.

    `features` matches every `features/<layer>` (and `scales/<layer>` follows its layer's features).
    """
    key = name.replace("scales/", "features/", 1) if name.startswith("scales/") else name
    best, best_len = default, -1
    for pattern, codec in overrides.items():
        if (key == pattern or key.startswith(pattern + "/")) and len(pattern) > best_len:
            best, best_len = codec, len(pattern)
    return best


def resolve(name: str, view_ndim: int, codec: str, shuffle: str, overrides: dict[str, str]) -> tuple[str, str]:
    """(codec, shuffle) of array `name`, whose values per view have `view_ndim` axes: its codec spec's own
    shuffle, else `shuffle`, where `auto` is noshuffle for a CNN's feature maps and bitshuffle otherwise."""
    cname, own = parse_codec(codec_for(name, codec, overrides))
    if shuffle not in SHUFFLES:
        raise ValueError(f"unknown shuffle {shuffle!r}; choose one of {', '.join(SHUFFLES)}")
    if own is None and shuffle == "auto":
        own = "noshuffle" if name.startswith("features/") and view_ndim == 3 else "bitshuffle"
    return cname, (own or shuffle) if cname != "none" else "noshuffle"


def blosc(cname: str, shuffle: str, clevel: int, typesize: int, blocksize: int = 0) -> Blosc | None:
    """The numcodecs Blosc that encodes a chunk as the store does (None for `none`; blocksize 0: Blosc's own)."""
    from numcodecs import Blosc
    if cname == "none":
        return None
    order = {"bitshuffle": Blosc.BITSHUFFLE, "shuffle": Blosc.SHUFFLE, "noshuffle": Blosc.NOSHUFFLE}[shuffle]
    return Blosc(cname=cname, clevel=clevel, shuffle=order, blocksize=blocksize, typesize=typesize)


def zarr_compressors(cname: str, shuffle: str, clevel: int) -> list:
    """The bytes-to-bytes codecs of one array's chunks: the compressor (if any), then CRC-32C."""
    from zarr.codecs import BloscCodec, Crc32cCodec
    crc = Crc32cCodec()
    if cname == "none":
        return [crc]
    return [BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle), crc]


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
