"""Starting or joining Ray: a local cluster tied to this process by default, an existing one when `ray.address` is set.

Exposure. Ray 2.60 has no setting that binds a cluster to the loopback interface: even started with
`--node-ip-address=127.0.0.1`, its GCS server, raylet, workers and the driver listen on all interfaces
and the runtime-env agent on the machine's address (tests/test_ray_local.py lists them). What a
local cluster can have is Ray's token authentication (RAY_AUTH_MODE=token, the token in
~/.ray/auth_token, or where there is none a random one for this command only), which every one of those ports then requires: this module turns it on (unless
the user set RAY_AUTH_MODE) and says at start that the ports are reachable from the network. The
dashboard, when asked for, binds to 127.0.0.1. Joining a cluster (`ray.address`) is the user's choice
and leaves its settings alone.

Lifetime. A driver that starts Ray with `ray.init()` leaves the dashboard agent, the runtime-env
agent and idle workers running when it is killed with SIGKILL. So the local cluster is
`ray start --head --block` run by a watchdog (`python -m infra.ray_cluster PID CMD...`) in its own
session: the watchdog is a child subreaper, so every Ray process stays its descendant even once
orphaned, and when process PID is gone, however it ended, it stops the cluster and kills whatever
is left within a few seconds, Python's resource trackers last so that they unlink the semaphores of the
processes they served (which is also why Ray's own killing of a dead worker's children and process group
is turned off in this cluster). A new session also keeps Ctrl-C in the terminal away from Ray: the
command handles it and exits, then the watchdog stops the cluster.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from infra.config import RayConfig

ROOT = Path(__file__).resolve().parent.parent
# `ray start` through the interpreter running hakd, so the venv's Ray is used whatever PATH says
RAY_CLI = "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
START_TIMEOUT_S = 90.0


class RayStartError(RuntimeError):
    """The local Ray cluster did not come up; the message names its log."""


def ensure_ray(rc: RayConfig) -> None:
    import ray
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # workers import hakd from the working tree; make that explicit for a fresh `ray` worker process
    runtime_env = {"env_vars": {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}}
    if rc.address:
        ray.init(address=rc.address, runtime_env=runtime_env, log_to_driver=False)
        return
    if "RAY_AUTH_MODE" not in os.environ:  # the user's explicit choice stands; else token authentication
        os.environ["RAY_AUTH_MODE"] = "token"  # inherited by the cluster's processes
        from ray._raylet import Config
        Config.initialize("")  # Ray reads the mode at import: re-read it (what Ray itself does for ray.init())
    mode = os.environ["RAY_AUTH_MODE"]
    if mode == "token":
        token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).expanduser()
        if not os.environ.get("RAY_AUTH_TOKEN") and not token_file.is_file():
            # `ray start` refuses to run without a token; a fresh machine has none: one for this command only,
            # inherited by the cluster it starts and by nothing else
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        print("hakd: note: the local Ray cluster listens on all network interfaces (Ray 2.60 cannot bind to "
              "127.0.0.1 only); token authentication is on, so callers without its token are refused",
              file=sys.stderr)
    else:
        print(f"hakd: warning: RAY_AUTH_MODE={mode}: the local Ray cluster listens on all "
              f"network interfaces WITHOUT authentication; anyone who reaches this machine can run code in it. "
              f"Unset RAY_AUTH_MODE to have token authentication", file=sys.stderr)
    address = start_local_cluster(rc)
    ray.init(address=address, _node_ip_address="127.0.0.1", runtime_env=runtime_env, log_to_driver=False)


def start_local_cluster(rc: RayConfig) -> str:
    """Start `ray start --head` under a watchdog tied to this process; returns the GCS address once it accepts."""
    port = free_port()
    # a private temp dir: `ray start` records its cluster in <temp dir>/ray_current_cluster, where a plain
    # `ray.init()` anywhere on the machine (another hakd, a test session) would otherwise join it
    temp_dir = tempfile.mkdtemp(prefix="hakd-ray-")
    cmd = [sys.executable, "-c", RAY_CLI, "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp_dir}",
           "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--dashboard-host=127.0.0.1",
           f"--include-dashboard={'true' if rc.dashboard else 'false'}"]
    if rc.num_cpus:
        cmd.append(f"--num-cpus={rc.num_cpus}")
    log = open(Path(temp_dir) / "hakd-ray.log", "wb")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Ray kills a dead worker's children (its direct ones, and by default its whole process group), Python's
    # resource trackers among them, before they unlink the named semaphores of a killed actor's writer pool:
    # a kill -9 of `hakd cache` left five or six files in /dev/shm whenever the raylet saw the actor die before
    # the watchdog stopped it. The watchdog stops every descendant at the end anyway, trackers last.
    env.setdefault("RAY_kill_child_processes_on_worker_exit", "0")
    env.setdefault("RAY_process_group_cleanup_enabled", "0")
    watchdog = subprocess.Popen([sys.executable, "-m", "infra.ray_cluster", str(os.getpid()), *cmd],
                                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    log.close()
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if watchdog.poll() is not None:
            raise RayStartError(f"the local Ray cluster exited while starting; see {log.name}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    raise RayStartError(f"the local Ray cluster did not start within {START_TIMEOUT_S:.0f} s; see {log.name}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpus_available() -> int:
    import ray
    return int(ray.cluster_resources().get("GPU", 0))


# ---------------------------------------------------------------- the watchdog process

def _become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process instead of init (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _alive(p) -> bool:
    import psutil
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_resource_tracker(p) -> bool:
    import psutil
    try:
        return "multiprocessing.resource_tracker" in " ".join(p.cmdline())
    except psutil.Error:
        return False


def _kill(procs: list, timeout: float) -> None:
    import psutil
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


def _stop_descendants() -> None:
    """SIGTERM every descendant (`ray start` then stops its processes), SIGKILL what remains after 3 s.

    Python's resource trackers go last: once every process they serve is gone, they unlink the shared
    memory those left behind (the cache actors' unit buffers, /dev/shm); killed first, they would leak it."""
    import psutil
    me = psutil.Process()
    procs = me.children(recursive=True)
    for p in procs:
        try:
            p.terminate()  # resource trackers ignore it
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=3)
    rest = list({p.pid: p for p in alive + me.children(recursive=True)}.values())  # and orphans re-parented meanwhile
    trackers = [p for p in rest if _is_resource_tracker(p)]
    _kill([p for p in rest if p not in trackers], timeout=2)
    _, alive = psutil.wait_procs(trackers, timeout=5)  # they exit by themselves once the last client is gone
    _kill(alive, timeout=2)


def watch(parent_pid: int, cmd: list[str]) -> int:
    """Run `cmd` (the Ray head) for as long as process `parent_pid` lives, then stop it and all it started."""
    import psutil
    _become_subreaper()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped itself: still stop the cluster (finally)
    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        return 0
    head = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    try:
        while _alive(parent) and head.poll() is None:
            time.sleep(0.2)
    finally:
        _stop_descendants()
    return 0


if __name__ == "__main__":
    sys.exit(watch(int(sys.argv[1]), sys.argv[2:]))
