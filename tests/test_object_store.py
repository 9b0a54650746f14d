"""Stores and fitted teachers under an object-store URL (cache.location=s3://...), against a local S3 server
(moto) started here: a missing bucket and a node without credentials are one-line errors (exit 2) naming the
node, and nothing written before is damaged. The end-to-end path (a two-node cluster's `hakd cache` into the
bucket, `hakd verify` and the packing of `hakd train` from it) is tests/test_ray_cluster.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY

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


def use_s3(monkeypatch, env: dict) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import fsspec
    fsspec.filesystem("s3").clear_instance_cache()  # s3fs caches clients built with other credentials


@pytest.mark.slow
def test_missing_bucket_is_one_line_naming_the_node(s3_env, tmp_path, monkeypatch, capsys, ray_session):
    from infra.cli import main
    use_s3(monkeypatch, s3_env)
    rc = main(["cache", "--out", str(tmp_path / "out"), *TINY, "cache.location=s3://no-such-bucket/x"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2
    assert "bucket does not exist" in err and "node " in err and "s3://no-such-bucket/x" in err


@pytest.mark.slow
def test_actor_node_that_cannot_reach_the_location_is_named(s3_env, tmp_path, monkeypatch, capsys, ray_session):
    """The session's Ray was started without the credentials: the driver reaches the bucket, its actors do not."""
    from infra.cli import main
    from infra.config import load_config
    from teacher_cache.job import teacher_file
    use_s3(monkeypatch, s3_env)
    location = f"s3://{BUCKET}/unreachable"
    rc = main(["cache", "--out", str(tmp_path / "out"), *TINY, f"cache.location={location}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2, err
    assert "Ray node" in err and "no credentials" in err and location in err
    from infra import storage  # found before any teacher was fitted: nothing was written, nothing is left behind
    cfg = load_config(None, [*TINY, f"cache.location={location}"])
    assert not storage.exists(teacher_file(tmp_path / "out", cfg, "teacher_vit"))
    assert not storage.exists(teacher_file(tmp_path / "out", cfg, "teacher_vit", ".json"))


@pytest.mark.parametrize("override, needle", [
    ("cache.location=gs://bucket/x", "cache.location"),
    ("cache.location=s3://", "cache.location"),
    ("cache.actor_resources={hakd_cache_node: 0}", "cache.actor_resources"),
])
def test_bad_location_or_resources_exit_2_naming_the_key(override, needle, tmp_path, capsys):
    from infra.cli import main
    assert main(["cache", "--out", str(tmp_path / "out"), *TINY, override]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_path_that_is_not_shared_is_named(tmp_path):
    """A node whose copy of the location is its own disk writes and reads fine, but does not see the driver's mark."""
    from infra import storage
    driver, node = tmp_path / "driver_disk", tmp_path / "node_disk"
    key, payload = storage.leave_mark(str(driver))
    storage.probe(str(driver), "driver-host", (key, payload))  # the driver's own view passes
    seen_from_node = (str(node / Path(key).name), payload)  # the same path, resolved on the other node's disk
    with pytest.raises(storage.StorageError, match="node other-host .* not shared"):
        storage.probe(str(node), "other-host", seen_from_node)
    assert not list(node.iterdir())  # its probe object was removed


@pytest.mark.slow
def test_units_written_to_the_bucket_are_the_local_stores_bytes(s3_env, monkeypatch, tmp_path):
    """A unit's shard files go to an object store as one PUT each: the same bytes and checksums as on a local
    disk, verified and read back by zarr from the bucket."""
    import fsspec
    import numpy as np

    from teacher_cache.store import CacheStore, shard_key
    from cache_helpers import IDENTITY, LAYOUT, PROVENANCE, random_unit
    use_s3(monkeypatch, s3_env)
    url = f"s3://{BUCKET}/units/t.zarr"
    remote = CacheStore.create_or_open(url, LAYOUT, IDENTITY, PROVENANCE, codec="lz4")
    local = CacheStore.create_or_open(tmp_path / "t.zarr", LAYOUT, IDENTITY, PROVENANCE, codec="lz4")
    rng = np.random.default_rng(0)
    for u in range(LAYOUT.units):
        arrays = random_unit(LAYOUT, u, rng)
        remote.write_unit(u, arrays)
        local.write_unit(u, arrays)
    fs = fsspec.filesystem("s3")
    for name, (shape, _) in LAYOUT.arrays().items():
        key = shard_key(name, len(shape), LAYOUT.units - 1)
        assert fs.cat_file(f"{url}/{key}") == (tmp_path / "t.zarr" / key).read_bytes(), name
    reopened = CacheStore.open(url)
    assert reopened.verify() == []
    np.testing.assert_array_equal(reopened.array("units/xxh3")[:], local.array("units/xxh3")[:])
    np.testing.assert_array_equal(reopened.array("features/blocks.2")[:], local.array("features/blocks.2")[:])
