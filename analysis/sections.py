"""The report's section per measure: its definition, plot (means over seeds) and table (mean ± spread).

Each entry of SECTIONS is (title, metrics keys any of which enables it, builder); `measure_sections` renders them
all, saying "not measured" for a section, or for a model within one, that the run lacks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from analysis import plots
from analysis.document import Heading, Image, Para, Table
from analysis.plots import order_models, style
from analysis.quantities import COUNT, FRACTION, PERCENT, eps_text, fmt, fmt_stat
from analysis.verdicts import KD, stat

DEFAULT_PAIRS = {KD: "teacher_vit", "student_kd_cnn": "teacher_cnn"}
GRADCAM_MEASURES = ["entropy", "mass50", "mass90", "energy_inside", "rank_corr_teacher"]
VARIANT_TEXT = {
    "clean": "*clean*, the test images as they are",
    "occluded": "*occluded*, the same images with part of them covered by mean-grey patches",
    "texture": "*texture*, the objects filled or backed with other textures",
}




def variants(metrics: dict) -> list[str]:
    listed = metrics.get("meta", {}).get("variants")
    return list(listed) if listed else list(dict.fromkeys(v for a in metrics.get("accuracy", {}).values() for v in a))


def _curve_table(metrics: dict, section: dict, x_key: str, measure: Callable[[float], str],
                 x_label: Callable[[float], str], y_key: str = "accuracy") -> Table:
    """Rows: models; columns: every x measured by any model; cells: mean ± spread (%) or a dash."""
    xs = sorted({float(x) for c in section.values() for x in c[x_key]})
    rows = []
    for m in order_models(section):
        measured = {float(x) for x in section[m][x_key]}
        rows.append([style(m).display, *(fmt_stat(stat(metrics, m, measure(x)), PERCENT, table=True)
                                         if x in measured else "—" for x in xs)])
    return Table(["Model", *map(x_label, xs)], rows)


def _mean_curve_table(section: dict, x_key: str, y_key: str, x_label: Callable[[float], str]) -> Table:
    """Rows: models; columns: every x; cells: the mean over seeds (%)."""
    xs = sorted({float(x) for c in section.values() for x in c[x_key]})
    rows = []
    for m in order_models(section):
        by_x = {float(x): y for x, y in zip(section[m][x_key], section[m][y_key])}
        rows.append([style(m).display, *(fmt(by_x.get(x), PERCENT) for x in xs)])
    return Table(["Model", *map(x_label, xs)], rows)


def _accuracy_section(metrics: dict, out: Path) -> tuple[list, dict]:
    path = plots.plot_accuracy(metrics["accuracy"], variants(metrics), out / "accuracy.png")
    return [Image(path, "Top-1 accuracy per test variant (mean over seeds)"), Para("The numbers are in Table 1.")], \
        {"plot_accuracy": path}


def _fourier_section(metrics: dict, out: Path) -> tuple[list, dict]:
    fourier = metrics["fourier"]
    path = plots.plot_fourier(fourier, out / "fourier.png")
    rows = [[style(m).display, fmt(fourier[m].get("clean"), PERCENT),
             *(fmt_stat(stat(metrics, m, f"fourier.{k}"), FRACTION, table=True)
               for k in ("low_frequency_reliance", "high_frequency_reliance"))] for m in order_models(fourier)]
    blocks = [Image(path, "Accuracy on low-pass and high-pass filtered images (mean over seeds)"),
              Table(["Model", "clean accuracy", "low-frequency reliance", "high-frequency reliance"], rows)]
    for key, kind in (("low", "low-pass"), ("high", "high-pass")):
        blocks += [Para(f"Accuracy on {kind} filtered images, by radius (mean over seeds):"),
                   _mean_curve_table(fourier, "radius", key, lambda r: f"r={r:.2f}")]
    return blocks, {"plot_fourier": path}


def _cka_section(metrics: dict, out: Path) -> tuple[list, dict]:
    blocks, paths = [], {}
    initial = metrics.get("cka_initial") or {}
    students = [m for m in order_models(initial) if m not in ("layer", "teacher_layer")]
    if students:
        blocks += [Para(f"Initial layers: student {initial.get('layer', '?')} vs ViT teacher "
                        f"{initial.get('teacher_layer', '?')}."),
                   Table(["Model", "linear CKA"], [[style(m).display, fmt_stat(stat(metrics, m, "cka_initial"), table=True)
                                                    if stat(metrics, m, "cka_initial") else fmt(initial[m])]
                                                   for m in students])]
    teacher = (metrics.get("meta", {}).get("pairs") or DEFAULT_PAIRS).get(KD, "teacher_vit")
    cka = metrics.get("cka") or {}
    for m in order_models(cka):
        entry = cka[m]
        path = paths[f"plot_cka_{m}"] = plots.plot_cka(entry, m, teacher, out / f"cka_{plots.file_stem(m)}.png")
        blocks += [Heading(3, style(m).display),
                   Image(path, f"Linear CKA, {style(m).display} vs {style(teacher).display} (mean over seeds)"),
                   Table(["student \\ teacher layer", *entry["teacher_layers"]],
                         [[layer, *map(fmt, row)] for layer, row in zip(entry["student_layers"], entry["matrix"])])]
    return blocks, paths


def _gradcam_section(metrics: dict, out: Path) -> tuple[list, dict]:
    gradcam = metrics["gradcam"]
    path = plots.plot_gradcam_measures(gradcam, GRADCAM_MEASURES, out / "gradcam_measures.png")
    blocks = [Para(_resampling(metrics)), Image(path, "GradCAM measures, predicted class on clean images, means over "
                                                      "images and seeds")]
    for key, what in (("", "For the predicted class on clean test images (primary):"),
                      ("cue_conflict.", "For the shape's class on cue-conflict images (secondary):")):
        models = [m for m in order_models(gradcam) if stat(metrics, m, f"gradcam.{key}maps")]
        if not models:
            continue
        rows = [[style(m).display, *(fmt_stat(stat(metrics, m, f"gradcam.{key}{k}"), table=True) for k in GRADCAM_MEASURES),
                 f"{fmt(stat(metrics, m, f'gradcam.{key}dropped')['mean'], COUNT)} of "
                 f"{fmt(stat(metrics, m, f'gradcam.{key}maps')['mean'], COUNT)}"] for m in models]
        blocks += [Para(what), Table(["Model", *GRADCAM_MEASURES, "maps dropped (no mass)"], rows)]
    if len(blocks) == 2:  # maps recorded without their counts
        blocks.append(Table(["Model", *GRADCAM_MEASURES], [[style(m).display, *(fmt_stat(
            stat(metrics, m, f"gradcam.{k}"), table=True) for k in GRADCAM_MEASURES)] for m in order_models(gradcam)]))
    return blocks, {"plot_gradcam": path}


def _resampling(metrics: dict) -> str:
    """How maps of different resolutions were brought to one grid, as the analysis recorded it."""
    grid = metrics.get("meta", {}).get("gradcam_common_grid")
    if not grid:
        return "The grid on which the GradCAM maps were compared was not recorded."
    native = "; ".join(f"{style(m).display} {'×'.join(map(str, hw))}" for m, hw in (grid.get("native") or {}).items())
    return (f"Maps are compared on one common {'×'.join(map(str, grid.get('size', [])))} grid: "
            f"{grid.get('resampling', 'resampling not recorded')}" + (f". Native map sizes: {native}." if native else "."))


def _occlusion_section(metrics: dict, out: Path) -> tuple[list, dict]:
    occlusion = metrics["occlusion"]
    path = plots.plot_occlusion(occlusion, out / "occlusion.png")
    return [Image(path, "Accuracy against the occluded fraction of the image (mean over seeds)"),
            _curve_table(metrics, occlusion, "fraction", lambda f: f"occlusion@{f:g}", lambda f: f"{f:.0%} occluded")], \
        {"plot_occlusion": path}


def _adversarial_section(metrics: dict, out: Path) -> tuple[list, dict]:
    adversarial = metrics["adversarial"]
    path = plots.plot_adversarial(adversarial, out / "adversarial.png")
    n = metrics.get("meta", {}).get("adversarial_images")
    subset = (f"Measured on a subset: the first {n} clean test images (analysis.adversarial_samples), not the "
              f"whole test set." if n else "Measured on the first analysis.adversarial_samples clean test images.")
    blocks = [Para(subset), Image(path, "Accuracy under FGSM and PGD against the L∞ budget ε (mean over seeds)")]
    for attack in ("fgsm", "pgd"):
        section = {m: a[attack] for m, a in adversarial.items() if attack in a}
        if section:
            blocks += [Para(f"{attack.upper()} accuracy, by ε:"),
                       _curve_table(metrics, section, "eps", lambda e, a=attack: f"adversarial.{a}@{e:g}",
                                    lambda e: f"ε={eps_text(e)}")]
        else:
            blocks.append(Para(f"{attack.upper()}: not measured."))
    return blocks, {"plot_adversarial": path}


def _shape_bias_section(metrics: dict, out: Path) -> tuple[list, dict]:
    shape = metrics["shape_bias"]
    counts = ("shape_decisions", "texture_decisions", "n")
    rows = [[style(m).display, fmt_stat(stat(metrics, m, "shape_bias"), table=True),
             *(fmt(shape[m].get(k), COUNT) for k in counts)] for m in order_models(shape)]
    return [Table(["Model", "shape bias", "shape decisions", "texture decisions", "cue-conflict images"], rows),
            Para("Decision counts are means over seeds.")], {}


DEFINITIONS = {
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
        "min-max scaled, for the class each model predicts on the clean test images (where it looks for its own "
        "decision); a secondary pass takes the shape's class on the cue-conflict images, where texture-biased "
        "students rarely predict it. Each measure is a mean over images; a map with no mass (all zero after the "
        "ReLU) has no distribution and is dropped, and the table counts them per model, as models scored on "
        "different numbers of maps are scored on different images. *entropy*: entropy of the map "
        "as a distribution divided by log(number of pixels), in [0, 1], 1 for a uniform map. *mass50* / "
        "*mass90*: the smallest fraction of pixels holding 50% / 90% of the map's mass. For these three, "
        "higher = more global attention. *energy_inside*: fraction of the mass on the object (higher = "
        "better localised). *rank_corr_teacher*: Spearman correlation with the ViT teacher's map of the "
        "same image (for the teacher's own prediction), in [−1, 1]. The grid, when present, min-max scales "
        "each map for display only."),
    "Occlusion": (
        "Accuracy (%) when a fraction of the image area, as random patches of a grid, is replaced by the "
        "data set's mean colour (Naseer et al. 2021). A flatter curve means more robust to occlusion. The claim "
        "is judged on the *occluded* test variant as made (the paper's treatment); beside it, the mean "
        "accuracy over the curve (its area divided by the range of fractions), never its largest fraction "
        "alone, where every model is near chance."),
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


def _definition(name: str, metrics: dict) -> str:
    if name != "Accuracy":
        return DEFINITIONS[name]
    texts = [VARIANT_TEXT.get(v, f"*{v}*") for v in variants(metrics)]
    return (f"Top-1 accuracy (%) on one test set per variant: {'; '.join(texts) or 'none measured'}. "
            f"Higher is better; chance is 100% / number of classes.")


def models_in(metrics: dict, keys: list[str]) -> set[str]:
    """The models with an entry in any of these sections (cka_initial also names its layers)."""
    return {m for k in keys for m in (metrics.get(k) or {})} - {"layer", "teacher_layer"}


def _not_measured_for(metrics: dict, keys: list[str]) -> Para | None:
    """Names the models of the run (meta.models) that a section lacks; the teacher is not expected in CKA."""
    present = models_in(metrics, keys)
    expected = [m for m in metrics.get("meta", {}).get("models", []) if not ("cka" in keys and m.startswith("teacher"))]
    missing = [style(m).display for m in order_models(expected) if m not in present]
    return Para("Not measured for: " + ", ".join(missing) + ".") if missing else None


def measure_sections(metrics: dict, out: Path, gradcam_grid: dict | None = None) -> tuple[list, dict]:
    """Every measure's section in SECTIONS order, with the GradCAM figure over images when `gradcam_grid` is given."""
    blocks, paths, meta = [], {}, metrics.get("meta", {})
    for name, keys, build in SECTIONS:
        blocks += [Heading(2, name), Para(_definition(name, metrics))]
        if models_in(metrics, keys):
            section_blocks, plot_paths = build(metrics, out)
            blocks += section_blocks
            paths.update(plot_paths)
            if note := _not_measured_for(metrics, keys):
                blocks.append(note)
        elif name == "Shape bias" and meta.get("shape_bias_note"):
            note = meta["shape_bias_note"]
            blocks.append(Para(note[0].upper() + note[1:] + "."))
        else:
            blocks.append(Para("Not measured."))
        if name == "GradCAM attention" and gradcam_grid is not None:
            path = paths["plot_gradcam_grid"] = plots.plot_gradcam_grid(gradcam_grid, out / "gradcam_grid.png")
            blocks.append(Image(path, "GradCAM maps (min-max scaled per map for display; the first seed's students) "
                                      "over test images"))
    return blocks, paths
