"""The grammar of `cache.codec` and `cache.codec_overrides`: names and parsing only, no codec library.

The config validates codec specs with these before any work starts; `teacher_cache/codecs.py` builds
the Blosc and zarr codecs they name.
"""
from __future__ import annotations

from typing import NamedTuple

CODECS = ("none", "lz4", "zstd")
SHUFFLES = ("auto", "bitshuffle", "shuffle", "noshuffle")
FEATURE_CODEC_GRAMMAR = ("float16, int8, or pca:FRACTION:BITS[:MAX_RANK] (FRACTION of the variance kept, in (0, 1]; "
                         "BITS int8 or int4; MAX_RANK an optional cap on the components kept), e.g. pca:0.99:int8")
GRAMMAR = "CODEC or CODEC:SHUFFLE, CODEC one of none, lz4, zstd, SHUFFLE one of bitshuffle, shuffle, noshuffle"


def parse_codec(spec: str) -> tuple[str, str | None]:
    """`lz4` -> ("lz4", None: the store's shuffle); `lz4:noshuffle` -> ("lz4", "noshuffle"). Raises ValueError."""
    cname, sep, shuffle = spec.partition(":")
    if cname not in CODECS or (sep and (cname == "none" or shuffle not in SHUFFLES[1:])):
        raise ValueError(f"{spec!r} is not {GRAMMAR} (none takes no shuffle)")
    return cname, shuffle or None


class FeatureCodec(NamedTuple):
    """`cache.feature_codec` parsed: kind float16 | int8 | pca; for pca the variance fraction, bits, rank cap."""
    kind: str
    fraction: float = 1.0
    bits: int = 8
    max_rank: int | None = None


def parse_feature_codec(spec: str) -> FeatureCodec:
    """`float16`, `int8`, `pca:0.99:int8`, `pca:0.999:int4:128` -> FeatureCodec; raises ValueError."""
    if spec in ("float16", "int8"):
        return FeatureCodec(spec)
    parts = spec.split(":")
    try:
        if parts[0] != "pca" or len(parts) not in (3, 4) or parts[2] not in ("int8", "int4"):
            raise ValueError
        fraction = float(parts[1])
        max_rank = int(parts[3]) if len(parts) == 4 else None
        if not 0 < fraction <= 1 or (max_rank is not None and max_rank < 1):
            raise ValueError
    except ValueError:
        raise ValueError(f"{spec!r} is not {FEATURE_CODEC_GRAMMAR}") from None
    return FeatureCodec("pca", fraction, int(parts[2][3:]), max_rank)


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`["features=lz4", "features/layer3=zstd:noshuffle"]` -> mapping; raises ValueError naming a bad item."""
    out = {}
    for item in items:
        name, sep, codec = item.partition("=")
        try:
            if not (sep and name):
                raise ValueError(item)
            parse_codec(codec)
        except ValueError:
            raise ValueError(f"{item!r} is not NAME=CODEC (NAME an array or group such as features or "
                             f"features/layer3, CODEC {GRAMMAR})") from None
        out[name] = codec
    return out
