"""Real datasets: tiny files in each dataset's official on-disk format, loaded through `load_real`.

The fixtures are written independently of torchvision's readers (pickled CIFAR batches, STL-10's
column-major binaries, IDX files, PNG folders), so a loaded image equal to the written one proves
the orientation and channel order. Their md5s differ from the official ones (so they load with
data.verify_md5 false, and are refused with it on) and STL-10 has no unlabeled_X.bin.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra.config import DataConfig
from teacher_cache.real_datasets import MASK_THRESHOLD, ForeignDataFile, class_names, load_real

NATIVE = {"cifar10": 32, "stl10": 96, "fashionmnist": 28, "imagefolder": 24}
N_TRAIN, N_TEST = 20, 30
FOLDER_CLASSES = ["cat", "dog", "zebra"]
RED, GREEN = (255, 0, 0), (0, 255, 0)


def _rgb_images(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Noise images (n, size, size, 3) with a red top-left and a green top-right corner block."""
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    b = size // 4
    images[:, :b, :b] = RED
    images[:, :b, -b:] = GREEN
    return images


def _gray_images(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """FashionMNIST-like (n, size, size): a bright top-left block and a textured object on black."""
    images = np.zeros((n, size, size), dtype=np.uint8)
    images[:, :size // 4, :size // 4] = 255
    rows, cols = slice(size // 3, size - 3), slice(size // 4, size - size // 4)  # a taller-than-wide object
    images[:, rows, cols] = rng.integers(60, 256, (n, rows.stop - rows.start, cols.stop - cols.start))
    return images


def write_cifar10(root: Path, rng: np.random.Generator) -> dict:
    """cifar-10-batches-py: five training batches, test_batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    splits = {"train": (_rgb_images(N_TRAIN, 32, rng), rng.integers(0, 10, N_TRAIN)),
              "test": (_rgb_images(N_TEST, 32, rng), rng.integers(0, 10, N_TEST))}

    # The official files are Python 2 pickles whose keys torchvision reads back as str (latin1);
    # each row holds the red plane, then green, then blue, each 32 x 32 row-major.
    def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels.tolist(), "data": rows}, f)

    images, labels = splits["train"]
    for k, part in enumerate(np.array_split(np.arange(N_TRAIN), 5)):
        dump(f"data_batch_{k + 1}", images[part], labels[part])
    dump("test_batch", *splits["test"])
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": class_names("cifar10"), "num_vis": 3072}, f)
    return splits


def write_stl10(root: Path, rng: np.random.Generator) -> dict:
    """stl10_binary: train/test X and y and class_names.txt (no unlabeled_X.bin)."""
    folder = root / "stl10_binary"
    folder.mkdir()
    splits = {"train": (_rgb_images(N_TRAIN, 96, rng), rng.integers(0, 10, N_TRAIN)),
              "test": (_rgb_images(N_TEST, 96, rng), rng.integers(0, 10, N_TEST))}
    for split, (images, labels) in splits.items():
        # the official binaries store each channel column-major (Matlab order): bytes run down columns
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 3, 2, 1).tobytes())
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())  # labels are 1..10
    (folder / "class_names.txt").write_text("\n".join(class_names("stl10")) + "\n")
    return splits


def write_fashionmnist(root: Path, rng: np.random.Generator) -> dict:
    """FashionMNIST/raw: the four uncompressed IDX files."""
    folder = root / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    splits = {"train": (_gray_images(N_TRAIN, 28, rng), rng.integers(0, 10, N_TRAIN)),
              "test": (_gray_images(N_TEST, 28, rng), rng.integers(0, 10, N_TEST))}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = splits[split]
        # IDX: magic 0x0803 (ubyte, 3 dims) or 0x0801 (ubyte, 1 dim), then big-endian dimensions
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, len(images), 28, 28)
                                                              + images.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, len(labels))
                                                              + labels.astype(np.uint8).tobytes())
    return splits


def write_imagefolder(root: Path, rng: np.random.Generator) -> dict:
    """root/train/<class>/*.png for three classes; root/test lacks "dog" (labels keep the train indices)."""
    per_class = {"train": {"cat": 4, "dog": 4, "zebra": 4}, "test": {"cat": 5, "zebra": 5}}
    splits = {}
    for split, counts in per_class.items():
        images = _rgb_images(sum(counts.values()), 24, rng)
        labels = np.concatenate([[FOLDER_CLASSES.index(c)] * k for c, k in counts.items()])
        names = [f"{c}/{i:03d}.png" for c, k in counts.items() for i in range(k)]  # ImageFolder's sorted order
        for image, name in zip(images, names):
            (root / split / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / split / name)
        splits[split] = (images, labels)
    return splits


WRITERS = {"cifar10": write_cifar10, "stl10": write_stl10, "fashionmnist": write_fashionmnist,
           "imagefolder": write_imagefolder}


def make(name: str, root: Path, **config) -> tuple[DataConfig, dict]:
    """Write dataset `name` under root; return its DataConfig (native size by default) and what was written."""
    written = WRITERS[name](root, np.random.default_rng(0))
    config = {"image_size": NATIVE[name], "test_size": 0, "verify_md5": False, **config}
    return DataConfig(name=name, root=str(root), **config), written


def as_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images[..., None], 3, axis=-1) if images.ndim == 3 else images


@pytest.mark.parametrize("name", list(WRITERS))
def test_splits_round_trip_at_native_size(name, tmp_path):
    data, written = make(name, tmp_path)
    for variant, split in (("train", "train"), ("clean", "test")):
        out = load_real(data, variant)
        images, labels = written[split]
        assert out["images"].dtype == np.uint8 and out["images"].shape == (len(labels), NATIVE[name], NATIVE[name], 3)
        assert out["labels"].dtype == np.int64
        np.testing.assert_array_equal(out["labels"], labels)
        np.testing.assert_array_equal(out["images"], as_rgb(images))
        assert out["texture_labels"] is None
        if name == "fashionmnist":
            assert out["masks"].dtype == bool
            np.testing.assert_array_equal(out["masks"], images > MASK_THRESHOLD)
        else:
            assert out["masks"] is None


@pytest.mark.parametrize("size", [16, 48])
@pytest.mark.parametrize("name", list(WRITERS))
def test_resize_keeps_orientation(name, size, tmp_path):
    data, written = make(name, tmp_path, image_size=size)
    out = load_real(data, "clean")
    assert out["images"].shape == (len(written["test"][1]), size, size, 3)
    top_left, top_right = out["images"][:, 0, 0].astype(int), out["images"][:, 0, -1].astype(int)
    if name == "fashionmnist":  # bright block top-left, black top-right
        assert (top_left > 200).all() and (top_right < MASK_THRESHOLD).all()
    else:
        assert (np.abs(top_left - RED) < 40).all() and (np.abs(top_right - GREEN) < 40).all()


@pytest.mark.parametrize("name", ["cifar10", "stl10", "fashionmnist"])
def test_test_size_takes_the_first_test_images(name, tmp_path):
    data, written = make(name, tmp_path, test_size=7)
    for variant in ("clean", "occluded"):
        np.testing.assert_array_equal(load_real(data, variant)["labels"], written["test"][1][:7])
    np.testing.assert_array_equal(load_real(data, "clean")["images"], as_rgb(written["test"][0][:7]))
    assert len(load_real(data, "train")["labels"]) == N_TRAIN  # the training split is never capped


def test_imagefolder_cap_is_a_seeded_subset_across_classes(tmp_path):
    # its files come class by class, so "the first 4" would be all cats
    data, written = make("imagefolder", tmp_path, test_size=4)
    out = load_real(data, "clean")
    images, labels = written["test"]
    hits = [int(np.flatnonzero((images == im).all(axis=(1, 2, 3)))[0]) for im in out["images"]]
    assert len(hits) == 4 and hits == sorted(hits)
    np.testing.assert_array_equal(out["labels"], labels[hits])
    assert len(set(out["labels"].tolist())) > 1
    np.testing.assert_array_equal(load_real(data, "clean")["images"], out["images"])


def test_imagefolder_crops_non_square_images_to_the_centre(tmp_path):
    image = _rgb_images(1, 40, np.random.default_rng(1))[0][:24]  # 24 high, 40 wide
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.fromarray(image).save(tmp_path / split / "cat" / "a.png")
    out = load_real(DataConfig(name="imagefolder", root=str(tmp_path), image_size=24), "clean")
    np.testing.assert_array_equal(out["images"][0], image[:, 8:32])


@pytest.mark.parametrize("name", list(WRITERS))
def test_variants_are_deterministic(name, tmp_path):
    data, _ = make(name, tmp_path, image_size=32, seed=3)
    variants = ["occluded", "texture"] if name == "fashionmnist" else ["occluded"]
    for variant in variants:
        first, second = load_real(data, variant), load_real(data, variant)
        for key in first:
            if first[key] is None:
                assert second[key] is None
            else:
                np.testing.assert_array_equal(first[key], second[key])


@pytest.mark.parametrize("name", list(WRITERS))
def test_occlusion_covers_the_requested_fraction_of_patches(name, tmp_path):
    data, _ = make(name, tmp_path, image_size=32, occlusion_fraction=0.25)
    clean, occluded = load_real(data, "clean"), load_real(data, "occluded")
    # 8 x 8 grid of 4 x 4 patches: a patch is covered when any of its pixels changed
    changed = (clean["images"] != occluded["images"]).reshape(-1, 8, 4, 8, 4, 3).any(axis=(2, 4, 5))
    assert (changed.sum(axis=(1, 2)) == 16).all()  # 0.25 of 64
    np.testing.assert_array_equal(occluded["labels"], clean["labels"])
    if name == "fashionmnist":  # the object mask is the clean image's
        np.testing.assert_array_equal(occluded["masks"], clean["masks"])


def test_texture_keeps_the_object_and_replaces_the_background(tmp_path):
    data, _ = make("fashionmnist", tmp_path, image_size=32)
    clean, textured = load_real(data, "clean"), load_real(data, "texture")
    masks = textured["masks"]
    np.testing.assert_array_equal(masks, clean["masks"])
    assert 0.1 < masks.mean() < 0.9
    np.testing.assert_array_equal(textured["images"][masks], clean["images"][masks])
    assert (textured["images"][~masks] != clean["images"][~masks]).any(axis=-1).all()
    assert textured["texture_labels"].dtype == np.int64 and textured["texture_labels"].shape == (N_TEST,)
    assert len(np.unique(textured["texture_labels"])) > 1
    np.testing.assert_array_equal(textured["labels"], clean["labels"])


@pytest.mark.parametrize("name", ["cifar10", "stl10", "imagefolder"])
def test_texture_needs_a_foreground_mask(name, tmp_path):
    data, _ = make(name, tmp_path)
    with pytest.raises(ValueError, match="foreground mask.*fashionmnist"):
        load_real(data, "texture")


@pytest.mark.parametrize("name, expected", [
    ("cifar10", "cifar-10-batches-py/data_batch_1"),
    ("stl10", "stl10_binary/train_X.bin"),
    ("fashionmnist", "FashionMNIST/raw/train-images-idx3-ubyte"),
    ("imagefolder", "train/<class>/"),
])
def test_missing_files_name_the_expected_paths(name, expected, tmp_path):
    data = DataConfig(name=name, root=str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_real(data, "clean")
    assert str(tmp_path / expected) in str(err.value)
    assert ("download=true" in str(err.value)) == (name != "imagefolder")


def test_fashionmnist_archives_only_ask_for_gunzip(tmp_path):
    make("fashionmnist", tmp_path)
    for path in (tmp_path / "FashionMNIST" / "raw").iterdir():
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    with pytest.raises(FileNotFoundError, match="gunzip"):
        load_real(DataConfig(name="fashionmnist", root=str(tmp_path)), "clean")


def test_class_names(tmp_path):
    assert class_names("cifar10")[:2] == ["airplane", "automobile"]
    assert class_names("stl10")[7] == "monkey"
    assert class_names("fashionmnist")[-1] == "Ankle boot"
    write_imagefolder(tmp_path, np.random.default_rng(0))
    assert class_names("imagefolder", str(tmp_path)) == FOLDER_CLASSES
    with pytest.raises(ValueError, match="root"):
        class_names("imagefolder")


class _RunsCode:
    """Unpickling this creates the file `path`: stands for a pickle that runs code when read."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_foreign_cifar_batch_is_refused_before_it_is_unpickled(tmp_path):
    data, _ = make("cifar10", tmp_path, verify_md5=True)  # the default
    marker = tmp_path / "code_ran"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps(_RunsCode(str(marker))))
    with pytest.raises(ForeignDataFile) as e:
        load_real(data, "train")
    assert "cifar-10-batches-py/" in str(e.value) and "data.verify_md5=false" in str(e.value)
    assert "\n" not in str(e.value)
    assert not marker.exists()
    assert DataConfig().verify_md5  # on unless turned off


def test_stl10_files_are_checked_too(tmp_path):
    data, _ = make("stl10", tmp_path, verify_md5=True)
    with pytest.raises(ForeignDataFile, match="stl10_binary/train_X.bin is not the official stl10 file"):
        load_real(data, "train")
