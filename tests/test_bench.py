"""`hakd bench`: every benchmark runs on the tiny profile and prints one JSON line with its figures; the results
file goes where the user says; the table keeps the latest clean results; the loader reads a file out of the page
cache; provenance names the commit of a copied tree.

No timing is asserted (this machine's speed says nothing about the code): only that each line is valid JSON with
the documented keys and positive numbers, and that the files are written where they should be.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest

from infra.bench import run as bench_run
from infra.bench import table
from infra.bench.profiles import resolve_profile

ROOT = Path(__file__).resolve().parent.parent
# numba (under FFCV's loader) can raise a KeyError from a finalizer when its compiled pipeline is
# garbage-collected; harmless, and unrelated to what these tests check
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
COMMON = ("bench", "device", "device_name", "profile", "created", "commit", "versions", "cores", "load_avg_1m")
FIGURES = {
    "cache": ("disk_write_mb_s", "disk_parallel_write_mb_s"),
    "train": ("plain_step_s", "resident_kd_step_s", "offline_kd_step_s", "online_kd_step_s",
              "offline_over_resident", "online_over_offline", "offline_over_plain"),
    "loader": ("ffcv_samples_s", "student_samples_s", "ffcv_over_student", "torch_zarr_samples_s", "ratio"),
    "analyze": ("projected_total_s", "one_worker_s", "two_workers_s", "speedup", "machine_speedup"),
}


def _lines(out: str) -> list[dict]:
    return [json.loads(l) for l in out.splitlines() if l.strip()]


def _check(line: dict, bench: str) -> None:
    assert line["bench"] == bench
    for k in COMMON:
        assert k in line, f"{bench}: missing {k}"
    assert line["device"].startswith("cpu-") and line["versions"]["torch"] and line["commit"]
    for k in FIGURES.get(bench, ()):
        assert isinstance(line[k], float) and line[k] > 0, f"{bench}: {k} = {line[k]!r}"
    for k in line.get("targets", {}):
        assert line["met"][k] in (True, False)


@pytest.fixture(scope="module")
def bench_set(tmp_path_factory):
    """cache, train, loader and codecs in one context (one tiny cache), as `hakd bench` runs them."""
    import contextlib
    import io

    from infra.cli import main as hakd
    results = tmp_path_factory.mktemp("results")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = hakd(["bench", "--results", str(results), "loader,cache,train,codecs", "profile=tiny", "device=cpu"])
    assert rc == 0
    return _lines(buf.getvalue()), results


@pytest.fixture
def one_thread():
    """One torch thread, as the tiny profile's Context sets it (two crawl on a shared machine)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_cache_train_loader_codecs_lines(bench_set):
    lines, _ = bench_set
    assert [l["bench"] for l in lines] == ["cache", "train", "loader", "codecs"]  # the usual order, one line each
    for line in lines:
        _check(line, line["bench"])
    cache, train, loader, codecs = lines
    assert set(cache["teachers"]) == {"vit_demo", "wrn_demo"}
    for name, fig in cache["teachers"].items():
        assert fig["bare_forward_img_s"] > 0 and fig["cache_img_s"] > 0 and fig["ratio"] > 0
        judged = "steady_over_disk" if fig["bound"] == "disk" else "steady_ratio"
        assert (f"teachers.{name}.{judged}" in cache["targets"]) == fig["steady_valid"]
        assert fig["compression_ratio"] > 0 and fig["writers_mb_s"] > 0 and fig["writers"] >= 1
    assert train["student"] == "resnet_demo" and train["params"]["batch"] == 8
    assert set(train["offline_over_plain_by_pca_qkv"]) == {"conv3x3", "conv1x1", "dwsep"}
    assert set(loader["targets"]) == {"ratio", "ffcv_over_student"}
    for kind in ("cold", "warm"):  # whole epochs, the file's pages dropped before each cold one
        assert loader[kind]["samples_s"] > 0 and loader[kind]["mb_s"] > 0
    assert 0 <= loader["cold"]["resident_before"] <= 1 and loader["cold"]["valid"] in (True, False)
    assert loader["kd_step_needs_mb_s"] is None and "no GPU results file" in loader["kd_step_from"]
    assert set(codecs["stores"]) == {"vit_demo", "wrn_demo"}
    lz4 = codecs["stores"]["wrn_demo"]["arrays"]["features/layer3"]["codecs"]["lz4:noshuffle"]
    assert lz4["ratio"] > 0 and lz4["encode_mb_s"] > 0 and lz4["decode_mb_s"] > 0


@pytest.mark.slow
def test_results_file_and_table(bench_set):
    _, results = bench_set
    files = sorted(results.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("cpu-") and "-tiny-" in files[0].name
    doc = json.loads(files[0].read_text())
    assert set(doc["benches"]) == {"cache", "train", "loader", "codecs"} and doc["profile"] == "tiny"
    assert len(doc["source_digest"]) == 64
    assert table.latest(files) == {}  # tiny figures check the code: never in the table


def _doc(device: str, created: str, commit: str, load: float, benches: dict, profile: str = "cpu",
         cores: int = 2) -> dict:
    return {"device": device, "date": created[:10], "commit": commit, "profile": profile,
            "benches": {b: {"bench": b, "created": created, "commit": commit, "profile": profile, "cores": cores,
                            "load_avg_1m": load, **fig} for b, fig in benches.items()}}


def test_table_keeps_the_newest_clean_line_per_machine_and_bench(tmp_path):
    docs = {
        "old": _doc("cpu-2core", "2026-11-01T00:00:00", "a" * 40, 1.0, {"train": {"plain_step_s": 1.0},
                                                                         "cache": {"ratio": 0.5}}),
        "new": _doc("cpu-2core", "2026-11-02T00:00:00", "b" * 40, 1.1, {"train": {"plain_step_s": 2.0}}),
        "dirty": _doc("cpu-2core", "2026-11-03T00:00:00", "c" * 40 + "-dirty", 1.0, {"train": {"plain_step_s": 3.0}}),
        "loaded": _doc("cpu-2core", "2026-11-04T00:00:00", "d" * 40, 9.5, {"cache": {"ratio": 0.1}}),
        "failed": _doc("cpu-2core", "2026-11-05T00:00:00", "e" * 40, 1.0, {"cache": {"error": "RuntimeError: x"}}),
        "gpu": _doc("nvidia-h200", "2026-11-01T00:00:00", "f" * 40, 5.0, {
            "train": {"compiled_offline_over_plain": 1.28, "targets": {"compiled_offline_over_plain": "<= 1.3"},
                      "met": {"compiled_offline_over_plain": True}, "skipped": {"online_kd_step_s": "why"}}},
                    "gpu", cores=16),  # its writers load the machine, below its cores
    }
    for name, doc in docs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    assert table.main([str(tmp_path)]) == 0
    md = (tmp_path / "README.md").read_text()
    best = table.latest(sorted(tmp_path.glob("*.json")))
    assert {k: v[1] for k, v in best.items()} == {("cpu-2core", "train"): "new.json", ("cpu-2core", "cache"): "old.json",
                                                  ("nvidia-h200", "train"): "gpu.json"}
    assert "| plain_step_s | 2 |" in md and "| plain_step_s | 1 |" not in md and "| ratio | 0.5 |" in md
    assert "| compiled_offline_over_plain | 1.28 | <= 1.3 | yes |" in md and "skipped: why" in md
    assert "commit bbbbbbbb" in md and "load_avg_1m" not in md
    assert table.main([str(tmp_path / "empty")]) == 1


def test_cli_dispatch_and_bad_override(capsys):
    from infra.cli import main
    assert main(["bench", "cache", "no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err
    for bad in (["repeats=two"], ["repeats=0"], ["profile=nope"], ["device=tpu"]):
        with pytest.raises(Exception):
            resolve_profile(["profile=tiny", "device=cpu", *bad])
    p = resolve_profile(["profile=tiny", "device=cpu", "repeats=3", "student=resnet50", "stores=a.zarr,b.zarr"])
    assert p.repeats == 3 and p.student == "resnet50" and p.amp is False and p.stores == "a.zarr,b.zarr"
    assert resolve_profile(["profile=gpu", "device=cpu"]).channels_last is False  # GPU models on the CPU: no bf16
    assert main(["bench", "all", "profile=nope"]) == 2
    assert main(["bench", "cache,nope"]) == 2
    assert bench_run.bench_names("loader") == ["train", "loader"]  # the loader is judged against train's figure


def test_gpu_script_is_valid_bash():
    bash = shutil.which("bash")
    subprocess.run([bash, "-n", str(ROOT / "infra" / "bench" / "gpu.sh")], check=True)


def test_results_go_to_the_current_directory_by_default_and_a_failure_is_recorded(tmp_path, monkeypatch, capsys):
    """`hakd bench` writes ./bench-results (never into the package), in the usual order whatever the list's;
    a failed bench is one line, the others still run, the file is rewritten after each, and the exit status is 1."""
    from infra.bench.common import header
    from infra.cli import main as hakd
    seen = []

    def fake_run_one(name, ctx):
        seen.append(name)
        held = json.loads(next((tmp_path / "bench-results").glob("*.json")).read_text())["benches"]
        assert held[name]["error"].startswith("did not finish")  # marked before it runs: a killed run says so
        if name == "cache":
            raise RuntimeError("unit 3: beyond float16's range\n  (second line of detail)")
        return {**header(name, ctx.p), "figure_s": 1.0}

    monkeypatch.setattr(bench_run, "run_one", fake_run_one)
    monkeypatch.chdir(tmp_path)
    assert hakd(["bench", "train,cache,loader", "profile=tiny", "device=cpu"]) == 1
    captured = capsys.readouterr()
    assert seen == ["cache", "train", "loader"]
    assert [(l["bench"], "error" in l) for l in _lines(captured.out)] == [
        ("cache", True), ("train", False), ("loader", False)]
    assert "Traceback" in captured.err and "failed: cache" in captured.err
    doc = json.loads(next((tmp_path / "bench-results").glob("*.json")).read_text())
    assert doc["benches"]["cache"]["error"] == "RuntimeError: unit 3: beyond float16's range"
    assert doc["benches"]["train"]["figure_s"] == 1.0
    seen.clear()
    monkeypatch.setattr(bench_run, "run_one", lambda name, ctx: seen.append(name) or header(name, ctx.p))
    assert hakd(["bench", "--results", str(tmp_path / "elsewhere"), "codecs", "profile=tiny", "device=cpu"]) == 0
    again = json.loads(next((tmp_path / "elsewhere").glob("*.json")).read_text())
    assert set(again["benches"]) == {"codecs"}
    assert not list((ROOT / "infra" / "bench").glob("bench-results"))


def test_provenance_takes_hakd_commit_only_where_git_names_no_clean_commit(monkeypatch, tmp_path):
    """A tree copied to the GPU machine: git there named another commit, dirty; HAKD_COMMIT names ours."""
    from infra import provenance
    monkeypatch.setenv("HAKD_COMMIT", "c0ffee")
    for git, want in (("abc", "abc"), ("abc-dirty", "c0ffee"), ("unknown", "c0ffee")):
        monkeypatch.setattr(provenance, "git_commit", lambda git=git: git)
        assert provenance.commit() == want
    monkeypatch.delenv("HAKD_COMMIT")
    assert provenance.commit() == "unknown"
    digest = provenance.source_digest()
    assert digest == provenance.source_digest() and len(digest) == 64
    monkeypatch.setattr(provenance, "ROOT", tmp_path)  # another tree: another digest
    (tmp_path / "infra").mkdir()
    (tmp_path / "infra" / "a.py").write_text("x = 1\n")
    assert provenance.source_digest() != digest


def test_drop_pages_takes_a_mapped_file_out_of_the_page_cache(tmp_path):
    from infra.bench.loader import drop_pages, resident
    path = tmp_path / "rows.bin"
    path.write_bytes(os.urandom(4 << 20))
    mapped = np.memmap(path, "uint8", mode="r")
    assert int(mapped.sum()) > 0 and resident(path) > 0.9  # read through the map, as FFCV reads
    assert drop_pages(path, [mapped]) < 0.05
    assert int(mapped.sum()) > 0 and resident(path) > 0.9  # the map still reads: from the disk now


def test_the_cold_loader_is_compared_with_the_newest_gpu_kd_step(tmp_path):
    from infra.bench.loader import kd_step_needs
    old = _doc("nvidia-h200", "2026-11-01T00:00:00", "a" * 40, 1.0,
               {"train": {"compiled_offline_kd_step_s": 0.04, "params": {"batch": 128}},
                "loader": {"params": {"row_kib": 442.5}}}, "gpu")
    new = _doc("nvidia-h200", "2026-11-02T00:00:00", "b" * 40, 1.0,
               {"train": {"compiled_offline_kd_step_s": 0.032, "params": {"batch": 128}}}, "gpu")
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    needs, source = kd_step_needs(types.SimpleNamespace(memo={}, results=tmp_path), 10.0)
    assert source == "new.json" and needs == pytest.approx(128 / 0.032 * 442.5 * 1024 / 1e6)
    needs, source = kd_step_needs(types.SimpleNamespace(memo={"compiled_kd_samples_s": 1000.0}, results=None), 10.0)
    assert needs == pytest.approx(1000 * 10 * 1024 / 1e6) and source == "this run's train bench"


@pytest.mark.slow
def test_analyze_rates_stop_at_the_budget_and_keep_what_they_measured(tmp_path, monkeypatch, one_thread):
    """Past analyze_budget_s no further measure starts, the line lists the skipped ones, and no model whose rates
    are missing gets a projection; with no budget, every measure of every architecture has its rate."""
    from infra.bench import analyze
    got = analyze.run(resolve_profile(["profile=tiny", "device=cpu"]), tmp_path)
    _check(got, "analyze")
    assert got["targets"] == {"speedup": ">= 1.6"}  # 1 vs 2 Ray workers, judged on CPUs
    assert set(got["rates_img_s"]) == {"vit_demo", "wrn_demo", "resnet_demo"} and set(got["rates_img_s"]["resnet_demo"]) \
        == {"accuracy", "fourier", "occlusion", "adversarial", "gradcam", "cka"}
    assert set(got["projected_s"]) == set(analyze.PROJECTION_MODELS) and got["projected_total_s"] > 0
    clock = iter(range(1000))  # each budget check is one second later: the first measure runs, the rest do not
    monkeypatch.setattr(analyze, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    got = analyze.run(resolve_profile(["profile=tiny", "device=cpu", "analyze_budget_s=1"]), tmp_path)
    assert got["rates_img_s"] == {"vit_demo": {"accuracy": got["rates_img_s"]["vit_demo"]["accuracy"]}}
    assert "vit_demo.fourier" in got["skipped_rates"] and "resnet_demo.cka" in got["skipped_rates"]
    assert got["projected_total_s"] is None and all(v is None for v in got["projected_s"].values())


@pytest.mark.slow
def test_calibration_brings_an_overflowing_random_teacher_into_float16_range(tmp_path):
    """Fresh BatchNorm statistics pass every conv's gain on in eval mode; with conv weights scaled up, the random
    wrn_demo's layer3 passes float16's 65,504, as random WRN-101's does at 224 px. Statistics measured on the
    images bring it back to a trained network's scale; Context saves that teacher."""
    import torch
    from infra.bench.common import Context, calibrate
    from teacher_cache.fit import build_teacher
    ctx = Context(resolve_profile(["profile=tiny", "device=cpu"]), tmp_path)
    torch.manual_seed(0)
    t = build_teacher(ctx.cfg, "teacher_cnn").eval()
    with torch.no_grad():
        for m in t.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(16)
    scales = calibrate(t, ctx.data()["images"][:16], ["layer3"], 8, "cpu")
    assert scales["batchnorm_layers"] > 0 and scales["max_abs_before"]["layer3"] > 65504
    assert scales["max_abs_after"]["layer3"] < 65504 / 64 and scales["max_abs_after"]["logits"] < 65504 / 64
    saved = ctx.teacher("teacher_cnn")  # the bench's own random teacher: calibrated before it is saved
    state = torch.load(ctx.out / "teachers" / "teacher_cnn.pt", weights_only=True)
    assert all(torch.equal(v, state[k]) for k, v in saved.state_dict().items())
    assert not torch.allclose(state["net.bn1.running_var"], torch.ones_like(state["net.bn1.running_var"]))
