"""The grammar of `cache.codec` and `cache.codec_overrides`: names and parsing only, no codec library.

The config validates codec specs with these before any work starts; `teacher_cache/codecs.py` builds
the Blosc and zarr codecs they name.
"""
from __future__ import annotations

CODECS = ("none", "lz4", "zstd")
SHUFFLES = ("auto", "bitshuffle", "shuffle", "noshuffle")
FEATURE_DTYPES = ("float16", "int8")
GRAMMAR = "CODEC or CODEC:SHUFFLE, CODEC one of none, lz4, zstd, SHUFFLE one of bitshuffle, shuffle, noshuffle"


def parse_codec(spec: str) -> tuple[str, str | None]:
    """`lz4` -> ("lz4", None: the store's shuffle); `lz4:noshuffle` -> ("lz4", "noshuffle"). Raises ValueError."""
    cname, sep, shuffle = spec.partition(":")
    if cname not in CODECS or (sep and (cname == "none" or shuffle not in SHUFFLES[1:])):
        raise ValueError(f"{spec!r} is not {GRAMMAR} (none takes no shuffle)")
    return cname, shuffle or None


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
