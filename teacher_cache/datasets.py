"""One entry point for every dataset the pipeline reads: the generated shapes or a real one.

A split is a dict of numpy arrays: images uint8 (N, S, S, 3) RGB at `data.image_size`, labels
int64 (N,), texture_labels (int64 or None) and object masks (bool (N, S, S) or None); a real
dataset's also lists the files it left out as unreadable ("skipped", data.skip_unreadable).
"""
from __future__ import annotations

import dataclasses
import hashlib
from functools import lru_cache

import numpy as np

from infra.config import DataConfig
from teacher_cache.shapes import SHAPES, make_shapes

TEST_VARIANTS = ("clean", "occluded", "texture")
# the texture variant needs a foreground mask: generated shapes and FashionMNIST have one
_TEXTURE_CAPABLE = ("shapes", "fashionmnist")


def test_variants(data: DataConfig) -> tuple[str, ...]:
    return TEST_VARIANTS if data.name in _TEXTURE_CAPABLE else ("clean", "occluded")


def class_names(data: DataConfig) -> list[str]:
    if data.name == "shapes":
        return list(SHAPES)
    from teacher_cache.real_datasets import class_names as real_names
    return real_names(data.name) if data.name != "imagefolder" else real_names(data.name, data.root)


def load_split(data: DataConfig, variant: str) -> dict[str, np.ndarray | None]:
    """The training split ("train") or one test variant ("clean", "occluded", "texture")."""
    return _load(_key(data), variant)


def skipped_files(data: DataConfig, variant: str) -> list[str]:
    """The files of a split left out as unreadable (data.skip_unreadable: ImageFolder images)."""
    return list(load_split(data, variant).get("skipped") or [])


def _key(data: DataConfig) -> tuple:
    return dataclasses.astuple(data)


@lru_cache(maxsize=8)
def _load(key: tuple, variant: str):
    data = DataConfig(*key)
    if data.name == "shapes":
        n = data.train_size if variant == "train" else data.test_size
        return make_shapes(n, data.image_size, data.seed, variant, data.texture_correlation, data.occlusion_fraction)
    from teacher_cache.real_datasets import load_real
    return load_real(data, variant)


def fingerprint(split: dict) -> str:
    """sha256 over the images and labels: identifies the exact data a cache was computed from."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(split["images"]).tobytes())
    h.update(np.ascontiguousarray(split["labels"]).astype(np.int64).tobytes())
    return h.hexdigest()
