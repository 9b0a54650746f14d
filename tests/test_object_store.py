"""Stores and fitted teachers under an object-store URL (cache.location=s3://...), against a local S3 server
(moto) started here: `hakd cache`, `hakd verify` and the packing of `hakd train` read and write through it;
a missing bucket and a node without credentials are one-line errors (exit 2) naming the node."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "hakd-test"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1 (free port) holding one bucket; the AWS_* variables that reach it."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    import boto3
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()


def _use(monkeypatch, env: dict) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import fsspec
    fsspec.filesystem("s3").clear_instance_cache()  # s3fs caches clients built with other credentials


def test_cache_verify_and_pack_through_s3(s3_env, tmp_path, monkeypatch):
    from infra.cli import main
    from infra.config import load_config
    from student_train.pack import FFCV_NAME, pack
    from teacher_cache.job import ROLES, store_path, teacher_file
    location = f"s3://{BUCKET}/run1"
    out = tmp_path / "out"
    # its own process: the Ray that `hakd cache` starts inherits the credentials and the endpoint
    res = subprocess.run([sys.executable, "-m", "infra.cli", "cache", "--out", str(out), *TINY,
                          f"cache.location={location}"], cwd=ROOT, env={**os.environ, **s3_env,
                          "RAY_USAGE_STATS_ENABLED": "0"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (out / "cache").exists() or not list((out / "cache").glob("*.zarr"))  # nothing local
    assert not (out / "teachers").exists()
    _use(monkeypatch, s3_env)
    cfg = load_config(None, [*TINY, f"cache.location={location}"])
    stores = {role: store_path(out, cfg, role) for role in ROLES}
    assert all(p.startswith(location + "/cache/") for p in stores.values())
    from infra import storage
    assert all(storage.exists(teacher_file(out, cfg, role)) for role in ROLES)
    assert main(["verify", *stores.values()]) == 0
    beton, meta = pack(stores, tmp_path / "train", workers=1, log=lambda *a: None)  # local scratch
    assert beton == tmp_path / "train" / FFCV_NAME and beton.stat().st_size > 0
    assert meta["rows"] == 128 * 3 and meta["stores"] == stores


def test_missing_bucket_is_one_line_naming_the_node(s3_env, tmp_path, monkeypatch, capsys, ray_session):
    from infra.cli import main
    _use(monkeypatch, s3_env)
    rc = main(["cache", "--out", str(tmp_path / "out"), *TINY, "cache.location=s3://no-such-bucket/x"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2
    assert "bucket does not exist" in err and "node " in err and "s3://no-such-bucket/x" in err


def test_actor_node_that_cannot_reach_the_location_is_named(s3_env, tmp_path, monkeypatch, capsys, ray_session):
    """The session's Ray was started without the credentials: the driver reaches the bucket, its actors do not."""
    from infra.cli import main
    from infra.config import load_config
    from teacher_cache.job import teacher_file
    _use(monkeypatch, s3_env)
    location = f"s3://{BUCKET}/unreachable"
    rc = main(["cache", "--out", str(tmp_path / "out"), *TINY, f"cache.location={location}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2, err
    assert "Ray node" in err and "no credentials" in err and location in err
    from infra import storage  # what was written before (the fitted teachers) is whole
    cfg = load_config(None, [*TINY, f"cache.location={location}"])
    assert storage.load_tensors(teacher_file(tmp_path / "out", cfg, "teacher_vit"))
    assert json.loads(storage.read_bytes(teacher_file(tmp_path / "out", cfg, "teacher_vit", ".json")))["key"]
