"""Every student run of a config as one Ray Tune trial: one per (student, seed, sweep grid point).

All trials read the same packed file (packed once, before the sweep) and never touch a teacher.
Each trial trains into its own directory, OUT/train/<student>/seed<k>[_<key>=<value>...]/, which
holds its resolved config, per-epoch `metrics.jsonl`, `checkpoint.pt`, `model.pt` and, once done,
`summary.json`. Tune keeps its own result files (result.json, progress.csv, params.json, and
TensorBoard logs when tensorboardX is installed) under OUT/train/tune/<trial>/.

Reuse and resume: a trial whose `summary.json` carries its digest is finished and is not
launched again; a sweep that was killed is restored with `Tuner.restore` (same experiment
directory, named by the digest of the whole training config), and each restored trial resumes
from its own last checkpoint.

Under torchrun (`train_trials_ddp`) there is no Tune: the ranks train the same trials one after
another, all ranks together, and rank 0 alone writes (student_train/distributed.py).
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import itertools
import json
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from infra.config import Config, TrainConfig, config_from_dict, dump_config
from infra.errors import UserError
from infra.failures import DISK_ERRNOS, unwrap
from infra.exclusive import lock_dir, wait_until_unheld
from infra.integrity import loads_tensors
from infra.storage import write_bytes

TUNE_DIR = "tune"  # OUT/train/tune/<experiment>/<trial>/: Tune's own result files


class SweepError(UserError, RuntimeError):
    """A trial failed; the message names it and where its error is."""


class Trial(NamedTuple):
    student: str
    seed: int
    grid: tuple[tuple[str, object], ...]  # ((config key, value), ...) of the swept keys this student reads; () if none

    @property
    def label(self) -> str:
        """seed<k>[_<leaf>=<value>...]: the directory under OUT/train/<student>/ and the run's name in metrics."""
        return f"seed{self.seed}" + "".join(f"_{key.split('.')[-1]}={value}" for key, value in self.grid)

    @property
    def grid_label(self) -> str:
        """<leaf>=<value>,... for the grid point alone ('' without a sweep)."""
        return ",".join(f"{key.split('.')[-1]}={value}" for key, value in self.grid)

    @property
    def name(self) -> str:
        """'<student>/<label>': the model name the analysis loads from OUT/train/<name>/model.pt."""
        return f"{self.student}/{self.label}"


def unread_keys(student: str) -> set[str]:
    """train.* keys (without "train.") that other students' objectives read and this one's does not
    (student_train.trainer.OBJECTIVE_KEYS): they cannot change what it learns."""
    from student_train.trainer import OBJECTIVE_KEYS
    return {k for keys in OBJECTIVE_KEYS.values() for k in keys} - set(OBJECTIVE_KEYS[student])


def plan_trials(cfg: Config) -> list[Trial]:
    """Every (student, seed, grid point), students outermost; grid points in the order the sweep lists them.

    A student's grid point holds only the swept keys that can change what it learns: a key that only other
    kinds' objectives read (student_train.trainer.OBJECTIVE_KEYS, e.g. train.kd_lambda for the independent
    student) is left out, so that student is trained once per seed for all the values of that key.
    """
    keys = list(cfg.sweep)
    trials = []
    for student in cfg.train.students:
        unread = unread_keys(student)
        mine = [k for k in keys if k.split(".", 1)[1] not in unread]
        points = dict.fromkeys(tuple((k, v) for k, v in zip(keys, values) if k in mine)
                               for values in itertools.product(*(cfg.sweep[k] for k in keys)))
        trials += [Trial(student, seed, point) for point in points for seed in cfg.train.seeds]
    return trials


def trial_config(cfg: Config, trial: Trial) -> Config:
    """The config one trial trains with: its seed, its grid values, and nothing of the other trials.

    train.seeds and sweep are narrowed to this trial, so that adding a seed or a grid point later
    leaves the digests, and so the reuse, of the trials already finished unchanged. Keys that only other
    students' objectives read (student_train.trainer.OBJECTIVE_KEYS) hold their defaults, so that changing
    one, e.g. train.kd_lambda, does not retrain the independent student either.
    """
    d = copy.deepcopy(cfg.to_dict())
    d["seed"] = trial.seed
    d["train"].update({"students": [trial.student], "seeds": [trial.seed]})
    defaults = TrainConfig()
    for key in unread_keys(trial.student):
        d["train"][key] = getattr(defaults, key)
    for key, value in trial.grid:
        d["train"][key.split(".", 1)[1]] = value
    d["sweep"] = {}
    return config_from_dict(d)


def trial_digest(cfg: Config) -> str:
    return cfg.digest("seed", "data", "teacher_vit", "teacher_cnn", "cache", "train")


def trial_dir(out: Path, trial: Trial) -> Path:
    return Path(out) / "train" / trial.student / trial.label


def finished(out: Path, cfg: Config, trial: Trial) -> dict | None:
    """The trial's final metrics when it has finished for this config and its model file loads, else None."""
    d = trial_dir(out, trial)
    done = d / "summary.json"
    if not (done.is_file() and loads_tensors(d / "model.pt")):
        return None
    try:
        summary = json.loads(done.read_text())
    except json.JSONDecodeError:
        return None
    return summary["final"] if summary.get("digest") == trial_digest(trial_config(cfg, trial)) else None


def write_summary(d: Path, tcfg: Config, trial: Trial, final: dict) -> None:
    """Mark a trial finished in its directory d: summary.json (the digest `finished` checks, the final metrics),
    written last and whole, then its run info. Called by the one process that writes (a Tune trial, or rank 0)."""
    from infra.provenance import write_run_info

    write_bytes(d / "summary.json",
                json.dumps({"digest": trial_digest(tcfg), "trial": trial.name, "final": final}, indent=2).encode())
    write_run_info(d, tcfg, student=trial.student, seed=trial.seed, grid=dict(trial.grid))


@dataclass(frozen=True)
class TrialInputs:
    """What every trial of one sweep is handed besides its own spec (through tune.with_parameters)."""
    base: dict      # the sweep's whole config, Config.to_dict()
    out: str        # the output directory, OUT
    beton: str      # the packed FFCV file every trial reads
    meta: dict      # its metadata (student_train/pack.py)
    device: str     # cpu | cuda
    threads: int    # torch threads of each trial


def _run_trial(config: dict, inputs: TrialInputs) -> None:
    """The Tune trainable: train one trial (resuming from its checkpoint), reporting each epoch to Tune."""
    import torch
    from ray import tune

    from student_train.trainer import train_student

    torch.set_num_threads(inputs.threads)
    cfg = config_from_dict(inputs.base)
    spec = config["trial"]
    trial = Trial(spec["student"], spec["seed"], tuple(tuple(p) for p in spec["grid"]))
    final = finished(Path(inputs.out), cfg, trial)
    if final is not None:  # finished before a restore was recorded
        tune.report(final)
        return
    tcfg = trial_config(cfg, trial)
    d = trial_dir(Path(inputs.out), trial)
    d.mkdir(parents=True, exist_ok=True)
    held = lock_dir(d, fcntl.LOCK_SH)  # while this trial writes here: see wait_for_trial_processes
    try:
        (d / "config.yaml").write_text(dump_config(tcfg))
        final = train_student(tcfg, trial.student, d, Path(inputs.beton), inputs.meta, device=inputs.device,
                              log=lambda *_: None, on_epoch=lambda metrics: tune.report(dict(metrics)))
        write_summary(d, tcfg, trial, final)
    finally:
        os.close(held)


def wait_for_trial_processes(out: Path, trials: list[Trial], log=print, timeout_s: float = 60.0) -> None:
    """Return once no process still trains any of `trials`. A trial holds a shared lock on its directory while
    it trains; the Ray workers of a command killed a moment ago live on for seconds (until its cluster's
    watchdog stops them) and would write the same checkpoints and metrics as this command's trials."""
    held = [d for d in (trial_dir(out, t) for t in trials) if d.is_dir() and not wait_until_unheld(d, 0)]
    if held:
        log(f"train: waiting for {len(held)} trial(s) of an earlier command to stop (up to {timeout_s:.0f} s)")
    for d in held:
        if not wait_until_unheld(d, timeout_s):
            raise SweepError(f"a process of an earlier hakd command still trains in {d} after {timeout_s:.0f} s; "
                             f"wait for it to end (or stop it), then re-run")


def _dirname(tune_trial) -> str:
    """Tune's directory (and display name) of a trial: <student>-<label>, e.g. student_kd_vit-seed1."""
    spec = tune_trial.config["trial"]
    return f"{spec['student']}-" + Trial(spec["student"], spec["seed"], tuple(map(tuple, spec["grid"]))).label


def _trial_name(tune_trial) -> str:
    """The name (<student>/<label>) of the trial a Tune trial trains."""
    spec = tune_trial.config["trial"]
    return Trial(spec["student"], spec["seed"], tuple(map(tuple, spec["grid"]))).name


def _resources(device: str, cfg: Config) -> dict[str, float]:
    """One GPU per trial on a GPU machine; otherwise train.trial_cpus CPUs (and as many torch threads)."""
    return {"cpu": 1, "gpu": 1} if device == "cuda" else {"cpu": cfg.train.trial_cpus}


def _fit_stopping_on_ctrl_c(tuner):
    """tuner.fit(), where Ctrl-C stops the sweep through Tune's own graceful stop and then raises KeyboardInterrupt.

    A KeyboardInterrupt raised inside Tune's event loop can be lost there (the sweep then ran to its end
    and exited 0); Tune always stops cleanly on SIGUSR1, so the first Ctrl-C is turned into that, the
    trials' checkpoints stay whole, and the interrupt is raised once fit() has returned. A second Ctrl-C
    raises at once.
    """
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()
    interrupted = threading.Event()

    def on_sigint(signum, frame):
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        results = tuner.fit()
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted.is_set():
        raise KeyboardInterrupt
    return results


def run_sweep(cfg: Config, out: Path, beton: Path, meta: dict, device: str, log=print) -> dict:
    """Train every unfinished trial with Ray Tune; returns {"trained": [...], "reused": [...], "final": {name: metrics}}."""
    from ray import tune

    from infra.ray_cluster import ensure_ray, gpus_available
    from student_train.progress import SweepProgress, tune_callback

    out = Path(out).resolve()
    trials = plan_trials(cfg)
    reused = {t.name: f for t in trials if (f := finished(out, cfg, t)) is not None}
    todo = [t for t in trials if t.name not in reused]
    if todo:
        wait_for_trial_processes(out, todo, log)
        ensure_ray(cfg.ray)
        if cfg.train.device == "auto" and gpus_available():  # the driver (a GPU-less head) may see no GPU
            device = "cuda"
        storage = out / "train" / TUNE_DIR
        # named by the trials to run too: a restore re-runs only the trials its experiment recorded, so a
        # trial found missing or damaged later (its directory deleted) needs an experiment of its own
        todo_digest = hashlib.sha256(" ".join(sorted(t.name for t in todo)).encode()).hexdigest()[:8]
        name = f"sweep-{trial_digest(cfg)}-{cfg.digest('sweep')[:8]}-{todo_digest}"
        threads = 1 if device == "cuda" else cfg.train.trial_cpus
        trainable = tune.with_resources(
            tune.with_parameters(_run_trial, inputs=TrialInputs(cfg.to_dict(), str(out), str(Path(beton).resolve()),
                                                                meta, device, threads)),
            _resources(device, cfg))
        experiment = storage / name
        # Tune's legacy console output, which verbose=0 silences entirely (the new one still prints tables);
        # its INFO lines and a restore's warnings about trials that never reported say nothing a user acts on
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        logging.getLogger("ray.tune").setLevel(logging.ERROR)
        log(f"train: {len(todo)} trial(s) to run, {len(reused)} finished trial(s) reused; Tune results in {experiment}")
        progress = SweepProgress([t.name for t in todo], cfg.train.epochs, log)
        callback = tune_callback(progress, _trial_name)  # made before a restore too, which takes it up
        if tune.Tuner.can_restore(experiment):
            log(f"train: resuming the interrupted sweep in {experiment}")
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
        else:
            space = {"trial": tune.grid_search([{"student": t.student, "seed": t.seed, "grid": [list(p) for p in t.grid]}
                                                for t in todo])}
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(trial_dirname_creator=_dirname, trial_name_creator=_dirname),
                run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0, callbacks=[callback],
                                          failure_config=tune.FailureConfig(max_failures=0)))
        try:
            results = _fit_stopping_on_ctrl_c(tuner)
        finally:
            progress.close()
        errors = [r for r in results if r.error is not None]
        if errors:
            raise trial_failure(errors[0].error, errors[0].path, len(errors)) from None
    final = {t.name: reused.get(t.name) or finished(out, cfg, t) for t in trials}
    missing = [n for n, f in final.items() if f is None]
    if missing:
        raise SweepError(f"trial(s) {', '.join(missing)} did not finish; the same command resumes the sweep")
    return {"trained": [t.name for t in todo], "reused": sorted(reused), "final": final}


def trial_failure(error, path: str, count: int) -> Exception:
    """What a sweep whose `count` trials failed raises, given the first one's error (as Tune keeps it: the
    exception out of the trial's actor, or the text of its traceback) and its trial directory: a full disk, a
    quota, a read-only or refused filesystem is that OSError, so that the command's one line names the path, the
    disk and the fix (infra/failures.py); anything else a SweepError pointing to the trial's error.txt."""
    cause = unwrap(error) if isinstance(error, BaseException) else None
    if isinstance(cause, OSError) and cause.errno in DISK_ERRNOS:
        return cause
    last = [line for line in str(error).splitlines() if line.strip()][-1:]  # the exception itself
    return SweepError(f"{count} trial(s) failed, first in {path}: {' '.join(last)}; its error.txt there has the "
                      f"traceback; the same command resumes the sweep")


def train_trials_ddp(cfg, out: Path, beton: Path, meta: dict, device: str, log=print) -> dict:
    """Every unfinished trial of the config, one after another, each trained by all ranks together (DDP).

    Under torchrun the ranks are the parallelism, so there is no Ray Tune here: each trial is the
    same call that a Tune trial makes (`_run_trial`), and rank 0 alone writes its
    config, summary and run info. Returns what `run_sweep` returns.
    """
    from student_train.distributed import is_main, on_rank0
    from student_train.progress import SweepProgress
    from student_train.trainer import train_student

    out = Path(out).resolve()
    trials = plan_trials(cfg)
    # decided once, on rank 0, so every rank trains the same trials in the same order
    reused = on_rank0(lambda: {t.name: f for t in trials if (f := finished(out, cfg, t)) is not None},
                      "listing the finished trials")
    todo = [t for t in trials if t.name not in reused]
    main = is_main()
    # event lines only: the trainer's own epoch lines and batch bar (rank 0) show the running trial
    progress = SweepProgress([t.name for t in todo], cfg.train.epochs, log, live=False) if main else None
    for trial in todo:
        tcfg = trial_config(cfg, trial)
        d = trial_dir(out, trial)
        if main:
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.yaml").write_text(dump_config(tcfg))
            progress.started(trial.name)
        final = train_student(tcfg, trial.student, d, Path(beton), meta, device=device,
                              log=log if main else (lambda *_: None))
        if main:
            write_summary(d, tcfg, trial, final)
            progress.finished(trial.name, final)
    final = on_rank0(lambda: {t.name: reused.get(t.name) or finished(out, cfg, t) for t in trials},
                     "reading the trials' results")
    return {"trained": [t.name for t in todo], "reused": sorted(reused), "final": final}
