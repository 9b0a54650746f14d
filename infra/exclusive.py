"""One writing hakd command per output directory at a time.

Two commands writing one --out at once (`hakd run` started twice, `hakd train` while `hakd analyze`
runs) would interleave their writes: two cache runs would write the same shards. Each writing command
holds an exclusive lock (flock) on the --out directory itself for its whole run, so no file is added
to --out; the kernel drops the lock when the process ends, however it ends (kill -9 too), so a stale
lock never blocks. A lock on a local path only: on a network filesystem flock may not reach other
machines, and where it fails outright (NFS on a directory) the command runs unguarded, as before.

The processes a command starts that write below --out and can outlive it by seconds (a cache store's writer
processes, a training trial's Ray worker) hold a shared lock on the directory they write (`lock_dir`), and the
next command waits for such holders to go (`wait_until_unheld`) before it writes there itself.
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

from infra.errors import UserError


class OutBusy(UserError, RuntimeError):
    """Another hakd command is writing this --out."""


def lock_dir(path, op: int) -> int:
    """Open directory `path` and flock it with `op` (fcntl.LOCK_SH / LOCK_EX, maybe | LOCK_NB); the returned
    descriptor holds the lock until it is closed. BlockingIOError (descriptor closed) when LOCK_NB and another
    holds it. Where a directory cannot be flocked (NFS emulates flock with locks that need write access) the
    descriptor comes back unlocked: the caller goes on unguarded, as without the lock."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, op)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:
        pass
    return fd


def wait_until_unheld(path, timeout_s: float) -> bool:
    """Wait up to `timeout_s` until no process holds a lock on directory `path`; True once none does."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.close(lock_dir(path, fcntl.LOCK_EX | fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


@contextmanager
def exclusive_out(out: Path):
    """Hold --out for this command; an --out this created and left empty is removed again."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        fd = lock_dir(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutBusy(f"another hakd command is writing {out} right now; wait for it to end (or stop it), "
                      f"or use another --out") from None
    try:
        yield
    finally:
        if created and not any(out.iterdir()):  # a run refused before writing leaves --out as it was
            out.rmdir()
        os.close(fd)  # releases the lock
