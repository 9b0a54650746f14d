"""The three stages over one output directory, with reuse, provenance and a closing summary.

OUT/
  config.yaml, run.json          the resolved config, versions, commit (refuses another config)
  teachers/<role>.pt|json        fitted teachers           } stage "cache"
  cache/<teacher>.zarr           teacher feature stores    }
  train/data.beton|json          packed FFCV file          } stage "train"
  train/<student>/               checkpoint, model.pt, metrics.jsonl
  report/                        report.md|html, metrics.json, plots   stage "analyze"
A stage whose `run.json` says complete for the same stage digest is reused, not recomputed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from infra.config import Config, ConfigError
from infra.provenance import git_commit, write_run_info

STAGE_SECTIONS = {
    "cache": ("seed", "data", "teacher_vit", "teacher_cnn", "cache"),
    "train": ("seed", "data", "teacher_vit", "teacher_cnn", "cache", "train", "sweep"),
    "analyze": ("seed", "data", "teacher_vit", "teacher_cnn", "cache", "train", "sweep", "analysis"),
}


def prepare_out(cfg: Config, out: Path, overwrite: bool) -> None:
    """Create OUT, or check that it holds results of this same config (unless overwrite)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory path")
    info = out / "run.json"
    if info.is_file() and not overwrite:
        old = json.loads(info.read_text()).get("config_digest")
        if old != cfg.digest():
            raise ConfigError(f"--out {out} holds results of a different config (digest {old}, now {cfg.digest()}); "
                              f"use another --out, or add --overwrite to replace the stages that changed")
    write_run_info(out, cfg)


STAGE_DIRS = {"cache": "cache", "train": "train", "analyze": "report"}


def _stage_done(cfg: Config, out: Path, stage: str) -> bool:
    info = Path(out) / STAGE_DIRS[stage] / "run.json"
    if not info.is_file():
        return False
    data = json.loads(info.read_text())
    return data.get("complete") is True and data.get("stage_digest") == cfg.digest(*STAGE_SECTIONS[stage])


def _mark_done(cfg: Config, out: Path, stage: str, **extra) -> None:
    d = Path(out) / STAGE_DIRS[stage]
    write_run_info(d, cfg, stage=stage, complete=True, stage_digest=cfg.digest(*STAGE_SECTIONS[stage]), **extra)


def device_for(cfg: Config) -> str:
    import torch
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but no GPU is visible; use auto or cpu")
    return cfg.train.device


def stage_cache(cfg: Config, out: Path, overwrite: bool = False, log=print) -> dict:
    if _stage_done(cfg, out, "cache") and not overwrite:
        return {"status": "reused"}
    from teacher_cache.job import run_cache
    summary = run_cache(cfg, out, overwrite=overwrite, log=log)
    _mark_done(cfg, out, "cache", summary=summary)
    return {"status": "ran", "detail": summary}


def stage_train(cfg: Config, out: Path, overwrite: bool = False, log=print) -> dict:
    if _stage_done(cfg, out, "train") and not overwrite:
        return {"status": "reused"}
    from student_train.pack import FFCV_NAME
    from student_train.sweep import run_sweep
    from teacher_cache.job import ROLES, store_path
    stores = {role: store_path(out, cfg, role) for role in ROLES}
    for role, p in stores.items():
        if not p.exists():
            raise ConfigError(f"no cache store at {p} for {role}: run `hakd cache` first with this config")
    packed_before = _stat(Path(out) / "train" / FFCV_NAME)
    # under torchrun: rank 0 packs while the others wait, the ranks train each trial together (DDP,
    # no Ray Tune), and rank 0 alone writes; otherwise one Ray Tune trial per (student, seed, grid point)
    from student_train.distributed import is_main, pack_on_rank0, train_trials_ddp, world_size
    beton, meta = pack_on_rank0(stores, Path(out) / "train", workers=cfg.train.loader_workers, log=log)
    train = train_trials_ddp if world_size() > 1 else run_sweep
    sweep = train(cfg, out, beton, meta, device_for(cfg), log=log)
    packing = "reused" if packed_before is not None and packed_before == _stat(beton) else "packed"
    if is_main():
        _mark_done(cfg, out, "train", packing=packing, trials={n: {"test_clean_accuracy": f.get("test_clean_accuracy")}
                                                               for n, f in sweep["final"].items()})
    note = f"{FFCV_NAME} {packing}; {len(sweep['trained'])} trial(s) trained, {len(sweep['reused'])} reused"
    return {"status": "ran", "detail": sweep, "note": note}


def _stat(path: Path) -> tuple[int, int] | None:
    return (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else None


def stage_analyze(cfg: Config, out: Path, overwrite: bool = False, log=print, seconds: dict | None = None) -> dict:
    if _stage_done(cfg, out, "analyze") and not overwrite:
        return {"status": "reused", "report": str(Path(out) / "report" / "report.md")}
    from analysis.evaluate import run_analysis
    from analysis.report import write_report
    res = run_analysis(cfg, out, log=log)
    metrics = res["metrics"]
    metrics["meta"].update({"commit": git_commit(), "config_digest": cfg.digest(),
                            "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if seconds:
        metrics["meta"]["seconds"].update(seconds)
    teachers_dir = Path(out) / "teachers"
    metrics["teacher_fit"] = {r: json.loads((teachers_dir / f"{r}.json").read_text())
                              for r in ("teacher_vit", "teacher_cnn") if (teachers_dir / f"{r}.json").is_file()}
    paths = write_report(metrics, Path(out) / "report", res["gradcam_grid"])
    _mark_done(cfg, out, "analyze")
    return {"status": "ran", "report": str(paths["markdown"])}
