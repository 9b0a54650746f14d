"""End to end through the `hakd` command line on a tiny config, and every kind of bad input."""
import json

import pytest
import yaml

from infra.cli import main
from conftest import TINY

MODELS = ["teacher_vit", "teacher_cnn", "student_kd_vit", "student_kd_cnn", "student_independent"]


@pytest.mark.slow
def test_run_writes_every_output(tiny_run):
    out = tiny_run
    for d in (out, out / "cache", out / "train", out / "report"):
        run = json.loads((d / "run.json").read_text())
        assert run["commit"] and run["versions"]["torch"] and (d / "config.yaml").is_file()
    assert (out / "cache" / "vit_demo.zarr" / "zarr.json").is_file()
    assert (out / "cache" / "wrn_demo.zarr" / "zarr.json").is_file()
    assert (out / "train" / "data.beton").is_file()
    for s in MODELS[2:]:
        lines = (out / "train" / s / "seed0" / "metrics.jsonl").read_text().splitlines()  # one directory per trial
        assert len(lines) == 2 and "ce" in json.loads(lines[-1])
        assert (out / "train" / s / "seed0" / "model.pt").is_file()
    m = json.loads((out / "report" / "metrics.json").read_text())
    assert set(m["accuracy"]) == set(MODELS) and m["seeds"] == [0]
    assert m["stats"]["student_kd_vit"]["accuracy.clean"]["values"] == [m["accuracy"]["student_kd_vit"]["clean"]]
    for model in MODELS:
        assert set(m["accuracy"][model]) == {"clean", "occluded", "texture"}
        assert all(0.0 <= v <= 1.0 for v in m["accuracy"][model].values())
        assert m["fourier"][model]["radius"] == [0.2, 0.6, 1.0]
        assert len(m["fourier"][model]["low"]) == 3
        assert "entropy" in m["gradcam"][model]
    for student in MODELS[2:]:
        cka = m["cka"][student]
        assert len(cka["matrix"]) == len(cka["student_layers"]) == 4
        assert len(cka["matrix"][0]) == len(cka["teacher_layers"]) == 4  # vit_demo has 4 blocks
    report = (out / "report" / "report.md").read_text()
    assert "Table 1" in report and (out / "report" / "report.html").is_file()


@pytest.mark.slow
def test_rerun_reuses_every_stage(tiny_run, capsys):
    before = (out_report := tiny_run / "report" / "metrics.json").stat().st_mtime_ns
    assert main(["run", "--out", str(tiny_run), *TINY]) == 0
    table = capsys.readouterr().out
    assert table.count("reused") == 3
    assert out_report.stat().st_mtime_ns == before


@pytest.mark.slow
def test_verify_the_finished_stores(tiny_run, capsys):
    assert main(["verify", "--out", str(tiny_run)]) == 0
    assert capsys.readouterr().out.count(": ok") == 2


@pytest.mark.slow
def test_another_config_is_refused_and_nothing_is_touched(tiny_run, capsys):
    snapshot = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*") if p.is_file()}
    assert main(["run", "--out", str(tiny_run), *TINY, "train.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*") if p.is_file()} == snapshot


@pytest.mark.parametrize("argv, needle", [
    (["run", "train.epochz=1"], "train.epochz"),
    (["run", "train.lr=-1"], "train.lr"),
    (["train", "--config", "/no/such.yaml"], "does not exist"),
    (["analyze", "data.name=mnist"], "data.name"),
    (["run", "train.students=[student_kd_cnn]"], "analysis.models names student_kd_vit, which train.students"),
])
def test_bad_config_exits_2_naming_the_problem(tmp_path, capsys, argv, needle):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written before validation


def test_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("precious")
    assert main(["run", "--out", str(f), *TINY]) == 2
    assert "is a file" in capsys.readouterr().err
    assert f.read_text() == "precious"


def test_stages_out_of_order_explain_what_to_run(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "hakd cache" in capsys.readouterr().err
    assert main(["analyze", "--out", str(tmp_path / "p"), *TINY]) == 2
    assert "hakd cache" in capsys.readouterr().err


@pytest.mark.slow
def test_damaged_model_file_is_refused_before_analysis(tiny_run, tmp_path, capsys):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    (out / "report" / "run.json").unlink()  # analysis must run again
    (out / "train" / "student_independent" / "seed0" / "model.pt").write_bytes(b"not a checkpoint")
    assert main(["analyze", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "student_independent/seed0/model.pt" in err and "cannot be read" in err
    assert not (out / "report" / "run.json").exists()


def test_every_subcommand_has_help(capsys):
    for cmd in ("cache", "train", "analyze", "run", "verify", "bench"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage" in capsys.readouterr().out


@pytest.mark.slow
def test_resolved_config_round_trips(tiny_run):
    from infra.config import config_from_dict
    saved = yaml.safe_load((tiny_run / "config.yaml").read_text())
    cfg = config_from_dict(saved)
    assert cfg.data.train_size == 128 and cfg.train.epochs == 2
