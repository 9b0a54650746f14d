"""The local Ray cluster that `hakd` starts: what it listens on, that it asks every caller for the
token, that none of it outlives a `hakd analyze` killed with SIGKILL, and that a killed actor's named semaphores
are unlinked (infra/ray_cluster.py)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import TINY

pytestmark = pytest.mark.slow  # every test here runs the pipeline or a cluster (more than a few seconds on 2 cores)


ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = ("127.0.0.1", "::1")


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _names(procs) -> dict[int, str]:
    out = {}
    for p in procs:
        try:
            out[p.pid] = p.name()
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def analyze_again(tiny_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_run, out)
    (out / "report" / "run.json").unlink()  # the analysis must run again
    return out


def test_local_ray_requires_the_token_and_dies_with_a_killed_analyze(analyze_again, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    log = open(tmp_path / "analyze.log", "wb")
    cli = subprocess.Popen([sys.executable, "-m", "infra.cli", "analyze", "--out", str(analyze_again), *TINY],
                           cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # the cluster is whole: GCS, raylet, both agents and workers (those that outlived a killed driver)
        def whole():
            names = set(_names(_tree(cli.pid)).values())
            workers = names - {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}
            return {"gcs_server", "raylet", "ray::RuntimeEnvAgent"} <= names and any(n.startswith("ray::") for n in workers)
        _wait_for(whole, 600, "the local Ray cluster and its workers")
        cluster = _tree(cli.pid)
        pids = _names(cluster) | {cli.pid: "hakd (driver)"}
        listening = [(c.laddr.ip, c.laddr.port, pids[c.pid]) for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids]
        # Ray 2.60 cannot bind to loopback only (docs/experiments.md, "Ray on this machine"): what is exposed is Ray's own
        # servers and the driver's, never anything else of ours
        exposed = [(ip, port, name) for ip, port, name in listening if ip not in LOOPBACK]
        assert exposed and all(n in ("gcs_server", "raylet", "hakd (driver)") or n.startswith("ray::")
                               for _, _, n in exposed), exposed
        gcs_port = next(port for _, port, name in listening if name == "gcs_server")
        agent = next((ip, port) for ip, port, name in exposed if name == "ray::RuntimeEnvAgent")
        # ... and each refuses a caller without the token: the GCS (gRPC) and the runtime-env agent (HTTP)
        probe = subprocess.run(
            [sys.executable, "-c", "import ray._raylet as r; "
             f"r.GcsClient(address='127.0.0.1:{gcs_port}').internal_kv_get(b'x', None, timeout=5)"],
            env={**env, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120)
        assert probe.returncode != 0 and "InvalidAuthToken" in probe.stderr, probe.stderr[-2000:]
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"http://{agent[0]}:{agent[1]}/get_or_create_runtime_env",
                                                          data=b"", method="POST"), timeout=10)
        assert e.value.code == 401
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(timeout=30)
        _wait_for(lambda: not any(_alive(p) for p in cluster), 15, "the cluster's processes to exit")
    finally:
        if cli.poll() is None:
            cli.kill()
        log.close()


KILLED_ACTOR = r"""
import json, os, time
import psutil, ray
from infra.config import RayConfig
from infra.ray_cluster import ensure_ray
ensure_ray(RayConfig())

@ray.remote
class PoolOwner:  # what a cache actor holds: a spawn process pool, whose queues are named semaphores
    def start(self):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        self.pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))
        self.pool.submit(os.getpid).result()
        return os.getpid()

owner = PoolOwner.remote()
pid = ray.get(owner.start.remote())
ray.kill(owner)  # the raylet sees this actor die while the cluster still runs
while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
    time.sleep(0.1)
time.sleep(1)
print(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]))
"""


def _semaphores() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("sem.mp-*")}


def test_a_killed_actors_named_semaphores_are_unlinked_when_the_cluster_stops():
    """An actor killed while its cluster runs (what the raylet sees when a `hakd cache` driver is killed, if it
    is quicker than the watchdog) leaves its pool's named semaphores to Python's resource tracker, which must
    outlive it: Ray's default process-group cleanup killed the tracker with the actor and left them in
    /dev/shm (tests/test_cache_kill.py failed that way in about half the full-suite runs)."""
    before = _semaphores()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    res = subprocess.run([sys.executable, "-c", KILLED_ACTOR], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    cluster = []
    for pid in json.loads(res.stdout.strip().splitlines()[-1]):
        try:
            cluster.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(cluster, timeout=60)  # the watchdog stops the cluster once the driver is gone
    assert not alive, _names(alive)
    assert not _semaphores() - before, sorted(_semaphores() - before)
