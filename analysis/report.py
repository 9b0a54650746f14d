"""The experiment report: metrics.json, report.md, a self-contained report.html and PNG plots.

`write_report` turns the metrics dict of one run into a document: Table 1 (accuracy per test
variant, laid out like the paper's), findings computed from the numbers, then one section per
measure with its definition, plot and table. Any section, or any model within one, may be missing;
the report then says "not measured" instead of failing. The document is built once as a list of
blocks and rendered twice, to Markdown (plots as files beside it) and to HTML (plots embedded).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from analysis import plots
from analysis.document import Heading, Image, Para, Table, to_html, to_markdown
from analysis.plots import order_models, style

KD, CONTROL, INDEPENDENT, LOGIT_KD = "student_kd_vit", "student_kd_cnn", "student_independent", "student_logit_kd"
DEFAULT_PAIRS = {KD: "teacher_vit", CONTROL: "teacher_cnn"}
# Table 1's "Distillation" column for students without a feature-distillation teacher
UNPAIRED = {INDEPENDENT: "none (CE only)", LOGIT_KD: "ViT → ResNet (logits)"}
COMPARED = [CONTROL, INDEPENDENT, LOGIT_KD]  # what the KD student is compared with in the findings
GRADCAM_MEASURES = ["entropy", "mass50", "mass90", "energy_inside", "rank_corr_teacher"]


# ---- numbers ----

def _value(x) -> float:
    """A float, nan for None or anything missing."""
    return float("nan") if x is None else float(x)


class Scale(NamedTuple):
    """How a quantity is shown: value * factor, rounded to `decimals`, then `suffix`; differences in `unit`."""
    factor: float
    decimals: int
    suffix: str
    unit: str


PERCENT = Scale(100, 2, "%", " points")
FRACTION = Scale(1, 3, "", "")


def _shown(x, scale: Scale) -> float:
    return round(_value(x) * scale.factor, scale.decimals)


def _fmt(x, scale: Scale = FRACTION) -> str:
    """The value as shown in tables and sentences; an em dash when not measured."""
    v = _shown(x, scale)
    return f"{v:.{scale.decimals}f}{scale.suffix}" if math.isfinite(v) else "—"


def _versus(values: dict, subject: str, others: list[str], scale: Scale) -> str | None:
    """'3.45 points higher than the control student (77.78%) and 1.00 points lower than ...'.

    Compares values[subject] with each of `others` that has a number; the difference is taken
    between the shown (rounded) values so that the sentence agrees with its own numbers.
    None when there is nothing to compare.
    """
    a = _shown(values.get(subject), scale)
    parts = []
    for other in others:
        b = _shown(values.get(other), scale)
        if other == subject or not (math.isfinite(a) and math.isfinite(b)):
            continue
        diff = round(a - b, scale.decimals)
        where = f"{style(other).short} ({_fmt(values[other], scale)})"
        if diff == 0:
            parts.append(f"equal to {where}")
        else:
            parts.append(f"{abs(diff):.{scale.decimals}f}{scale.unit} {'higher' if diff > 0 else 'lower'} than {where}")
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else (parts[0] if parts else None)


def _eps(eps: float) -> str:
    """An L-inf budget as k/255 when it is one (the usual way to quote it), else as a decimal."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.4g}"


def _jsonable(obj):
    """Plain JSON types: numpy scalars and arrays unwrapped, NaN and infinities as None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---- Table 1 and findings ----

def _variants(metrics: dict) -> list[str]:
    listed = metrics.get("meta", {}).get("variants")
    return list(listed) if listed else list(dict.fromkeys(v for a in metrics.get("accuracy", {}).values() for v in a))


def _family(teacher: str) -> str:
    for key, name in (("vit", "ViT"), ("cnn", "CNN")):
        if key in teacher.lower():
            return name
    return style(teacher).display


def _table1(metrics: dict) -> list:
    """Accuracy (%) per variant: each teacher followed by its students (meta.pairs), then the unpaired students."""
    accuracy, meta = metrics.get("accuracy") or {}, metrics.get("meta", {})
    blocks = [Heading(2, "Table 1: top-1 accuracy (%) per test variant")]
    if not accuracy:
        return blocks + [Para("Accuracy was not measured.")]
    variants, arch = _variants(metrics), meta.get("teachers", {})
    models = order_models([*meta.get("models", []), *accuracy])
    cells = lambda m: [_fmt(accuracy.get(m, {}).get(v), PERCENT).rstrip("%") for v in variants]
    students_of: dict[str, list[str]] = {}
    for student, teacher in (meta.get("pairs") or DEFAULT_PAIRS).items():
        if student in models:
            students_of.setdefault(teacher, []).append(student)
    rows, placed = [], set()
    for teacher in order_models(students_of):
        name = style(teacher).display + (f" ({arch[teacher]})" if teacher in arch else "")
        rows.append([f"{_family(teacher)} → ResNet", "Teacher", name, *cells(teacher)])
        rows += [["", "Student", style(s).display, *cells(s)] for s in order_models(students_of[teacher])]
        placed |= {teacher, *students_of[teacher]}
    for m in models:
        if m not in placed:
            role = "Student" if m.startswith("student") else "—"
            rows.append([UNPAIRED.get(m, "—"), role, style(m).display, *cells(m)])
    return blocks + [Table(["Distillation", "Role", "Model", *variants], rows),
                     Para("— : not measured. Students are ResNets; the teacher's architecture is in parentheses.")]


def _accuracy_findings(metrics: dict) -> list[str]:
    """Per bias variant (clean only if there is no other): the most accurate student, the KD student vs the others."""
    accuracy, out = metrics.get("accuracy") or {}, []
    variants = _variants(metrics)
    for v in [v for v in variants if v != "clean"] or variants:
        scores = {m: accuracy[m].get(v) for m in order_models(accuracy) if m.startswith("student")}
        scores = {m: s for m, s in scores.items() if math.isfinite(_shown(s, PERCENT))}
        if not scores:
            continue
        top = max(_shown(s, PERCENT) for s in scores.values())
        best = [m for m, s in scores.items() if _shown(s, PERCENT) == top]
        names = " and ".join(style(m).short for m in best)
        lead = (f"On *{v}*, the most accurate student{'s are' if len(best) > 1 else ' is'} {names} "
                f"({_fmt(scores[best[0]], PERCENT)})")
        versus = _versus(scores, KD, COMPARED, PERCENT) if KD in scores else None
        if versus is None:
            out.append(lead + ".")
        elif best == [KD]:
            out.append(f"{lead}, {versus}.")
        else:
            out.append(f"{lead}; {style(KD).short} ({_fmt(scores[KD], PERCENT)}) is {versus}.")
    return out


def _kd_sentence(values: dict, scale: Scale, sentence: Callable[[str, str], str],
                 others: list[str] = COMPARED) -> str | None:
    """sentence(KD value, comparison) for the KD student, when it and something to compare with exist."""
    versus = _versus(values, KD, others, scale)
    return None if versus is None else sentence(_fmt(values[KD], scale), versus)


def _at_largest(section: dict, x_key: str) -> tuple[float, dict[str, float]] | None:
    """The KD student's largest x and every model's y at that same x (models without it left out)."""
    if KD not in section or not section[KD][x_key]:
        return None
    x = max(section[KD][x_key])
    return x, {m: c["accuracy"][list(c[x_key]).index(x)] for m, c in section.items() if x in list(c[x_key])}


def _gradcam_finding(gradcam: dict) -> str | None:
    """Entropy and mass90 of the KD student's maps against each other student's: more global = both higher."""
    if KD not in gradcam:
        return None
    kd = {k: _shown(gradcam[KD].get(k), FRACTION) for k in ("entropy", "mass90")}
    if not all(math.isfinite(v) for v in kd.values()):
        return None
    parts = []
    for other in COMPARED:
        if other not in gradcam:
            continue
        o = {k: _shown(gradcam[other].get(k), FRACTION) for k in kd}
        if not all(math.isfinite(v) for v in o.values()):
            continue
        rel = {k: "higher" if kd[k] > o[k] else "lower" if kd[k] < o[k] else "equal" for k in kd}
        if rel["entropy"] == rel["mass90"]:
            verdict = {"higher": "both are higher (more global)", "lower": "both are lower (more local)",
                       "equal": "both are equal"}[rel["entropy"]]
        else:
            verdict = f"entropy is {rel['entropy']} and mass90 {rel['mass90']} (the two measures disagree)"
        parts.append(f"against {style(other).short} ({o['entropy']:.3f} and {o['mass90']:.3f}) {verdict}")
    if not parts:
        return None
    return (f"The KD student's GradCAM maps have entropy {kd['entropy']:.3f} and mass90 {kd['mass90']:.3f}; "
            + "; ".join(parts) + ".")


def _findings(metrics: dict) -> list:
    """Sentences computed from the numbers; each only when its numbers exist."""
    sentences = _accuracy_findings(metrics)
    fourier = metrics.get("fourier") or {}
    sentences.append(_kd_sentence({m: f.get("low_frequency_reliance") for m, f in fourier.items()}, FRACTION,
                                  lambda kd, vs: f"The KD student's low-frequency reliance is {kd}, {vs}."))
    initial = metrics.get("cka_initial") or {}
    layers = f"{initial.get('layer', '?')} vs the ViT teacher's {initial.get('teacher_layer', '?')}"
    sentences.append(_kd_sentence(initial, FRACTION, lambda kd, vs: f"In the initial layers ({layers}), the KD "
                                  f"student's CKA with the ViT teacher is {kd}, {vs}.",
                                  others=[INDEPENDENT, CONTROL, LOGIT_KD]))
    sentences.append(_gradcam_finding(metrics.get("gradcam") or {}))
    shape = metrics.get("shape_bias") or {}
    sentences.append(_kd_sentence({m: s.get("shape_bias") for m, s in shape.items()}, FRACTION,
                                  lambda kd, vs: f"The KD student's shape bias is {kd}, {vs}."))
    occluded = _at_largest(metrics.get("occlusion") or {}, "fraction")
    if occluded:
        sentences.append(_kd_sentence(occluded[1], PERCENT, lambda kd, vs: f"With {occluded[0]:.0%} of the image "
                                      f"occluded, the KD student's accuracy is {kd}, {vs}."))
    adversarial = metrics.get("adversarial") or {}
    for attack in ("fgsm", "pgd"):
        largest = _at_largest({m: a[attack] for m, a in adversarial.items() if attack in a}, "eps")
        if largest:
            sentences.append(_kd_sentence(largest[1], PERCENT, lambda kd, vs: f"Under {attack.upper()} at the largest "
                                          f"ε ({_eps(largest[0])}), the KD student keeps {kd} accuracy, {vs}."))
    missing = [title for title, keys, _ in SECTIONS if not _measured(metrics, keys)]
    if missing:
        sentences.append("Not measured: " + ", ".join(missing) + ".")
    return [Heading(2, "Findings"), Para(" ".join(s for s in sentences if s))]


# ---- one section per measure: definition, plot, table ----

def _curve_table(section: dict, x_key: str, y_key: str, x_label: Callable[[float], str]) -> Table:
    """Rows: models; columns: every x measured by any model; cells: y (%) or a dash."""
    xs = sorted({float(x) for c in section.values() for x in c[x_key]})
    rows = []
    for m in order_models(section):
        by_x = {float(x): y for x, y in zip(section[m][x_key], section[m][y_key])}
        rows.append([style(m).display, *(_fmt(by_x.get(x), PERCENT) for x in xs)])
    return Table(["Model", *map(x_label, xs)], rows)


def _accuracy_section(metrics: dict, out: Path) -> tuple[list, dict]:
    path = plots.plot_accuracy(metrics["accuracy"], _variants(metrics), out / "accuracy.png")
    blocks = [Image(path, "Top-1 accuracy per test variant"), Para("The numbers are in Table 1.")]
    return blocks, {"plot_accuracy": path}


def _fourier_section(metrics: dict, out: Path) -> tuple[list, dict]:
    fourier = metrics["fourier"]
    path = plots.plot_fourier(fourier, out / "fourier.png")
    rows = [[style(m).display, _fmt(fourier[m].get("clean"), PERCENT),
             *(_fmt(fourier[m].get(k)) for k in ("low_frequency_reliance", "high_frequency_reliance"))]
            for m in order_models(fourier)]
    summary = Table(["Model", "clean accuracy", "low-frequency reliance", "high-frequency reliance"], rows)
    blocks = [Image(path, "Accuracy on low-pass and high-pass filtered images"), summary]
    for key, kind in (("low", "low-pass"), ("high", "high-pass")):
        blocks += [Para(f"Accuracy on {kind} filtered images, by radius:"),
                   _curve_table(fourier, "radius", key, lambda r: f"r={r:.2f}")]
    return blocks, {"plot_fourier": path}


def _cka_section(metrics: dict, out: Path) -> tuple[list, dict]:
    blocks, paths = [], {}
    initial = metrics.get("cka_initial") or {}
    students = [m for m in order_models(initial) if m not in ("layer", "teacher_layer")]
    if students:
        blocks += [Para(f"Initial layers: student {initial.get('layer', '?')} vs ViT teacher "
                        f"{initial.get('teacher_layer', '?')}."),
                   Table(["Model", "linear CKA"], [[style(m).display, _fmt(initial[m])] for m in students])]
    teacher = (metrics.get("meta", {}).get("pairs") or DEFAULT_PAIRS).get(KD, "teacher_vit")
    cka = metrics.get("cka") or {}
    for m in order_models(cka):
        entry = cka[m]
        path = paths[f"plot_cka_{m}"] = plots.plot_cka(entry, m, teacher, out / f"cka_{m}.png")
        blocks += [Heading(3, style(m).display),
                   Image(path, f"Linear CKA, {style(m).display} vs {style(teacher).display}"),
                   Table(["student \\ teacher layer", *entry["teacher_layers"]],
                         [[layer, *map(_fmt, row)] for layer, row in zip(entry["student_layers"], entry["matrix"])])]
    return blocks, paths


def _gradcam_section(metrics: dict, out: Path) -> tuple[list, dict]:
    gradcam = metrics["gradcam"]
    path = plots.plot_gradcam_measures(gradcam, GRADCAM_MEASURES, out / "gradcam_measures.png")
    table = Table(["Model", *GRADCAM_MEASURES],
                  [[style(m).display, *(_fmt(gradcam[m].get(k)) for k in GRADCAM_MEASURES)]
                   for m in order_models(gradcam)])
    return [Image(path, "GradCAM measures, means over images"), table], {"plot_gradcam": path}


def _occlusion_section(metrics: dict, out: Path) -> tuple[list, dict]:
    occlusion = metrics["occlusion"]
    path = plots.plot_occlusion(occlusion, out / "occlusion.png")
    return [Image(path, "Accuracy against the occluded fraction of the image"),
            _curve_table(occlusion, "fraction", "accuracy", lambda f: f"{f:.0%} occluded")], {"plot_occlusion": path}


def _adversarial_section(metrics: dict, out: Path) -> tuple[list, dict]:
    adversarial = metrics["adversarial"]
    path = plots.plot_adversarial(adversarial, out / "adversarial.png")
    blocks = [Image(path, "Accuracy under FGSM and PGD against the L∞ budget ε")]
    for attack in ("fgsm", "pgd"):
        section = {m: a[attack] for m, a in adversarial.items() if attack in a}
        if section:
            blocks += [Para(f"{attack.upper()} accuracy, by ε:"),
                       _curve_table(section, "eps", "accuracy", lambda e: f"ε={_eps(e)}")]
        else:
            blocks.append(Para(f"{attack.upper()}: not measured."))
    return blocks, {"plot_adversarial": path}


def _shape_bias_section(metrics: dict, out: Path) -> tuple[list, dict]:
    shape = metrics["shape_bias"]
    counts = ("shape_decisions", "texture_decisions", "n")
    rows = [[style(m).display, _fmt(shape[m].get("shape_bias")), *(str(shape[m].get(k, "—")) for k in counts)]
            for m in order_models(shape)]
    return [Table(["Model", "shape bias", "shape decisions", "texture decisions", "cue-conflict images"], rows)], {}


DEFINITIONS = {
    "Accuracy": (
        "Top-1 accuracy (%) on one test set per variant: *clean* images; *occluded*, the same images with "
        "part of them covered by mean-grey patches; *texture*, shapes filled with another class's texture "
        "(shape and texture cues conflict). Higher is better; chance is 100% / number of classes."),
    "Fourier analysis": (
        "Accuracy (%) on images filtered in the Fourier domain (Wang et al. 2020). A low-pass filter keeps "
        "the spatial frequencies of radius ≤ r, a high-pass filter those above r; r is a fraction of the "
        "Nyquist frequency (0 keeps only the image mean, 1 is the circle touching Nyquist on each axis). "
        "Low-frequency reliance = ∫₀¹ min(low(r) / clean, 1) dr, where clean is the accuracy on unfiltered "
        "images: 1 means the model keeps its clean accuracy on blurred images, near 0 that it needs fine "
        "detail. High-frequency reliance is the same integral of high(r). Both lie in [0, 1]; a model at "
        "chance still scores chance / clean, so compare models on the same task."),
    "CKA with the ViT teacher": (
        "Linear centred kernel alignment (Kornblith et al. 2019) between the activations of a student layer "
        "and of a ViT-teacher layer on the same images, a debiased (unbiased HSIC) minibatch estimate. "
        "Unitless: 1 means the two representations are identical up to rotation and isotropic scale, 0 that "
        "they share no linear structure; the debiased estimate can dip slightly below 0. The first table is "
        "the paper's initial-layer comparison."),
    "GradCAM attention": (
        "GradCAM maps (ReLU of the gradient-weighted activations of the model's last stage), raw rather than "
        "min-max scaled, on a common grid; each measure is a mean over images. *entropy*: entropy of the map "
        "as a distribution divided by log(number of pixels), in [0, 1], 1 for a uniform map. *mass50* / "
        "*mass90*: the smallest fraction of pixels holding 50% / 90% of the map's mass. For these three, "
        "higher = more global attention. *energy_inside*: fraction of the mass on the object (higher = "
        "better localised). *rank_corr_teacher*: Spearman correlation with the ViT teacher's map of the "
        "same image, in [−1, 1]. The grid, when present, min-max scales each map for display only."),
    "Occlusion": (
        "Accuracy (%) when a fraction of the image area, as random patches of a grid, is replaced by the "
        "data set's mean colour (Naseer et al. 2021). A flatter curve means more robust to occlusion."),
    "Adversarial robustness": (
        "Accuracy (%) under L∞-bounded attacks: FGSM (one signed-gradient step) and PGD (several projected "
        "steps from a random start). ε is the largest change allowed per pixel and channel, for images in "
        "[0, 1] (8/255 ≈ 0.031); ε = 0 is the clean accuracy."),
    "Shape bias": (
        "On cue-conflict images, whose shape names one class and whose texture another (Geirhos et al. "
        "2019), shape bias = shape decisions / (shape + texture decisions), in [0, 1]; predictions matching "
        "neither cue are left out. 1 means the model always follows the shape, 0 always the texture."),
}
# (title, metrics keys any of which enables the section, builder returning its blocks and plot paths)
SECTIONS = [
    ("Accuracy", ["accuracy"], _accuracy_section),
    ("Fourier analysis", ["fourier"], _fourier_section),
    ("CKA with the ViT teacher", ["cka", "cka_initial"], _cka_section),
    ("GradCAM attention", ["gradcam"], _gradcam_section),
    ("Occlusion", ["occlusion"], _occlusion_section),
    ("Adversarial robustness", ["adversarial"], _adversarial_section),
    ("Shape bias", ["shape_bias"], _shape_bias_section),
]


def _models_in(metrics: dict, keys: list[str]) -> set[str]:
    """The models with an entry in any of these sections (cka_initial also names its layers)."""
    return {m for k in keys for m in (metrics.get(k) or {})} - {"layer", "teacher_layer"}


def _measured(metrics: dict, keys: list[str]) -> bool:
    return bool(_models_in(metrics, keys))


def _not_measured_for(metrics: dict, keys: list[str]) -> Para | None:
    """Names the models of the run (meta.models) that a section lacks; the teacher is not expected in CKA."""
    present = _models_in(metrics, keys)
    expected = [m for m in metrics.get("meta", {}).get("models", []) if not ("cka" in keys and m.startswith("teacher"))]
    missing = [style(m).display for m in order_models(expected) if m not in present]
    return Para("Not measured for: " + ", ".join(missing) + ".") if missing else None


def _meta_blocks(meta: dict) -> list:
    rows = [["teacher " + t, a] for t, a in meta.get("teachers", {}).items()]
    rows += [["config digest", str(meta["config_digest"])]] if "config_digest" in meta else []
    rows += [[f"time: {stage}", f"{_value(s):.1f} s"] for stage, s in meta.get("seconds", {}).items()]
    return [Heading(2, "Run details"), Table(["Item", "Value"], rows)] if rows else []


def write_report(metrics: dict, out_dir: Path, gradcam_grid: dict | None = None) -> dict[str, Path]:
    """Write metrics.json, report.md, report.html and the PNG plots into out_dir.

    metrics: the run's metrics dict (sections "meta", "accuracy", "cka", "cka_initial", "fourier",
    "gradcam", "occlusion", "adversarial", "shape_bias"; any may be missing). gradcam_grid: optional
    {"images": uint8 (S, H, W, 3), "labels": int (S,), "class_names": [str], "maps": {model: (S, h, w)}}
    for a figure of maps over images. Returns {"markdown", "html", "metrics", "plot_*": path}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out_dir / "metrics.json"}
    paths["metrics"].write_text(json.dumps(_jsonable(metrics), indent=2, allow_nan=False, ensure_ascii=False) + "\n")

    meta = metrics.get("meta", {})
    title = f"hakd report: {meta.get('dataset', 'unknown dataset')}"
    blocks = [Heading(1, title),
              Para(f"Dataset: {meta.get('dataset', 'unknown')} · commit: {meta.get('commit', 'unknown')} · "
                   f"created: {meta.get('created', 'unknown')}"),
              *_table1(metrics), *_findings(metrics)]
    for name, keys, build in SECTIONS:
        blocks += [Heading(2, name), Para(DEFINITIONS[name])]
        if _measured(metrics, keys):
            section_blocks, plot_paths = build(metrics, out_dir)
            blocks += section_blocks
            paths.update(plot_paths)
            if note := _not_measured_for(metrics, keys):
                blocks.append(note)
        else:
            blocks.append(Para("Not measured."))
        if name == "GradCAM attention" and gradcam_grid is not None:
            path = paths["plot_gradcam_grid"] = plots.plot_gradcam_grid(gradcam_grid, out_dir / "gradcam_grid.png")
            blocks.append(Image(path, "GradCAM maps (min-max scaled per map for display) over test images"))
    blocks += _meta_blocks(meta)

    paths["markdown"] = out_dir / "report.md"
    paths["markdown"].write_text(to_markdown(blocks), encoding="utf-8")
    paths["html"] = out_dir / "report.html"
    paths["html"].write_text(to_html(blocks, title), encoding="utf-8")
    return paths
