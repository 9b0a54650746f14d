"""What the numbers say, in sentences: warnings, the paper's premise as measured, and the findings.

Every comparison is between the per-seed values of two models (`metrics["stats"]`, see
analysis/stats.py). A difference is called supported only when the Welch 95% interval of the
difference of means excludes 0; otherwise the sentence says the runs do not separate the models.
Accuracies at or below chance are never read as findings.
"""
from __future__ import annotations

import math

from analysis.plots import order_models, style
from analysis.quantities import FRACTION, PERCENT, Scale, eps_text, fmt, fmt_diff, fmt_stat, shown
from analysis.stats import difference, scalar_measures, summarize

KD, CONTROL, INDEPENDENT, LOGIT_KD = "student_kd_vit", "student_kd_cnn", "student_independent", "student_logit_kd"
COMPARED = [CONTROL, INDEPENDENT, LOGIT_KD]  # what the KD student is compared with
# a teacher whose clean accuracy is less than this share of the way from chance to 100% gets a warning: it has learned little
NEAR_CHANCE_SHARE = 1 / 3


def stat(metrics: dict, model: str, measure: str) -> dict | None:
    """The model's statistics for one measure; from the single value when the metrics carry no stats."""
    per_model = (metrics.get("stats") or {}).get(model)
    if per_model is not None:
        return per_model.get(measure)
    single = scalar_measures(metrics, model).get(measure)
    return None if single is None else summarize([single])


def chance(metrics: dict) -> float | None:
    n = metrics.get("meta", {}).get("num_classes")
    return 1 / n if n else None


def at_chance(accuracy: float, floor: float) -> bool:
    """At or below chance; accuracies come from float32 counts, so equal to chance within 1e-6 counts as at."""
    return accuracy <= floor + 1e-6


def _mean(s: dict | None) -> float:
    return float("nan") if not s or s.get("mean") is None else s["mean"]


def _verdict(a: dict, b: dict, scale: Scale) -> str:
    d = difference(a["values"], b["values"])
    if d is None:
        return "not comparable"
    if d.ci95 is None:
        return f"difference {fmt_diff(d.diff, scale)}, but one of the two is a single run: no spread, so no claim"
    lo, hi = (fmt(c, scale, suffix=False) for c in d.ci95)
    if d.separated:
        return (f"{fmt_diff(d.diff, scale)} (95% interval of the difference {lo} to {hi}, Welch): "
                f"the runs separate the models")
    return f"difference {fmt_diff(d.diff, scale)} (95% interval {lo} to {hi} includes 0): the runs do not separate the models"


def compare(metrics: dict, measure: str, label: str, scale: Scale, subject: str = KD,
            others: list[str] = COMPARED, accuracy_like: bool = False) -> str | None:
    """'<label>: the KD student <mean ± std>; against the control student (<…>) <verdict>; …' or None."""
    a = stat(metrics, subject, measure)
    if a is None or not math.isfinite(_mean(a)):
        return None
    floor = chance(metrics) if accuracy_like else None
    parts = []
    for other in others:
        b = stat(metrics, other, measure)
        if other == subject or b is None or not math.isfinite(_mean(b)):
            continue
        below = [m for m, s in ((subject, a), (other, b)) if floor is not None and at_chance(_mean(s), floor)]
        if below:
            who = " and ".join(style(m).short for m in below)
            verdict = f"{who} {'are' if len(below) > 1 else 'is'} at or below chance ({fmt(floor, PERCENT)}): not read as a finding"
        else:
            verdict = _verdict(a, b, scale)
        parts.append(f"against {style(other).short} ({fmt_stat(b, scale)}) {verdict}")
    if not parts:
        return None
    return f"{label}: {style(subject).short} {fmt_stat(a, scale)}; " + "; ".join(parts) + "."


def _largest(metrics: dict, section: str, x_key: str, attack: str | None = None) -> float | None:
    entry = (metrics.get(section) or {}).get(KD) or {}
    curve = entry.get(attack, {}) if attack else entry
    xs = curve.get(x_key) or []
    return max(xs) if xs else None


def warnings(metrics: dict) -> list[str]:
    """Lines for the top of the report: teachers near chance, or no better than the independent student."""
    out, floor = [], chance(metrics)
    independent = stat(metrics, INDEPENDENT, "accuracy.clean")
    for teacher in ("teacher_vit", "teacher_cnn"):
        t = stat(metrics, teacher, "accuracy.clean")
        if t is None or not math.isfinite(_mean(t)):
            continue
        name = style(teacher).display
        if floor is not None and _mean(t) < floor + NEAR_CHANCE_SHARE * (1 - floor):
            out.append(f"Warning: the {name}'s clean accuracy ({fmt(_mean(t), PERCENT)}) is less than a third of "
                       f"the way from chance ({fmt(floor, PERCENT)}) to 100%: it has learned little of this task, so "
                       f"its students say little about the paper's claim.")
        if independent is not None and math.isfinite(_mean(independent)) and _mean(t) <= _mean(independent):
            out.append(f"Warning: the {name} ({fmt(_mean(t), PERCENT)} clean) is not better than the independent "
                       f"student ({fmt_stat(independent, PERCENT)}): distilling from it cannot be expected to help.")
    return out


def premise(metrics: dict) -> list[str]:
    """The paper's premise, measured on the two teachers: the ViT is more shape-biased and low-frequency reliant."""
    dataset = metrics.get("meta", {}).get("dataset", "this dataset")
    out = ["The paper's claim assumes that the ViT teacher relies more on shape and on low spatial frequencies "
           "than the CNN teacher. Each teacher is one run, so these numbers have no spread."]
    holds = []
    for measure, label in (("shape_bias", "Shape bias"), ("fourier.low_frequency_reliance", "Low-frequency reliance")):
        vit, cnn = stat(metrics, "teacher_vit", measure), stat(metrics, "teacher_cnn", measure)
        if vit is None or cnn is None or not (math.isfinite(_mean(vit)) and math.isfinite(_mean(cnn))):
            if measure == "shape_bias":
                out.append(_shape_bias_absent(metrics, dataset))
            continue
        ok = shown(_mean(vit), FRACTION) > shown(_mean(cnn), FRACTION)
        holds.append(ok)
        out.append(f"{label}: ViT teacher {fmt(_mean(vit))}, CNN teacher {fmt(_mean(cnn))}: "
                   f"{'as the premise assumes' if ok else 'not as the premise assumes'}.")
    if holds:
        out.append("The premise holds on this data." if all(holds) else
                   "The premise does not hold on this data: the findings below test the claim with teachers that "
                   "lack the property it is about.")
    return out


def _shape_bias_absent(metrics: dict, dataset: str) -> str:
    note = metrics.get("meta", {}).get("shape_bias_note")
    if note:
        return f"Shape bias on {dataset}: {note}."
    return (f"Shape bias is not measured on {dataset}: it needs cue-conflict images, whose texture labels are "
            f"class labels.")


def claim(metrics: dict) -> str | None:
    """One sentence: is the ViT-taught student more shape-biased, low-frequency reliant and occlusion-robust
    than the CNN-taught one, as the paper claims? Each part says yes, no or not shown, judged over seeds."""
    occluded = _largest(metrics, "occlusion", "fraction")
    parts = []
    for measure, what in (("shape_bias", "more shape-biased"), ("fourier.low_frequency_reliance",
                                                                  "more reliant on low frequencies"),
                          (f"occlusion@{occluded:g}" if occluded is not None else None, "more robust to occlusion")):
        a, b = (stat(metrics, m, measure) if measure else None for m in (KD, CONTROL))
        d = difference(a["values"], b["values"]) if a and b else None
        if d is None:
            parts.append(f"{what}: not measured")
        elif d.separated:
            parts.append(f"{what}: {'yes' if d.diff > 0 else 'no, the opposite'} (the runs separate the two)")
        elif d.ci95 is None:
            parts.append(f"{what}: not shown (one run each, no spread)")
        else:
            parts.append(f"{what}: not shown (the runs do not separate the two)")
    return ("The paper's claim, that the ViT-taught student is more shape-biased, more reliant on low frequencies "
            "and more robust to occlusion than the CNN-taught one, on this data: " + "; ".join(parts) + ".")


def findings(metrics: dict) -> list[str]:
    """Sentences computed from the numbers, the paper's three claimed effects first; each only when measured."""
    out = []
    occluded = _largest(metrics, "occlusion", "fraction")
    claimed = [("shape_bias", "Shape bias (higher = more shape-based)", FRACTION, False),
             ("fourier.low_frequency_reliance", "Low-frequency reliance", FRACTION, False)]
    if occluded is not None:
        claimed.append((f"occlusion@{occluded:g}", f"Accuracy with {occluded:.0%} of the image occluded", PERCENT, True))
    for measure, label, scale, acc in claimed:
        out.append(compare(metrics, measure, label, scale, others=[CONTROL, INDEPENDENT, LOGIT_KD], accuracy_like=acc))
    variants = metrics.get("meta", {}).get("variants") or list(
        dict.fromkeys(v for a in (metrics.get("accuracy") or {}).values() for v in a))
    for v in variants:
        out.append(compare(metrics, f"accuracy.{v}", f"Accuracy on *{v}*", PERCENT, accuracy_like=True))
    initial = metrics.get("cka_initial") or {}
    out.append(compare(metrics, "cka_initial", f"CKA with the ViT teacher in the initial layers ({initial.get('layer', '?')} "
                       f"vs {initial.get('teacher_layer', '?')})", FRACTION, others=[INDEPENDENT, CONTROL, LOGIT_KD]))
    for key in ("entropy", "mass90"):
        out.append(compare(metrics, f"gradcam.{key}", f"GradCAM {key} (higher = more global)", FRACTION))
    for attack in ("fgsm", "pgd"):
        eps = _largest(metrics, "adversarial", "eps", attack)
        if eps is not None:
            out.append(compare(metrics, f"adversarial.{attack}@{eps:g}", f"Accuracy under {attack.upper()} at "
                               f"ε = {eps_text(eps)}", PERCENT, accuracy_like=True))
    return [s for s in out if s]


def most_accurate(metrics: dict, variant: str) -> str | None:
    """'On *v*, the most accurate student is X (mean ± std)' by mean; ties named together."""
    students = [m for m in order_models(metrics.get("accuracy") or {}) if m.startswith("student")]
    stats = {m: stat(metrics, m, f"accuracy.{variant}") for m in students}
    stats = {m: s for m, s in stats.items() if s is not None and math.isfinite(shown(_mean(s), PERCENT))}
    if not stats:
        return None
    top = max(shown(_mean(s), PERCENT) for s in stats.values())
    floor = chance(metrics)
    if floor is not None and at_chance(max(_mean(s) for s in stats.values()), floor):
        return f"On *{variant}*, no student is above chance ({fmt(floor, PERCENT)})."
    best = [m for m, s in stats.items() if shown(_mean(s), PERCENT) == top]
    names = " and ".join(style(m).short for m in best)
    return (f"On *{variant}*, the most accurate student{'s are' if len(best) > 1 else ' is'} {names} "
            f"({fmt_stat(stats[best[0]], PERCENT)}) by mean.")


def spread_note(metrics: dict) -> str:
    seeds = metrics.get("seeds") or []
    if len(seeds) > 1:
        return (f"Students: mean ± standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}) "
                f"[95% t-interval of the mean]. Teachers are one run each: no spread.")
    return "One run per model: no spread over seeds, so no difference below can be called supported."
