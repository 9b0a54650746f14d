"""The shape of a cache store: how many images, views and classes, each cached layer's shape per view,
the shards (one unit of work, writing and repair each) and chunks, and how features are coded."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from infra.codec_spec import parse_feature_codec
from teacher_cache.basis import code_dtype, code_shape, planned_rank
from teacher_cache.codecs import scale_shape, token_axis


@dataclass(frozen=True)
class Layout:
    n: int
    views: int
    image_size: int
    num_classes: int
    layers: dict[str, tuple[int, ...]]   # per-view feature shape of each cached layer
    shard_size: int
    chunk_size: int
    feature_codec: str = "float16"       # cache.feature_codec: float16 | int8 | pca:... (int8 and pca: a float16 scale per token in scales/<layer>)
    ranks: dict[str, int] = field(default_factory=dict)  # pca: components kept per layer (fitted; planned_ranks before)

    @property
    def units(self) -> int:
        return -(-self.n // self.shard_size)

    def unit_range(self, u: int) -> tuple[int, int]:
        return u * self.shard_size, min(self.n, (u + 1) * self.shard_size)

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype) of every per-sample array, in checksum-column order."""
        s, k = self.image_size, self.views
        out = {"images": ((self.n, s, s, 3), "uint8"), "labels": ((self.n,), "int64"),
               "views": ((self.n, k, 5), "float32"), "logits": ((self.n, k, self.num_classes), "float16")}
        codec = parse_feature_codec(self.feature_codec)
        for name, shape in self.layers.items():
            if codec.kind == "pca":
                out[f"features/{name}"] = ((self.n, k, *code_shape(shape, self.ranks[name], codec.bits)),
                                           code_dtype(codec.bits))
            else:
                out[f"features/{name}"] = ((self.n, k, *shape), codec.kind)
        if codec.kind != "float16":
            for name, shape in self.layers.items():
                out[f"scales/{name}"] = ((self.n, k, *scale_shape(shape)), "float16")
        return out

    def per_view_arrays(self) -> list[str]:
        """The arrays with one entry per view (logits, features, their scales): what a packed row holds of this store."""
        return [a for a in self.arrays() if a not in ("images", "labels", "views")]  # views: a row holds its own once

    def unit_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype) of every per-sample array for one full unit (a writer's buffer)."""
        return {name: ((self.shard_size, *shape[1:]), dtype) for name, (shape, dtype) in self.arrays().items()}

    def bytes_per_sample(self) -> dict[str, int]:
        return {name: int(np.prod(shape[1:])) * np.dtype(dt).itemsize for name, (shape, dt) in self.arrays().items()}

    def to_json(self) -> dict:
        return {"n": self.n, "views": self.views, "image_size": self.image_size, "num_classes": self.num_classes,
                "layers": {k: list(v) for k, v in self.layers.items()}, "shard_size": self.shard_size,
                "chunk_size": self.chunk_size, "feature_codec": self.feature_codec, "ranks": dict(self.ranks)}

    @classmethod
    def from_json(cls, lj: dict) -> "Layout":
        return cls(lj["n"], lj["views"], lj["image_size"], lj["num_classes"],
                   {k: tuple(v) for k, v in lj["layers"].items()}, lj["shard_size"], lj["chunk_size"],
                   lj.get("feature_codec", lj.get("feature_dtype")), dict(lj.get("ranks", {})))


def planned_ranks(feature_codec: str, layers: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The most components each layer can keep under a pca codec (its rank cap, else every dimension): what
    bounds the bytes before a basis is fitted. {} for float16 and int8."""
    codec = parse_feature_codec(feature_codec)
    if codec.kind != "pca":
        return {}
    return {name: planned_rank(codec, shape[len(shape) + token_axis(len(shape))]) for name, shape in layers.items()}
