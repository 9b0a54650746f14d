"""Progress while training: the lines and the live display of student_train/progress.py, fed fake trial events."""
from __future__ import annotations

import io
import re
import shutil

import pytest

from student_train.progress import SweepProgress

TRIALS = ["student_kd_vit/seed0", "student_kd_cnn/seed0", "student_independent/seed0"]


def epoch(n: int, acc: float) -> dict:
    """A trainer's metrics line for epoch n (from 0), as Tune passes it on (with Tune's own keys)."""
    return {"epoch": n, "loss": 2.5 - n, "train_accuracy": acc, "test_clean_accuracy": acc - 0.05,
            "images_per_s": 120.0, "training_iteration": n + 1, "time_total_s": 20.0 * (n + 1)}


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_one_line_per_event_without_a_terminal():
    lines, clock = [], Clock()
    p = SweepProgress(TRIALS, epochs=2, log=lines.append, live=False, clock=clock)
    p.started(TRIALS[0])
    p.started(TRIALS[1])
    clock.t += 20
    p.epoch_done(TRIALS[0], epoch(0, 0.4))
    clock.t += 20
    p.epoch_done(TRIALS[0], epoch(1, 0.5))
    p.finished(TRIALS[0], epoch(1, 0.5))
    p.failed(TRIALS[1])
    assert lines == [
        "train: student_kd_vit/seed0 started (0 of 3 done, 1 running, 2 pending)",
        "train: student_kd_cnn/seed0 started (0 of 3 done, 2 running, 1 pending)",
        "train: student_kd_vit/seed0 epoch 1/2: loss 2.500, train acc 0.400, test acc 0.350, 120 img/s",
        "train: student_kd_vit/seed0 epoch 2/2: loss 1.500, train acc 0.500, test acc 0.450, 120 img/s",
        "train: student_kd_vit/seed0 finished: test acc 0.450, 40s (1 of 3 done, 1 running, 1 pending)",
        "train: student_kd_cnn/seed0 failed (1 of 3 done, 0 running, 1 pending, 1 failed)",
    ]


def test_heartbeat_when_nothing_else_was_said():
    lines, clock = [], Clock()
    p = SweepProgress(TRIALS, epochs=4, log=lines.append, live=False, heartbeat_s=10, clock=clock)
    p.started(TRIALS[0])
    p.epoch_done(TRIALS[0], epoch(0, 0.4))
    clock.t += 9
    p.tick()
    assert len(lines) == 2  # 9 s since the last line: quiet
    clock.t += 1
    p.tick()
    assert lines[-1] == ("train: 10s elapsed, 0 of 3 done, 1 running, 2 pending: "
                         "student_kd_vit/seed0 in epoch 2/4")
    p.tick()
    assert len(lines) == 3  # the heartbeat itself restarts the wait
    clock.t += 65
    p.tick()
    assert lines[-1].startswith("train: 1m15s elapsed,")


def test_restored_trial_reports_before_its_start():
    """A trial restored (or finished before the restore was recorded) may report without a start event."""
    lines = []
    p = SweepProgress(TRIALS[:1], epochs=3, log=lines.append, live=False, clock=Clock())
    p.epoch_done(TRIALS[0], epoch(2, 0.6))
    assert lines[0].endswith("started (0 of 1 done, 1 running, 0 pending)")
    assert lines[1].startswith("train: student_kd_vit/seed0 epoch 3/3:")


def test_live_display_on_a_terminal():
    lines, clock, screen = [], Clock(), io.StringIO()
    p = SweepProgress(TRIALS, epochs=2, log=lines.append, live=True, file=screen, clock=clock)
    p.started(TRIALS[0])
    p.started(TRIALS[1])
    p.epoch_done(TRIALS[0], epoch(0, 0.4))
    shown = screen.getvalue()
    assert re.search(r"train:\s+17%.*1/6", shown), shown  # one of 3 x 2 epochs, in the bar
    assert "0 of 3 done, 2 running, 1 pending" in shown
    assert "student_kd_vit/seed0: epoch 2/2 (loss 2.500, train acc 0.400, test acc 0.350, 120 img/s)" in shown
    assert "student_kd_cnn/seed0: epoch 1/2 (first epoch)" in shown
    p.finished(TRIALS[0], epoch(1, 0.5))
    assert "train: student_kd_vit/seed0 finished: test acc 0.450" in screen.getvalue()
    before = len(screen.getvalue())
    clock.t += 0.5
    p.tick()
    assert len(screen.getvalue()) == before  # refreshed at most once a second
    clock.t += 1
    p.tick()
    assert len(screen.getvalue()) > before  # the elapsed time moves on
    p.close()
    assert lines == []  # nothing through the log on a terminal: the display has it


@pytest.mark.slow
def test_hakd_train_reports_each_epoch(tiny_run, tmp_path, capsys):
    """`hakd train` without a terminal (pytest captures its output) prints each trial's start, epochs and end."""
    from conftest import TINY
    from infra.cli import main
    out = tmp_path / "out"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("tune", "report"))
    for d in (out / "train").glob("student_*"):  # the trials train again from the same packed file
        shutil.rmtree(d)
    capsys.readouterr()
    assert main(["train", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    for name in ("student_kd_vit/seed0", "student_kd_cnn/seed0", "student_independent/seed0"):
        for line in (f"train: {name} started (", f"train: {name} epoch 1/2: loss ", f"train: {name} epoch 2/2: loss ",
                     f"train: {name} finished: test acc "):
            assert line in printed, printed


def test_a_restored_sweep_reports_to_the_running_command():
    """Tune pickles its callbacks into the experiment and Tuner.restore unpickles them: the callback must come
    back as the one of the command running the restore, not as a copy of the killed command's."""
    from ray import cloudpickle

    from student_train.progress import tune_callback
    killed = tune_callback(SweepProgress(TRIALS, 2, log=[].append, live=False), name_of=str)
    pickled = cloudpickle.dumps(killed)
    lines = []
    running = tune_callback(SweepProgress(TRIALS, 2, log=lines.append, live=False), name_of=str)
    restored = cloudpickle.loads(pickled)
    assert restored is running
    restored.on_trial_start(0, [], TRIALS[0])
    assert lines == ["train: student_kd_vit/seed0 started (0 of 3 done, 1 running, 2 pending)"]
