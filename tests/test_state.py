"""State that never lies: reuse judged from the outputs, failed runs that change nothing, --overwrite
that redoes only what the changed config affects. Each test damages its own copy of the tiny run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.cli import main
from infra.integrity import file_crc32c, loads_tensors
from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_run, out)
    return out


def files(out) -> dict:
    """Every file under out with its size and mtime: what a run must leave as it was."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


def trial_dirs(out) -> list:
    return sorted(d for d in (out / "train").glob("student_*/*/") if (d / "summary.json").is_file())


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.slow
def test_missing_trial_and_truncated_packed_file_are_redone(run_copy, capsys):
    beton, meta_path = run_copy / "train" / "data.beton", run_copy / "train" / "data.json"
    lost, *kept = trial_dirs(run_copy)
    before = {d: (d / "model.pt").stat().st_mtime_ns for d in kept}
    shutil.rmtree(lost)
    truncate(beton)
    assert main(["train", "--out", str(run_copy), *TINY]) == 0
    assert "data.beton packed; 1 trial(s) trained" in capsys.readouterr().out
    meta = json.loads(meta_path.read_text())
    assert meta["beton_bytes"] == beton.stat().st_size and meta["beton_crc32c"] == file_crc32c(beton)
    assert loads_tensors(lost / "model.pt") and loads_tensors(lost / "checkpoint.pt")
    assert {d: (d / "model.pt").stat().st_mtime_ns for d in kept} == before  # the whole trials were reused


@pytest.mark.slow
def test_damaged_teacher_file_is_refit_and_its_store_kept(run_copy, capsys):
    pt = run_copy / "teachers" / "teacher_cnn.pt"
    store = {p: s for p, s in files(run_copy / "cache").items()  # the shards; the metadata may be rewritten
             if "wrn_demo.zarr" in str(p) and "/units/" not in str(p) and p.name != "zarr.json"}
    truncate(pt)
    assert main(["cache", "--out", str(run_copy), *TINY]) == 0
    out = capsys.readouterr().out
    assert "teacher_vit: 0 of 4 units written" in out and "teacher_cnn: 0 of 4 units written" in out
    assert loads_tensors(pt)
    after = files(run_copy / "cache")
    assert all(after[p] == s for p, s in store.items())  # the deterministic refit matches the store: no shard rewritten


@pytest.mark.slow
def test_refused_train_changes_nothing_and_the_original_config_still_runs(run_copy, capsys):
    before = files(run_copy)
    assert main(["train", "--out", str(run_copy), "--overwrite", *TINY, "data.seed=1"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hakd: error")]
    assert len(errors) == 1 and "hakd cache" in errors[0]
    assert files(run_copy) == before
    assert main(["run", "--out", str(run_copy), *TINY]) == 0
    assert capsys.readouterr().out.count("reused") == 3


def test_train_into_an_empty_directory_writes_nothing(tmp_path, capsys):
    out = tmp_path / "fresh"
    assert main(["train", "--out", str(out), *TINY]) == 2
    assert "hakd cache" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_unreadable_packed_file_is_one_line_and_leaves_no_empty_trial(run_copy, capsys):
    beton, meta_path = run_copy / "train" / "data.beton", run_copy / "train" / "data.json"
    lost = trial_dirs(run_copy)[0]
    shutil.rmtree(lost)
    truncate(beton, 0.3)  # recorded as if it had been written so: size and checksum match, FFCV cannot read it
    meta = json.loads(meta_path.read_text())
    meta.update(beton_bytes=beton.stat().st_size, beton_crc32c=file_crc32c(beton))
    meta_path.write_text(json.dumps(meta))
    assert main(["train", "--out", str(run_copy), *TINY]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("hakd: error")]
    assert len(errors) == 1 and "data.beton" in errors[0] and "Traceback" not in err
    assert not lost.exists() and (not lost.parent.exists() or any(lost.parent.iterdir()))


@pytest.mark.slow
def test_only_analysis_changed_keeps_teachers_stores_and_trials(run_copy, capsys):
    keep = {p: s for p, s in files(run_copy).items() if p.parent.name != "report" and p.name not in ("run.json", "config.yaml")}
    for stage in ("cache", "train"):
        assert main([stage, "--out", str(run_copy), "--overwrite", *TINY, "analysis.pgd_steps=3"]) == 0
        assert "reused" in capsys.readouterr().out
    after = files(run_copy)
    assert all(after.get(p) == s for p, s in keep.items())


@pytest.mark.slow
def test_checkpoint_of_another_config_is_refused_without_overwrite(run_copy, capsys):
    (run_copy / "run.json").unlink()  # no record of OUT's config: the checkpoints themselves must say
    (run_copy / "train" / "run.json").unlink()
    before = files(run_copy)
    assert main(["train", "--out", str(run_copy), *TINY, "train.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt was written for another config" in err and "--overwrite" in err
    assert files(run_copy) == before


@pytest.mark.slow
def test_ctrl_c_in_train_is_one_line_exit_130_and_checkpoints_stay_whole(run_copy, tmp_path):
    for d in (run_copy / "train").glob("student_*"):
        shutil.rmtree(d)  # so that the first checkpoint seen is one the interrupted run wrote
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    err_path = tmp_path / "stderr"
    with open(err_path, "wb") as err:
        cli = subprocess.Popen([sys.executable, "-m", "infra.cli", "train", "--out", str(run_copy), "--overwrite",
                                *TINY, "train.epochs=50"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.time() + 300
            while not list((run_copy / "train").glob("student_*/*/checkpoint.pt")):  # an epoch of the retraining
                assert cli.poll() is None and time.time() < deadline, err_path.read_text()[-3000:]
                time.sleep(0.5)
            cli.send_signal(signal.SIGINT)
            assert cli.wait(timeout=120) == 130
        finally:
            if cli.poll() is None:
                cli.kill()
    lines = [line for line in err_path.read_text().splitlines() if line.strip()]
    assert "Traceback" not in "\n".join(lines)
    assert [line for line in lines if line.startswith("hakd: interrupted")] == [lines[-1]]
    assert "run the same command again to resume" in lines[-1] and "epoch(s) checkpointed" in lines[-1]
    assert all(loads_tensors(p) for p in (run_copy / "train").glob("student_*/*/checkpoint.pt"))
