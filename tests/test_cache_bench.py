"""`hakd bench cache`: the steady-state judgement, the disk probe and the stores in /dev/shm (tiny profile)."""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from infra.bench import cache
from infra.bench.common import Context
from infra.bench.profiles import PROFILES, resolve_profile

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizer


def test_implausible_steady_rates_are_not_judged():
    assert cache.plausible(4755.0, 8408.0) and cache.plausible(8600.0, 8408.0)
    assert not cache.plausible(157600.0, 8408.0)  # the H200 run whose half run held the writers' start-up
    assert not cache.plausible(None, 8408.0) and not cache.plausible(4000.0, None)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this machine")
def test_cache_bench_in_ram(tmp_path):
    p = resolve_profile(["profile=tiny", "device=cpu", "codec_overrides=features/layer3=zstd", "cache_images=64"])
    ctx = Context(p, tmp_path)
    shm = Path(tempfile.mkdtemp(prefix="hakd-test-", dir="/dev/shm"))
    try:
        line = cache.run(ctx, str(shm))
        assert not list(shm.iterdir())  # the bench's stores, scratch stores and probe files are gone
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    assert line["disk_write_mb_s"] > 0 and line["params"]["store_dir"] == str(shm)
    assert line["params"]["images"] == 64
    for name, fig in line["teachers"].items():
        assert fig["units"] == 4  # 64 images (the 32 generated ones twice) in shards of 16
        judged = f"teachers.{name}.{'steady_over_disk' if fig['bound'] == 'disk' else 'steady_ratio'}"
        assert (judged in line["targets"]) == (judged in line["met"]) == fig["steady_valid"]  # judged when plausible
        for k in ("steady_cache_img_s", "steady_bare_img_s", "steady_ratio", "steady_written_mb_s", "steady_over_disk"):
            assert fig[k] is None or fig[k] > 0, (k, fig[k])  # None only where timing noise swamped the difference
        assert fig["bare_needs_mb_s"] > 0 and fig["compression_ratio"] > 0 and fig["writers_mb_s"] > 0
    assert line["teachers"]["wrn_demo"]["compression_ratio"] > line["teachers"]["vit_demo"]["compression_ratio"]


def test_profile_refuses_a_bad_codec():
    with pytest.raises(Exception, match="cache.codec"):
        Context(dataclasses.replace(PROFILES["tiny"], codec="gzip"), Path("/nonexistent"))
