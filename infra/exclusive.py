"""One writing hakd command per output directory at a time.

Two commands writing one --out at once (`hakd run` started twice, `hakd train` while `hakd analyze`
runs) would interleave their writes: two cache runs would write the same shards. Each writing command
holds an exclusive lock (flock) on the --out directory itself for its whole run, so no file is added
to --out; the kernel drops the lock when the process ends, however it ends (kill -9 too), so a stale
lock never blocks. A lock on a local path only: on a network filesystem flock may not reach other
machines, and where it fails outright (NFS on a directory) the command runs unguarded, as before.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from infra.errors import UserError


class OutBusy(UserError, RuntimeError):
    """Another hakd command is writing this --out."""


@contextmanager
def exclusive_out(out: Path):
    """Hold --out for this command; an --out this created and left empty is removed again."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutBusy(f"another hakd command is writing {out} right now; wait for it to end (or stop it), "
                          f"or use another --out") from None
        except OSError:  # no flock on directories here (NFS emulates it with locks that need write access)
            pass
        try:
            yield
        finally:
            if created and not any(out.iterdir()):  # a run refused before writing leaves --out as it was
                out.rmdir()
    finally:
        os.close(fd)  # releases the lock
