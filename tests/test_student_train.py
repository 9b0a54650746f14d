"""Student training from the packed cache: packing, view order, view replay, loader failures, the
four students, resume, cache checks and 2-process DDP on CPU (gloo).

One tiny cache (64 images, 3 views, both demo teachers) is written once for the module and packed
once; every test reads it, and tests that change a store work on a copy.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY
from infra.config import load_config
from student_train.loader import LoaderError, StudentLoader, view_order
from student_train.pack import FFCV_NAME, META_NAME, pack
from student_train.students import STUDENTS, Student, StudentSpec
from student_train.trainer import CacheMismatch, check_cache, train_student
from teacher_cache.store import CacheStore

N, K = 64, 3
OVERRIDES = [*TINY, "data.train_size=64", "teacher_vit.fit_epochs=1", "teacher_cnn.fit_epochs=0",
             "cache.workers=1", "cache.shard_size=64"]  # one shard, one Ray actor per teacher
TERMS = {"student_kd_vit": {"ce", "pca_attn", "pca_value", "gl"}, "student_kd_cnn": {"ce", "hint"},
         "student_independent": {"ce"}, "student_logit_kd": {"ce", "logit_kd"}}
PROJECTOR = {"student_kd_vit": ("objective.pca.", "objective.gl."), "student_kd_cnn": ("objective.hint.",),
             "student_independent": (), "student_logit_kd": ()}
NOT_TERMS = {"epoch", "loss", "train_accuracy", "lr", "images_per_s", "seconds", "test_clean_accuracy",
             "grad_norm", "grad_share", "grad_measured_steps"}  # gradient shares: tests/test_kd_step.py
ROOT = Path(__file__).resolve().parents[1]
# numba's dispatcher finalizer raises a KeyError when FFCV's compiled pipelines are garbage collected
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def make_cfg(*extra: str):
    return load_config(None, [*OVERRIDES, *extra])


def quiet(*_a, **_k):
    pass


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def cache(tmp_path_factory, ray_session):
    """(cfg, out): the tiny cache of both teachers, written once for the module."""
    from teacher_cache.job import run_cache
    cfg = make_cfg()
    out = tmp_path_factory.mktemp("student_train") / "out"
    run_cache(cfg, out, log=quiet)
    return cfg, out


def stores_of(cfg, root: Path) -> dict[str, Path]:
    from teacher_cache.job import ROLES, store_path
    return {role: store_path(root, cfg, role) for role in ROLES}


@pytest.fixture(scope="module")
def packed(cache):
    """(beton, meta) of the module's cache, packed once."""
    cfg, out = cache
    return pack(stores_of(cfg, out), out / "train", workers=1, log=quiet)


def field_of(meta: dict, role: str, array: str) -> str:
    return next(f for f, info in meta["fields"].items() if info["role"] == role and info["array"] == array)


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


def epoch_batches(loader: StudentLoader, epoch: int) -> dict[str, torch.Tensor]:
    loader.set_epoch(epoch)
    parts = defaultdict(list)
    for batch in loader:
        for k, v in batch.items():
            parts[k].append(v.clone())
    return {k: torch.cat(v) for k, v in parts.items()}


class RecordStart:
    """Wraps trainer._run_epoch: keeps a copy of the model's state before the first epoch runs."""

    def __init__(self, original):
        self.original, self.initial = original, None

    def __call__(self, model, step_module, *args, **kwargs):
        if self.initial is None:
            self.initial = {k: v.detach().clone() for k, v in step_module.state_dict().items()}
        return self.original(model, step_module, *args, **kwargs)


@pytest.fixture(scope="module")
def trained(cache, packed, tmp_path_factory):
    """Each student kind trained for 2 epochs: kind -> (dir, state before training, log lines)."""
    import student_train.trainer as trainer
    cfg, _ = cache
    beton, meta = packed
    root = tmp_path_factory.mktemp("students")
    runs = {}
    for kind in TERMS:
        rec, lines = RecordStart(trainer._run_epoch), []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(trainer, "_run_epoch", rec)
            train_student(cfg, kind, root / kind, beton, meta, log=lines.append)
        runs[kind] = (root / kind, rec.initial, lines)
    return runs


def metrics(path: Path) -> list[dict]:
    return [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ 1. pack

def test_pack_rows_are_the_stores_bit_for_bit(cache, packed):
    cfg, out = cache
    beton, meta = packed
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


def test_pack_is_reused_unless_a_store_changes(cache, packed, tmp_path):
    cfg, out = cache
    beton, meta = packed
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


def test_loader_follows_view_order(cache, packed):
    cfg, out = cache
    beton, meta = packed
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


# ------------------------------------------------------------------------------------ 3. replay

def test_replayed_view_reproduces_the_teacher(cache, packed):
    """Tolerance: values are stored as float16 (relative rounding <= 2^-11 ~ 4.9e-4), so the
    recomputation must agree within 2e-3 x the largest magnitude of the compared tensor; a wrong view
    must miss by far more."""
    from student_train.trainer import LastBlockTargets
    from teacher_cache.fit import load_fitted
    from teacher_cache.views import apply_views
    cfg, out = cache
    beton, meta = packed
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
def test_dead_loader_thread_raises(packed, monkeypatch):
    beton, meta = packed

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
def test_stalled_loader_raises(packed, monkeypatch):
    beton, meta = packed
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
def test_truncated_file_raises(packed, tmp_path):
    beton, meta = packed
    bad = tmp_path / FFCV_NAME
    shutil.copy(beton, bad)
    os.truncate(bad, bad.stat().st_size // 2)
    with pytest.raises(LoaderError, match=str(bad)):
        for _ in StudentLoader(bad, meta, [], batch_size=16, workers=1, seed=0, timeout_s=5):
            pass


# ------------------------------------------------------------------------------------ 5. training

@pytest.mark.parametrize("kind", list(TERMS))
def test_student_trains(kind, trained, cache):
    cfg, _ = cache
    d, initial, lines = trained[kind]
    m = metrics(d)
    assert [l["epoch"] for l in m] == [0, 1]
    for line in m:
        assert set(line) - NOT_TERMS == TERMS[kind]
        assert all(np.isfinite(line[t]) and line[t] >= 0 for t in TERMS[kind])
        if kind in ("student_kd_vit", "student_kd_cnn"):  # each KD term's share of the gradient at the KD layer
            assert set(line["grad_share"]) == TERMS[kind] - {"ce"}
            assert sum(line["grad_share"].values()) == pytest.approx(1.0)
        assert 0 <= line["test_clean_accuracy"] <= 1
    for t in TERMS[kind]:
        assert m[0][t] != m[1][t], t   # the terms move as the student trains
    assert any("epoch 2/2" in l for l in lines)

    ck = torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=True)
    # no RNG state: every epoch's draws restart from (seed, rank, epoch), so the epoch number resumes them
    assert ck["epoch"] == 1 and set(ck) >= {"model", "optimizer", "schedule", "digest"}
    state = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
    student = Student(cfg.train.arch, 10, cfg.data.image_size)
    student.load_state_dict(state)  # strict
    for k, v in state.items():
        assert torch.equal(v, ck["model"][f"student.{k}"]), k

    # the projectors' weights moved: the KD terms' gradients reach them
    projector = [k for k, v in initial.items() if k.startswith(PROJECTOR[kind]) and v.is_floating_point()]
    assert bool(projector) == bool(PROJECTOR[kind])
    for k in projector:
        assert not torch.equal(initial[k], ck["model"][k]), f"{k} did not change"
    assert not torch.equal(initial["student.net.fc.weight"], ck["model"]["student.net.fc.weight"])


# ------------------------------------------------------------------------------------ 6. resume

class Killed(Exception):
    pass


def test_resume_matches_uninterrupted(cache, packed, trained, tmp_path, monkeypatch):
    """kd_vit: its PCA swap draws from the torch RNG, so the checkpoint's RNG state matters too."""
    import student_train.trainer as trainer
    cfg, _ = cache
    beton, meta = packed
    kind = "student_kd_vit"
    a = trained[kind][0]
    b = tmp_path / kind
    original = trainer._run_epoch

    def killed_in_epoch_2(*args, **kwargs):
        if inspect.signature(original).bind(*args, **kwargs).arguments["epoch"] == 1:
            raise Killed()
        return original(*args, **kwargs)
    monkeypatch.setattr(trainer, "_run_epoch", killed_in_epoch_2)
    with pytest.raises(Killed):
        train_student(cfg, kind, b, beton, meta, log=quiet)
    assert torch.load(b / "checkpoint.pt", weights_only=True)["epoch"] == 0
    assert len(metrics(b)) == 1 and not (b / "model.pt").exists()

    monkeypatch.setattr(trainer, "_run_epoch", original)
    lines = []
    train_student(cfg, kind, b, beton, meta, log=lines.append)
    assert any("resuming after epoch 1/2" in l for l in lines)
    ma, mb = metrics(a), metrics(b)
    assert len(mb) == 2
    for la, lb in zip(ma, mb):
        for t in TERMS[kind] | {"loss", "train_accuracy", "lr", "test_clean_accuracy"}:
            assert lb[t] == pytest.approx(la[t], abs=1e-6), t
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k].double() - wb[k].double()).abs().max().item() <= 1e-6, k
    ca = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    cb = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    for k in ca:  # the projectors too
        assert (ca[k].double() - cb[k].double()).abs().max().item() <= 1e-6, k


# ------------------------------------------------------------------------------------ 7. cache check

def test_check_cache_plans_the_fields(cache, packed):
    cfg, _ = cache
    _, meta = packed
    assert check_cache(cfg, "student_kd_vit", meta)["field"] == field_of(meta, "teacher_vit", "features/blocks.2")
    assert check_cache(cfg, "student_kd_cnn", meta)["field"] == field_of(meta, "teacher_cnn", "features/layer3")
    assert check_cache(cfg, "student_logit_kd", meta)["field"] == field_of(meta, "teacher_vit", "logits")
    assert "field" not in check_cache(cfg, "student_independent", meta)


@pytest.mark.parametrize("override, message", [
    ("cache.views=4", r"holds 3 views per image, cache.views is 4"),
    ("data.seed=1", r"other data .*dataset fingerprint differs"),
    ("teacher_vit.name=vit_b16_clip", r"from teacher vit_demo, the config names vit_b16_clip"),
])
def test_cache_mismatch_before_training(override, message, packed, tmp_path):
    beton, meta = packed
    cfg = make_cfg(override)
    d = tmp_path / "student"
    with pytest.raises(CacheMismatch, match=message):
        train_student(cfg, "student_independent", d, beton, meta, log=quiet)
    assert not (d / "checkpoint.pt").exists() and not (d / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------ 8. DDP

class PairBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm as two DDP ranks compute it, in one process: in training, the even and the odd
    positions of the batch are normalised separately (rank r holds positions r::2 of each global
    batch, see view_order), and the running statistics follow the even half only (DDP broadcasts
    rank 0's buffers before every forward, so rank 0's are the ones saved). Same state dict as BatchNorm2d."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        pairs = x.unflatten(0, (-1, 2))
        even = F.batch_norm(pairs[:, 0], self.running_mean, self.running_var, self.weight, self.bias, True,
                            self.momentum, self.eps)
        odd = F.batch_norm(pairs[:, 1], None, None, self.weight, self.bias, True, 0.0, self.eps)
        return torch.stack([even, odd], 1).flatten(0, 1)


def _pair_bn_student(num_classes: int) -> nn.Module:
    from teacher_cache.small_nets import SmallResNet
    net = SmallResNet(num_classes)  # BatchNorm init draws no random numbers: same weights as resnet_demo
    for name, m in list(net.named_modules()):
        if type(m) is nn.BatchNorm2d:
            pbn = PairBatchNorm2d(m.num_features, m.eps, m.momentum)
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, attr, pbn)
    return net


PAIR_BN = StudentSpec("resnet_demo_pairbn", _pair_bn_student, None, STUDENTS["resnet_demo"].mean,
                      STUDENTS["resnet_demo"].std)
DDP_COMMON = ["train.epochs=1", "train.batch_size=32", "train.pca_swap_prob=0.0"]
DDP_KINDS = ("student_independent", "student_kd_vit")


def ddp_worker(spec_path: str) -> None:
    """One rank of the DDP test (run in a subprocess with RANK / WORLD_SIZE / MASTER_* set)."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    beton, meta = Path(spec["beton"]), spec["meta"]
    cfg = load_config(None, [*spec["overrides"], *DDP_COMMON])
    for kind in DDP_KINDS:
        train_student(cfg, kind, Path(spec["dir"]) / kind, beton, meta, log=quiet)
    rank = dist.get_rank()
    loader = StudentLoader(beton, meta, [], batch_size=16, workers=1, seed=cfg.seed, distributed=True)
    got = {e: epoch_batches(loader, e) for e in (0, 1)}
    torch.save({e: {"index": b["index"], "view": b["view"]} for e, b in got.items()},
               Path(spec["dir"]) / f"order{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_ddp_two_cpu_ranks_match_one_process(cache, packed, tmp_path, monkeypatch):
    """2 gloo ranks x 16 images vs 1 process x 32 images, one epoch (2 optimiser steps), the real demo student.

    Each rank's BatchNorm normalises its own 16 images (SyncBatchNorm refuses CPU tensors in torch 2.14),
    so the 1-process reference uses PairBatchNorm2d, which computes exactly that in one process. The rest
    (the averaged gradients of student and projectors, the loss) is then the same computation up to float
    summation order: weights, running statistics and logged loss terms within 1e-5. Plain BatchNorm over
    all 32 images gives visibly different weights (checked, so the comparison can fail).
    """
    import student_train.trainer as trainer
    cfg, _ = cache
    beton, meta = packed
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"beton": str(beton), "meta": meta, "overrides": OVERRIDES,
                                "dir": str(tmp_path / "ddp")}))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
        code = f"import test_student_train as t; t.ddp_worker({str(spec)!r})"
        with (tmp_path / f"rank{rank}.log").open("w") as log:  # the child keeps its own handle
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=log,
                                          stderr=subprocess.STDOUT))

    try:  # meanwhile, the 1-process references: per-half BatchNorm (the comparison), plain BatchNorm (the control)
        monkeypatch.setitem(STUDENTS, PAIR_BN.name, PAIR_BN)
        ref = tmp_path / "ref"
        start = RecordStart(trainer._run_epoch)
        for kind in DDP_KINDS:
            train_student(make_cfg(*DDP_COMMON, f"train.arch={PAIR_BN.name}"), kind, ref / kind, beton, meta,
                          log=quiet)
        with monkeypatch.context() as mp:
            mp.setattr(trainer, "_run_epoch", start)
            train_student(make_cfg(*DDP_COMMON), "student_independent", ref / "plain_bn", beton, meta, log=quiet)
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], logs

    # each rank read positions r::2 of the 1-process order: disjoint halves covering every image
    views = CacheStore.open(meta["stores"]["teacher_vit"]).group["views"][:]
    orders = [torch.load(tmp_path / "ddp" / f"order{r}.pt", weights_only=True) for r in range(2)]
    for e in (0, 1):
        full = view_order(N, K, cfg.seed, e)
        for r in range(2):
            rows = full[r::2]
            assert np.array_equal(orders[r][e]["index"].numpy(), rows // K)
            assert np.array_equal(orders[r][e]["view"].numpy(), views[rows // K, rows % K])
        assert set(orders[0][e]["index"].tolist()).isdisjoint(orders[1][e]["index"].tolist())

    def load(d):
        return torch.load(d / "checkpoint.pt", weights_only=True)["model"], metrics(d)[0]

    def worst(a, b):
        assert a.keys() == b.keys()
        return max((a[k].double() - b[k].double()).abs().max().item() for k in a)

    for kind in DDP_KINDS:
        (wd, md), (wr, mr) = load(tmp_path / "ddp" / kind), load(ref / kind)
        assert worst(wd, wr) <= 1e-5, (kind, worst(wd, wr))   # student, projectors and BN statistics
        for t in TERMS[kind] | {"loss"}:
            assert md[t] == pytest.approx(mr[t], rel=1e-5, abs=1e-6), (kind, t)
        assert md["train_accuracy"] == mr["train_accuracy"]

    # control: plain BatchNorm over 32 images moves the weights differently (~40 % of the update)
    wd, _ = load(tmp_path / "ddp" / "student_independent")
    wp, _ = load(ref / "plain_bn")
    w0 = start.initial
    keys = [k for k, v in w0.items() if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))]
    update = torch.cat([(wp[k] - w0[k]).flatten() for k in keys])
    gap = torch.cat([(wd[k] - wp[k]).flatten() for k in keys])
    assert update.norm() > 0 and gap.norm() > 0.1 * update.norm() and gap.abs().max() > 1e-3
