"""Spread over seeds: per-run metrics merged into means, per-measure statistics, and two-model tests.

Every student is trained once per seed (`train.seeds`); the analysis measures each run. Here the
runs of one model become (a) one metrics entry of the usual shape holding the mean over runs (so
that curves and matrices plot as before) and (b) `stats[model][measure]`: the per-seed values,
their mean, standard deviation (n - 1 in the denominator) and the 95% t-interval of the mean.

- An interval never leaves the range its quantity can take (`bounds`: accuracies and shape bias in
  [0, 1], a rank correlation or CKA in [-1, 1]): the t-interval is clipped to it. Each seed's value is
  already a proportion over the whole test set; what varies is the training run, so the interval is
  over runs (a t-interval), and an interval for one binomial proportion would not describe it.
- With fewer than MIN_RUNS runs there is no interval: a t-interval on one degree of freedom is wider than
  most quantities' range, so the report says the spread cannot be judged instead.
- Two models are compared by Welch's t-test (`difference`); a comparison whose runs all gave the same
  value on both sides has no spread and is not judged. Many comparisons are made per report, so their
  p-values are Holm-corrected (`holm`) within each family (analysis/verdicts.py names the families).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
MIN_RUNS = 3  # fewer runs than this: no interval, no test
# sections of metrics.json holding one entry per model
MODEL_SECTIONS = ("accuracy", "fourier", "occlusion", "adversarial", "gradcam", "shape_bias", "cka")


def bounds(measure: str) -> tuple[float, float]:
    """The range a measure's values can take (analysis/evaluate.py's measures, named as in `scalar_measures`)."""
    if measure in ("cka_initial", "gradcam.rank_corr_teacher", "gradcam.cue_conflict.rank_corr_teacher"):
        return -1.0, 1.0  # debiased CKA and Spearman correlations can be negative
    if measure.startswith("gradcam.") and measure.endswith(("maps", "dropped")):
        return 0.0, math.inf  # counts of maps
    return 0.0, 1.0  # accuracies, reliances, shape bias, GradCAM spreads: fractions


def _finite(values) -> np.ndarray:
    a = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    return a[np.isfinite(a)]


def _clip(interval: tuple[float, float], lo: float, hi: float) -> list[float]:
    return [min(max(interval[0], lo), hi), min(max(interval[1], lo), hi)]


def summarize(values: list, measure: str | None = None) -> dict:
    """{"values", "mean", "std", "ci95": [lo, hi], "n"} of one measure over runs; None/NaN values are left out.

    std is None for fewer than two finite values (a single run has no spread); ci95 is None for fewer
    than MIN_RUNS, and otherwise clipped to the measure's `bounds` ([0, 1] when no measure is named).
    """
    a = _finite(values)
    n = len(a)
    out = {"values": [None if v is None or not math.isfinite(v) else float(v) for v in values],
           "mean": float(a.mean()) if n else None, "std": None, "ci95": None, "n": n}
    if n >= 2:
        out["std"] = float(a.std(ddof=1))
    if n >= MIN_RUNS:
        half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * out["std"] / math.sqrt(n)
        out["ci95"] = _clip((out["mean"] - half, out["mean"] + half), *bounds(measure or ""))
    return out


class Difference(NamedTuple):
    diff: float                          # mean(a) - mean(b)
    ci95: tuple[float, float] | None     # Welch 95% interval of the difference, clipped to what a difference can be
    p: float | None                      # Welch t-test two-sided p-value (uncorrected); None when not tested
    status: str                          # "tested", "too few runs" (fewer than MIN_RUNS a side), "no spread"
    se: float | None = None              # standard error of the difference (what it is rounded to)

    @property
    def separated(self) -> bool:
        """Uncorrected: the 95% interval excludes 0 (the corrected decision is the family's, see `holm`)."""
        return self.p is not None and self.p < ALPHA


def difference(a: list, b: list, measure: str | None = None) -> Difference | None:
    """Welch comparison of two models' per-seed values; None when either has no finite value.

    Fewer than MIN_RUNS runs on either side: not tested ("too few runs"). Both sides without spread
    (every run of each model gave the same value): not tested ("no spread"), whatever the means.
    """
    x, y = _finite(a), _finite(b)
    if not len(x) or not len(y):
        return None
    diff = float(x.mean() - y.mean())
    if len(x) < MIN_RUNS or len(y) < MIN_RUNS:
        return Difference(diff, None, None, "too few runs")
    if x.min() == x.max() and y.min() == y.max():  # (not var == 0: the mean of equal floats may not be one of them)
        return Difference(diff, None, None, "no spread")
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(x) - 1) + vb ** 2 / (len(y) - 1))  # Welch-Satterthwaite
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, df)) * se
    p = float(scipy_stats.ttest_ind(x, y, equal_var=False).pvalue)
    lo, hi = bounds(measure or "")
    return Difference(diff, tuple(_clip((diff - half, diff + half), lo - hi, hi - lo)), p, "tested", se)


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order; None (not tested) stays None.

    The k-th smallest of m p-values is multiplied by (m - k + 1), then made non-decreasing and capped
    at 1; rejecting where the adjusted p < ALPHA keeps the family-wise error rate at ALPHA.
    """
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m, out, running = len(tested), list(pvalues), 0.0
    for k, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - k) * p))
        out[i] = running
    return out


def scalar_measures(metrics: dict, model: str) -> dict[str, float]:
    """The scalar measures of one model in one run's metrics, by name ("accuracy.clean", "occlusion@0.5", ...)."""
    out: dict[str, float] = {}
    for variant, acc in (metrics.get("accuracy", {}).get(model) or {}).items():
        out[f"accuracy.{variant}"] = acc
    fourier = metrics.get("fourier", {}).get(model) or {}
    for key in ("low_frequency_reliance", "high_frequency_reliance"):
        if key in fourier:
            out[f"fourier.{key}"] = fourier[key]
    occlusion = metrics.get("occlusion", {}).get(model) or {}
    for x, y in zip(occlusion.get("fraction", []), occlusion.get("accuracy", [])):
        out[f"occlusion@{x:g}"] = y
    if "area" in occlusion:
        out["occlusion.area"] = occlusion["area"]
    for attack, curve in (metrics.get("adversarial", {}).get(model) or {}).items():
        for x, y in zip(curve.get("eps", []), curve.get("accuracy", [])):
            out[f"adversarial.{attack}@{x:g}"] = y
    for key, value in (metrics.get("gradcam", {}).get(model) or {}).items():
        if isinstance(value, dict):  # a secondary pass, e.g. "cue_conflict"
            out.update({f"gradcam.{key}.{k}": v for k, v in value.items() if isinstance(v, (int, float)) or v is None})
        elif isinstance(value, (int, float)) or value is None:
            out[f"gradcam.{key}"] = value
    shape = metrics.get("shape_bias", {}).get(model) or {}
    if "shape_bias" in shape:
        out["shape_bias"] = shape["shape_bias"]
    initial = metrics.get("cka_initial") or {}
    if model in initial:
        out["cka_initial"] = initial[model]
    return out


def mean_tree(trees: list):
    """Element-wise mean of equally shaped nested dicts/lists of numbers; strings and axes are kept.

    Lists of numbers that are equal in every run (radii, fractions, eps) stay as they are; a value
    missing (None/NaN) in a run is left out of its mean.
    """
    first = trees[0]
    if isinstance(first, dict):
        return {k: mean_tree([t[k] for t in trees if isinstance(t, dict) and k in t]) for k in first}
    if isinstance(first, (list, tuple)):
        if len({len(t) for t in trees}) != 1:
            raise ValueError("runs disagree on the length of a list; they were measured with different settings")
        return [mean_tree([t[i] for t in trees]) for i in range(len(first))]
    if isinstance(first, bool) or not isinstance(first, (int, float)) and first is not None:
        return first
    a = _finite(trees)
    if len(a) and a.min() == a.max():  # an axis (radius, fraction, eps) or a value every run agrees on: kept exact,
        return float(a[0])             # since the mean of equal floats can differ from them in the last bit
    return float(a.mean()) if len(a) else None


def merge_runs(metrics: dict, runs: dict[str, tuple[str, int | None]]) -> dict:
    """Replace per-run entries by per-model means; add `stats` (per model and measure) and `seeds`.

    metrics: sections keyed by run name (e.g. "student_kd_vit/seed1"; cka_initial too). runs: run
    name -> (model key, seed; None for a teacher). Returns metrics with model keys in place of runs.
    """
    by_model: dict[str, list[str]] = {}
    for run, (model, _) in runs.items():
        by_model.setdefault(model, []).append(run)
    stats: dict[str, dict] = {}
    for model, rs in by_model.items():
        per_run = [scalar_measures(metrics, r) for r in rs]
        names = list(dict.fromkeys(k for m in per_run for k in m))
        stats[model] = {k: {**summarize([m.get(k) for m in per_run], k), "seeds": [runs[r][1] for r in rs]}
                        for k in names}
    for section in MODEL_SECTIONS:
        entries = metrics.get(section)
        if entries:
            metrics[section] = {model: mean_tree([entries[r] for r in rs if r in entries])
                                for model, rs in by_model.items() if any(r in entries for r in rs)}
    initial = metrics.get("cka_initial")
    if initial:
        metrics["cka_initial"] = {**{k: v for k, v in initial.items() if k not in runs},
                                  **{model: s["cka_initial"]["mean"] for model, s in stats.items()
                                     if "cka_initial" in s}}
    metrics["stats"] = stats
    metrics["seeds"] = sorted({seed for _, seed in runs.values() if seed is not None})
    return metrics
