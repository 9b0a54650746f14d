"""The tiny cache that the student tests share (tests/test_student_*.py): its config and helpers to read it.

The session fixtures `tiny_cache` and `tiny_packed` (tests/conftest.py) write it once (64 images, 3 views,
both demo teachers) and pack it once; every test reads it, and tests that change a store work on a copy.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from conftest import TINY
from infra.config import load_config
from student_train.loader import StudentLoader

N, K = 64, 3
OVERRIDES = [*TINY, "data.train_size=64", "teacher_vit.fit_epochs=1", "teacher_cnn.fit_epochs=0",
             "cache.workers=1", "cache.shard_size=64"]  # one shard, one Ray actor per teacher
TERMS = {"student_kd_vit": {"ce", "pca_attn", "pca_value", "gl"}, "student_kd_cnn": {"ce", "hint"},
         "student_independent": {"ce"}, "student_logit_kd": {"ce", "logit_kd"}}


def make_cfg(*extra: str):
    return load_config(None, [*OVERRIDES, *extra])


def quiet(*_a, **_k):
    pass


def stores_of(cfg, root: Path) -> dict[str, Path]:
    from teacher_cache.job import ROLES, store_path
    return {role: store_path(root, cfg, role) for role in ROLES}


def field_of(meta: dict, role: str, array: str) -> str:
    return next(f for f, info in meta["fields"].items() if info["role"] == role and info["array"] == array)


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

    def __call__(self, run, epoch):
        if self.initial is None:
            self.initial = {k: v.detach().clone() for k, v in run.step_module.state_dict().items()}
        return self.original(run, epoch)


def metrics(path: Path) -> list[dict]:
    return [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]
