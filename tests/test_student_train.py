"""Training one student from the packed cache: the four students, resume, and the cache checks before training.

The tiny cache and its packed file (tests/conftest.py: tiny_cache, tiny_packed) are written once for the session;
each student kind is trained once for this module (`trained`).
"""
from __future__ import annotations

import errno
import inspect

import numpy as np
import pytest
import torch

from student_cache import TERMS, RecordStart, field_of, make_cfg, metrics, quiet
from student_train.students import Student
from student_train.trainer import CacheMismatch, check_cache, train_student

# numba's dispatcher finalizer raises a KeyError when FFCV's compiled pipelines are garbage collected
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

PROJECTOR = {"student_kd_vit": ("objective.pca.", "objective.gl."), "student_kd_cnn": ("objective.hint.",),
             "student_independent": (), "student_logit_kd": ()}
NOT_TERMS = {"epoch", "loss", "train_accuracy", "lr", "images_per_s", "seconds", "test_clean_accuracy",
             "grad_norm", "grad_share", "grad_measured_steps"}  # gradient shares: tests/test_kd_step.py


@pytest.fixture(scope="module")
def trained(tiny_cache, tiny_packed, tmp_path_factory):
    """Each student kind trained for 2 epochs: kind -> (dir, state before training, log lines)."""
    import student_train.trainer as trainer
    cfg, _ = tiny_cache
    beton, meta = tiny_packed
    root = tmp_path_factory.mktemp("students")
    runs = {}
    for kind in TERMS:
        rec, lines = RecordStart(trainer._run_epoch), []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(trainer, "_run_epoch", rec)
            train_student(cfg, kind, root / kind, beton, meta, log=lines.append)
        runs[kind] = (root / kind, rec.initial, lines)
    return runs


# ------------------------------------------------------------------------------------ 1. training

@pytest.mark.parametrize("kind", list(TERMS))
def test_student_trains(kind, trained, tiny_cache):
    cfg, _ = tiny_cache
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


# ------------------------------------------------------------------------------------ 2. resume

class Killed(Exception):
    pass


def test_resume_matches_uninterrupted(tiny_cache, tiny_packed, trained, tmp_path, monkeypatch):
    """kd_vit: its PCA swap draws from the torch RNG, so the checkpoint's RNG state matters too."""
    import student_train.trainer as trainer
    cfg, _ = tiny_cache
    beton, meta = tiny_packed
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


# ------------------------------------------------------------------------------------ 3. cache check

def test_a_full_disk_at_a_checkpoint_is_an_oserror_naming_it_and_the_student_resumes(tiny_cache, tiny_packed,
                                                                                       tmp_path):
    """torch.save straight to a file meets a full disk with a RuntimeError of its C++ writer that names nothing, and
    leaves the part written: checkpoints go through infra.storage, an OSError naming the checkpoint (which `hakd`
    words as the disk's one line) and nothing partial left. A metrics line cut short is dropped on resume."""
    cfg, _ = tiny_cache
    beton, meta = tiny_packed
    d = tmp_path / "student_independent"
    d.mkdir()
    (d / "checkpoint.pt.tmp").symlink_to("/dev/full")  # every write into it fails with ENOSPC
    with pytest.raises(OSError) as e:
        train_student(cfg, "student_independent", d, beton, meta, log=quiet)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(d / "checkpoint.pt")
    assert not (d / "checkpoint.pt.tmp").is_symlink() and not (d / "checkpoint.pt").exists()
    with (d / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 1, "lo')  # the disk filled in the middle of a line
    train_student(cfg, "student_independent", d, beton, meta, log=quiet)
    assert [m["epoch"] for m in metrics(d)] == list(range(cfg.train.epochs))


def test_check_cache_plans_the_fields(tiny_cache, tiny_packed):
    cfg, _ = tiny_cache
    _, meta = tiny_packed
    assert check_cache(cfg, "student_kd_vit", meta)["field"] == field_of(meta, "teacher_vit", "features/blocks.2")
    assert check_cache(cfg, "student_kd_cnn", meta)["field"] == field_of(meta, "teacher_cnn", "features/layer3")
    assert check_cache(cfg, "student_logit_kd", meta)["field"] == field_of(meta, "teacher_vit", "logits")
    assert "field" not in check_cache(cfg, "student_independent", meta)


@pytest.mark.parametrize("override, message", [
    ("cache.views=4", r"holds 3 views per image, cache.views is 4"),
    ("data.seed=1", r"other data .*dataset fingerprint differs"),
    ("teacher_vit.name=vit_b16_clip", r"from teacher vit_demo, the config names vit_b16_clip"),
])
def test_cache_mismatch_before_training(override, message, tiny_packed, tmp_path):
    beton, meta = tiny_packed
    cfg = make_cfg(override)
    d = tmp_path / "student"
    with pytest.raises(CacheMismatch, match=message):
        train_student(cfg, "student_independent", d, beton, meta, log=quiet)
    assert not (d / "checkpoint.pt").exists() and not (d / "metrics.jsonl").exists()
