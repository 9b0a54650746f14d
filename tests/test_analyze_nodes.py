"""`hakd analyze` as a user runs it on a Ray cluster: from their own directory, with a relative --out, joining a
two-node cluster (ray.cluster_utils.Cluster, on this machine) whose head offers no CPU, so that every analysis
task runs on the second node; the report matches the one-node run's.

The cluster runs in a subprocess, so the session's own Ray (tests/conftest.py) is never disturbed."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, sys
import ray
from ray.cluster_utils import Cluster
from infra.cli import main

work, overrides = sys.argv[1], json.loads(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
worker = cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
os.chdir(work)  # the user's directory; the nodes' workers run in another one
try:
    status = main(["analyze", "--out", "moved", *overrides, f"ray.address={cluster.address}"])
    cpus = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
    print(json.dumps({"status": status, "worker": worker.node_id, "cpus": cpus}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def _numbers(tree, path=""):
    """Every number of a metrics tree by its path (lists by index)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


@pytest.mark.slow
@pytest.mark.timeout(2400)  # whole runs through subprocesses: minutes on 2 shared cores
def test_the_analysis_on_a_second_node_matches_the_one_node_report(tiny_run, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(tiny_run, work / "moved")
    shutil.rmtree(work / "moved" / "report")
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(work), json.dumps(TINY)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["status"] == 0, res.stderr[-3000:]
    # only the second node has CPUs, and every analysis task takes one: all of them ran there
    assert {n: c for n, c in result["cpus"].items() if c} == {result["worker"]: 2}
    one = json.loads((tiny_run / "report" / "metrics.json").read_text())
    two = json.loads((work / "moved" / "report" / "metrics.json").read_text())
    assert two["accuracy"] == one["accuracy"]
    del one["meta"], two["meta"]  # times, commit
    a, b = dict(_numbers(one)), dict(_numbers(two))
    assert a.keys() == b.keys()
    far = {k: (a[k], b[k]) for k in a if not (math.isnan(a[k]) and math.isnan(b[k])) and abs(a[k] - b[k]) > 1e-5}
    assert far == {}
