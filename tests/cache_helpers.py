"""Helpers of the cache tests: a tiny config, a tiny store layout with random units, and ways to damage
and compare stores (tests/test_cache*.py, test_codecs.py, test_object_store.py)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import zarr

from infra.config import load_config
from teacher_cache.layout import Layout
from teacher_cache.store import CacheStore

from conftest import TINY

# even smaller than TINY: 64 images = 2 shards of 32 per teacher, one actor; the ViT trains one epoch
# (covers fit determinism), the CNN stays at its seeded init (its fit costs seconds on 2 cores)
SMALL = [*TINY, "data.train_size=64", "cache.workers=1", "teacher_cnn.fit_epochs=0"]


def small_cfg(*extra: str):
    return load_config(None, [*SMALL, *extra])


LAYOUT = Layout(n=40, views=3, image_size=8, num_classes=10, layers={"blocks.2": (5, 6), "layer3": (4, 3, 3)},
                shard_size=16, chunk_size=8)  # 3 units, the last one partial (8 samples)
IDENTITY = {"teacher": "t", "views": {"k": 3, "seed": 0}, "dataset": {"name": "shapes", "n": 40},
            "layers": {"blocks.2": (5, 6)}}
PROVENANCE = {"commit": "abc", "versions": {"zarr": zarr.__version__}}


def random_unit(layout: Layout, u: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    lo, hi = layout.unit_range(u)
    out = {}
    for name, (shape, dtype) in layout.arrays().items():
        shape = (hi - lo, *shape[1:])
        if dtype == "uint8":
            out[name] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif dtype == "int64":
            out[name] = rng.integers(0, 10, shape).astype(np.int64)
        else:
            out[name] = rng.normal(size=shape).astype(np.float32)  # the store casts to its dtype
    return out


def make_store(path: Path, seed: int = 0) -> tuple[CacheStore, dict[str, np.ndarray]]:
    """A store with every unit written from random arrays; returns it and the expected full arrays."""
    store = CacheStore.create_or_open(path, LAYOUT, IDENTITY, PROVENANCE, clevel=5)
    rng = np.random.default_rng(seed)
    parts = {name: [] for name in LAYOUT.arrays()}
    for u in range(LAYOUT.units):
        arrays = random_unit(LAYOUT, u, rng)
        store.write_unit(u, arrays)
        for name, a in arrays.items():
            parts[name].append(a.astype(LAYOUT.arrays()[name][1]))
    return store, {name: np.concatenate(p) for name, p in parts.items()}


def shard_files(store_dir: Path, array: str, u: int) -> list[Path]:
    """The file(s) holding unit u's shard of `array`."""
    root = Path(store_dir) / array / "c" / str(u)
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    assert files, f"no shard file for {array} unit {u} under {root}"
    return files


def corrupt_middle(f: Path, n: int = 16) -> None:
    data = bytearray(f.read_bytes())
    assert len(data) > 4 * n, f"{f} too small to corrupt in the middle"
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    f.write_bytes(bytes(data))


def snapshot(path: Path) -> dict[str, np.ndarray]:
    """Every array of a zarr group (recursively), read into memory."""
    g = zarr.open_group(str(path), mode="r")
    return {name: obj[...] for name, obj in g.members(max_depth=None) if isinstance(obj, zarr.Array)}


def assert_same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), f"array {name} differs"


def file_states(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file under root."""
    return {str(f.relative_to(root)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
            for f in sorted(Path(root).rglob("*")) if f.is_file()}
