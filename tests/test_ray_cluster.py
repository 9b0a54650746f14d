"""A two-node Ray cluster on one machine (ray.cluster_utils.Cluster) writing the cache stores to one location
every node sees, an object store (a local moto S3 server), with the cache actors pinned to the second node by a
custom resource (cache.actor_resources); then `hakd verify` and the packing of `hakd train` read from it.

The cluster runs in a subprocess, so the session's own Ray (tests/conftest.py) is never disturbed; it starts
with the S3 variables set, as a real cluster's nodes would have them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import pytest
from pathlib import Path

from conftest import TINY
from tests.test_object_store import BUCKET, s3_env, use_s3  # noqa: F401  (s3_env: the moto server fixture)

pytestmark = pytest.mark.slow  # every test here runs the pipeline or a cluster (more than a few seconds on 2 cores)


ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
from ray.cluster_utils import Cluster
from infra.config import load_config
from teacher_cache.job import ROLES, run_cache, store_path
from teacher_cache.store import CacheStore

out, shared, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
worker = cluster.add_node(num_cpus=2, resources={"hakd_cache_node": 2})
cluster.wait_for_nodes()
cfg = load_config(None, [*overrides, f"ray.address={cluster.address}", f"cache.location={shared}",
                         "cache.actor_resources={hakd_cache_node: 1}"])
try:
    summary = run_cache(cfg, out, log=lambda *a: None)
    stores = {r: CacheStore.open(store_path(out, cfg, r)) for r in ROLES}
    print(json.dumps({"worker": worker.node_id, "nodes": {r: s["nodes"] for r, s in summary.items()},
                      "problems": {r: s.verify() for r, s in stores.items()},
                      "paths": {r: s.path for r, s in stores.items()}}))
finally:
    import ray
    ray.shutdown()
    cluster.shutdown()
"""


def test_two_node_cluster_caches_to_s3_then_verify_and_pack(s3_env, tmp_path, monkeypatch):
    from infra.cli import main
    from student_train.pack import FFCV_NAME, pack
    location = f"s3://{BUCKET}/cluster"
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(out), location, json.dumps(TINY)],
                         cwd=ROOT, capture_output=True, text=True, timeout=400,
                         env={**os.environ, **s3_env, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["problems"] == {"teacher_vit": [], "teacher_cnn": []}
    for role, nodes in result["nodes"].items():  # every actor ran on the node that offers the resource
        assert nodes and all(result["worker"][:12] in n for n in nodes), (role, nodes, result["worker"])
    stores = result["paths"]
    assert all(p.startswith(location + "/cache/") for p in stores.values())
    assert not (out / "cache").exists() and not (out / "teachers").exists()  # nothing went to local disk
    use_s3(monkeypatch, s3_env)
    assert main(["verify", *stores.values()]) == 0
    beton, meta = pack(stores, tmp_path / "train", workers=1, log=lambda *a: None)  # into local scratch
    assert beton == tmp_path / "train" / FFCV_NAME and beton.stat().st_size > 0
    assert meta["rows"] == 128 * 3 and meta["stores"] == stores
