"""`hakd compare A B`: the same models in two finished runs, measure by measure, over their seeds.

Two runs that differ in one setting (a feature codec against float16, fewer views against more) answer
whether the setting changed what the students learned: for each model in both reports and each
measure, the difference of the means (A - B) and its Welch 95% interval over the seeds
(analysis/stats.py `difference`). An interval that contains 0 means the runs cannot tell the two
settings apart at this many seeds; it is not proof that they are equal, and its width says how large a
difference could still hide. Intervals are per measure, uncorrected: this answers "did anything move",
for which a missed difference is the costly error.
"""
from __future__ import annotations

import json
from pathlib import Path

from analysis.stats import difference
from infra.errors import UserError

# clean accuracy and the paper's three treatments (analysis/verdicts.py judges the claim on them)
MEASURES = ("accuracy.clean", "shape_bias", "fourier.low_frequency_reliance", "accuracy.occluded")


def load_metrics(out: str | Path) -> dict:
    path = Path(out) / "report" / "metrics.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: run `hakd analyze --out {out}` first (or name a finished run's --out)")
    return json.loads(path.read_text())


def compare(a: dict, b: dict, models: list[str] | None = None, measures: tuple[str, ...] = MEASURES) -> list[dict]:
    """One row per (model, measure) present in both runs' stats: means, difference, interval, status."""
    shared = [m for m in a.get("stats", {}) if m in b.get("stats", {})]
    rows = []
    for model in (models or shared):
        for measure in measures:
            sa, sb = a["stats"].get(model, {}).get(measure), b["stats"].get(model, {}).get(measure)
            if not sa or not sb:
                continue
            d = difference(sa["values"], sb["values"], measure)
            if d is None:
                continue
            rows.append({"model": model, "measure": measure, "a": sa["mean"], "b": sb["mean"],
                         "n": [len(sa["values"]), len(sb["values"])], "diff": d.diff,
                         "ci95": list(d.ci95) if d.ci95 else None, "status": d.status,
                         "contains_zero": None if d.ci95 is None else d.ci95[0] <= 0 <= d.ci95[1]})
    return rows


def render(rows: list[dict], a: str, b: str) -> str:
    lines = [f"A = {a}", f"B = {b}", "",
             f"{'model':<28} {'measure':<32} {'A':>8} {'B':>8} {'A - B':>8}  {'95% interval':<18} verdict"]
    for r in rows:
        ci = f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]" if r["ci95"] else "-"
        verdict = {True: "no detectable difference", False: "differ"}.get(r["contains_zero"], r["status"])
        lines.append(f"{r['model']:<28} {r['measure']:<32} {r['a']:>8.4f} {r['b']:>8.4f} {r['diff']:>+8.4f}  "
                     f"{ci:<18} {verdict}")
    if not rows:
        lines.append("(no model has these measures in both runs)")
    return "\n".join(lines)
