"""One writing hakd command per --out: a second one is refused with exit 2 while the first runs; the lock dies
with its holder (kill -9 included); a command refused before writing leaves --out as it was."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import TINY
from infra.cli import main
from infra.exclusive import exclusive_out


def test_second_command_on_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    with exclusive_out(out):  # as a running `hakd run` holds it
        assert main(["train", "--out", str(out), *TINY]) == 2
        assert "another hakd command is writing" in capsys.readouterr().err
        assert main(["train", "--out", str(tmp_path / "other"), *TINY]) == 2  # another --out: its own error
        assert "another hakd command" not in capsys.readouterr().err
    assert not out.exists()  # it was empty: removed with the lock


def test_a_refused_command_leaves_no_out_behind(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["train", "--out", str(out), *TINY]) == 2  # no cache yet
    assert "run `hakd cache` first" in capsys.readouterr().err
    assert not out.exists()


def test_the_lock_dies_with_its_holder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from infra.exclusive import exclusive_out\n"
        "with exclusive_out(sys.argv[2]):\n    print('held', flush=True); time.sleep(600)"),
        str(Path(__file__).resolve().parents[1]), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()  # SIGKILL: no cleanup runs
        holder.wait()
    finally:
        holder.kill()
    with exclusive_out(out):  # not refused: the kernel dropped the dead holder's lock
        pass


def test_a_filesystem_without_directory_locks_runs_unguarded(tmp_path, monkeypatch):
    """NFS emulates flock with locks that need write access, so it fails on a directory: no lock, no refusal."""
    import errno
    import fcntl

    from teacher_cache.writers import wait_for_other_writers

    def unsupported(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")
    monkeypatch.setattr(fcntl, "flock", unsupported)
    with exclusive_out(tmp_path / "out"):
        (tmp_path / "out" / "x").write_text("written")
    wait_for_other_writers(str(tmp_path / "out"), timeout_s=0.1)  # returns: nothing to wait on
