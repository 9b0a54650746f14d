"""Spread over seeds, pinned independently: t-intervals and Welch differences against scipy, Holm against a
hand-worked example, intervals clipped to their quantity's range, and the cases that cannot be judged."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from analysis.stats import bounds, difference, holm, mean_tree, merge_runs, summarize

T_975 = {2: 4.302652729749464, 4: 2.7764451051977987}  # t quantiles, statistics tables


def test_t_interval_known_values():
    s = summarize([0.4, 0.5, 0.6])
    assert s["mean"] == pytest.approx(0.5) and s["std"] == pytest.approx(0.1) and s["n"] == 3
    half = T_975[2] * 0.1 / math.sqrt(3)
    assert s["ci95"] == pytest.approx([0.5 - half, 0.5 + half], rel=1e-9)


def test_interval_never_leaves_the_range():
    """2 seeds of the digits run gave [70.45, 116.46]; with 3 close to 100% the t-interval still overshoots."""
    s = summarize([0.99, 1.0, 0.97], "accuracy.clean")
    lo, hi = s["ci95"]
    raw = s["mean"] + T_975[2] * s["std"] / math.sqrt(3)
    assert raw > 1 and hi == 1.0 and 0 <= lo < s["mean"]
    corr = summarize([-0.95, -0.7, -0.99], "gradcam.rank_corr_teacher")
    assert corr["ci95"][0] == -1.0 and bounds("cka_initial") == (-1.0, 1.0)
    d = difference([0.99, 1.0, 0.97], [0.01, 0.0, 0.03], "accuracy.clean")
    assert d.ci95[1] <= 1.0 and d.p < 0.05


def test_fewer_than_three_runs_have_no_interval_and_no_test():
    assert summarize([0.7]) == {"values": [0.7], "mean": 0.7, "std": None, "ci95": None, "n": 1}
    two = summarize([0.9345 - 0.0256 / math.sqrt(2), 0.9345 + 0.0256 / math.sqrt(2)], "accuracy.clean")
    assert two["std"] == pytest.approx(0.0256) and two["ci95"] is None
    s = summarize([0.5, None, float("nan"), 0.7])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.6) and s["values"] == [0.5, None, None, 0.7]
    assert summarize([None])["mean"] is None
    d = difference([0.9, 0.8], [0.5, 0.6, 0.55])
    assert d.status == "too few runs" and d.ci95 is None and d.p is None and not d.separated
    assert difference([], [1.0]) is None


def test_zero_spread_is_not_separated():
    d = difference([0.5, 0.5, 0.5], [0.7, 0.7, 0.7])
    assert d.status == "no spread" and d.p is None and d.ci95 is None and not d.separated
    assert d.diff == pytest.approx(-0.2)


@pytest.mark.parametrize("a, b", [
    ([0.61, 0.72, 0.66, 0.69, 0.58], [0.70, 0.71, 0.705]),             # unequal sizes, unequal variances
    ([0.1, 0.4, 0.25], [0.3, 0.31, 0.32, 0.29, 0.33, 0.30, 0.28]),
    ([0.51, 0.55, 0.53, 0.52], [0.50, 0.49, 0.51]),
])
def test_welch_against_scipy(a, b):
    res = scipy_stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(0.95)
    d = difference(a, b)
    assert d.diff == pytest.approx(np.mean(a) - np.mean(b), abs=1e-12)
    assert d.ci95 == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert d.p == pytest.approx(res.pvalue, abs=1e-12) and d.status == "tested"
    assert d.separated == (ci.low > 0 or ci.high < 0)


def test_holm_hand_worked():
    # p = 0.01, 0.04, 0.03, 0.005 (m = 4). Sorted: 0.005, 0.01, 0.03, 0.04; times 4, 3, 2, 1: 0.02, 0.03, 0.06,
    # 0.04; running maximum: 0.02, 0.03, 0.06, 0.06. Back in the input order:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # untested comparisons are no part of the family, and adjusted values never exceed 1
    assert holm([None, 0.5, 0.4, None]) == [None, pytest.approx(0.8), pytest.approx(0.8), None]
    assert holm([0.6, 0.7]) == [pytest.approx(1.0), pytest.approx(1.0)]
    assert holm([]) == []


def test_mean_tree_keeps_axes_and_averages_values():
    runs = [{"radius": [0.1, 0.5], "low": [0.2, 0.4], "name": "x", "clean": 0.8},
            {"radius": [0.1, 0.5], "low": [0.4, None], "name": "x", "clean": 0.9}]
    assert mean_tree(runs) == {"radius": [0.1, 0.5], "low": [pytest.approx(0.3), 0.4], "name": "x",
                               "clean": pytest.approx(0.85)}


def test_merge_runs_gives_means_and_per_seed_stats():
    metrics = {"accuracy": {"teacher_vit": {"clean": 0.9}, **{f"student_kd_vit/seed{i}": {"clean": v}
                                                              for i, v in enumerate([0.6, 0.8, 0.7])}},
               "occlusion": {f"student_kd_vit/seed{i}": {"fraction": [0.0, 0.5], "accuracy": [a, b], "area": (a + b) / 2}
                             for i, (a, b) in enumerate([(0.6, 0.2), (0.8, 0.4), (0.7, 0.3)])},
               "gradcam": {f"student_kd_vit/seed{i}": {"entropy": 0.5 + i / 10, "maps": 10, "dropped": i,
                                                       "cue_conflict": {"entropy": 0.4}} for i in range(3)},
               "cka_initial": {"layer": "layer1", "teacher_layer": "blocks.0",
                               **{f"student_kd_vit/seed{i}": v for i, v in enumerate([0.5, 0.7, 0.6])}}}
    runs = {"teacher_vit": ("teacher_vit", None), **{f"student_kd_vit/seed{i}": ("student_kd_vit", i) for i in range(3)}}
    merged = merge_runs(metrics, runs)
    assert merged["seeds"] == [0, 1, 2]
    assert merged["accuracy"]["student_kd_vit"]["clean"] == pytest.approx(0.7)
    assert merged["occlusion"]["student_kd_vit"]["accuracy"] == pytest.approx([0.7, 0.3])
    assert merged["cka_initial"] == {"layer": "layer1", "teacher_layer": "blocks.0", "student_kd_vit": pytest.approx(0.6)}
    kd = merged["stats"]["student_kd_vit"]
    assert kd["accuracy.clean"]["values"] == [0.6, 0.8, 0.7] and kd["accuracy.clean"]["seeds"] == [0, 1, 2]
    assert kd["accuracy.clean"]["std"] == pytest.approx(0.1)
    assert kd["occlusion@0.5"]["mean"] == pytest.approx(0.3) and kd["cka_initial"]["n"] == 3
    assert kd["occlusion.area"]["mean"] == pytest.approx(0.5)
    assert kd["gradcam.dropped"]["values"] == [0, 1, 2] and kd["gradcam.cue_conflict.entropy"]["mean"] == pytest.approx(0.4)
    teacher = merged["stats"]["teacher_vit"]["accuracy.clean"]
    assert teacher["values"] == [0.9] and teacher["std"] is None and teacher["ci95"] is None


def test_occlusion_area_is_the_mean_accuracy_over_the_curve():
    from analysis.evaluate import occlusion_area
    # trapezoids over [0, 0.9]: (0.9+0.8)/2*0.1 + (0.8+0.4)/2*0.2 + (0.4+0.1)/2*0.6 = 0.085 + 0.12 + 0.15 = 0.355
    curve = {"fraction": [0.0, 0.1, 0.3, 0.9], "accuracy": [0.9, 0.8, 0.4, 0.1]}
    assert occlusion_area(curve) == pytest.approx(0.355 / 0.9)
    shuffled = {"fraction": [0.3, 0.0, 0.9, 0.1], "accuracy": [0.4, 0.9, 0.1, 0.8]}
    assert occlusion_area(shuffled) == pytest.approx(0.355 / 0.9)
    assert occlusion_area({"fraction": [0.4], "accuracy": [0.6]}) == pytest.approx(0.6)


def test_mean_tree_keeps_values_every_run_agrees_on_exact():
    """The mean of three equal floats can differ from them in the last bit (0.05 -> 0.05000000000000001), which
    split a curve table's columns by radius; an axis that every run shares is kept as it is."""
    import numpy as np
    from analysis.stats import mean_tree
    radii = [0.05, 0.1, 0.7]
    assert np.mean([0.05, 0.05, 0.05]) != 0.05 or np.mean([0.7, 0.7, 0.7]) != 0.7  # the rounding this guards
    merged = mean_tree([{"radius": radii, "low": [0.1, 0.2, 0.3]}, {"radius": radii, "low": [0.3, 0.2, 0.5]},
                        {"radius": radii, "low": [0.2, 0.2, 0.4]}])
    assert merged["radius"] == radii
    assert merged["low"][0] == pytest.approx(0.2) and merged["low"][1] == 0.2
