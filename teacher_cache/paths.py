"""Where a cache's files live: the teachers' stores and their fitted weights, under cache.location or OUT.

Both the driver (teacher_cache/job.py) and each cache actor (teacher_cache/worker.py) resolve them
from the config, so a location shared by every node (a path or an s3:// URL) names the same files.
"""
from __future__ import annotations

from pathlib import Path

from infra import storage
from infra.config import Config


def storage_root(out: Path | str, cfg: Config) -> str:
    """Where stores and fitted teachers live: cache.location (a shared path or a URL), else OUT."""
    return storage.root(cfg.cache.location, out)


def store_path(out: Path | str, cfg: Config, role: str) -> Path | str:
    """A teacher's store: a Path under a local location, a URL under an object store."""
    return storage.join(storage_root(out, cfg), "cache", f"{getattr(cfg, role).name}.zarr")


def teacher_file(out: Path | str, cfg: Config, role: str, suffix: str = ".pt") -> Path | str:
    """The fitted teacher's weights (.pt) or its fit record (.json)."""
    return storage.join(storage_root(out, cfg), "teachers", f"{role}{suffix}")


def teacher_loads(path: Path | str) -> bool:
    """True when the teacher file at `path` loads with weights_only=True (never unpickles anything else)."""
    try:
        storage.load_tensors(path)
    except storage.StorageError:
        raise  # an unreachable location is not a damaged teacher
    except Exception:  # missing, truncated, foreign or unsafe: not a whole output
        return False
    return True
