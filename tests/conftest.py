"""Shared fixtures: one Ray for the whole session, tiny configs, and one tiny finished run."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TINY = [  # a config that exercises every stage in seconds
    "data.train_size=128", "data.test_size=40",
    "teacher_vit.fit_epochs=1", "teacher_cnn.fit_epochs=1",
    "cache.views=3", "cache.shard_size=32", "cache.chunk_size=16", "cache.batch_size=64",
    "train.epochs=2", "train.batch_size=32", "train.loader_workers=1", "train.seeds=[0]",
    "analysis.cka_samples=40", "analysis.cka_batch_size=20", "analysis.gradcam_samples=4",
    "analysis.gradcam_eval_samples=8", "analysis.adversarial_samples=16", "analysis.pgd_steps=2",
    "analysis.eval_batch_size=40", "analysis.fourier_radii=[0.2,0.6,1.0]",
    "analysis.occlusion_fractions=[0.0,0.5]", "analysis.adversarial_eps=[0.0,0.01]",
]


@pytest.fixture(scope="session")
def ray_session():
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_cfg():
    from infra.config import load_config
    return load_config(None, TINY)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, ray_session):
    """One finished `hakd run` on the tiny config (shared by the end-to-end tests)."""
    from infra.cli import main
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["run", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, ray_session):
    """(cfg, out): a 64-image cache of both teachers, written once (shared by tests/test_student_*.py)."""
    from student_cache import make_cfg, quiet
    from teacher_cache.job import run_cache
    cfg = make_cfg()
    out = tmp_path_factory.mktemp("student_train") / "out"
    run_cache(cfg, out, log=quiet)
    return cfg, out


@pytest.fixture(scope="session")
def tiny_packed(tiny_cache):
    """(beton, meta): tiny_cache packed once."""
    from student_cache import quiet, stores_of
    from student_train.pack import pack
    cfg, out = tiny_cache
    return pack(stores_of(cfg, out), out / "train", workers=1, log=quiet)
