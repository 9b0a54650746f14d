"""The paper's real datasets (CIFAR-10, STL-10, FashionMNIST) and a user ImageFolder, as arrays.

`load_real` reads a split through torchvision's dataset classes and returns it in the format of
`make_shapes` (uint8 RGB images at `data.image_size`, int64 labels, texture labels, object masks),
together with the paper's bias variants:

- `train`: the training split, never capped.
- `clean`: the test split, capped to its first `data.test_size` images (0 = all).
- `occluded`: the clean images with `data.occlusion_fraction` of an 8 x 8 patch grid covered by
  the mean colour (the paper's STL-10 treatment).
- `texture`: the clean images with their background replaced by a procedural texture (the
  paper's FashionMNIST treatment). It needs a foreground mask, so only datasets whose objects sit
  on a blank background support it (`TEXTURE_DATASETS`): there the mask is the pixels brighter
  than `MASK_THRESHOLD`.

Everything is a function of the files on disk and `data.seed`.
"""
from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision import datasets

from infra.config import DataConfig
from infra.errors import UserError
from teacher_cache.bias import TEXTURES, occlude_patches, texture_images

REAL_DATASETS = ("cifar10", "stl10", "fashionmnist", "imagefolder")
VARIANTS = ("train", "clean", "occluded", "texture")
TEXTURE_DATASETS = ("fashionmnist",)
# FashionMNIST objects lie on an exactly black background; after resizing, bicubic ringing leaves
# low values next to the object. An intensity above 10 / 255 keeps that ringing out of the object
# mask; the rare object pixels darker than that count as background (and get textured).
MASK_THRESHOLD = 10

_CLASS_NAMES = {
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "stl10": ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"],
    "fashionmnist": list(datasets.FashionMNIST.classes),
}
# the files torchvision reads, relative to data.root (FashionMNIST: the uncompressed IDX files)
_CIFAR = datasets.CIFAR10
_FILES = {
    "cifar10": [f"{_CIFAR.base_folder}/{f}" for f, _ in _CIFAR.train_list + _CIFAR.test_list]
    + [f"{_CIFAR.base_folder}/{_CIFAR.meta['filename']}"],
    "stl10": [f"{datasets.STL10.base_folder}/{f}" for f in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")],
    "fashionmnist": [f"FashionMNIST/raw/{Path(f).stem}" for f, _ in datasets.FashionMNIST.resources],
}


# The official md5 of every file read (torchvision's). CIFAR-10's batches are Python pickles, which
# can run code when read, so a file that is not the official one is refused before it is opened.
# STL-10's are raw arrays; their md5 guards against damaged or foreign files. FashionMNIST has no
# entry: torchvision's md5s are of the .gz archives, not of the IDX files read (parsed as arrays).
_STL_LABELLED = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")
_MD5 = {
    "cifar10": {f"{_CIFAR.base_folder}/{f}": md5 for f, md5 in _CIFAR.train_list + _CIFAR.test_list}
    | {f"{_CIFAR.base_folder}/{_CIFAR.meta['filename']}": _CIFAR.meta["md5"]},
    "stl10": {f"{datasets.STL10.base_folder}/{f}": md5
              for f, md5 in datasets.STL10.train_list + datasets.STL10.test_list if f in _STL_LABELLED},
}
_WHY_MD5 = {"cifar10": "CIFAR-10's batches are Python pickles, which can run code when read",
            "stl10": "a damaged or foreign file would be read as images"}


class ForeignDataFile(UserError, ValueError):
    """A dataset file that is not the official one, refused before it is read."""


class UnreadableData(UserError, ValueError):
    """A dataset file (an image of an ImageFolder, a file of a packed dataset) that cannot be read."""


# what PIL and torchvision's readers raise for a damaged or foreign file (a truncated JPEG: OSError)
_READ_ERRORS = (OSError, ValueError, EOFError, SyntaxError, AssertionError, RuntimeError, pickle.UnpicklingError,
                Image.DecompressionBombError)


@functools.lru_cache(maxsize=None)
def _md5_matches(path: str, size: int, mtime_ns: int, md5: str) -> bool:  # size and mtime key the cache
    return datasets.utils.check_integrity(path, md5)


def _check_md5(data: DataConfig) -> None:
    """Refuse (ForeignDataFile) a file under data.root whose md5 is not the official one (data.verify_md5)."""
    if not data.verify_md5 or data.name not in _MD5:
        return
    for rel, md5 in _MD5[data.name].items():
        path = Path(data.root) / rel
        st = path.stat()
        if not _md5_matches(str(path), st.st_size, st.st_mtime_ns, md5):
            raise ForeignDataFile(
                f"{path} is not the official {data.name} file (its md5 differs), so it is not read: "
                f"{_WHY_MD5[data.name]}. Replace it with the official file (data.download=true fetches it), "
                f"or set data.verify_md5=false for a copy you trust (re-packed, or a test fixture)")


class _LocalCIFAR10(datasets.CIFAR10):
    """CIFAR10 reading files already on disk, after `_check_md5` (torchvision's own check has no switch).

    With data.verify_md5 false the files need only exist and parse: a re-packed copy or a tiny test
    fixture in the official format. With `data.download` true the stock class is used.
    """

    train_list = [[f, None] for f, _ in datasets.CIFAR10.train_list]
    test_list = [[f, None] for f, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _LocalSTL10(datasets.STL10):
    """STL10 reading the labelled files already on disk, after `_check_md5` (see `_LocalCIFAR10`).

    The stock integrity check also demands `unlabeled_X.bin` (2.6 GB), which the labelled splits
    never read; it is left out here.
    """

    train_list = [["train_X.bin", None], ["train_y.bin", None]]
    test_list = [["test_X.bin", None], ["test_y.bin", None]]


def class_names(name: str, root: str | None = None) -> list[str]:
    """Class names in label order; an ImageFolder's are its sorted class folders under `root/train`."""
    if name == "imagefolder":
        if root is None:
            raise ValueError("class_names('imagefolder') needs root: its classes are the folders of root/train")
        return datasets.folder.find_classes(Path(root) / "train")[0]
    if name not in _CLASS_NAMES:
        raise ValueError(f"unknown real dataset {name!r}; choose one of {', '.join(REAL_DATASETS)}")
    return list(_CLASS_NAMES[name])


def _require_files(data: DataConfig) -> None:
    """Raise FileNotFoundError naming every file (or folder) of the dataset missing under data.root."""
    root = Path(data.root)
    if data.name == "imagefolder":
        missing = [f"{root / split}/<class>/" for split in ("train", "test") if not (root / split).is_dir()]
        fix = "put one folder of images per class under root/train and root/test (an ImageFolder is never downloaded)"
    else:
        missing = [str(root / f) for f in _FILES[data.name] if not (root / f).is_file()]
        fix = "set data.download=true on a machine with network access, or copy the files there"
        if data.name == "fashionmnist" and any(Path(f + ".gz").is_file() for f in missing):
            fix += "; torchvision reads the uncompressed IDX files, so gunzip the .gz archives in place"
    if missing:
        raise FileNotFoundError(f"{data.name} data not found under {root}: missing {', '.join(missing)}; {fix}")


def _torchvision_split(data: DataConfig, train: bool):
    """The torchvision dataset object of one split (the stock class when downloading)."""
    split = "train" if train else "test"
    if data.name == "imagefolder" or not data.download:
        _require_files(data)
        _check_md5(data)
    if data.name == "imagefolder":
        return datasets.ImageFolder(str(Path(data.root) / split))
    if data.name == "cifar10":
        cls = datasets.CIFAR10 if data.download else _LocalCIFAR10
        return cls(data.root, train=train, download=data.download)
    if data.name == "stl10":
        cls = datasets.STL10 if data.download else _LocalSTL10
        return cls(data.root, split=split, download=data.download)
    return datasets.FashionMNIST(data.root, train=train, download=data.download)


def _pick(n: int, limit: int | None, data: DataConfig) -> np.ndarray:
    """Indices of the images to keep: all, or the first `limit` in the dataset's order.

    ImageFolder lists its files class by class, so its first images would all be of the first
    classes: there the cap takes a seeded random subset instead, kept in folder order.
    """
    if not limit or limit >= n:
        return np.arange(n)
    if data.name == "imagefolder":
        return np.sort(np.random.default_rng([data.seed, 13]).choice(n, limit, replace=False))
    return np.arange(limit)


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _read_images(ds, keep: np.ndarray, data: DataConfig) -> tuple[list[Image.Image], list[int], list[str]]:
    """The ImageFolder images `keep` (decoded now, so a damaged file is found here): the images, their indices
    and the paths left out as unreadable (data.skip_unreadable; without it the first one is an error)."""
    images, kept, skipped = [], [], []
    for i in keep:
        path = ds.samples[i][0]
        try:
            images.append(ds.loader(path))
        except _READ_ERRORS as e:
            if not data.skip_unreadable:
                raise UnreadableData(f"{path} cannot be read as an image ({_why(e)}): replace or delete it, or "
                                     f"set data.skip_unreadable=true to leave unreadable images out") from None
            skipped.append(path)
            continue
        kept.append(int(i))
    if not images:
        raise UnreadableData(f"none of the {len(keep)} images under {Path(ds.root)} can be read (the first: "
                             f"{skipped[0]}); check that the files are images")
    return images, kept, skipped


def _read_split(data: DataConfig, train: bool, limit: int | None) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    """PIL images at native size (mode L for FashionMNIST, else RGB), int64 labels of one split, and the
    files left out as unreadable."""
    try:
        ds = _torchvision_split(data, train)
    except (UserError, FileNotFoundError):
        raise
    except _READ_ERRORS as e:  # a packed dataset file cut short or not in the official format
        raise UnreadableData(f"the {data.name} files under {data.root} cannot be read ({_why(e)}): one is damaged "
                             f"or not in the official format; replace them with the official files "
                             f"(data.download=true fetches them)") from None
    if data.name == "imagefolder":
        labels = np.asarray(ds.targets, dtype=np.int64)
        if not train:  # a test folder may miss classes: index by the training folder's classes
            train_classes = class_names("imagefolder", data.root)
            unknown = sorted(set(ds.classes) - set(train_classes))
            if unknown:
                raise ValueError(f"{data.root}/test has classes {unknown} that {data.root}/train lacks")
            labels = np.array([train_classes.index(ds.classes[t]) for t in labels], dtype=np.int64)
        images, kept, skipped = _read_images(ds, _pick(len(ds.samples), limit, data), data)
        return images, labels[kept], skipped
    if data.name == "cifar10":
        pixels, labels = ds.data, ds.targets  # (N, 32, 32, 3)
    elif data.name == "stl10":
        pixels, labels = ds.data.transpose(0, 2, 3, 1), ds.labels  # torchvision keeps (N, 3, 96, 96)
    else:
        pixels, labels = ds.data.numpy(), ds.targets.numpy()  # (N, 28, 28) grayscale
    keep = _pick(len(pixels), limit, data)
    return [Image.fromarray(pixels[i]) for i in keep], np.asarray(labels, dtype=np.int64)[keep], []


def _to_square(img: Image.Image, size: int) -> np.ndarray:
    """uint8 array (size, size[, 3]): centre-crop to a square (keeps the aspect ratio), then bicubic resize.

    PIL's bicubic filter widens its support when downscaling, so it antialiases.
    """
    w, h = img.size
    if w != h:
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def load_real(data: DataConfig, variant: str) -> dict[str, np.ndarray | None]:
    """One split or bias variant of a real dataset, in the format of `make_shapes`.

    Returns images uint8 (N, S, S, 3) RGB with S = data.image_size, labels int64 (N,),
    texture_labels (int64 for the texture variant, else None), masks (bool (N, S, S) object
    masks for FashionMNIST, else None) and skipped (the ImageFolder files left out as unreadable,
    data.skip_unreadable). Missing files raise FileNotFoundError naming them, unreadable ones
    UnreadableData naming the file.
    """
    if data.name not in REAL_DATASETS:
        raise ValueError(f"unknown real dataset {data.name!r}; choose one of {', '.join(REAL_DATASETS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant == "texture" and data.name not in TEXTURE_DATASETS:
        raise ValueError(f"the texture variant replaces the background around a foreground mask, which "
                         f"{data.name} does not have (its objects fill natural scenes); it is defined for "
                         f"{', '.join(TEXTURE_DATASETS)} only")
    train = variant == "train"
    pil, labels, skipped = _read_split(data, train, None if train else data.test_size)
    size = data.image_size
    images = np.stack([_to_square(im, size) for im in pil])
    masks = texture_labels = None
    if data.name == "fashionmnist":  # grayscale: the object is what is brighter than the black background
        masks = images > MASK_THRESHOLD
        images = np.repeat(images[..., None], 3, axis=-1)
    if variant == "occluded":
        images = occlude_patches(images, data.occlusion_fraction, grid=8, rng=np.random.default_rng([data.seed, 11]))
    elif variant == "texture":
        rng = np.random.default_rng([data.seed, 12])
        texture_labels = rng.integers(0, len(TEXTURES), len(images)).astype(np.int64)
        background = texture_images(texture_labels, size, rng).round().astype(np.uint8)
        images = np.where(masks[..., None], images, background)
    return {"images": images, "labels": labels, "texture_labels": texture_labels, "masks": masks, "skipped": skipped}
