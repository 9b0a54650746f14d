"""Progress of a sweep while it trains: trials done, running (with their epoch) and pending, and each epoch's metrics.

On a terminal (stderr a TTY) a live display in the style of the cache's and the analysis's tqdm bars: one
bar in epochs over all the trials to run, with the counts and the elapsed time, a status line under it per
running trial (its epoch and its last metrics), and a line above it per finished or failed trial. Without a
terminal (a log file, CI), one line per event instead: a trial started, an epoch done (its metrics), a trial
finished or failed, and a heartbeat line when nothing else was printed for `heartbeat_s`.

`SweepProgress` takes the events; `tune_callback` feeds it from Ray Tune's driver loop (trials report each
epoch's metrics with `tune.report`, student_train/sweep.py), and `train_trials_ddp` calls it directly.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

STATES = ("pending", "running", "done", "failed")


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _metrics(metrics: dict) -> str:
    """A trainer's epoch metrics (student_train/trainer.py's metrics.jsonl line) in a few words."""
    parts = []
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.3f}")
    if "train_accuracy" in metrics:
        parts.append(f"train acc {metrics['train_accuracy']:.3f}")
    if "test_clean_accuracy" in metrics:
        parts.append(f"test acc {metrics['test_clean_accuracy']:.3f}")
    if "images_per_s" in metrics:
        parts.append(f"{metrics['images_per_s']:.0f} img/s")
    return ", ".join(parts)


class SweepProgress:
    """The state of every trial to run, shown as it changes (see the module's docstring).

    trials: the names of the trials to run; epochs: train.epochs; log: where event lines go without a
    terminal; live: show the live display (default: whether `file`, stderr by default, is a terminal);
    clock: seconds (time.monotonic), for the heartbeat and the durations."""

    def __init__(self, trials: list[str], epochs: int, log=print, live: bool | None = None, file=None,
                 heartbeat_s: float = 10.0, clock=time.monotonic):
        self.epochs, self.log, self.heartbeat_s, self.clock = epochs, log, heartbeat_s, clock
        self.file = file if file is not None else sys.stderr
        self.live = self.file.isatty() if live is None else live
        self.state = dict.fromkeys(trials, "pending")
        self.epochs_done = dict.fromkeys(trials, 0)
        self.last: dict[str, dict] = {}
        self.started_at: dict[str, float] = {}
        self.start = self.last_line = self.last_refresh = clock()
        self.bar = self.slots = None
        if self.live:
            self.bar = tqdm(total=len(trials) * epochs, desc="train", unit="epoch", file=self.file, leave=True)
            self.slots: list[tuple[tqdm, str | None]] = []  # one status line per running trial, reused

    # ------------------------------------------------------------ events

    def started(self, name: str) -> None:
        self.state[name] = "running"
        self.started_at[name] = self.clock()
        self._say(f"train: {name} started ({self._counts()})")
        if self.live:
            self._take_slot(name)
            self._render()

    def epoch_done(self, name: str, metrics: dict) -> None:
        """metrics: the trainer's epoch line (its "epoch" counts from 0)."""
        if self.state.get(name) == "pending":  # a restored trial may report before its start is seen
            self.started(name)
        self.epochs_done[name] = int(metrics.get("epoch", self.epochs_done[name])) + 1
        self.last[name] = metrics
        if not self.live:
            self._say(f"train: {name} epoch {self.epochs_done[name]}/{self.epochs}: {_metrics(metrics)}")
        self._render()

    def finished(self, name: str, metrics: dict | None = None) -> None:
        self.state[name] = "done"
        self.epochs_done[name] = self.epochs
        metrics = metrics or self.last.get(name, {})
        took = self.clock() - self.started_at.get(name, self.start)
        acc = f"test acc {metrics['test_clean_accuracy']:.3f}, " if "test_clean_accuracy" in metrics else ""
        self._say(f"train: {name} finished: {acc}{_duration(took)} ({self._counts()})", always=True)
        self._free_slot(name)
        self._render()

    def failed(self, name: str) -> None:
        self.state[name] = "failed"
        self._say(f"train: {name} failed ({self._counts()})", always=True)
        self._free_slot(name)
        self._render()

    def tick(self) -> None:
        """Called often (each turn of Tune's loop): refreshes the live display's elapsed time once a second;
        without a terminal, prints a heartbeat line when nothing was printed for heartbeat_s."""
        now = self.clock()
        if self.live:
            if now - self.last_refresh >= 1.0:
                self._render()
        elif now - self.last_line >= self.heartbeat_s:
            running = [f"{n} in epoch {min(self.epochs_done[n] + 1, self.epochs)}/{self.epochs}"
                       for n, s in self.state.items() if s == "running"]
            self._say(f"train: {_duration(now - self.start)} elapsed, {self._counts()}"
                      + (f": {', '.join(running)}" if running else ""))

    def close(self) -> None:
        if self.live:
            for bar, _ in self.slots:
                bar.close()
            self.bar.close()
            self.slots, self.live = [], False

    # ------------------------------------------------------------ display

    def _counts(self) -> str:
        n = {s: 0 for s in STATES}
        for s in self.state.values():
            n[s] += 1
        failed = f", {n['failed']} failed" if n["failed"] else ""
        return f"{n['done']} of {len(self.state)} done, {n['running']} running, {n['pending']} pending{failed}"

    def _say(self, line: str, always: bool = False) -> None:
        """An event line: logged without a terminal; above the live display with one when `always`."""
        if self.live:
            if always:
                self.bar.write(line, file=self.file)
        else:
            self.log(line)
            sys.stdout.flush()  # a log file gets the line now, not when stdout's buffer fills
        self.last_line = self.clock()

    def _take_slot(self, name: str) -> None:
        for i, (bar, holder) in enumerate(self.slots):
            if holder is None:
                self.slots[i] = (bar, name)
                return
        bar = tqdm(total=0, position=len(self.slots) + 1, bar_format="{desc}", file=self.file, leave=False)
        self.slots.append((bar, name))

    def _free_slot(self, name: str) -> None:
        if self.live:
            self.slots = [(bar, None if holder == name else holder) for bar, holder in self.slots]

    def _render(self) -> None:
        if not self.live:
            return
        self.bar.n = sum(self.epochs_done.values())
        self.bar.set_postfix_str(self._counts(), refresh=False)
        for bar, name in self.slots:
            if name is None:
                bar.set_description_str("", refresh=False)
            else:
                epoch = min(self.epochs_done[name] + 1, self.epochs)
                last = _metrics(self.last[name]) if name in self.last else "first epoch"
                bar.set_description_str(f"  {name}: epoch {epoch}/{self.epochs} ({last})", refresh=False)
            bar.refresh()
        self.bar.refresh()
        self.last_refresh = self.clock()


_ACTIVE: list = []  # the Tune callback of the sweep this process runs now (see __reduce__ below)


def tune_callback(progress: SweepProgress, name_of):
    """A ray.tune.Callback that feeds `progress` from Tune's driver loop; name_of(tune_trial) -> trial name.
    Make it before Tuner.restore too: the restored sweep gets this one."""
    from ray import tune

    class ProgressCallback(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            progress.started(name_of(trial))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            progress.epoch_done(name_of(trial), result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            progress.finished(name_of(trial), trial.last_result)

        def on_trial_error(self, iteration, trials, trial, **info):
            progress.failed(name_of(trial))

        def on_step_end(self, iteration, trials, **info):
            progress.tick()

        def __reduce__(self):
            # Tune pickles its callbacks with the experiment (tuner.pkl) and Tuner.restore unpickles the old
            # ones: this one comes back as the callback of the sweep running then, which shows its own progress
            return _active_callback, ()

    _ACTIVE[:] = [ProgressCallback()]
    return _ACTIVE[0]


def _active_callback():
    from ray import tune
    return _ACTIVE[0] if _ACTIVE else tune.Callback()
