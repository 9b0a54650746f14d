"""Spread over seeds: t-intervals and Welch differences against known values, and merging runs into models."""
import math

import pytest

from analysis.stats import difference, mean_tree, merge_runs, summarize

T_975 = {1: 12.706204736174698, 2: 4.302652729749464, 4: 2.7764451051977987}  # t quantiles, statistics tables


def test_t_interval_known_values():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0) and s["n"] == 3
    half = T_975[2] / math.sqrt(3)
    assert s["ci95"] == pytest.approx([2.0 - half, 2.0 + half], rel=1e-9)
    s = summarize([0.0, 1.0])
    assert s["ci95"] == pytest.approx([0.5 - T_975[1] * 0.5, 0.5 + T_975[1] * 0.5], rel=1e-9)


def test_one_run_has_no_spread_and_missing_values_are_left_out():
    assert summarize([0.7]) == {"values": [0.7], "mean": 0.7, "std": None, "ci95": None, "n": 1}
    s = summarize([0.5, None, float("nan"), 0.7])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.6) and s["values"] == [0.5, None, None, 0.7]
    assert summarize([None])["mean"] is None


def test_welch_difference_known_values():
    d = difference([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])  # equal variances 1/3 each: df = 4, se = sqrt(2/3)
    half = T_975[4] * math.sqrt(2 / 3)
    assert d.diff == -3.0 and d.ci95 == pytest.approx((-3.0 - half, -3.0 + half), rel=1e-9)
    assert d.separated and d.p == pytest.approx(0.02131, abs=1e-4)  # t = 3.674 on 4 df
    close = difference([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
    assert not close.separated and close.ci95[0] < 0 < close.ci95[1]
    single = difference([0.9], [0.5, 0.6])
    assert single.ci95 is None and not single.separated  # a teacher's one run: no claim
    assert difference([], [1.0]) is None


def test_mean_tree_keeps_axes_and_averages_values():
    runs = [{"radius": [0.1, 0.5], "low": [0.2, 0.4], "name": "x", "clean": 0.8},
            {"radius": [0.1, 0.5], "low": [0.4, None], "name": "x", "clean": 0.9}]
    assert mean_tree(runs) == {"radius": [0.1, 0.5], "low": [pytest.approx(0.3), 0.4], "name": "x",
                               "clean": pytest.approx(0.85)}


def test_merge_runs_gives_means_and_per_seed_stats():
    metrics = {"accuracy": {"teacher_vit": {"clean": 0.9}, "student_kd_vit/seed0": {"clean": 0.6},
                            "student_kd_vit/seed1": {"clean": 0.8}},
               "occlusion": {"student_kd_vit/seed0": {"fraction": [0.0, 0.5], "accuracy": [0.6, 0.2]},
                             "student_kd_vit/seed1": {"fraction": [0.0, 0.5], "accuracy": [0.8, 0.4]}},
               "cka_initial": {"layer": "layer1", "teacher_layer": "blocks.0", "student_kd_vit/seed0": 0.5,
                               "student_kd_vit/seed1": 0.7}}
    runs = {"teacher_vit": ("teacher_vit", None), "student_kd_vit/seed0": ("student_kd_vit", 0),
            "student_kd_vit/seed1": ("student_kd_vit", 1)}
    merged = merge_runs(metrics, runs)
    assert merged["seeds"] == [0, 1]
    assert merged["accuracy"]["student_kd_vit"]["clean"] == pytest.approx(0.7)
    assert merged["occlusion"]["student_kd_vit"]["accuracy"] == pytest.approx([0.7, 0.3])
    assert merged["cka_initial"] == {"layer": "layer1", "teacher_layer": "blocks.0", "student_kd_vit": pytest.approx(0.6)}
    kd = merged["stats"]["student_kd_vit"]
    assert kd["accuracy.clean"]["values"] == [0.6, 0.8] and kd["accuracy.clean"]["seeds"] == [0, 1]
    assert kd["accuracy.clean"]["std"] == pytest.approx(math.sqrt(0.02))
    assert kd["occlusion@0.5"]["mean"] == pytest.approx(0.3) and kd["cka_initial"]["n"] == 2
    teacher = merged["stats"]["teacher_vit"]["accuracy.clean"]
    assert teacher["values"] == [0.9] and teacher["std"] is None and teacher["ci95"] is None
