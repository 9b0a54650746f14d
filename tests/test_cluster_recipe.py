"""infra/cluster.yaml and infra/submit.sh: the facts a cluster depends on, checked without a cluster."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "infra" / "cluster.yaml").read_text())


def test_every_node_pip_installs_the_repository(cluster):
    (target, source), = cluster["file_mounts"].items()
    assert source == "."  # the repository itself, on every node
    setup = cluster["setup_commands"]  # run on every node, head and workers
    assert any(c.startswith("pip install") and c.rstrip().endswith(target) for c in setup)
    assert any("torch==2.14.1" in c for c in setup)  # pinned as in `make install`
    assert "py311" in cluster["docker"]["image"]  # pyproject: requires-python >=3.11,<3.12
    assert "**/.venv" in cluster["rsync_exclude"]  # a local environment is never copied to the nodes


def test_gpu_work_lands_on_gpu_nodes_and_storage_is_shared(cluster):
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"] == {"GPU": 0}
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert workers and all(t["min_workers"] >= 1 for t in workers)  # GPU actors have somewhere to run at once
    mount = "/mnt/hakd"
    assert any(mount in c and "mount" in c for c in cluster["initialization_commands"])
    assert f"-v {mount}:{mount}" in cluster["docker"]["run_options"]
    assert all("127.0.0.1" in c for c in cluster["head_start_ray_commands"] if c.startswith("ray start"))


def test_submit_script_is_valid_bash_and_refuses_bad_input(tmp_path):
    bash = shutil.which("bash")
    script = ROOT / "infra" / "submit.sh"
    subprocess.run([bash, "-n", str(script)], check=True)
    demo = str(ROOT / "infra" / "configs" / "demo.yaml")
    cases = {("runs/x",): "absolute path on the shared mount", ("s3://bucket/run",): "cache.location=s3://bucket/run",
             ("/mnt/hakd/x", "not-an-override"): "not a key.sub=value override"}
    for args, message in cases.items():
        r = subprocess.run([bash, str(script), demo, *args], cwd=ROOT, capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin"})  # fails before it would need ray or a cluster
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    r = subprocess.run([bash, str(script), str(tmp_path / "missing.yaml"), "/mnt/hakd/x"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr
    text = script.read_text()
    assert ".venv" not in text and "--working-dir" not in text  # runs the hakd installed on the nodes
