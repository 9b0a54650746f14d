"""Every comparison the report makes, its family, its Holm-corrected decision, and the claim's verdicts.

The paper claims that the ViT-taught student is more shape-biased, more reliant on low frequencies
and more robust to occlusion than the CNN-taught one. Those tests (KD-ViT against the control
student, on shape bias where cue-conflict data exist, low-frequency reliance, and accuracy on the
`occluded` variant: the paper's treatment, 40% of the image) are the primary family; every other
comparison of the KD student (with the independent and logit-KD students, on every measure, and the
area under the occlusion curve) is exploratory. Holm's correction runs within each family apart
(analysis/stats.py `holm`), so a primary verdict is not diluted by the exploratory tests and the
exploratory ones do not produce a chance "separation" in every report.

No test is made where it cannot be judged: fewer than 3 runs a side, no spread on either side, or
(for accuracies) both models within the binomial 95% interval of chance for the test set's size.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from scipy import stats as scipy_stats

from analysis.quantities import FRACTION, PERCENT, Scale, eps_text
from analysis.stats import ALPHA, Difference, difference, holm, scalar_measures, summarize

KD, CONTROL, INDEPENDENT, LOGIT_KD = "student_kd_vit", "student_kd_cnn", "student_independent", "student_logit_kd"
COMPARED = [CONTROL, INDEPENDENT, LOGIT_KD]  # what the KD student is compared with
PRIMARY, EXPLORATORY = "primary", "exploratory"
PRIMARY_TEXT = ("the primary family is the claim's tests (the KD student against the control student on shape bias, "
                "low-frequency reliance and accuracy on the occluded variant, those measured)")
EXPLORATORY_TEXT = "every other comparison is exploratory, Holm-corrected across all of them"
CORRECTION = f"Holm (1979) within each family: {PRIMARY_TEXT}; {EXPLORATORY_TEXT}"  # metrics.json meta.correction
# (key, what the paper claims, measure): the occlusion measure is the variant as made, the paper's treatment
CRITERIA = [("shape_bias", "more shape-biased", "shape_bias"),
            ("low_frequency", "more reliant on low frequencies", "fourier.low_frequency_reliance"),
            ("occlusion", "more robust to occlusion", "accuracy.occluded")]
OCCLUSION_AREA = "occlusion.area"


class Comparison(NamedTuple):
    family: str                  # PRIMARY | EXPLORATORY
    measure: str
    label: str
    scale: Scale
    subject: str
    other: str
    a: dict                      # the subject's statistics (analysis/stats.py summarize)
    b: dict
    diff: Difference | None
    at_chance: bool              # both models within (or below) the chance interval: no verdict
    p_holm: float | None         # Holm-adjusted within the family; None when not tested

    @property
    def tested(self) -> bool:
        return self.p_holm is not None

    @property
    def separated(self) -> bool:
        return self.tested and self.p_holm < ALPHA

    def verdict(self) -> str:
        """'higher', 'lower', 'not separated', or why it is not judged."""
        if self.at_chance:
            return "at chance"
        if self.diff is None:
            return "not measured"
        if self.diff.status == "too few runs":
            return "fewer than 3 runs: cannot judge"
        if self.diff.status == "no spread":
            return "no spread: cannot judge"
        if not self.separated:
            return "not separated"
        return "higher" if self.diff.diff > 0 else "lower"


def stat(metrics: dict, model: str, measure: str) -> dict | None:
    """The model's statistics for one measure; from the single value when the metrics carry no stats."""
    per_model = (metrics.get("stats") or {}).get(model)
    if per_model is not None:
        return per_model.get(measure)
    single = scalar_measures(metrics, model).get(measure)
    return None if single is None else summarize([single], measure)


def mean(s: dict | None) -> float:
    return float("nan") if not s or s.get("mean") is None else s["mean"]


def chance(metrics: dict) -> float | None:
    n = metrics.get("meta", {}).get("num_classes")
    return 1 / n if n else None


def chance_band(metrics: dict, measure: str) -> tuple[float, float] | None:
    """The binomial 95% interval of a guessing model's accuracy on the images `measure` is computed on
    (7.4-12.8% for 500 images and 10 classes: scipy.stats.binom.interval); at or below chance alone when the
    count is not recorded. None for a measure that is not an accuracy."""
    p = chance(metrics)
    if p is None or not measure.startswith(("accuracy.", "occlusion", "adversarial.")):
        return None
    meta = metrics.get("meta", {})
    n = meta.get("adversarial_images") if measure.startswith("adversarial.") else meta.get("test_images")
    if not n:
        return 0.0, p + 1e-6  # accuracies come from float32 counts: equal to chance within 1e-6 is at chance
    lo, hi = scipy_stats.binom.interval(0.95, int(n), p)
    return lo / n, hi / n


def at_chance(metrics: dict, measure: str, value: float) -> bool:
    band = chance_band(metrics, measure)
    return band is not None and value <= band[1]


def _largest(metrics: dict, section: str, x_key: str, attack: str | None = None) -> float | None:
    entry = (metrics.get(section) or {}).get(KD) or {}
    curve = entry.get(attack, {}) if attack else entry
    xs = curve.get(x_key) or []
    return max(xs) if xs else None


def occlusion_label(metrics: dict) -> str:
    fraction = metrics.get("meta", {}).get("occlusion_fraction")
    return f"Accuracy on *occluded* ({fraction:.0%} of the image)" if fraction else "Accuracy on *occluded*"


def _variants(metrics: dict) -> list[str]:
    listed = metrics.get("meta", {}).get("variants")
    return list(listed) if listed else list(dict.fromkeys(v for a in (metrics.get("accuracy") or {}).values() for v in a))


def _planned(metrics: dict) -> list[tuple[str, str, str, Scale, str]]:
    """(family, measure, label, scale, other model) of every comparison of the KD student, primary first."""
    planned = []
    claim_labels = {"shape_bias": "Shape bias (cue-conflict)", "fourier.low_frequency_reliance": "Low-frequency reliance",
                    "accuracy.occluded": occlusion_label(metrics)}
    for _, _, measure in CRITERIA:
        scale = PERCENT if measure.startswith("accuracy.") else FRACTION
        planned += [(PRIMARY if other == CONTROL else EXPLORATORY, measure, claim_labels[measure], scale, other)
                    for other in COMPARED]
    measures = [(OCCLUSION_AREA, "Occlusion: mean accuracy over the curve", PERCENT)]
    measures += [(f"accuracy.{v}", f"Accuracy on *{v}*", PERCENT) for v in _variants(metrics) if v != "occluded"]
    initial = metrics.get("cka_initial") or {}
    measures.append(("cka_initial", f"CKA with the ViT teacher ({initial.get('layer', '?')} vs "
                                    f"{initial.get('teacher_layer', '?')})", FRACTION))
    measures += [(f"gradcam.{k}", f"GradCAM {k} (higher = more global)", FRACTION) for k in ("entropy", "mass90")]
    for attack in ("fgsm", "pgd"):
        eps = _largest(metrics, "adversarial", "eps", attack)
        if eps is not None:
            measures.append((f"adversarial.{attack}@{eps:g}", f"Accuracy under {attack.upper()}, ε = {eps_text(eps)}",
                             PERCENT))
    return planned + [(EXPLORATORY, m, label, scale, other) for m, label, scale in measures for other in COMPARED]


def comparisons(metrics: dict, subject: str = KD) -> list[Comparison]:
    """Every comparison of `subject` that both models were measured for, with Holm-adjusted p per family."""
    rows = []
    for family, measure, label, scale, other in _planned(metrics):
        a, b = stat(metrics, subject, measure), stat(metrics, other, measure)
        if other == subject or not (math.isfinite(mean(a)) and math.isfinite(mean(b))):
            continue
        both_at_chance = all(at_chance(metrics, measure, mean(s)) for s in (a, b))
        d = difference(a["values"], b["values"], measure)
        rows.append(Comparison(family, measure, label, scale, subject, other, a, b, d, both_at_chance, None))
    for family in (PRIMARY, EXPLORATORY):  # only the tests made count in a family's correction
        index = [i for i, r in enumerate(rows) if r.family == family and not r.at_chance and r.diff and r.diff.p is not None]
        for i, p in zip(index, holm([rows[i].diff.p for i in index])):
            rows[i] = rows[i]._replace(p_holm=p)
    return rows


def claim_verdict(c: Comparison | None) -> str:
    """The claim's answer for one criterion: yes, no (the opposite), not shown, or why it is not judged."""
    if c is None:
        return "not measured"
    verdict = c.verdict()
    return {"higher": "yes", "lower": "no, the opposite", "not separated": "not shown"}.get(verdict, verdict)


def claim(metrics: dict, rows: list[Comparison]) -> dict:
    """metrics["claim"]: per criterion the measure used, both students' means, the difference, its 95% interval,
    p (uncorrected and Holm-adjusted within the primary family) and the verdict; occlusion also has the area
    under its curve beside it (an exploratory comparison)."""
    by_key = {(r.measure, r.other): r for r in rows}
    out = {}
    for key, what, measure in CRITERIA:
        c = by_key.get((measure, CONTROL))
        out[key] = {"criterion": what, **_record(measure, c), "verdict": claim_verdict(c)}
        if key == "occlusion":
            area = by_key.get((OCCLUSION_AREA, CONTROL))
            out[key]["beside"] = {**_record(OCCLUSION_AREA, area), "verdict": area.verdict() if area else "not measured"}
    return out


def _record(measure: str, c: Comparison | None) -> dict:
    if c is None:
        return {"measure": measure, KD: None, CONTROL: None, "difference": None, "ci95": None, "p": None,
                "p_holm": None, "family": None}
    d = c.diff
    return {"measure": measure, c.subject: mean(c.a), c.other: mean(c.b), "difference": d.diff if d else None,
            "ci95": list(d.ci95) if d and d.ci95 else None, "p": d.p if d else None, "p_holm": c.p_holm,
            "family": c.family}
