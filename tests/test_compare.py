"""`hakd compare A B`: per model and measure, A - B over the seeds with its Welch interval (fast, synthetic runs)."""
from __future__ import annotations

import json

import pytest
from scipy import stats as scipy_stats

from analysis.compare import compare
from infra.cli import main as cli_main


def _metrics(values: dict[str, dict[str, list[float]]]) -> dict:
    return {"stats": {model: {m: {"values": v, "mean": sum(v) / len(v)} for m, v in measures.items()}
                      for model, measures in values.items()}}


def test_compare_matches_welch_and_says_whether_zero_is_inside():
    a = _metrics({"student_kd_vit": {"accuracy.clean": [0.80, 0.82, 0.81], "shape_bias": [0.30, 0.31, 0.29]}})
    b = _metrics({"student_kd_vit": {"accuracy.clean": [0.81, 0.80, 0.83], "shape_bias": [0.10, 0.12, 0.11]},
                  "student_independent": {"accuracy.clean": [0.5, 0.6, 0.7]}})
    rows = {r["measure"]: r for r in compare(a, b)}
    assert set(rows) == {"accuracy.clean", "shape_bias"}  # only models and measures both runs have
    want = scipy_stats.ttest_ind([0.30, 0.31, 0.29], [0.10, 0.12, 0.11], equal_var=False).confidence_interval()
    assert rows["shape_bias"]["ci95"] == pytest.approx([want.low, want.high])
    assert rows["shape_bias"]["contains_zero"] is False
    assert rows["accuracy.clean"]["contains_zero"] is True


def test_compare_cli_reads_two_runs_and_names_a_missing_report(tmp_path, capsys):
    for name, v in (("a", [0.8, 0.82, 0.81]), ("b", [0.7, 0.72, 0.71])):
        (tmp_path / name / "report").mkdir(parents=True)
        (tmp_path / name / "report" / "metrics.json").write_text(
            json.dumps(_metrics({"student_kd_vit": {"accuracy.clean": v}})))
    assert cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["diff"] == pytest.approx(0.1) and row["contains_zero"] is False
    assert cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert "metrics.json is missing" in capsys.readouterr().err
