"""What made an output: the resolved config, package versions and the git commit, written beside it."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from infra import storage
from infra.config import Config, dump_config

ROOT = Path(__file__).resolve().parent.parent
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


def commit() -> str:
    """The commit of this tree: git's answer where it names a clean commit, else $HAKD_COMMIT where set, else git's
    answer as it is. A tree copied to another machine (a GPU machine, a cluster node) has no git state of its
    own, or another one; whoever copies it passes the commit it was made from as HAKD_COMMIT (e.g.
    `git describe --always --dirty --abbrev=40` in the checkout). `source_digest` tells which files ran."""
    answer = git_commit()
    if answer not in ("unknown", NOT_A_CHECKOUT) and not answer.endswith("-dirty"):
        return answer
    return os.environ.get("HAKD_COMMIT") or answer


def source_digest() -> str:
    """SHA-256 of hakd's own source (every .py and .yaml of its packages, by relative path): the same for the same
    files on any machine, git or not, installed or checked out."""
    h = hashlib.sha256()
    for pkg in ("infra", "teacher_cache", "student_train", "analysis"):
        for path in sorted((ROOT / pkg).rglob("*")):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


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
