"""`hakd bench cache`: the per-stage breakdown, the disk probe and the stores in /dev/shm (tiny profile)."""
from __future__ import annotations

import dataclasses
import os
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


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this machine")
def test_cache_bench_breakdown_in_ram(tmp_path):
    p = resolve_profile("tiny", "cpu", ["store_dir=/dev/shm", "codec_overrides=features/layer3=zstd",
                                        "cache_images=64", "breakdown_units=1"])
    ctx = Context(dataclasses.replace(p, repeats=1), tmp_path)
    assert str(ctx.store_dir).startswith("/dev/shm/hakd-bench-")
    line = cache.run(ctx)
    assert line["disk_write_mb_s"] > 0 and line["params"]["store_dir"] == "/dev/shm"
    assert line["params"]["images"] == 64 and line["params"]["breakdown_units"] == 1
    for name, fig in line["teachers"].items():
        assert fig["units"] == 4  # 64 images (the 32 generated ones twice) in shards of 16
        assert fig["bound"] in ("disk", "compute")
        judged = f"teachers.{name}.{'steady_over_disk' if fig['bound'] == 'disk' else 'steady_ratio'}"
        assert (judged in line["targets"]) == (judged in line["met"]) == fig["steady_valid"]  # judged when plausible
        for k in ("steady_cache_img_s", "steady_bare_img_s", "steady_ratio", "steady_written_mb_s", "steady_over_disk"):
            assert fig[k] is None or fig[k] > 0, (k, fig[k])  # None only where timing noise swamped the difference
        stages = fig["stages_s_per_unit"]
        assert list(stages) == list(cache.STAGES), name
        assert all(v >= 0 for v in stages.values()) and stages["compute"] > 0 and stages["write"] > 0, stages
        assert fig["bare_needs_mb_s"] > 0 and fig["compression_ratio"] > 0
        assert fig["writers_img_s"] > 0 and fig["writers_mb_s"] > 0
    assert line["teachers"]["wrn_demo"]["compression_ratio"] > line["teachers"]["vit_demo"]["compression_ratio"]
    folder = Path(ctx.store_dir)
    assert not (folder / "scratch" / "vit_demo.zarr").exists()  # the writers' scratch store is gone
    assert not list((folder / "cache-bench").iterdir())  # and so are the bench's own stores
    del ctx, line  # the stores' folder in RAM goes with the context
    import gc
    gc.collect()
    assert not folder.exists()


def test_profile_refuses_a_bad_codec():
    with pytest.raises(Exception, match="cache.codec"):
        Context(dataclasses.replace(PROFILES["tiny"], codec="gzip"), Path("/nonexistent"))
