"""The models `hakd analyze` measures: the two teachers and every trained student run, where their weights are
under OUT, and how they are loaded (checked against the config before any task is launched)."""
from __future__ import annotations

from pathlib import Path

import torch

from infra.config import Config
from infra.errors import UserError
from teacher_cache.datasets import class_names
from teacher_cache.fit import build_teacher

TEACHERS = ("teacher_vit", "teacher_cnn")


class ModelMismatch(UserError, RuntimeError):
    """A saved model does not fit the config; raised before any task is launched."""


def model_path(out: Path, name: str) -> Path:
    """A model's weights under OUT (the teachers' when cache.location is unset: load_model follows it)."""
    return Path(out) / ("teachers" if name in TEACHERS else "train") / (
        f"{name}.pt" if name in TEACHERS else f"{name}/model.pt")


def build_model(cfg: Config, name: str) -> torch.nn.Module:
    if name in TEACHERS:
        return build_teacher(cfg, name)
    from student_train.students import Student
    from student_train.sweep import plan_trials, trial_config
    trial = {t.name: t for t in plan_trials(cfg)}.get(name)  # a run of a sweep may change the architecture
    arch = (trial_config(cfg, trial) if trial else cfg).train.arch
    return Student(arch, len(class_names(cfg.data)), cfg.data.image_size)


def model_runs(cfg: Config) -> dict[str, tuple[str, int | None]]:
    """Every run to measure: run name -> (model name in the report, seed; None for a teacher).

    A teacher is one run; a student has one run per trial (seed, grid point), loaded from
    OUT/train/<student>/<trial label>/model.pt. With a sweep, each grid point is a model of its own,
    "<student>@<key>=<value>".
    """
    from student_train.sweep import plan_trials
    trials = plan_trials(cfg)
    runs: dict[str, tuple[str, int | None]] = {}
    for m in cfg.analysis.models:
        if m in TEACHERS:
            runs[m] = (m, None)
            continue
        mine = [t for t in trials if t.student == m]
        if not mine:
            raise ModelMismatch(f"analysis.models names {m}, which train.students does not train; "
                                f"add it to train.students or remove it from analysis.models")
        runs.update({t.name: (m + (f"@{t.grid_label}" if t.grid else ""), t.seed) for t in mine})
    return runs


def load_model(cfg: Config, out: Path, name: str) -> torch.nn.Module:
    from infra import storage
    from teacher_cache.job import teacher_file
    path = teacher_file(out, cfg, name) if name in TEACHERS else model_path(out, name)  # teachers: cache.location
    if not storage.exists(path):
        stage = "hakd cache" if name in TEACHERS else "hakd train"
        raise ModelMismatch(f"{path} is missing: run `{stage}` for this config first")
    model = build_model(cfg, name)
    try:
        state = storage.load_tensors(path)
    except storage.StorageError:
        raise
    except Exception as e:  # truncated, foreign or unsafe file: never unpickle more than tensors
        raise ModelMismatch(f"{path} cannot be read as a weights file ({type(e).__name__}); "
                            f"re-run the stage that wrote it") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelMismatch(f"{path} does not fit the configured architecture of {name} ({str(e)[:200]}...); "
                            f"re-run the stage that wrote it with this config") from None
    return model.eval()
