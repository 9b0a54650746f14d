"""What the `hakd` command prints when it fails: one line, and the traceback in a log file the line names.

- An error raised inside a Ray task or actor reaches the driver wrapped (`ray::run_task() (pid=..., ip=...)`
  and the task's traceback); the line gives the error the task raised.
- A UserError (and a FileNotFoundError: data or weights not where the config says) is its own message: exit 2.
- An OSError of a full disk, an exhausted quota, a read-only filesystem or a refused permission names the path,
  the disk and the fix: exit 2. Every stage resumes when the same command is run again, keeping finished work.
- Anything else is a bug: its type and message, exit 1.

Every failure but a UserError raised in the driver itself (whose message says all) leaves its traceback in
OUT/logs/error-<stage>-<time>.log, or in the temporary directory when OUT does not exist or cannot be written
(a full or read-only disk): a command refused before it wrote anything leaves no OUT behind.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from infra.errors import UserError

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def unwrap(e: BaseException) -> BaseException:
    """The exception a Ray task raised, out of Ray's wrappers (nested tasks wrap it once per level)."""
    ray_exceptions = sys.modules.get("ray.exceptions")  # never imports Ray for a failure that did not use it
    while ray_exceptions is not None and isinstance(e, ray_exceptions.RayTaskError) and e.cause is not None \
            and e.cause is not e:
        e = e.cause
    return e


def _actor_failure(e: BaseException) -> str | None:
    """An actor that died keeps only the text of its error: its last `SomeError: message` line."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is None or not isinstance(e, ray_exceptions.RayActorError):
        return None
    lines = [m[0] for line in str(e).splitlines() if (m := re.match(r"\s*[\w.]*(Error|Exception): .+", line))]
    return lines[-1].strip() if lines else str(e).splitlines()[0]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_of(path: str | Path) -> str:
    """`the disk mounted at M: F free of T` for the filesystem holding `path` (its nearest existing ancestor)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    mount = p
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return f"the disk mounted at {mount}"
    return f"the disk mounted at {mount}: {_size(usage.free)} free of {_size(usage.total)}"


def disk_message(e: OSError, fallback: str | Path | None) -> str:
    """One line for an OSError of the disk (errno in DISK_ERRNOS): the path, the disk and the fix."""
    path = e.filename or fallback or "."
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left" if e.errno == errno.ENOSPC else "disk quota exceeded"
        need = f"; {e.strerror}" if e.strerror and e.strerror != os.strerror(e.errno) else ""  # hakd's own estimate
        return (f"{what} writing {path} ({disk_of(path)}{need}): free space there (or move --out to a larger "
                f"disk), then run the same command again; it resumes, keeping what was finished")
    if e.errno == errno.EROFS:
        return (f"cannot write {path}: {disk_of(path).split(':')[0]} is read-only; give an --out (and "
                f"cache.location) on a writable filesystem")
    return (f"permission denied on {path}: give this user (uid {os.getuid()}) access to it, or use another "
            f"--out; then run the same command again")


def describe(e: BaseException, out: str | Path | None = None) -> tuple[str, int, bool]:
    """(the one line, the exit status, whether its traceback is worth a log) for a failure of a command on `out`."""
    cause = unwrap(e)
    wrapped = cause is not e
    if isinstance(cause, OSError) and cause.errno in DISK_ERRNOS and not isinstance(cause, UserError):
        return disk_message(cause, out), 2, True
    if isinstance(cause, (UserError, FileNotFoundError)):
        return str(cause), 2, wrapped
    actor = _actor_failure(cause)
    if actor is not None:
        m = re.match(r"[\w.]*Error: \[Errno (\d+)\] ([^:]+)(?:: '(.+)')?", actor)  # an OSError, as text
        if m and int(m[1]) in DISK_ERRNOS:
            return disk_message(OSError(int(m[1]), m[2], m[3]), out), 2, True
        return f"a Ray actor failed: {actor}", 1, True
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else '(no message)'}", 1, True


def write_log(e: BaseException, out: str | Path | None, stage: str) -> Path | None:
    """The traceback of `e` in OUT/logs (when OUT is a directory that takes it) or the temporary directory."""
    text = "".join(traceback.format_exception(e))
    name = f"error-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    dirs = [Path(out) / "logs"] if out is not None and Path(out).is_dir() else []
    for d in [*dirs, Path(tempfile.gettempdir())]:
        path = d / (name if d in dirs else f"hakd-{name}")
        try:
            d.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path
        except OSError:
            try:  # a log cut short by the full disk is not left behind
                path.unlink(missing_ok=True)
            except OSError:
                pass
    return None


def report(e: BaseException, out: str | Path | None, stage: str) -> int:
    """Print `e` as one line on stderr (naming its log) and return the exit status."""
    line, status, logged = describe(e, out)
    if logged:
        log = write_log(e, out, stage)
        line += f" (traceback: {log})" if log else " (no log could be written: the disk is full or read-only)"
    print(f"hakd: error: {line}", file=sys.stderr)
    return status
