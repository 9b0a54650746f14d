"""Reading the packed cache: packing, view order, view replay and loader failures (never a hang).

The tiny cache and its packed file (tests/conftest.py: tiny_cache, tiny_packed) are written once for the session.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from student_cache import K, N, epoch_batches, field_of, quiet, stores_of
from student_train.loader import LoaderError, StudentLoader, view_order
from student_train.pack import FFCV_NAME, META_NAME, pack, packed_params
from student_train.students import Student
from teacher_cache.store import CacheStore, StoreError

# numba's dispatcher finalizer raises a KeyError when FFCV's compiled pipelines are garbage collected
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


def read_all_rows(beton: Path, meta: dict) -> dict[str, torch.Tensor]:
    """Every row of the file in row order, through StudentLoader (so float16 fields are reinterpreted)."""
    loader = StudentLoader(beton, meta, list(meta["fields"]), batch_size=48, workers=1, seed=0, timeout_s=60,
                           shuffle=False, drop_last=False)
    rows = np.arange(meta["rows"], dtype=np.uint64)
    loader.loader.traversal_order.sample_order = lambda epoch: rows
    loader.loader.first_traversal_order = rows
    parts = defaultdict(list)
    for batch in loader:
        for k, v in batch.items():
            parts[k].append(v.clone())  # FFCV reuses its batch buffers: copy before the next batch
    return {k: torch.cat(v) for k, v in parts.items()}



# ------------------------------------------------------------------------------------ 1. pack

def test_pack_rows_are_the_stores_bit_for_bit(tiny_cache, tiny_packed):
    cfg, out = tiny_cache
    beton, meta = tiny_packed
    from ffcv.reader import Reader
    assert meta["rows"] == N * K == Reader(str(beton)).num_samples
    assert (meta["images"], meta["views"]) == (N, K)

    rows = read_all_rows(beton, meta)
    assert len(rows["index"]) == N * K
    image, view = np.arange(N * K) // K, np.arange(N * K) % K
    assert np.array_equal(rows["index"].numpy(), image)
    stores = {r: CacheStore.open(p) for r, p in stores_of(cfg, out).items()}
    g = stores["teacher_vit"].group
    assert np.array_equal(rows["image"].numpy(), g["images"][:][image])
    assert np.array_equal(rows["label"].numpy(), g["labels"][:][image])
    assert np.array_equal(rows["view"].numpy(), g["views"][:][image, view])
    expected = {("teacher_vit", "logits"), ("teacher_vit", "features/blocks.2"),
                ("teacher_cnn", "logits"), ("teacher_cnn", "features/layer3")}
    assert {(i["role"], i["array"]) for i in meta["fields"].values()} == expected
    for f, info in meta["fields"].items():
        got = rows[f]
        assert got.dtype == torch.float16
        want = stores[info["role"]].group[info["array"]][:][image, view]  # float16 (N*K, ...)
        assert tuple(got.shape[1:]) == tuple(info["shape"]) == want.shape[1:]
        # bit for bit: the int16 pattern in the file is the float16 of the store
        assert np.array_equal(got.view(torch.int16).numpy(), want.view(np.int16)), f


def test_pack_is_reused_unless_a_store_changes(tiny_cache, tiny_packed, tmp_path):
    cfg, out = tiny_cache
    beton, meta = tiny_packed
    old = 1_000_000_000
    # unchanged caches: the file is neither rewritten nor touched
    os.utime(beton, (old, old))
    beton2, meta2 = pack(stores_of(cfg, out), out / "train", workers=1, log=quiet)
    assert beton2 == beton and beton.stat().st_mtime == old and meta2 == meta

    # a copy of the caches, with the packed file copied beside it: same digest, so reused
    shutil.copytree(out / "cache", tmp_path / "cache")
    shutil.copytree(out / "train", tmp_path / "train")
    stores = stores_of(cfg, tmp_path)
    copied = tmp_path / "train" / FFCV_NAME
    os.utime(copied, (old, old))
    logs = []
    pack(stores, tmp_path / "train", workers=1, log=logs.append)
    assert copied.stat().st_mtime == old and not logs

    # rewrite unit 0 of the ViT store with changed logits: its crc table changes, the file is rebuilt
    s = CacheStore.open(stores["teacher_vit"])
    crc_before = s.group["units/xxh3"][:]
    lo, hi = s.layout.unit_range(0)
    arrays = {name: s.group[name][lo:hi] for name in s.names}
    arrays["logits"] = arrays["logits"].copy()
    arrays["logits"][0, 0] = np.arange(s.layout.num_classes, dtype=np.float16) - 3.5
    s.write_unit(0, arrays)
    assert s.verify() == [] and not np.array_equal(s.group["units/xxh3"][:], crc_before)
    _, meta3 = pack(stores, tmp_path / "train", workers=1, log=logs.append)
    assert copied.stat().st_mtime != old and len(logs) == 1 and "packing" in logs[0]
    assert meta3["source_digest"] != meta["source_digest"]
    assert json.loads((tmp_path / "train" / META_NAME).read_text())["source_digest"] == meta3["source_digest"]
    rows = read_all_rows(copied, meta3)
    f = field_of(meta3, "teacher_vit", "logits")
    assert np.array_equal(rows[f][0].numpy(), arrays["logits"][0, 0])   # row 0 = (image 0, view 0)
    assert np.array_equal(rows[f][1].numpy(), arrays["logits"][0, 1])   # its neighbours unchanged


def test_pack_carries_the_live_block_so_training_needs_no_store(tiny_cache, tiny_packed, tmp_path):
    """The ViT's frozen last block is copied beside the packed file (checksummed): a trainer on a machine that
    cannot reach the stores (remote, or deleted after packing) still has it; a damaged copy is repacked."""
    cfg, out = tiny_cache
    beton, meta = tiny_packed
    shutil.copytree(out / "train", tmp_path / "train")
    want = CacheStore.open(stores_of(cfg, out)["teacher_vit"]).read_params("live_block")
    got = packed_params(tmp_path / "train", meta, "teacher_vit", "live_block")
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    copy = tmp_path / "train" / meta["params"]["teacher_vit/live_block"]["file"]
    copy.write_bytes(copy.read_bytes()[:-8])  # damaged
    with pytest.raises(StoreError, match="no whole copy of teacher_vit's live_block/ weights; delete .* re-run"):
        packed_params(tmp_path / "train", meta, "teacher_vit", "live_block")
    shutil.copytree(out / "cache", tmp_path / "cache")
    logs = []
    _, meta2 = pack(stores_of(cfg, tmp_path), tmp_path / "train", workers=1, log=logs.append)
    assert len(logs) == 1 and "packing" in logs[0]  # not whole: packed again
    got = packed_params(tmp_path / "train", meta2, "teacher_vit", "live_block")
    assert all(np.array_equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------ 2. view order

def test_view_order_one_row_per_image_new_views_each_epoch():
    for seed in (0, 1):
        epochs = [view_order(N, K, seed, e) for e in range(4)]
        for rows in epochs:
            assert rows.dtype == np.uint64 and len(rows) == N
            assert np.array_equal(np.sort(rows // K), np.arange(N))   # each image exactly once
        for e, rows in enumerate(epochs):
            assert np.array_equal(rows, view_order(N, K, seed, e))     # deterministic in (seed, epoch)
        views = np.stack([np.sort(r)[:] % K for r in epochs])          # (epoch, image) -> view
        assert (views[0] != views[1]).mean() > 0.3                     # E = 2/3 for K = 3
        assert (np.array([len(set(v)) for v in views.T]) > 1).mean() > 0.8  # most images see several views
        assert set(views.ravel()) == set(range(K))
        assert not np.array_equal(epochs[0] // K, epochs[1] // K)        # reshuffled
    assert not np.array_equal(view_order(N, K, 0, 0), view_order(N, K, 1, 0))


@pytest.mark.parametrize("use", [1, 2])
def test_view_order_uses_only_the_first_views(use):
    """train.views = k: one of the first k views per image; k = 1 is the plain image (view 0) every epoch."""
    seen = set()
    for e in range(6):
        rows = view_order(N, K, 0, e, use=use)
        assert np.array_equal(np.sort(rows // K), np.arange(N))
        seen |= set((rows % K).tolist())
    assert seen == set(range(use))
    assert np.array_equal(view_order(N, K, 0, 3, use=K), view_order(N, K, 0, 3))  # all K: the default order


@pytest.mark.parametrize("n", [N, N + 1])
def test_view_order_ranks_split_the_global_order(n):
    for epoch in (0, 1):
        full = view_order(n, K, 0, epoch)
        parts = [view_order(n, K, 0, epoch, rank=r, world=2) for r in range(2)]
        assert len(parts[0]) == len(parts[1]) == -(-n // 2)
        padded = np.concatenate([full, full[: 2 * len(parts[0]) - n]])  # DistributedSampler padding
        for r in range(2):
            assert np.array_equal(parts[r], padded[r::2])              # rank r: positions r::2
        both = np.concatenate(parts)
        assert set(both // K) == set(range(n))                          # every image covered
        dup = len(both) - len(set(both))
        assert dup == 2 * len(parts[0]) - n                             # disjoint apart from padding
        assert set(parts[0]) & set(parts[1]) <= set(full[: 2 * len(parts[0]) - n])


def test_loader_follows_view_order(tiny_cache, tiny_packed):
    cfg, out = tiny_cache
    beton, meta = tiny_packed
    views = CacheStore.open(stores_of(cfg, out)["teacher_vit"]).group["views"][:]
    loader = StudentLoader(beton, meta, [], batch_size=16, workers=1, seed=cfg.seed, timeout_s=60)
    assert len(loader) == N // 16
    seen = {}
    for epoch in (0, 1, 0):
        b = epoch_batches(loader, epoch)
        rows = view_order(N, K, cfg.seed, epoch)
        assert np.array_equal(b["index"].numpy(), rows // K)
        assert np.array_equal(b["view"].numpy(), views[rows // K, rows % K])
        if epoch in seen:  # the same epoch again: the same rows in the same order
            assert torch.equal(seen[epoch]["view"], b["view"]) and torch.equal(seen[epoch]["image"], b["image"])
        seen[epoch] = b
    assert not torch.equal(seen[0]["view"], seen[1]["view"])
    plain = StudentLoader(beton, meta, [], batch_size=16, workers=1, seed=cfg.seed, timeout_s=60, views=1)
    b = epoch_batches(plain, 1)  # train.views = 1: the plain image, view 0, whatever the epoch
    assert np.array_equal(b["view"].numpy(), views[b["index"].numpy(), 0])


# ------------------------------------------------------------------------------------ 3. replay

def test_replayed_view_reproduces_the_teacher(tiny_cache, tiny_packed):
    """Tolerance: values are stored as float16 (relative rounding <= 2^-11 ~ 4.9e-4), so the
    recomputation must agree within 2e-3 x the largest magnitude of the compared tensor; a wrong view
    must miss by far more."""
    from student_train.trainer import LastBlockTargets
    from teacher_cache.fit import load_fitted
    from teacher_cache.views import apply_views
    cfg, out = tiny_cache
    beton, meta = tiny_packed
    f_logits = field_of(meta, "teacher_vit", "logits")
    f_tokens = field_of(meta, "teacher_vit", "features/blocks.2")
    loader = StudentLoader(beton, meta, [f_logits, f_tokens], batch_size=32, workers=1, seed=cfg.seed)
    b = {k: v[:32] for k, v in epoch_batches(loader, 1).items()}
    assert (b["view"][:, 2] < 1).any()  # real crops among them, not only the plain view 0

    teacher = load_fitted(cfg, "teacher_vit", out)
    student = Student(cfg.train.arch, meta["num_classes"], cfg.data.image_size)
    assert student.input_size == teacher.input_size
    last = f"blocks.{len(teacher.net.blocks) - 1}"

    def run(views):
        with torch.no_grad():
            x = apply_views(b["image"], views, teacher.input_size)
            return teacher.extract(x, ["blocks.2", last])

    def err(a, cached):
        return (a.float() - cached.float()).abs().max().item(), 2e-3 * cached.float().abs().max().item()

    got = run(b["view"])
    for name, cached in (("logits", b[f_logits]), ("blocks.2", b[f_tokens])):
        e, tol = err(got[name], cached)
        assert e <= tol, f"{name}: max error {e:.2e} > {tol:.2e}"
    # another image's view (rolled by one) gives other features: the check can fail
    wrong = run(b["view"].roll(1, 0))
    e, tol = err(wrong["blocks.2"], b[f_tokens])
    assert e > 20 * tol

    # the trainer's live last block on the cached tokens gives the teacher's last-block output
    params = CacheStore.open(meta["stores"]["teacher_vit"]).read_params("live_block")
    live = LastBlockTargets(cfg.teacher_vit.name, meta["num_classes"], cfg.data.image_size, params)
    h = live(b[f_tokens])["h"]
    want = got[last][:, live.prefix:]
    e = (h - want).abs().max().item()
    assert e <= 2e-3 * want.abs().max().item(), e  # float16 input through one block


# ------------------------------------------------------------------------------------ 4. no hang

def _patch_pipeline(monkeypatch, fn):
    from ffcv.loader.epoch_iterator import EpochIterator
    original = EpochIterator.run_pipeline

    def patched(self, b_ix, *args):
        fn(b_ix)
        return original(self, b_ix, *args)
    monkeypatch.setattr(EpochIterator, "run_pipeline", patched)


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected failure
def test_dead_loader_thread_raises(tiny_packed, monkeypatch):
    beton, meta = tiny_packed

    def die(b_ix):
        if b_ix == 1:
            raise RuntimeError("injected decode failure")
    _patch_pipeline(monkeypatch, die)
    loader = StudentLoader(beton, meta, [], batch_size=16, workers=1, seed=0, timeout_s=30)
    got, start = 0, time.monotonic()
    with pytest.raises(LoaderError, match="thread died: RuntimeError: injected decode failure") as e:
        for _ in loader:
            got += 1
    assert got == 1 and isinstance(e.value.__cause__, RuntimeError)
    assert time.monotonic() - start < 20


@pytest.mark.timeout(60)
def test_stalled_loader_raises(tiny_packed, monkeypatch):
    beton, meta = tiny_packed
    release = threading.Event()
    _patch_pipeline(monkeypatch, lambda b_ix: b_ix == 0 and release.wait(30))
    loader = StudentLoader(beton, meta, [], batch_size=16, workers=1, seed=0, timeout_s=1)
    start = time.monotonic()
    try:
        with pytest.raises(LoaderError, match="produced nothing for 1 s"):
            for _ in loader:
                pass
        assert time.monotonic() - start < 10
    finally:
        release.set()


@pytest.mark.timeout(60)
def test_truncated_file_raises(tiny_packed, tmp_path):
    beton, meta = tiny_packed
    bad = tmp_path / FFCV_NAME
    shutil.copy(beton, bad)
    os.truncate(bad, bad.stat().st_size // 2)
    with pytest.raises(LoaderError, match=str(bad)):
        for _ in StudentLoader(bad, meta, [], batch_size=16, workers=1, seed=0, timeout_s=5):
            pass


def test_dry_run_plans_the_packed_rows_the_packer_writes(tiny_cache, tiny_packed):
    """`hakd cache --dry-run` counts the packed file with the packer's own row size, and the file holds them."""
    from teacher_cache.sizing import disk_plan
    cfg, _ = tiny_cache
    beton, meta = tiny_packed
    plan = disk_plan(cfg)
    assert plan["packed"]["row_bytes"] == meta["row_bytes"]
    assert plan["packed"]["rows"] == meta["rows"]
    assert beton.stat().st_size >= meta["rows"] * meta["row_bytes"]
