"""`hakd cache` killed with SIGKILL while it writes, then run again: the stores end byte for byte as an
uninterrupted run's (test_cache.base_run), and nothing of the killed run (its Ray cluster, actors, writer
processes, their shared memory and semaphores) is left behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from teacher_cache.job import ROLES, run_cache, store_path
from teacher_cache.store import CacheStore
from cache_helpers import SMALL, assert_same_arrays, snapshot
from test_cache import base_run  # noqa: F401 (a fixture)
from test_cache_writers import _ours_in_shm

pytestmark = pytest.mark.slow  # every test here runs the pipeline or a cluster (more than a few seconds on 2 cores)


ROOT = Path(__file__).resolve().parents[1]


def _done_units(path: Path) -> int:
    try:
        return int(CacheStore.open(path).done_units().sum())
    except Exception:  # not created yet, or being created
        return 0


def _semaphores() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("sem.mp-*")}


def test_killed_cache_resumes_to_the_uninterrupted_store(base_run, tmp_path):
    cfg, _, _, want = base_run
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    shm_before = _ours_in_shm()
    semaphores_before = _semaphores()
    log = open(tmp_path / "cache.log", "wb")
    cli = subprocess.Popen([sys.executable, "-m", "infra.cli", "cache", "--out", str(out), *SMALL],
                           cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        vit = store_path(out, cfg, "teacher_vit")
        deadline = time.time() + 600
        while _done_units(vit) == 0:  # killed once the first unit is durable: the job is part way
            assert cli.poll() is None, (tmp_path / "cache.log").read_text()[-3000:]
            assert time.time() < deadline, "no unit was written in 600 s"
            time.sleep(0.05)
        tree = psutil.Process(cli.pid).children(recursive=True)
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(timeout=30)
        gone, alive = psutil.wait_procs(tree, timeout=60)  # its cluster, actors and writers stop with it
        assert not alive, [p.pid for p in alive]
        assert _ours_in_shm() <= shm_before  # and nothing of the actors' unit buffers is left in /dev/shm
        # nor the named semaphores of their writer pools (their resource trackers unlink them)
        assert not _semaphores() - semaphores_before, sorted(_semaphores() - semaphores_before)
    finally:
        if cli.poll() is None:
            cli.kill()
        log.close()
    cnn = store_path(out, cfg, "teacher_cnn")
    assert _done_units(cnn) < 2 or _done_units(vit) < 2  # really interrupted

    run_cache(cfg, out)
    for role in ROLES:
        path = store_path(out, cfg, role)
        assert CacheStore.open(path).verify() == []
        assert_same_arrays(snapshot(path), want[role])
