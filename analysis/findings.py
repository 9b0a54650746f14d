"""What the numbers say, as tables: warnings, the claim's verdicts, the paper's premise, and the findings.

Every comparison is between the per-seed values of two models and is made once, with its family's
Holm correction, in analysis/verdicts.py; here the comparisons become the report's blocks and the
`claim` and `premise` records of metrics.json.
"""
from __future__ import annotations

import math

from analysis.document import Para, Table
from analysis.plots import style
from analysis.quantities import FRACTION, PERCENT, digits_of, fmt, fmt_diff, fmt_stat, shown
from analysis.stats import MIN_RUNS
from analysis.verdicts import (CONTROL, CRITERIA, EXPLORATORY_TEXT, INDEPENDENT, OCCLUSION_AREA, PRIMARY, Comparison,
                               chance, claim_verdict, mean, occlusion_label, stat)

TEACHERS = ("teacher_vit", "teacher_cnn")
# a teacher whose clean accuracy is less than this share of the way from chance to 100% gets a warning: it has learned little
NEAR_CHANCE_SHARE = 1 / 3
PREMISE_MEASURES = [("accuracy.clean", "clean accuracy", PERCENT), ("shape_bias", "shape bias", FRACTION),
                    ("low_frequency_reliance", "low-frequency reliance", FRACTION)]


def warnings(metrics: dict) -> list[str]:
    """Lines for the top of the report: teachers near chance, or no better than the independent student."""
    out, floor = [], chance(metrics)
    independent = stat(metrics, INDEPENDENT, "accuracy.clean")
    for teacher in TEACHERS:
        t = stat(metrics, teacher, "accuracy.clean")
        if t is None or not math.isfinite(mean(t)):
            continue
        name = style(teacher).display
        if floor is not None and mean(t) < floor + NEAR_CHANCE_SHARE * (1 - floor):
            out.append(f"Warning: the {name}'s clean accuracy ({fmt(mean(t), PERCENT)}) is less than a third of "
                       f"the way from chance ({fmt(floor, PERCENT)}) to 100%: it has learned little of this task, so "
                       f"its students say little about the paper's claim.")
        if independent is not None and math.isfinite(mean(independent)) and mean(t) <= mean(independent):
            out.append(f"Warning: the {name} ({fmt(mean(t), PERCENT)} clean) is not better than the independent "
                       f"student ({fmt_stat(independent, PERCENT)}): distilling from it cannot be expected to help.")
    return out


def spread_note(metrics: dict) -> str:
    seeds = metrics.get("seeds") or []
    if len(seeds) >= MIN_RUNS:
        return (f"Students: mean ± standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}) "
                f"[95% t-interval of the mean, clipped to the quantity's range], the mean to the digit of the "
                f"standard deviation's first figure. Teachers are one run each: no spread.")
    if len(seeds) > 1:
        return (f"Students: mean ± standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}). "
                f"With fewer than {MIN_RUNS} seeds the spread cannot be judged: no interval and no test is given.")
    return "One run per model: no spread over seeds, so no difference can be judged."


def _p(p: float | None) -> str:
    if p is None:
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _difference(c: Comparison) -> str:
    """'+3 points [1, 5]' to the digit of the difference's standard error; the bare difference when not tested."""
    d = c.diff
    if d is None:
        return "—"
    if d.ci95 is None:
        return fmt_diff(d.diff, c.scale)
    digits = digits_of(d.se, c.scale)
    lo, hi = (fmt(x, c.scale, suffix=False, digits=digits) for x in d.ci95)
    return f"{fmt_diff(d.diff, c.scale, d.se)} [{lo}, {hi}]"


# ---- the claim's verdicts ----

def verdict_blocks(metrics: dict, rows: list[Comparison]) -> list:
    """The verdicts table: one row per criterion of the claim (KD student against the control student)."""
    by_key = {(r.measure, r.other): r for r in rows}
    table = []
    for key, what, measure in CRITERIA:
        label = {"shape_bias": "shape bias on cue-conflict images", "low_frequency": "low-frequency reliance",
                 "occlusion": occlusion_label(metrics).replace("Accuracy on", "accuracy on")}[key]
        entries = [(label, by_key.get((measure, CONTROL)), True)]
        if key == "occlusion":
            entries.append(("beside it: mean accuracy over the occlusion curve", by_key.get((OCCLUSION_AREA, CONTROL)),
                            False))
        for text, c, primary in entries:
            if c is None:
                table.append([what if primary else "", text, "—", "—", "—", "not measured"])
                continue
            verdict = claim_verdict(c) if primary else f"{c.verdict()} (exploratory)"
            table.append([what if primary else "", text, f"{fmt_stat(c.a, c.scale, table=True)} vs "
                          f"{fmt_stat(c.b, c.scale, table=True)}", _difference(c), _p(c.p_holm), verdict])
    return [Table(["The ViT-taught student is…", "measure", "KD student vs control", "difference [95% interval]",
                   "p (Holm)", "verdict"], table),
            Para("Primary tests: Welch's t-test over seeds, Holm-corrected within the claim's tests; a verdict needs "
                 "p (Holm) < 0.05. *at chance*: both students within the binomial 95% interval of a guessing model "
                 "for the test set's size. " + spread_note(metrics))]


def claim_sentence(metrics: dict, rows: list[Comparison]) -> str:
    by_key = {(r.measure, r.other): r for r in rows}
    parts = [f"{what}: {claim_verdict(by_key.get((measure, CONTROL)))}" for _, what, measure in CRITERIA]
    return ("The paper's claim, that the ViT-taught student is more shape-biased, more reliant on low frequencies "
            "and more robust to occlusion than the CNN-taught one, on this data: " + "; ".join(parts) + ".")


# ---- findings: every other comparison ----

def findings_table(metrics: dict, rows: list[Comparison]) -> list:
    """The exploratory comparisons as one table, the claim's measures first."""
    body = []
    for c in rows:
        if c.family == PRIMARY:
            continue
        body.append([c.label, fmt_stat(c.a, c.scale, table=True), style(c.other).display,
                     fmt_stat(c.b, c.scale, table=True), _difference(c), _p(c.p_holm), c.verdict()])
    if not body:
        return [Para("No exploratory comparison could be made (the KD student, or every model it is compared with, "
                     "was not measured).")]
    return [Table(["measure", "KD student", "compared with", "its value", "difference [95% interval]", "p (Holm)",
                   "KD student is"], body),
            Para(f"Exploratory: {EXPLORATORY_TEXT}. A row names a difference only where p (Holm) < 0.05."
                 f" The claim's own tests are in the verdicts above.")]


# ---- the premise: head and features of each teacher ----

def _head(metrics: dict, teacher: str) -> dict:
    values = {"accuracy.clean": mean(stat(metrics, teacher, "accuracy.clean")),
              "shape_bias": mean(stat(metrics, teacher, "shape_bias")),
              "low_frequency_reliance": mean(stat(metrics, teacher, "fourier.low_frequency_reliance"))}
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


def _holds(vit: dict | None, cnn: dict | None, key: str) -> bool | None:
    if not vit or not cnn or vit.get(key) is None or cnn.get(key) is None:
        return None
    return shown(vit[key], FRACTION) > shown(cnn[key], FRACTION)


def premise_record(metrics: dict) -> dict:
    """metrics["premise"]: per teacher what it was trained on, its head's and its features' (a linear probe on
    the cached features) figures, and whether the premise holds on each."""
    probe = metrics.get("probe") or {}
    training = metrics.get("meta", {}).get("teacher_training") or {}
    out = {t: {"trained_on": training.get(t), "head": _head(metrics, t), "features": probe.get(t)}
           for t in TEACHERS if t in (metrics.get("accuracy") or {}) or t in probe}
    vit, cnn = out.get("teacher_vit"), out.get("teacher_cnn")
    for on in ("head", "features"):
        out[f"holds_on_{on}"] = {k: _holds((vit or {}).get(on), (cnn or {}).get(on), k)
                                 for k in ("shape_bias", "low_frequency_reliance")}
    out["claim_depends_on"] = "features"
    return out


def premise_blocks(metrics: dict, record: dict) -> list:
    dataset = metrics.get("meta", {}).get("dataset", "this dataset")
    blocks = [Para("The paper's claim assumes that the ViT teacher relies more on shape and on low spatial frequencies "
                   "than the CNN teacher. The students distil the teachers' features, not their classifier heads, so "
                   "the claim depends on the features: below, each teacher's own head, and a linear probe fitted on "
                   "the features the students receive (the cached training views, pooled over tokens or positions), "
                   "measured the same way. Each teacher is one run: no spread.")]
    rows = []
    for t in TEACHERS:
        if t not in record:
            continue
        for on, what in (("head", "its head"), ("features", "its features (linear probe)")):
            values = record[t][on]
            rows.append([style(t).display, what, *(fmt((values or {}).get(k), scale) for k, _, scale in PREMISE_MEASURES)])
    if rows:
        blocks.append(Table(["teacher", "measured on", *(name for _, name, _ in PREMISE_MEASURES)], rows))
    if not any(record.get(t, {}).get("head", {}).get("shape_bias") is not None for t in TEACHERS):
        blocks.append(Para(_shape_bias_absent(metrics, dataset)))
    for on, what in (("features", "On the features (what the claim depends on)"), ("head", "On the heads")):
        holds = record[f"holds_on_{on}"]
        parts = [f"{name} {'as' if ok else 'not as'} the premise assumes"
                 for key, name in (("shape_bias", "shape bias"), ("low_frequency_reliance", "low-frequency reliance"))
                 if (ok := holds.get(key)) is not None]
        if parts:
            verdict = "the premise holds" if all(holds[k] for k in holds if holds[k] is not None) else \
                "the premise does not hold"
            blocks.append(Para(f"{what}: {'; '.join(parts)}: {verdict}."))
    if record.get("holds_on_features", {}).get("shape_bias") is False:
        blocks.append(Para("The findings below test the claim with teachers whose features lack the property it is "
                           "about."))
    trained = {t: record[t]["trained_on"] for t in TEACHERS if t in record and record[t]["trained_on"]}
    if len(set(trained.values())) > 1:
        blocks.append(Para("The teachers were trained on different data: " + "; ".join(
            f"the {style(t).display} {text}" for t, text in trained.items()) + ". A gap between them is partly this "
            "training-data difference, not only the architectures'."))
    return blocks


def _shape_bias_absent(metrics: dict, dataset: str) -> str:
    note = metrics.get("meta", {}).get("shape_bias_note")
    if note:
        return f"Shape bias on {dataset}: {note}."
    return (f"Shape bias is not measured on {dataset}: it needs cue-conflict images, whose texture labels are "
            f"class labels.")
