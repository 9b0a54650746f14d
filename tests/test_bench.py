"""`hakd bench`: every benchmark runs on the tiny profile and prints one JSON line with its figures.

No timing is asserted (this machine's speed says nothing about the code): only that each line is
valid JSON with the documented keys and positive numbers, that the results file is written and
rendered by table.py, and that gpu.sh is valid bash.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from infra.bench import run as bench_run
from infra.bench import table
from infra.bench.profiles import resolve_profile

ROOT = Path(__file__).resolve().parent.parent
# numba (under FFCV's loader) can raise a KeyError from a finalizer when its compiled pipeline is
# garbage-collected; harmless, and unrelated to what these tests check
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
COMMON = ("bench", "device", "device_name", "profile", "created", "commit", "versions", "targets", "met")
FIGURES = {
    "cache": ("bare_forward_img_s", "cache_img_s", "ratio"),
    "train": ("plain_step_s", "resident_kd_step_s", "offline_kd_step_s", "online_kd_step_s",
              "offline_over_resident", "online_over_offline"),
    "loader": ("ffcv_samples_s", "torch_zarr_samples_s", "ratio", "student_samples_s"),
    "analyze": ("one_worker_s", "two_workers_s", "speedup", "machine_speedup", "projected_total_s"),
}


def _lines(out: str) -> list[dict]:
    lines = [l for l in out.splitlines() if l.strip()]
    return [json.loads(l) for l in lines]


def _check(line: dict, bench: str) -> None:
    assert line["bench"] == bench
    for k in COMMON:
        assert k in line, f"{bench}: missing {k}"
    assert line["device"] == "cpu-2core" or line["device"].startswith("cpu-")
    assert line["versions"]["torch"] and line["commit"]
    for k in FIGURES[bench]:
        assert isinstance(line[k], float) and line[k] > 0, f"{bench}: {k} = {line[k]!r}"
    for k in line["targets"]:
        assert line["met"][k] in (True, False)


@pytest.fixture(scope="module")
def gpu_set(tmp_path_factory):
    """cache, train and loader in one context (one tiny cache), as `python -m infra.bench.run gpu --device cpu --tiny`."""
    results = tmp_path_factory.mktemp("results")
    import io
    import contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bench_run.cli(["gpu", "--device", "cpu", "--tiny", "--out", str(results)])
    assert rc == 0
    return _lines(buf.getvalue()), results


def test_cache_train_loader_lines(gpu_set):
    lines, _ = gpu_set
    assert [l["bench"] for l in lines] == ["cache", "train", "loader"]  # one line each, nothing else on stdout
    for line in lines:
        _check(line, line["bench"])
    cache, train, loader = lines
    assert set(cache["teachers"]) == {"vit_demo", "wrn_demo"}
    for name, fig in cache["teachers"].items():
        assert fig["bare_forward_img_s"] > 0 and fig["cache_img_s"] > 0 and fig["ratio"] > 0
        judged = "steady_over_disk" if fig["bound"] == "disk" else "steady_ratio"
        assert (f"teachers.{name}.{judged}" in cache["targets"]) == fig["steady_valid"] and "steady_cache_img_s" in fig
    assert train["student"] == "resnet_demo" and train["params"]["batch"] == 8
    assert "offline_over_resident" in train["targets"]
    assert {"ratio", "ffcv_over_student"} <= set(loader["targets"])


def test_results_file_and_table(gpu_set):
    _, results = gpu_set
    files = sorted(results.glob("cpu-*core-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert set(doc["benches"]) == {"cache", "train", "loader"} and doc["profile"] == "tiny"
    md = table.render(files)
    rows = [r for r in md.splitlines() if r.startswith("| cpu-")]
    assert md.splitlines()[0].startswith("| device | date | commit | figure | value | target | met |")
    assert any("cache: teachers.vit_demo.steady_" in r for r in rows)
    assert any("train: offline_over_resident" in r for r in rows)
    assert any("loader: ratio" in r for r in rows)
    assert table.main([str(results)]) == 0


def test_analyze_line(ray_session, capsys, tmp_path):
    assert bench_run.cli(["analyze", "--device", "cpu", "--tiny"]) == 0
    lines = _lines(capsys.readouterr().out)
    assert len(lines) == 1
    _check(lines[0], "analyze")
    assert lines[0]["params"]["ray_cpus"] == 2
    rates = lines[0]["rates_img_s"]  # every measure of every architecture, as the GPU profile reports them
    assert set(rates) == {"vit_demo", "wrn_demo", "resnet_demo"} and set(rates["resnet_demo"]) == {
        "accuracy", "fourier", "occlusion", "adversarial", "gradcam", "cka"}
    assert set(lines[0]["projected_s"]) == set(lines[0]["params"]["projection"]["models"])


def test_analyze_rates_stop_at_the_budget_and_keep_what_they_measured(tmp_path, monkeypatch):
    """A short GPU run (the H200's analyze run was cut off after three measures, and nothing of it was kept):
    past analyze_budget_s no further measure starts, the line lists the skipped ones, and no model whose
    rates are missing gets a projection."""
    import types
    from infra.bench import analyze
    clock = iter(range(1000))  # each budget check is one second later: the first measure runs, the rest do not
    monkeypatch.setattr(analyze, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    p = resolve_profile("tiny", "cpu", ["analyze_budget_s=1"])
    got = analyze.measure_rates(p, tmp_path)
    assert got["rates_img_s"] == {"vit_demo": {"accuracy": got["rates_img_s"]["vit_demo"]["accuracy"]}}
    assert "vit_demo.fourier" in got["skipped_rates"] and "resnet_demo.cka" in got["skipped_rates"]
    assert got["projected_total_s"] is None and all(v is None for v in got["projected_s"].values())


def test_table_renders_skips_and_verdicts(tmp_path):
    doc = {"device": "nvidia-h100-80gb-hbm3", "date": "2026-01-02", "commit": "0123456789abcdef", "profile": "gpu",
           "benches": {
               "cache": {"bench": "cache", "teacher": "vit_b16_clip", "bare_forward_img_s": 4000.0,
                         "cache_img_s": 3800.0, "ratio": 0.95, "versions": {"torch": "x"},
                         "teachers": {"vit_b16_clip": {"bare_forward_img_s": 4000.0, "cache_img_s": 3800.0,
                                                       "ratio": 0.95}},
                         "targets": {"teachers.vit_b16_clip.ratio": ">= 0.9"},
                         "met": {"teachers.vit_b16_clip.ratio": True}},
               "train": {"bench": "train", "plain_step_s": 0.05, "offline_kd_step_s": None,
                         "skipped": {"offline_kd_step_s": "ffcv is not importable"}, "targets": {}, "met": {}},
               "loader": {"bench": "loader", "skipped": "missing Python modules: ffcv"}}}
    path = tmp_path / "nvidia-h100-80gb-hbm3-2026-01-02.json"
    path.write_text(json.dumps(doc))
    md = table.render([path])
    assert "| nvidia-h100-80gb-hbm3 | 2026-01-02 | 01234567 | cache: teachers.vit_b16_clip.ratio | 0.95 | >= 0.9 | yes |" in md
    assert "cache: ratio |" not in md  # the top-level copy of the first teacher is not repeated
    assert "skipped: ffcv is not importable" in md and "skipped: missing Python modules: ffcv" in md
    assert "versions" not in md


def test_cli_dispatch_and_bad_override(capsys):
    from infra.cli import main
    assert main(["bench", "cache", "no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err
    with pytest.raises(Exception):
        resolve_profile("tiny", "cpu", ["repeats=two"])
    with pytest.raises(Exception):
        resolve_profile("tiny", "cpu", ["repeats=0"])
    p = resolve_profile("tiny", "cpu", ["repeats=3", "student=resnet50"])
    assert p.repeats == 3 and p.student == "resnet50" and p.amp is False
    assert resolve_profile("gpu", "cpu").channels_last is False  # GPU models on the CPU: no bf16/channels_last
    assert main(["bench", "all", "profile=nope"]) == 2


def test_gpu_script_is_valid_bash():
    bash = shutil.which("bash")
    assert bash
    script = ROOT / "infra" / "bench" / "gpu.sh"
    subprocess.run([bash, "-n", str(script)], check=True)
    text = script.read_text()
    assert "BENCHES=${BENCHES:-gpu}" in text and "EXTRAS" in text and "WHEELS" in text
    bad = subprocess.run([bash, str(script)], env={"PATH": "/usr/bin:/bin", "EXTRAS": "nope"}, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "EXTRAS: unknown extra run 'nope'" in bad.stderr


def test_a_comma_separated_list_runs_in_order_and_writes_the_results_file(tmp_path, monkeypatch, capsys):
    from infra.bench.common import header
    from infra.errors import UserError
    assert bench_run.bench_names("cache,") == ["cache"] and bench_run.writes_results("cache,")
    assert not bench_run.writes_results("cache")
    for bad in ("cache,nope", ","):
        with pytest.raises(UserError):
            bench_run.bench_names(bad)
    seen = []
    monkeypatch.setattr(bench_run, "run_one", lambda name, ctx: seen.append(name) or {**header(name, ctx.p)})
    results = tmp_path / "results"
    assert bench_run.cli(["train,cache", "--device", "cpu", "--tiny", "--out", str(results)]) == 0
    assert seen == ["cache", "train"]  # the usual order, whatever the list's
    assert [l["bench"] for l in _lines(capsys.readouterr().out)] == ["cache", "train"]
    assert set(json.loads(next(results.glob("*.json")).read_text())["benches"]) == {"cache", "train"}
    assert bench_run.cli(["cache,nope", "--tiny"]) == 2
    from infra.cli import main as hakd  # `hakd bench` takes the same lists
    seen.clear()
    assert hakd(["bench", "cache,train", "profile=tiny", "device=cpu", "--out", str(tmp_path / "hakd")]) == 0
    assert seen == ["cache", "train"]
    assert hakd(["bench", "cache,nope"]) == 2


def test_calibration_brings_an_overflowing_random_teacher_into_float16_range(tmp_path):
    """Fresh BatchNorm statistics (mean 0, variance 1) pass every conv's gain on in eval mode; with conv weights
    scaled up, the random wrn_demo's layer3 passes float16's 65,504, as random WRN-101's does at 224 px.
    Statistics measured on the images bring it back to a trained network's scale; Context saves that teacher."""
    import torch
    from infra.bench.common import Context, calibrate
    from teacher_cache.fit import build_teacher
    ctx = Context(resolve_profile("tiny", "cpu"), tmp_path)
    torch.manual_seed(0)
    t = build_teacher(ctx.cfg, "teacher_cnn").eval()
    with torch.no_grad():
        for m in t.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(16)
    scales = calibrate(t, ctx.data()["images"][:16], ["layer3"], 8, "cpu")
    assert scales["batchnorm_layers"] > 0 and scales["max_abs_before"]["layer3"] > 65504
    assert scales["max_abs_after"]["layer3"] < 65504 / 64 and scales["max_abs_after"]["logits"] < 65504 / 64
    assert not t.training and next(t.parameters()).device.type == "cpu"

    saved = ctx.teacher("teacher_cnn")  # the bench's own random teacher: calibrated before it is saved
    state = torch.load(ctx.out / "teachers" / "teacher_cnn.pt", weights_only=True)
    assert all(torch.equal(v, state[k]) for k, v in saved.state_dict().items())
    assert not torch.allclose(state["net.bn1.running_var"], torch.ones_like(state["net.bn1.running_var"]))
    assert ctx.memo["calibration"]["wrn_demo"]["layers"] == ["layer3"]


def test_a_failing_bench_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    """`infra.bench.run gpu` records a failed bench as a one-line error, runs the rest, writes the results file
    after every bench, and exits 1 at the end."""
    from infra.bench.common import header
    results = tmp_path / "results"
    seen = []

    def fake_run_one(name, ctx):
        seen.append(name)
        if name == "cache":
            raise RuntimeError("unit 3: beyond float16's range\n  (second line of detail)")
        held = json.loads(next(results.glob("*.json")).read_text())["benches"]  # written after the failure
        assert held["cache"]["error"] == "RuntimeError: unit 3: beyond float16's range"
        return {**header(name, ctx.p), "figure_s": 1.0}

    monkeypatch.setattr(bench_run, "run_one", fake_run_one)
    assert bench_run.cli(["gpu", "--device", "cpu", "--tiny", "--out", str(results)]) == 1
    captured = capsys.readouterr()
    assert seen == ["cache", "train", "loader"]
    assert [(l["bench"], "error" in l) for l in _lines(captured.out)] == [
        ("cache", True), ("train", False), ("loader", False)]
    assert "Traceback" in captured.err and "failed: cache" in captured.err
    path = next(results.glob("*.json"))
    doc = json.loads(path.read_text())
    assert set(doc["benches"]) == {"cache", "train", "loader"}
    assert "| cache | failed: RuntimeError: unit 3: beyond float16's range |" in table.render([path])


def test_merge_records_lines_and_runs_that_died(tmp_path):
    """gpu.sh's merge: a run's last JSON line, or why it printed none; benches a killed run never finished."""
    from infra.bench import merge
    results = tmp_path / "nvidia-h200-2026-11-28.json"
    printed = tmp_path / "lines.jsonl"
    printed.write_text('{"bench": "cache", "device": "nvidia-h200", "commit": "abc", "ratio": 0.5}\n')
    assert merge.main([str(results), "cache_shm", "--line-from", str(printed), "--rc", "0"]) == 0
    doc = json.loads(results.read_text())  # created from the line's header
    assert doc["device"] == "nvidia-h200" and doc["commit"] == "abc"
    assert doc["benches"]["cache_shm"] == {"bench": "cache_shm", "device": "nvidia-h200", "commit": "abc",
                                           "ratio": 0.5}
    printed.write_text("not json\n")
    merge.main([str(results), "analyze", "--line-from", str(printed), "--rc", "124", "--why", "killed: hit X=90 s"])
    merge.main([str(results), "cache_shm", "train", "--rc", "124", "--why", "killed"])
    benches = json.loads(results.read_text())["benches"]
    assert benches["analyze"]["error"] == "no result line: exit status 124 (killed: hit X=90 s)"
    assert benches["train"]["error"] == "did not finish: exit status 124 (killed)"
    assert benches["cache_shm"]["ratio"] == 0.5  # a bench the file already holds is kept


def test_source_stamp_names_the_commit_only_while_the_tree_matches(tmp_path):
    """The device gets a copy of the tree without our git state; the stamp written here names the commit there."""
    from infra.bench import stamp
    doc = stamp.write_stamp(tmp_path / "stamp.json")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert doc["commit"] == head and "infra/provenance.py" in doc["files"]
    git_blob = subprocess.run(["git", "hash-object", "pyproject.toml"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    assert stamp.blob_hash(ROOT / "pyproject.toml") == git_blob  # git's own blob ids

    tree = tmp_path / "copy"  # a copied tree with no .git
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "a.py").write_text("x = 1\n")
    fake = tmp_path / "fake-stamp.json"
    fake.write_text(json.dumps({"commit": "c0ffee", "dirty": True,
                                "files": {"pkg/a.py": stamp.blob_hash(tree / "pkg" / "a.py")}}))
    assert stamp.stamped_commit(fake, tree) == "c0ffee-dirty"
    (tree / "pkg" / "a.py").write_text("x = 2\n")  # edited after stamping: the stamp no longer speaks for it
    assert stamp.stamped_commit(fake, tree) is None
    assert stamp.stamped_commit(tmp_path / "missing.json", tree) is None


def test_every_output_names_the_stamped_commit_on_a_copied_tree(monkeypatch, tmp_path):
    """infra.provenance.commit (run.json, store provenance, results files): git's clean answer, else a
    matching stamp's (the GPU machine's copy: git there named an older commit, dirty), else git's as it is."""
    from infra import provenance
    from infra.config import load_config
    monkeypatch.setattr(provenance, "stamped_commit", lambda *a: "c0ffee")
    for git, want in (("abc", "abc"), ("abc-dirty", "c0ffee"), ("unknown", "c0ffee")):
        monkeypatch.setattr(provenance, "git_commit", lambda git=git: git)
        assert provenance.commit() == want
    monkeypatch.setattr(provenance, "stamped_commit", lambda *a: None)  # no stamp, or a stale one
    assert provenance.commit() == "unknown"
    cfg = load_config(None)
    monkeypatch.setattr(provenance, "stamped_commit", lambda *a: "c0ffee")
    monkeypatch.setattr(provenance, "git_commit", lambda: "abc-dirty")
    provenance.write_run_info(tmp_path, cfg)
    assert json.loads((tmp_path / "run.json").read_text())["commit"] == "c0ffee"


def test_writer_bench_times_hakds_writer_against_zarrs_assignment(tmp_path):
    from infra.bench.writer import measure
    r = measure("lz4", threads=2, units=1, directory=str(tmp_path), shard_size=8, chunk_size=4)
    assert r["unit_mb"] == 6.1 and r["codec"] == "lz4" and r["threads"] == 2
    for side in ("hakd", "zarr_assignment"):
        assert r[side]["wall_s"] > 0 and r[side]["cpu_s"] > 0 and r[side]["mb_s"] > 0
    assert set(r["hakd"]["stages_s"]) == {"encode", "checksum", "write"}
    assert list(tmp_path.iterdir()) == []  # the scratch stores are gone
