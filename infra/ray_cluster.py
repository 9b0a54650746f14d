"""Starting or joining Ray: local by default, an existing cluster when `ray.address` is set.

The dashboard, when asked for, binds to 127.0.0.1: nothing is exposed beyond this machine unless
the user starts the cluster otherwise (see infra/cluster.yaml).
"""
from __future__ import annotations

import os

from infra.config import RayConfig


def ensure_ray(rc: RayConfig) -> None:
    import ray
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # workers import hakd from the working tree; make that explicit for a fresh `ray` worker process
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runtime_env = {"env_vars": {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}}
    if rc.address:
        ray.init(address=rc.address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(num_cpus=rc.num_cpus, include_dashboard=rc.dashboard, dashboard_host="127.0.0.1",
                 log_to_driver=False, runtime_env=runtime_env)


def gpus_available() -> int:
    import ray
    return int(ray.cluster_resources().get("GPU", 0))
