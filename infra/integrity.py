"""Is an output whole? Cheap checks on files that stages write and later reuse."""
from __future__ import annotations

from pathlib import Path

BLOCK = 1 << 24  # 16 MiB reads: the digest runs at disk speed without holding the file in memory


def file_crc32c(path: Path) -> str:
    """CRC-32C of the whole file as 8 hex digits (hardware CRC through google-crc32c, a zarr dependency)."""
    import google_crc32c
    c = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            c.update(block)
    return c.hexdigest().decode()


def loads_tensors(path: Path) -> bool:
    """True when `path` is a torch file that loads with weights_only=True (never unpickles anything else)."""
    import torch
    if not Path(path).is_file():
        return False
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated, foreign or unsafe: not a whole output
        return False
    return True
