"""`torchrun --nproc_per_node=2 -m infra.cli train` on CPU (gloo), from an empty train directory, with a rank
that dies, then resumed: compared with the same training in one process.

1. From OUT with a finished cache and no train/, rank 1 dies (exit 17) as epoch 2 starts, once rank 0 has written
   epoch 1's checkpoint. torchrun fails naming it; nothing written is damaged: the packed file is complete, the
   checkpoint loads, metrics.jsonl has epoch 1's line, and there is no model.pt, summary or stage mark.
2. The plain CLI under torchrun resumes after epoch 1 and finishes.
3. Reference: the same 2 epochs in one process with PairBatchNorm2d (tests/test_student_ddp.py), which
   normalises each half of the batch on its own as the two ranks' BatchNorms do, and keeps rank 0's running
   statistics, as DDP saves them. The two compute the same thing in another order of float sums, and those
   rounding differences grow over the 8 SGD steps: weights and BatchNorm statistics agree within 5 % of what
   training changed (measured: 1.3 % for the weights, 0.12 % for the statistics), the logged losses within
   1e-3. A plain BatchNorm over the 32 images differs by ~40 % of the update after 2 steps already
   (test_student_ddp's control), so the comparison does tell the two apart.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from infra.ray_cluster import free_port

ROOT = Path(__file__).resolve().parents[1]
TRIAL = Path("train") / "student_independent" / "seed0"
ARGS = ["train.epochs=2", "train.students=[student_independent]", "train.seeds=[0]", "train.batch_size=32"]
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def torchrun(target: list[str], log: Path) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 <target>` on 127.0.0.1 with gloo, one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *target]
    with log.open("w") as f:
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=400)


def metrics(d: Path) -> list[dict]:
    return [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_dies_cleanly_resumes_and_matches_one_process(tiny_run, tmp_path, monkeypatch):
    from conftest import TINY
    from infra.config import load_config
    from student_train.pack import FFCV_NAME, META_NAME
    from student_train.students import STUDENTS, Student
    from student_train.sweep import plan_trials, trial_config
    from student_train.trainer import train_student
    from test_student_ddp import PAIR_BN

    out = tmp_path / "out"
    out.mkdir()
    for part in ("teachers", "cache", "config.yaml", "run.json"):  # a finished cache, an empty train directory
        (shutil.copytree if (tiny_run / part).is_dir() else shutil.copy)(tiny_run / part, out / part)
    cli = ["train", "--out", str(out), "--overwrite", *TINY, *ARGS]
    trial = out / TRIAL

    # 1. rank 1 dies as epoch 2 starts
    died = torchrun([__file__, str(trial / "checkpoint.pt"), *cli], tmp_path / "died.log")
    log = (tmp_path / "died.log").read_text()
    assert died.returncode != 0 and "exitcode: 17" in log, log[-3000:]
    meta = json.loads((out / "train" / META_NAME).read_text())
    assert (out / "train" / FFCV_NAME).stat().st_size > 0 and meta["rows"] == 128 * 3
    assert not list((out / "train").glob("*.tmp")) and not list(trial.glob("*.tmp"))
    assert torch.load(trial / "checkpoint.pt", weights_only=True)["epoch"] == 0
    assert [m["epoch"] for m in metrics(trial)] == [0]
    assert not (trial / "model.pt").exists() and not (trial / "summary.json").exists()
    assert not (out / "train" / "run.json").exists()

    # 2. the plain CLI resumes (in the background) while 3. the one-process reference trains here
    port_log = tmp_path / "resumed.log"
    resumed = {}
    import threading
    runner = threading.Thread(target=lambda: resumed.update(p=torchrun(["-m", "infra.cli", *cli], port_log)))
    runner.start()
    cfg = load_config(None, [*TINY, *ARGS])
    tcfg = trial_config(cfg, plan_trials(cfg)[0])
    monkeypatch.setitem(STUDENTS, PAIR_BN.name, PAIR_BN)
    ref = tmp_path / "ref"
    ref_cfg = load_config(None, [*TINY, *ARGS, f"train.arch={PAIR_BN.name}"])
    assert ref_cfg.seed == tcfg.seed
    torch.set_num_threads(1)
    train_student(ref_cfg, "student_independent", ref, out / "train" / FFCV_NAME, meta, log=lambda *_: None)
    runner.join()
    log = port_log.read_text()
    assert resumed["p"].returncode == 0, log[-3000:]
    assert "resuming after epoch 1/2" in log
    assert json.loads((out / "train" / "run.json").read_text())["complete"] is True
    assert json.loads((trial / "summary.json").read_text())["trial"] == "student_independent/seed0"

    got, want = torch.load(trial / "model.pt", weights_only=True), torch.load(ref / "model.pt", weights_only=True)
    assert got.keys() == want.keys()
    torch.manual_seed(tcfg.seed)  # the initial weights, as train_student draws them
    start = Student(tcfg.train.arch, meta["num_classes"], tcfg.data.image_size).state_dict()
    stats = ("running_mean", "running_var")
    for what, keys in {"weights": [k for k, v in start.items() if v.is_floating_point() and not k.endswith(stats)],
                       "BatchNorm statistics": [k for k in start if k.endswith(stats)]}.items():
        update = torch.cat([(want[k] - start[k]).flatten() for k in keys]).norm()
        gap = torch.cat([(got[k] - want[k]).flatten() for k in keys]).norm()
        assert update > 0 and gap <= 0.05 * update, (what, (gap / update).item())
    for a, b in zip(metrics(trial), metrics(ref), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)


@pytest.mark.slow
def test_a_failure_on_rank0_reaches_the_waiting_rank(tmp_path):
    """Rank 0 fails while the others wait for its packing: it raises its own error, they raise one naming rank 0."""
    script = tmp_path / "rank0_fails.py"
    script.write_text(
        "import sys, time\n"
        "from student_train.distributed import RankFailed, on_rank0\n"
        "def pack():\n"
        "    raise OSError('disk full')\n"
        "try:\n"
        "    on_rank0(pack, 'packing the cache')\n"
        "except RankFailed as e:\n"
        "    print('WAITER', e, flush=True)\n"
        "    sys.exit(3)\n"
        "except OSError as e:\n"
        "    print('OWNER', e, flush=True)\n"
        "    time.sleep(2)  # torchrun stops the other rank when this one exits: let it print first\n"
        "    sys.exit(4)\n")
    r = torchrun([str(script)], tmp_path / "log")
    log = (tmp_path / "log").read_text()
    assert r.returncode != 0
    assert "OWNER disk full" in log, log[-2000:]
    assert "WAITER rank 0 failed while packing the cache, so rank 1 stops too: OSError: disk full" in log, log[-2000:]


def test_swap_masks_differ_across_ranks_and_repeat_per_epoch():
    """The PCA swap draws from the torch RNG, seeded per (seed, rank, epoch) at every epoch's start."""
    from student_train.distributed import epoch_seed

    def masks(rank, epoch):
        torch.manual_seed(epoch_seed(0, rank, epoch))
        return torch.rand(3, 64) < 0.5
    assert torch.equal(masks(0, 1), masks(0, 1))  # a resumed epoch draws what the uninterrupted one drew
    assert not torch.equal(masks(0, 1), masks(1, 1)) and not torch.equal(masks(0, 1), masks(0, 2))


def test_only_train_runs_under_torchrun(monkeypatch, capsys):
    from infra.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "--out", "unused"]) == 2
    assert "only `torchrun ... -m infra.cli train`" in capsys.readouterr().err


if __name__ == "__main__":  # one rank of step 1: `hakd train`, and rank 1 dies as epoch 2 starts
    import student_train.trainer as trainer
    from infra.cli import main

    checkpoint = Path(sys.argv[1])
    original = trainer._run_epoch

    def run_epoch(*args, **kwargs):
        if inspect.signature(original).bind(*args, **kwargs).arguments["epoch"] == 1 and os.environ["RANK"] == "1":
            deadline = time.time() + 120
            while not checkpoint.is_file() and time.time() < deadline:  # rank 0 writes it after epoch 1
                time.sleep(0.05)
            os._exit(17)
        return original(*args, **kwargs)
    trainer._run_epoch = run_epoch
    sys.exit(main(sys.argv[2:]))
