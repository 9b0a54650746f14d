"""Runs and sweeps: the trial plan, per-trial configs, and one small sweep that reuses the cache and packed file."""
import json
import re
import shutil

import pytest

from analysis.grid import points
from infra.cli import main
from infra.config import ConfigError, load_config
from student_train.sweep import Trial, finished, plan_trials, trial_config, trial_dir
from conftest import TINY


def test_plan_and_trial_configs():
    cfg = load_config(None, [*TINY, "train.students=[student_kd_vit,student_independent]", "train.seeds=[0,1]",
                             "sweep={train.kd_lambda: [0.5, 2], train.lr: [0.1]}"])
    trials = plan_trials(cfg)
    assert len(trials) == 2 * 2 + 2  # the independent student reads lr but no KD weight: one point per seed
    assert trials[0] == Trial("student_kd_vit", 0, (("train.kd_lambda", 0.5), ("train.lr", 0.1)))
    assert trials[4:] == [Trial("student_independent", seed, (("train.lr", 0.1),)) for seed in (0, 1)]
    assert trials[0].name == "student_kd_vit/seed0_kd_lambda=0.5_lr=0.1"
    assert trials[0].grid_label == "kd_lambda=0.5,lr=0.1"
    one = trial_config(cfg, trials[3])
    assert (one.seed, one.train.seeds, one.train.students) == (1, [1], ["student_kd_vit"])
    assert (one.train.kd_lambda, one.train.lr, one.sweep) == (2.0, 0.1, {})
    # adding a seed or a grid point leaves the configs, so the reuse, of the other trials unchanged
    more = load_config(None, [*TINY, "train.students=[student_kd_vit]", "train.seeds=[0,1,5]",
                              "sweep={train.kd_lambda: [0.5, 2, 4], train.lr: [0.1]}"])
    assert trial_config(more, trials[3]).digest() == one.digest()


def test_a_key_that_some_students_do_not_read_trains_them_once_per_seed():
    """A KD weight does not change the independent student: one trial per seed, the same as without a sweep."""
    students = "train.students=[student_kd_vit,student_kd_cnn,student_independent,student_logit_kd]"
    cfg = load_config(None, [*TINY, students, "train.seeds=[0,1]",
                             "sweep={train.kd_lambda: [0.5, 2], train.logit_temperature: [2, 4]}"])
    names = [t.name for t in plan_trials(cfg)]
    assert len(names) == len(set(names)) == 4 + 4 + 2 + 4
    assert [n for n in names if n.startswith("student_independent/")] == [
        "student_independent/seed0", "student_independent/seed1"]
    assert "student_kd_cnn/seed1_kd_lambda=2" in names and "student_logit_kd/seed0_logit_temperature=4" in names
    alone = load_config(None, [*TINY, students, "train.seeds=[0,1]"])
    independent = Trial("student_independent", 0, ())
    assert trial_config(cfg, independent).digest() == trial_config(alone, independent).digest()  # so reused

    # the report: each full grid point shows the students that stand in it, under their plain names
    models = [f"{t.student}@{t.grid_label}" if t.grid else t.student for t in plan_trials(cfg)]
    accuracy = {m: {"clean": i / 100} for i, m in enumerate(models)}
    views = dict(points({"meta": {"models": models, "sweep": cfg.sweep}, "accuracy": accuracy}))
    assert list(views)[:2] == ["kd_lambda=0.5,logit_temperature=2", "kd_lambda=0.5,logit_temperature=4"]
    assert len(views) == 4 and all(len(v["accuracy"]) == 4 for v in views.values())
    view = views["kd_lambda=2,logit_temperature=4"]["accuracy"]
    assert view["student_kd_vit"] == accuracy["student_kd_vit@kd_lambda=2"]
    assert view["student_logit_kd"] == accuracy["student_logit_kd@logit_temperature=4"]
    assert view["student_independent"] == accuracy["student_independent"]


def test_a_key_a_student_does_not_read_leaves_its_trial_unchanged():
    """Outside a sweep too: another train.kd_lambda or logit temperature keeps the independent student's trial
    (same digest, so reused), and changes exactly the trials of the students that read it."""
    students = "train.students=[student_kd_vit,student_kd_cnn,student_independent,student_logit_kd]"
    base = load_config(None, [*TINY, students])
    other = load_config(None, [*TINY, students, "train.kd_lambda=2.5", "train.logit_temperature=8"])
    for trial in plan_trials(base):
        same = trial_config(base, trial).digest() == trial_config(other, trial).digest()
        assert same == (trial.student == "student_independent"), trial.name
    kd = Trial("student_kd_vit", 0, ())
    assert trial_config(other, kd).train.kd_lambda == 2.5
    assert trial_config(other, kd).train.logit_temperature == base.train.logit_temperature  # not read: default


def test_objective_keys_are_train_keys_and_objective_arguments():
    import dataclasses
    import inspect

    from infra.config import TrainConfig
    from student_train.losses import KINDS, KDObjective
    from student_train.trainer import OBJECTIVE_KEYS
    arguments = set(inspect.signature(KDObjective).parameters)
    assert set(OBJECTIVE_KEYS) == set(KINDS)
    for keys in OBJECTIVE_KEYS.values():
        assert set(keys) <= {f.name for f in dataclasses.fields(TrainConfig)} and set(keys.values()) <= arguments


def test_sweep_keys_from_the_command_line():
    nested = load_config(None, [*TINY, "sweep.train.kd_lambda=[0.5,2]", "sweep.train.lr=[0.1]"])
    assert nested.sweep == {"train.kd_lambda": [0.5, 2], "train.lr": [0.1]}
    assert load_config(None, [*TINY, "sweep={train.kd_lambda: [0.5, 2]}"]).sweep == {"train.kd_lambda": [0.5, 2]}


@pytest.mark.parametrize("override, message", [
    ("sweep={data.seed: [1, 2]}", "sweep.data.seed: not a train.* config key"),
    ("sweep={train.seeds: [1]}", "seeds are train.seeds"),
    ("sweep={train.kd_lambda: [-1]}", "sweep.train.kd_lambda: value -1.0 is impossible"),
    ("sweep={train.epochs: [1.5]}", "sweep.train.epochs[0]: expected an integer"),
    ("sweep={train.lr: []}", "sweep.train.lr: give at least one value"),
    ("train.seeds=[1,1]", "train.seeds: names a seed twice"),
])
def test_bad_sweeps_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*TINY, override])


@pytest.mark.slow
def test_sweep_reuses_cache_packed_file_and_finished_trials(tiny_run, tmp_path, capsys):
    """A second seed trains one trial from the same stores and packed file; a re-run trains nothing."""
    out = tmp_path / "sweep"
    shutil.copytree(tiny_run, out)
    written = {p: p.stat().st_mtime_ns for p in [*(out / "cache").rglob("*"), *(out / "teachers").rglob("*"),
                                                  out / "train" / "data.beton"] if p.is_file()}
    args = ["train", "--out", str(out), "--overwrite", *TINY, "train.students=[student_independent]",
            "train.seeds=[0,1]"]
    capsys.readouterr()
    assert main(args) == 0
    assert "data.beton reused; 1 trial(s) trained, 1 reused" in capsys.readouterr().out  # seed 0: from tiny_run
    cfg = load_config(None, args[4:])
    new = Trial("student_independent", 1, ())
    assert finished(out, cfg, new) is not None
    d = trial_dir(out, new)
    assert len((d / "metrics.jsonl").read_text().splitlines()) == 2
    assert {"config.yaml", "checkpoint.pt", "model.pt", "summary.json"} <= {p.name for p in d.iterdir()}
    progress = list((out / "train" / "tune").glob("*/student_independent-seed1/progress.csv"))
    assert len(progress) == 1 and len(progress[0].read_text().splitlines()) == 3  # Tune's own file: header + 2 epochs
    assert {p: p.stat().st_mtime_ns for p in written} == written  # no teacher forward, no packing

    (out / "train" / "run.json").unlink()  # the stage must look again: every trial is found finished
    assert main(args) == 0
    assert "data.beton reused; 0 trial(s) trained, 2 reused" in capsys.readouterr().out
    assert json.loads((out / "train" / "run.json").read_text())["packing"] == "reused"

    # a sweep over a KD weight, which the independent student does not read, trains nothing new
    assert main([*args, "sweep.train.kd_lambda=[0.5,2]"]) == 0
    assert "data.beton reused; 0 trial(s) trained, 2 reused" in capsys.readouterr().out


def test_a_trial_still_trained_by_an_earlier_command_is_waited_for(tmp_path, monkeypatch):
    """A trial holds a shared lock on its directory while it trains; the next command waits for the holder to go
    (a killed command's Ray workers live on for seconds) and gives up with one line naming the directory."""
    import fcntl
    import subprocess
    import sys
    import time
    from pathlib import Path

    from infra.exclusive import lock_dir
    from student_train import sweep, trainer
    cfg = load_config(None, TINY)
    trial = plan_trials(cfg)[0]
    d = trial_dir(tmp_path, trial)

    def train_student(tcfg, student, where, *args, **kwargs):  # the trial's lock is held while it trains
        with pytest.raises(BlockingIOError):
            lock_dir(where, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return {"epoch": 1}
    monkeypatch.setattr(trainer, "train_student", train_student)
    spec = {"trial": {"student": trial.student, "seed": trial.seed, "grid": []}}
    sweep._run_trial(spec, sweep.TrialInputs(cfg.to_dict(), str(tmp_path), "data.beton", {}, "cpu", 1))
    sweep.wait_for_trial_processes(tmp_path, [trial], timeout_s=0)  # released when the trial ended

    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; sys.path.insert(0, sys.argv[1]); from infra.exclusive import lock_dir\n"
        "lock_dir(sys.argv[2], fcntl.LOCK_SH); print('held', flush=True); time.sleep(float(sys.argv[3]))"),
        str(Path(__file__).resolve().parents[1]), str(d), "600"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lines = []
        with pytest.raises(sweep.SweepError, match=r"still trains in .*seed0 after 0 s; wait for it to end"):
            sweep.wait_for_trial_processes(tmp_path, [trial], log=lines.append, timeout_s=0.3)
        assert lines == ["train: waiting for 1 trial(s) of an earlier command to stop (up to 0 s)"]
        start = time.monotonic()
        holder.kill()  # as the watchdog stops a killed command's workers
        sweep.wait_for_trial_processes(tmp_path, [trial], log=lines.append, timeout_s=30)
        assert time.monotonic() - start < 10
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_full_disk_in_a_trial_is_the_disks_one_line(ray_session, tmp_path):
    """A trial that meets a full disk makes the sweep raise that OSError, which `hakd` words as the disk's one line
    (the path, the disk, the fix, exit 2), as a full disk in the driver is; any other failure names the trial."""
    from ray import tune
    from infra.failures import describe
    from student_train.sweep import SweepError, trial_failure

    def trial(config):  # defined here, so that Ray ships it by value to its workers
        import errno
        if config["kind"] == "disk":
            raise OSError(errno.ENOSPC, "No space left on device", config["path"])
        raise ValueError("a bug in the trial")

    checkpoint = str(tmp_path / "train" / "checkpoint.pt")
    results = tune.Tuner(trial, param_space={"kind": tune.grid_search(["disk", "bug"]), "path": checkpoint},
                         run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0,
                                                   failure_config=tune.FailureConfig(max_failures=0))).fit()
    by_kind = {r.config["kind"]: r for r in results}
    disk = trial_failure(by_kind["disk"].error, by_kind["disk"].path, 2)
    assert isinstance(disk, OSError) and disk.filename == checkpoint
    line, status, _ = describe(disk, tmp_path)
    assert status == 2 and line.startswith(f"no space left writing {checkpoint}") and "run the same command" in line
    bug = trial_failure(by_kind["bug"].error, by_kind["bug"].path, 2)
    assert isinstance(bug, SweepError) and "ValueError: a bug in the trial" in str(bug)
    assert by_kind["bug"].path in str(bug) and "error.txt" in str(bug)
