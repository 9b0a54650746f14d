"""What made an output: the resolved config, package versions and the git commit, written beside it."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from infra import storage
from infra.config import Config, dump_config

ROOT = Path(__file__).resolve().parent.parent
STAMP = ROOT / "infra" / "bench" / "source-stamp.json"  # written by `python -m infra.bench.stamp`
NOT_A_CHECKOUT = "not a git checkout"
PACKAGES = ("torch", "torchvision", "timm", "ffcv", "zarr", "numcodecs", "ray", "numpy", "grad-cam", "hakd")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def git_commit() -> str:
    """HEAD's sha ('-dirty' with uncommitted changes to tracked files); NOT_A_CHECKOUT where hakd's files are not
    the root of a git work tree (installed as a package, or a copy): an enclosing repository is not hakd's."""
    if not (ROOT / ".git").exists():
        return NOT_A_CHECKOUT
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def blob_hash(path: Path) -> str | None:
    """git's blob id of the file's bytes (`git hash-object`), None for a missing file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def stamped_commit(stamp: Path = STAMP, root: Path = ROOT) -> str | None:
    """The stamp's commit ('-dirty' when the stamped tree differed from it) if the tree still matches the stamp."""
    try:
        doc = json.loads(stamp.read_text())
        files, sha = doc["files"], doc["commit"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(blob_hash(root / f) != h for f, h in files.items()):
        return None
    return sha + ("-dirty" if doc.get("dirty") else "")


def commit() -> str:
    """The commit of this tree. git's answer when it names a commit the files match (clean); otherwise that of a
    source stamp that still matches every tracked file, else git's answer as it is. A tree copied to another
    machine (a GPU machine, a cluster node) has no git state of its own, or another one (on the GPU machine git
    named an older commit, dirty): `python -m infra.bench.stamp` in the checkout before the copy writes the
    stamp that travels with it."""
    answer = git_commit()
    if answer not in ("unknown", NOT_A_CHECKOUT) and not answer.endswith("-dirty"):
        return answer
    return stamped_commit() or answer


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance(cfg: Config) -> dict:
    return {"versions": versions(), "commit": commit(), "created": now(), "config_digest": cfg.digest(),
            "config": cfg.to_dict()}


def write_run_info(directory: Path, cfg: Config, **extra) -> None:
    """`config.yaml` (resolved) and `run.json` (versions, commit, time, extra) in `directory`."""
    info = {"versions": versions(), "commit": commit(), "created": now(), "config_digest": cfg.digest(), **extra}
    storage.write_bytes(directory / "config.yaml", dump_config(cfg).encode())  # whole or not at all; an error
    storage.write_bytes(directory / "run.json", json.dumps(info, indent=2).encode())  # names the file
