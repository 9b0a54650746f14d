"""The teacher cache end to end: one tiny `run_cache` and what it must do: repair, resume, identity, replayed
views (the store on its own: tests/test_cache_store.py; tests/test_views.py, tests/test_cache_sizing.py and
tests/test_cache_integrity.py hold the rest).

The end-to-end tests share one tiny `run_cache` (module fixture `base_run`, 64 images, 2 shards per
teacher) and work on copies of its output directory, so they can damage stores freely.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from teacher_cache.job import ROLES, run_cache, store_path
from teacher_cache.layout import Layout
from teacher_cache.store import CacheStore, StoreError
from teacher_cache.views import apply_views, sample_views

from cache_helpers import assert_same_arrays, corrupt_middle, file_states, shard_files, small_cfg, snapshot

# ---------------------------------------------------------------- end-to-end: one tiny cache run

pytestmark = pytest.mark.slow  # every test here runs the pipeline or a cluster (more than a few seconds on 2 cores)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, ray_session):
    """An uninterrupted `run_cache` of the small config: (cfg, out, summary, snapshot per role)."""
    cfg = small_cfg()
    out = tmp_path_factory.mktemp("cache_base") / "out"
    summary = run_cache(cfg, out)
    for role in ROLES:
        assert summary[role]["units_written"] == summary[role]["units"] == 2
        assert summary[role]["image_views_per_s"] > 0  # 64 images x 3 views over the units' wall time
    snaps = {role: snapshot(store_path(out, cfg, role)) for role in ROLES}
    return cfg, out, summary, snaps


@pytest.fixture
def run_copy(base_run, tmp_path):
    cfg, out, _, snaps = base_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return cfg, copy, snaps


@pytest.fixture(scope="module")
def damaged_rerun(base_run, tmp_path_factory):
    """A copy of the base run, damaged, then `run_cache` again (one re-run serves tests 3 and 4):
    - ViT store: bytes in the middle of unit 1's feature shard and of a live_block file overwritten
      (a damaged disk);
    - CNN store: the job was killed while writing unit 1: done flag 0, the first arrays' shards
      half written (truncated), the later ones not written at all.
    Returns (cfg, out, snaps of the base run, summary, mtimes of the ViT's unit-0 shards before)."""
    cfg, base_out, _, snaps = base_run
    out = tmp_path_factory.mktemp("cache_damaged") / "out"
    shutil.copytree(base_out, out)

    vit = store_path(out, cfg, "teacher_vit")
    store = CacheStore.open(vit)
    (layer,) = list(store.layout.layers)
    (f,) = shard_files(vit, f"features/{layer}", 1)
    corrupt_middle(f)
    assert store.bad_units() == [1] and store.pending_units() == []
    # and the frozen block's weights: one of their chunk files damaged the same way
    weights = max((p for p in (vit / "live_block").rglob("*") if p.is_file() and p.name != "zarr.json"),
                  key=lambda p: p.stat().st_size)
    corrupt_middle(weights)
    assert store.param_problems("live_block")
    unit0 = {str(p): p.stat().st_mtime_ns for name in store.names for p in shard_files(vit, name, 0)}

    cnn = store_path(out, cfg, "teacher_cnn")
    store = CacheStore.open(cnn)
    store.mark_pending([1])
    for i, name in enumerate(store.names):
        for f in shard_files(cnn, name, 1):
            if i < 3:
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
            else:
                f.unlink()
    assert store.pending_units() == [1]
    with pytest.raises(Exception):
        store.group["images"][32:64]  # really damaged

    summary = run_cache(cfg, out)
    return cfg, out, snaps, summary, unit0


def test_run_cache_store_is_complete(base_run):
    cfg, out, summary, snaps = base_run
    from teacher_cache.datasets import load_split
    train = load_split(cfg.data, "train")
    for role in ROLES:
        store = CacheStore.open(store_path(out, cfg, role))
        assert store.verify() == []
        assert store.attrs["complete"] is True
        assert store.layout.n == 64 and store.layout.views == 3 and store.layout.units == 2
        # images and views in the store are the training split and the sampled views
        np.testing.assert_array_equal(snaps[role]["images"], train["images"])
        np.testing.assert_array_equal(snaps[role]["labels"], train["labels"])
        np.testing.assert_array_equal(snaps[role]["views"], sample_views(64, 3, cfg.data.seed, cfg.cache.crop_scale,
                                                                          cfg.cache.crop_ratio, cfg.cache.flip_prob))
        assert np.isfinite(snaps[role]["logits"].astype(np.float32)).all()
    assert any(k.startswith("live_block/") for k in snaps["teacher_vit"])
    assert not any(k.startswith("live_block/") for k in snaps["teacher_cnn"])


# ---------------------------------------------------------------- 3. repair

def test_repair_rewrites_only_the_damaged_unit(damaged_rerun):
    cfg, out, snaps, summary, unit0 = damaged_rerun
    assert summary["teacher_vit"]["units_written"] == 1
    vit = store_path(out, cfg, "teacher_vit")
    assert CacheStore.open(vit).verify() == []
    assert_same_arrays(snapshot(vit), snaps["teacher_vit"])  # live_block/ included: rewritten as a unit
    assert {p: Path(p).stat().st_mtime_ns for p in unit0} == unit0  # unit 0 was not rewritten


# ---------------------------------------------------------------- 4. kill and resume

def test_killed_job_resumes_to_the_uninterrupted_store(damaged_rerun, base_run):
    cfg, out, snaps, summary, _ = damaged_rerun
    assert summary["teacher_cnn"]["units_written"] == 1
    cnn = store_path(out, cfg, "teacher_cnn")
    assert CacheStore.open(cnn).verify() == []
    assert_same_arrays(snapshot(cnn), snaps["teacher_cnn"])  # == the uninterrupted run in another out dir
    base_attrs = CacheStore.open(store_path(base_run[1], cfg, "teacher_cnn")).attrs
    assert CacheStore.open(cnn).attrs["identity"] == base_attrs["identity"]


def test_teacher_fit_is_deterministic(base_run, tmp_path):
    """A job killed before a teacher was saved refits it on resume: the fit must give the same weights
    (and so the same store identity), whatever the process did with the global RNG before."""
    from teacher_cache.fit import fit_teacher
    cfg, base_out, _, _ = base_run
    torch.randn(17)  # disturb the global RNG
    for role in ROLES:
        fit_teacher(cfg, role, tmp_path)
        got = torch.load(tmp_path / "teachers" / f"{role}.pt", weights_only=True)
        want = torch.load(base_out / "teachers" / f"{role}.pt", weights_only=True)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), role


def test_teacher_fit_is_reused_only_for_the_same_fit(base_run, tmp_path):
    from teacher_cache.job import ensure_teacher
    cfg, base_out, _, _ = base_run
    shutil.copytree(base_out / "teachers", tmp_path / "teachers")
    pt = tmp_path / "teachers" / "teacher_cnn.pt"  # trained by the pipeline (the demo ViT ships pretrained)
    before = file_states(tmp_path / "teachers")
    ensure_teacher(small_cfg("cache.views=2", "cache.shard_size=16"), "teacher_cnn", tmp_path, "cpu")
    assert file_states(tmp_path / "teachers") == before  # the fit does not depend on K or the shards
    ensure_teacher(small_cfg("seed=1"), "teacher_cnn", tmp_path, "cpu")  # the fit's own seed
    refit = hashlib.sha256(pt.read_bytes()).hexdigest()
    assert refit != hashlib.sha256((base_out / "teachers" / "teacher_cnn.pt").read_bytes()).hexdigest()


# ---------------------------------------------------------------- 5. identity

def test_store_for_another_config_is_refused_untouched(run_copy):
    cfg, out, _ = run_copy
    before = file_states(out / "cache")
    teachers = file_states(out / "teachers")

    with pytest.raises(StoreError, match=r"different views than this config asks for.*--overwrite"):
        run_cache(small_cfg("cache.views=2"), out)
    with pytest.raises(StoreError) as e:
        run_cache(small_cfg("data.seed=1"), out)
    msg = str(e.value)
    assert "dataset" in msg and "views" in msg and str(store_path(out, cfg, "teacher_vit")) in msg

    assert file_states(out / "cache") == before
    assert file_states(out / "teachers") == teachers  # the store's teacher is not refitted either

    # --overwrite (overwrite=True) replaces the store: new identity, new shape, nothing old left
    path = store_path(out, cfg, "teacher_vit")
    old = CacheStore.open(path)
    new_layout = Layout(old.layout.n, 2, old.layout.image_size, old.layout.num_classes, old.layout.layers,
                        old.layout.shard_size, old.layout.chunk_size)
    new_identity = {**old.attrs["identity"], "views": {"k": 2}}
    with pytest.raises(StoreError, match="views"):
        CacheStore.create_or_open(path, new_layout, new_identity, {})
    store = CacheStore.create_or_open(path, new_layout, new_identity, {}, overwrite=True)
    assert store.attrs["identity"]["views"] == {"k": 2}
    assert store.group["logits"].shape == (64, 2, 10)
    assert store.pending_units() == [0, 1]
    assert "live_block" not in store.group
    assert not any(f.is_file() for f in (path / "logits").rglob("*") if f.name != "zarr.json")
    assert CacheStore.create_or_open(path, new_layout, new_identity, {}).attrs["identity"] == store.attrs["identity"]


# ---------------------------------------------------------------- 6. views (their unit tests: tests/test_views.py)

def test_cached_logits_are_recomputable(base_run):
    from teacher_cache.fit import load_fitted
    cfg, out, _, snaps = base_run
    for role in ROLES:
        s = snaps[role]
        teacher = load_fitted(cfg, role, out)
        (layer,) = [k[len("features/"):] for k in s if k.startswith("features/")]
        for i in (0, 33, 63):
            images = torch.from_numpy(s["images"][[i] * 3])
            views = torch.from_numpy(s["views"][i])
            with torch.no_grad():
                got = teacher.extract(apply_views(images, views, teacher.input_size), [layer])
            for k in range(3):
                np.testing.assert_allclose(got["logits"][k].half().float().numpy(), s["logits"][i, k].astype(np.float32),
                                           atol=2e-3, rtol=2e-3, err_msg=f"{role} row {i} view {k}")
                np.testing.assert_allclose(got[layer][k].half().float().numpy(),
                                           s[f"features/{layer}"][i, k].astype(np.float32), atol=2e-3, rtol=2e-3)
            # and the views matter: view 1's input does not give view 2's cached features
            assert np.abs(got[layer][1].numpy() - s[f"features/{layer}"][i, 2].astype(np.float32)).max() > 0.1
