"""A sweep in the report: the metrics seen one grid point at a time, and each measure against the swept value.

With a sweep, each grid point of a student is a model of its own, "<student>@<key>=<value>" (the swept keys
it reads). A view of one point names that point's students plainly, so Table 1 and the findings read as for
a single run.
"""
from __future__ import annotations

import itertools
from pathlib import Path

from analysis import plots
from analysis.document import Heading, Image, Para, Table
from analysis.findings import spread_note
from analysis.verdicts import stat
from analysis.plots import order_models, style
from analysis.quantities import FRACTION, PERCENT, fmt_stat
from analysis.stats import MODEL_SECTIONS


def _within(label: str, point: str) -> bool:
    """Whether a model's grid label is part of the grid point: a student labels its models with only the
    swept keys it reads (student_train/sweep.py), so one model may stand in several grid points."""
    return set(label.split(",")) <= set(point.split(","))


def points(metrics: dict) -> list[tuple[str, dict]]:
    """[(grid label, metrics with that point's students under their plain names)]; [("", metrics)] without a sweep.

    The grid points combine the swept values of every key that some model's label names (meta.sweep gives them
    in order), so a model of a student that reads fewer keys stands in several points.
    """
    meta = metrics.get("meta", {})
    labels = list(dict.fromkeys(m.split("@", 1)[1] for m in meta.get("models", []) if "@" in m))
    if not labels:
        return [("", metrics)]
    named = {pair.split("=", 1)[0] for label in labels for pair in label.split(",")}
    swept = {k: v for k, v in (meta.get("sweep") or {}).items() if k.split(".")[-1] in named}
    full = [",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(swept, values))
            for values in itertools.product(*swept.values())]
    return [(label, _view(metrics, label)) for label in full or labels]


def _view(metrics: dict, label: str) -> dict:
    def pick(section: dict) -> dict:
        return {(k.split("@", 1)[0]): v for k, v in section.items() if "@" not in k or _within(k.split("@", 1)[1], label)}
    view = dict(metrics)
    for key in (*MODEL_SECTIONS, "stats", "cka_initial"):
        if isinstance(metrics.get(key), dict):
            view[key] = pick(metrics[key])
    meta = dict(metrics.get("meta", {}))
    meta["models"] = list(pick({m: None for m in meta.get("models", [])}))
    view["meta"] = meta
    return view


SWEEP_MEASURES = [("accuracy.clean", "clean accuracy", PERCENT), ("fourier.low_frequency_reliance",
                  "low-frequency reliance", FRACTION), ("shape_bias", "shape bias", FRACTION),
                  ("gradcam.entropy", "GradCAM entropy", FRACTION), ("cka_initial", "initial-layer CKA", FRACTION)]


def sweep_section(metrics: dict, out: Path) -> tuple[list, dict]:
    """A table (rows: student × grid point) and a plot of each measure against the swept value."""
    sweep = metrics.get("meta", {}).get("sweep") or {}
    views = dict(points(metrics))
    labels = list(views)
    students = order_models(m.split("@", 1)[0] for m in metrics.get("meta", {}).get("models", []) if "@" in m)
    measures = [(k, name, scale) for k, name, scale in SWEEP_MEASURES
                if any(stat(views[p], s, k) for s in students for p in labels)]
    for key, name in (("accuracy.occluded", "accuracy, occluded variant"), ("occlusion.area", "occlusion curve, mean")):
        if any(stat(views[p], s, key) for s in students for p in labels):  # the claim's occlusion measure, its area
            measures.append((key, name, PERCENT))
    rows = [[style(s).display, p, *(fmt_stat(stat(views[p], s, k), scale, table=True) for k, _, scale in measures)]
            for s in students for p in labels]
    series = {s: {k: [stat(views[p], s, k) for p in labels] for k, _, _ in measures} for s in students}
    (key, values), = sweep.items() if len(sweep) == 1 else ((None, None),)
    numeric = key is not None and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    path = plots.plot_sweep(series, labels, [(k, f"{name}{' (%)' if scale is PERCENT else ''}", scale.factor)
                                             for k, name, scale in measures], out / "sweep.png",
                            swept=(key, list(values)) if numeric and len(values) == len(labels) else None)
    keys = ", ".join(f"{k} ∈ {{{', '.join(map(str, v))}}}" for k, v in sweep.items())
    return [Heading(2, "Sweep"), Para(f"Swept: {keys}. Every grid point trains, once per seed, each student whose "
                                      f"training the swept keys change, from the same caches and packed file; a "
                                      f"student they do not change (the independent one under a KD weight) is "
                                      f"trained once per seed and stands in every grid point. " + spread_note(metrics)),
            Table(["Student", "grid point", *(name for _, name, _ in measures)], rows),
            Image(path, "Each measure against the swept value (mean ± standard deviation over seeds)")], {"plot_sweep": path}
