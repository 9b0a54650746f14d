"""The three stages over one output directory: reuse judged from the outputs themselves, provenance.

OUT/
  config.yaml, run.json          the resolved config (paths absolute, given_paths: as given), versions, commit
                                 (refuses another config)
  teachers/<role>.pt|json        fitted teachers           } stage "cache"
  cache/<teacher>.zarr           teacher feature stores    }
  train/data.beton|json          packed FFCV file          } stage "train"
  train/<student>/seed<k>[_<grid>]/  one Ray Tune trial: config, checkpoint, model.pt, metrics.jsonl (train/tune/: Tune's files)
  report/                        report.md|html, metrics.json, plots   stage "analyze"
  logs/error-<stage>-<time>.log  a failed command's traceback (its one-line error names the file)

Reuse. A stage is reused when its run.json records the digest of the config sections it depends on
and its outputs are whole: the teachers' files load (tensors only) and the stores' unit tables are
complete; the packed file has the size and CRC-32C recorded when it was written and every trial's
model loads; the report's files exist and the model files it was made from are unchanged. A part
that is missing or damaged is redone, and nothing else.

Failed runs change nothing. A stage checks its inputs before it writes anything, and OUT's own
config.yaml and run.json are written (`claim_out`) only once a stage is about to produce outputs:
a run refused for a mismatch leaves OUT as it was.

--overwrite lets another config replace OUT's results, output by output: a teacher, store, packed
file or trial is redone only when the config it depends on changed (so a change to analysis.*
re-runs the analysis alone). A trial checkpoint written for another config is refused without it.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from infra import storage
from infra.config import Config, ConfigError
from infra.errors import Interrupted, UserError
from infra.integrity import file_crc32c
from infra.provenance import git_commit, write_run_info

STAGE_SECTIONS = {
    "cache": ("seed", "data", "teacher_vit", "teacher_cnn", "cache"),
    "train": ("seed", "data", "teacher_vit", "teacher_cnn", "cache", "train", "sweep"),
    "analyze": ("seed", "data", "teacher_vit", "teacher_cnn", "cache", "train", "sweep", "analysis"),
}
STAGE_DIRS = {"cache": "cache", "train": "train", "analyze": "report"}
REPORT_FILES = ("report.md", "report.html", "metrics.json")


class StaleOutput(UserError):
    """An output written for another config, which only --overwrite may replace."""


class StageInputs(UserError):
    """A stage's inputs are missing, incomplete or made for another config; the message names the stage to run."""


class PackedFileError(UserError):
    """The packed FFCV file cannot be read although it matches its recorded size and checksum."""


def _json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def check_out(cfg: Config, out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, or that holds results of another config (unless overwrite). Writes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory path")
    old = _json(out / "run.json").get("config_digest")
    if old is not None and old != cfg.digest() and not overwrite:
        raise ConfigError(f"--out {out} holds results of a different config (digest {old}, now {cfg.digest()}); "
                          f"use another --out, or add --overwrite to replace the stages that changed")


def claim_out(cfg: Config, out: Path) -> None:
    """Record this config as OUT's (config.yaml, run.json): called just before a stage writes its first output."""
    if _json(Path(out) / "run.json").get("config_digest") != cfg.digest():
        write_run_info(Path(out), cfg)


def _recorded(cfg: Config, out: Path, stage: str) -> dict | None:
    """The stage's run.json when it records a finished run for this config's sections, else None."""
    data = _json(Path(out) / STAGE_DIRS[stage] / "run.json")
    ok = data.get("complete") is True and data.get("stage_digest") == cfg.digest(*STAGE_SECTIONS[stage])
    return data if ok else None


def _mark_done(cfg: Config, out: Path, stage: str, **extra) -> None:
    d = Path(out) / STAGE_DIRS[stage]
    write_run_info(d, cfg, stage=stage, complete=True, stage_digest=cfg.digest(*STAGE_SECTIONS[stage]), **extra)


def _same_config_as_out(cfg: Config, out: Path) -> bool:
    """OUT's results were made with exactly this config, so its outputs need no identity check."""
    return _json(Path(out) / "run.json").get("config_digest") == cfg.digest()


def device_for(cfg: Config) -> str:
    import torch
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but no GPU is visible; use auto or cpu")
    return cfg.train.device


# ---------------------------------------------------------------- cache

def _cache_whole(cfg: Config, out: Path) -> bool:
    """Both teachers' files load (tensors only) and both stores are complete."""
    from teacher_cache.job import ROLES, store_path, teacher_file, teacher_loads
    from teacher_cache.store import CacheStore, StoreError
    for role in ROLES:
        if not teacher_loads(teacher_file(out, cfg, role)):
            return False
        try:
            store = CacheStore.open(store_path(out, cfg, role))
        except StoreError:
            return False
        if store.pending_units() or not store.attrs.get("complete"):
            return False
    return True


def _store_mismatches(cfg: Config, out: Path) -> dict[str, list[str]]:
    """For each existing store: the identity keys in which it differs from what this config would write."""
    from teacher_cache.datasets import fingerprint, load_split
    from teacher_cache.fit import build_teacher
    from teacher_cache.job import ROLES, identity, plan, store_path
    from teacher_cache.store import CacheStore
    paths = {role: store_path(out, cfg, role) for role in ROLES}
    if not any(storage.exists(p) for p in paths.values()):
        return {}
    train = load_split(cfg.data, "train")
    data_fp, n = fingerprint(train), len(train["labels"])
    found = {}
    for role, p in paths.items():
        if not storage.exists(p):
            continue
        teacher = build_teacher(cfg, role)
        want = json.loads(json.dumps(identity(cfg, role, teacher, plan(cfg, role, n, teacher), data_fp)))
        have = CacheStore.open(p).attrs.get("identity", {})
        found[str(p)] = sorted(k for k in set(want) | set(have)
                               if k != "weights_sha256" and want.get(k) != have.get(k))
    return found


def stage_cache(cfg: Config, out: Path, overwrite: bool = False, log=print) -> dict:
    out = Path(out)
    if _recorded(cfg, out, "cache") and _cache_whole(cfg, out):
        return {"status": "reused"}
    if not overwrite and not _same_config_as_out(cfg, out):  # stores of unknown origin: refuse before writing
        for path, keys in _store_mismatches(cfg, out).items():
            if keys:
                raise StaleOutput(f"cache store {path} was written for a different {', '.join(keys)} than this "
                                  f"config asks for; it is left untouched. Use another --out, or add --overwrite "
                                  f"to replace it")
    from teacher_cache.job import run_cache
    claim_out(cfg, out)
    try:
        summary = run_cache(cfg, out, overwrite=overwrite, log=log)
    except KeyboardInterrupt:
        raise Interrupted("while caching; finished shards are kept and the fitted teachers too") from None
    from student_train.fidelity import measure_all  # the codec's error on the KD targets; refuses above the bound
    for role, record in measure_all(cfg, out, device_for(cfg)).items():
        summary[role]["fidelity"] = record
    from teacher_cache.datasets import skipped_files
    skipped = skipped_files(cfg.data, "train")
    _mark_done(cfg, out, "cache", summary=summary, unreadable_skipped=skipped)
    note = "; ".join(f"{role}: {r['units_written']} of {r['units']} units written"
                     + (f", {r['image_views_per_s']:,.0f} img/s" if r.get("image_views_per_s") else "")
                     + f", {r['fidelity']['codec']} (loss terms within {r['fidelity']['worst']:.1%})"
                     for role, r in summary.items()) + _skipped_note(skipped, out / "cache")
    return {"status": "ran", "detail": summary, "note": note}


def _skipped_note(skipped: list[str], stage_dir: Path) -> str:
    """The stage line's count of unreadable files left out (data.skip_unreadable); run.json lists them."""
    return f"; {len(skipped)} unreadable image(s) skipped, listed in {stage_dir / 'run.json'}" if skipped else ""


# ---------------------------------------------------------------- train

def _cache_for_training(cfg: Config, out: Path) -> dict[str, Path | str]:
    """The stores `hakd train` packs from: present, complete and made for this config, else StageInputs."""
    from teacher_cache.job import ROLES, store_path
    from teacher_cache.store import CacheStore
    stores = {role: store_path(out, cfg, role) for role in ROLES}
    for role, p in stores.items():
        if not storage.exists(p):
            raise StageInputs(f"no cache store at {p} for {role}: run `hakd cache` first with this config")
        left = CacheStore.open(p).pending_units()
        if left:
            raise StageInputs(f"cache store {p} is incomplete ({len(left)} unit(s) not written): run `hakd cache` "
                              f"with this config to finish it")
    if not _same_config_as_out(cfg, out):
        for path, keys in _store_mismatches(cfg, out).items():
            if keys:
                raise StageInputs(f"cache store {path} was made for a different {', '.join(keys)} than this config; "
                                  f"run `hakd cache` with this config (with --overwrite to replace it) before training")
    return stores


def _trial_checkpoints(cfg: Config, out: Path) -> tuple[list[Path], list[Path]]:
    """Trial directories whose checkpoint is (stale) of another config, or (damaged) cannot be read."""
    import torch

    from student_train.sweep import plan_trials, trial_config, trial_dir
    from student_train.trainer import _digest as checkpoint_digest
    stale, damaged = [], []
    for trial in plan_trials(cfg):
        d = trial_dir(out, trial)
        ck = d / "checkpoint.pt"
        if not ck.is_file():
            continue
        try:
            digest = torch.load(ck, map_location="cpu", weights_only=True).get("digest")
        except Exception:  # truncated or foreign: not a checkpoint to resume from
            damaged.append(d)
            continue
        if digest != checkpoint_digest(trial_config(cfg, trial), trial.student):
            stale.append(d)
    return stale, damaged


def _trials_whole(cfg: Config, out: Path) -> bool:
    from student_train.sweep import finished, plan_trials
    return all(finished(out, cfg, t) is not None for t in plan_trials(cfg))


def _progress(cfg: Config, out: Path) -> str:
    """Where training stands, from the files: finished trials and the epochs checkpointed of the others."""
    from student_train.sweep import finished, plan_trials, trial_dir
    trials = plan_trials(cfg)
    done = [t for t in trials if finished(out, cfg, t) is not None]
    parts = [f"{len(done)} of {len(trials)} trial(s) finished"]
    for t in trials:
        metrics = trial_dir(out, t) / "metrics.jsonl"
        if t not in done and metrics.is_file():
            epochs = sum(1 for line in metrics.read_text().splitlines() if line.strip())
            parts.append(f"{t.name}: {epochs} of {cfg.train.epochs} epoch(s) checkpointed")
    return "; ".join(parts)


def _remove_unstarted(out: Path, existed: set[Path]) -> None:
    """After a failed training: trial directories this run created that hold no checkpoint, and empty student dirs."""
    train = Path(out) / "train"
    for d in sorted(train.glob("*/*/")):
        if d not in existed and d.parent.name != "tune" and not (d / "checkpoint.pt").exists():
            shutil.rmtree(d, ignore_errors=True)
    for d in train.glob("*/"):
        if d.name != "tune" and not any(d.iterdir()):
            d.rmdir()


def stage_train(cfg: Config, out: Path, overwrite: bool = False, log=print) -> dict:
    from student_train.distributed import is_main, pack_on_rank0, world_size
    from student_train.loader import LoaderError
    from student_train.pack import FFCV_NAME, packed_file
    from student_train.sweep import run_sweep, train_trials_ddp
    out = Path(out)
    stores = _cache_for_training(cfg, out)
    device = device_for(cfg)
    stale, damaged = _trial_checkpoints(cfg, out)
    if stale and not overwrite:
        raise StaleOutput(f"{stale[0] / 'checkpoint.pt'} was written for another config"
                          f"{f' ({len(stale)} trial(s) in all)' if len(stale) > 1 else ''}; add --overwrite to "
                          f"retrain it from scratch, or use another --out")
    packed = packed_file(stores, out / "train")
    if _recorded(cfg, out, "train") and packed is not None and _trials_whole(cfg, out):
        return {"status": "reused"}
    if is_main():
        claim_out(cfg, out)
        for d in stale + damaged:  # another config's (allowed by --overwrite) or unreadable: trained anew
            shutil.rmtree(d)
    existed = set((out / "train").glob("*/")) | set((out / "train").glob("*/*/"))
    try:
        # under torchrun: rank 0 packs while the others wait, the ranks train each trial together (DDP,
        # no Ray Tune), and rank 0 alone writes; otherwise one Ray Tune trial per (student, seed, grid point)
        try:
            beton, meta = pack_on_rank0(stores, out / "train", workers=cfg.train.loader_workers, log=log)
            train = train_trials_ddp if world_size() > 1 else run_sweep
            sweep = train(cfg, out, beton, meta, device, log=log)
        except BaseException:
            if is_main():
                _remove_unstarted(out, existed)
            raise
    except KeyboardInterrupt:
        raise Interrupted(f"while training ({_progress(cfg, out)}); every checkpoint is whole") from None
    except LoaderError as e:
        raise PackedFileError(f"reading {out / 'train' / FFCV_NAME} failed although it matches its recorded "
                              f"checksum ({str(e).splitlines()[0]}); delete it and re-run `hakd train` to repack "
                              f"it from the stores") from None
    packing = "reused" if packed is not None else "packed"
    if is_main():
        _mark_done(cfg, out, "train", packing=packing, trials={n: {"test_clean_accuracy": f.get("test_clean_accuracy")}
                                                               for n, f in sweep["final"].items()})
    note = f"{FFCV_NAME} {packing}; {len(sweep['trained'])} trial(s) trained, {len(sweep['reused'])} reused"
    return {"status": "ran", "detail": sweep, "note": note}


# ---------------------------------------------------------------- analyze

def _model_files(cfg: Config, out: Path) -> dict[str, str]:
    """CRC-32C of every model file the analysis reads (teachers, under cache.location, and trials), by path."""
    import google_crc32c
    from teacher_cache.job import teacher_file
    out = Path(out)
    files = {str(p.relative_to(out)): file_crc32c(p) for p in sorted(out.glob("train/*/*/model.pt"))}
    for role in ("teacher_vit", "teacher_cnn"):
        path = teacher_file(out, cfg, role)
        if storage.exists(path):
            files[f"teachers/{role}.pt"] = google_crc32c.Checksum(storage.read_bytes(path)).hexdigest().decode()
    return dict(sorted(files.items()))


def _report_whole(cfg: Config, out: Path) -> bool:
    info = _recorded(cfg, out, "analyze")
    report = Path(out) / "report"
    if info is None or not all((report / f).is_file() for f in REPORT_FILES) or not _json(report / "metrics.json"):
        return False
    return info.get("models") == _model_files(cfg, out)


def _models_for_analysis(cfg: Config, out: Path) -> None:
    """Trained students must be this config's: refuse those of another training config (missing ones are
    named by the analysis' own checks)."""
    if (Path(out) / "train" / "run.json").is_file() and _recorded(cfg, out, "train") is None:
        raise StageInputs(f"the models under {Path(out) / 'train'} were not trained with this config: run "
                          f"`hakd train` with it first (with --overwrite to replace them)")


def stage_analyze(cfg: Config, out: Path, overwrite: bool = False, log=print, seconds: dict | None = None) -> dict:
    out = Path(out)
    if _report_whole(cfg, out):
        return {"status": "reused", "report": str(out / "report" / "report.md")}
    _models_for_analysis(cfg, out)
    from analysis.evaluate import run_analysis
    from analysis.report import write_report
    models = _model_files(cfg, out)
    try:
        res = run_analysis(cfg, out, log=log)  # checks every model before launching anything; writes nothing
    except KeyboardInterrupt:
        raise Interrupted("while analysing; the report is written only once every task has finished") from None
    claim_out(cfg, out)
    metrics = res["metrics"]
    metrics["meta"].update({"commit": git_commit(), "config_digest": cfg.digest(),
                            "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if seconds:
        metrics["meta"]["seconds"].update(seconds)
    from teacher_cache.job import teacher_file
    fits = {r: teacher_file(out, cfg, r, ".json") for r in ("teacher_vit", "teacher_cnn")}  # under cache.location
    metrics["teacher_fit"] = {r: json.loads(storage.read_bytes(p)) for r, p in fits.items() if storage.exists(p)}
    from student_train.fidelity import codec_meta
    metrics["meta"]["codec"] = codec_meta(cfg, out)  # each teacher's feature codec, bytes per view and errors
    paths = write_report(metrics, out / "report", res["gradcam_grid"])
    from teacher_cache.datasets import skipped_files
    skipped = skipped_files(cfg.data, "clean")  # the test images every variant is made of
    _mark_done(cfg, out, "analyze", models=models, unreadable_skipped=skipped)
    return {"status": "ran", "report": str(paths["markdown"]), "note": _skipped_note(skipped, out / "report")[2:]}
