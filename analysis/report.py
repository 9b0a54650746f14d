"""The experiment report: metrics.json, report.md, a self-contained report.html and PNG plots.

`write_report` turns the metrics dict of one run into a document, built from PARTS in order: warnings,
the claim's verdicts (a table), Table 1 (accuracy per test variant, laid out like the paper's, with the
paper's published numbers for the real data sets), the paper's premise measured on the teachers' heads
and features, the exploratory findings (a table), a sweep section when the config swept a training
setting, one section per measure (definition, plot, table), and the run's details. Students are
measured once per seed: tables show mean ± standard deviation [95% t-interval] over the seeds, plots the
means (analysis/stats.py); every comparison and its Holm correction is made in analysis/verdicts.py.
Any section, or any model within one, may be missing; the report then says "not measured". The
document is built once as a list of blocks and rendered twice, to Markdown (plots as files beside
it) and to HTML (plots embedded).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple

from analysis.codec_part import codec_part
from analysis.document import Heading, Para, Table, to_html, to_markdown
from analysis.findings import (findings_table, premise_blocks, premise_record, spread_note, verdict_blocks,
                               warnings)
from analysis.grid import points, sweep_section
from analysis.plots import order_models, style
from analysis.quantities import PERCENT, fmt, fmt_stat, jsonable
from analysis.sections import DEFAULT_PAIRS, SECTIONS, measure_sections, models_in, variants
from analysis.verdicts import CORRECTION, INDEPENDENT, KD, LOGIT_KD, Comparison, claim, comparisons, stat
from infra import storage

# Table 1's "Distillation" column for students without a feature-distillation teacher
UNPAIRED = {INDEPENDENT: "none (CE only)", LOGIT_KD: "ViT → ResNet (logits)"}
# The paper's Table 1 (Aftab et al.), top-1 %, one number per model on its treated test set
PUBLISHED = {
    "cifar10": {"teacher_vit": 91.68, KD: 78.17, "teacher_cnn": 79.91, "student_kd_cnn": 79.78},
    "stl10": {"teacher_vit": 95.16, KD: 36.825, "teacher_cnn": 90.00, "student_kd_cnn": 26.65},
    "fashionmnist": {"teacher_vit": 83.31, KD: 32.49, "teacher_cnn": 76.21, "student_kd_cnn": 45.86},
}
PUBLISHED_SET = {"cifar10": "CIFAR-10 unchanged (control)", "stl10": "STL-10 with occlusions added",
                 "fashionmnist": "FashionMNIST with texture changes"}


def _family(teacher: str) -> str:
    for key, name in (("vit", "ViT"), ("cnn", "CNN")):
        if key in teacher.lower():
            return name
    return style(teacher).display


# ---- Table 1 ----

def _table1(metrics: dict, heading: str) -> list:
    """Accuracy (%) per variant: each teacher followed by its students (meta.pairs), then the unpaired students."""
    accuracy, meta = metrics.get("accuracy") or {}, metrics.get("meta", {})
    blocks = [Heading(2, heading)]
    if not accuracy:
        return blocks + [Para("Accuracy was not measured.")]
    measured, arch = variants(metrics), meta.get("teachers", {})
    published = PUBLISHED.get(meta.get("dataset"))
    models = order_models([*meta.get("models", []), *accuracy])

    def cells(m: str) -> list[str]:
        row = [fmt_stat(stat(metrics, m, f"accuracy.{v}"), PERCENT, table=True) for v in measured]
        return row + ([f"{published[m]:.2f}" if m in published else "—"] if published else [])
    students_of: dict[str, list[str]] = {m: [] for m in models if m.startswith("teacher")}
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
            rows.append([UNPAIRED.get(m, "—"), "Student" if m.startswith("student") else "—", style(m).display, *cells(m)])
    header = ["Distillation", "Role", "Model", *measured] + (["paper (published)"] if published else [])
    notes = ["— : not measured. Students are ResNets; the teacher's architecture is in parentheses. "
             + spread_note(metrics)]
    if published:
        notes.append(f"*paper (published)*: the paper's Table 1 for {PUBLISHED_SET[meta['dataset']]}, one number per "
                     f"model, beside the numbers measured here; the paper does not report an independent student.")
    return blocks + [Table(header, rows), *map(Para, notes)]


# ---- the report's parts, in order ----

class Context(NamedTuple):
    """What the parts share: the grid points' views of the metrics, each view's comparisons, the premise."""
    views: list[tuple[str, dict]]       # [(grid label, metrics of that point)]; [("", metrics)] without a sweep
    rows: dict[str, list[Comparison]]   # grid label -> analysis/verdicts.py comparisons
    premise: dict
    gradcam_grid: dict | None


def _at(label: str) -> str:
    return f" at {label}" if label else ""


def _warnings_part(metrics: dict, out: Path, ctx: Context) -> tuple[list, dict]:
    meta = metrics.get("meta", {})
    return [*(Para(w) for w in warnings(metrics)),
            Para(f"Dataset: {meta.get('dataset', 'unknown')} · commit: {meta.get('commit', 'unknown')} · "
                 f"created: {meta.get('created', 'unknown')}")], {}


def _verdicts_part(metrics: dict, out: Path, ctx: Context) -> tuple[list, dict]:
    blocks = []
    for label, view in ctx.views:
        blocks.append(Heading(2, f"Verdicts: the paper's claim{_at(label)}"))
        if KD in (view.get("stats") or view.get("accuracy") or {}):
            blocks += verdict_blocks(view, ctx.rows[label])
        else:
            blocks.append(Para("The KD student was not measured: no verdict."))
    return blocks, {}


def _table1_part(metrics: dict, out: Path, ctx: Context) -> tuple[list, dict]:
    return [b for label, view in ctx.views for b in _table1(view, f"Table 1: top-1 accuracy (%) per test variant"
                                                                   f"{_at(label)}")], {}


def _premise_part(metrics: dict, out: Path, ctx: Context) -> tuple[list, dict]:
    return [Heading(2, "Premise (measured on the teachers)"), *premise_blocks(metrics, ctx.premise),
            *_probe_note(metrics)], {}


def _probe_note(metrics: dict) -> list:
    probe = metrics.get("probe") or {}
    if not probe:
        return [Para("The probe on the teachers' features was not measured.")]
    parts = [f"{style(t).display}: layer {p['layer']}, {p['pooling']}, {p['train_samples']:,} training views, "
             f"L2 strength {p['l2']:g} (held-out accuracy {fmt(p['holdout_accuracy'], PERCENT)})"
             for t, p in probe.items()]
    return [Para("Probe: multinomial logistic regression (L-BFGS, full batch) on the standardised pooled features of "
                 "every cached view of the training split, its L2 strength chosen on a held-out fifth of the training "
                 "images; test images go through the fitted teacher to the same layer. " + "; ".join(parts) + ".")]


def _findings_part(metrics: dict, out: Path, ctx: Context) -> tuple[list, dict]:
    blocks = []
    for label, view in ctx.views:
        blocks += [Heading(2, f"Findings (exploratory){_at(label)}"), *findings_table(view, ctx.rows[label])]
        missing = [title for title, keys, _ in SECTIONS if not models_in(view, keys)]
        if missing:
            blocks.append(Para("Not measured: " + ", ".join(missing) + "."))
    return blocks, {}


def _sweep_part(metrics: dict, out: Path, ctx: Context) -> tuple[list, dict]:
    return sweep_section(metrics, out) if len(ctx.views) > 1 else ([], {})


def _measures_part(metrics: dict, out: Path, ctx: Context) -> tuple[list, dict]:
    return measure_sections(metrics, out, ctx.gradcam_grid)


def _details_part(metrics: dict, out: Path, ctx: Context) -> tuple[list, dict]:
    meta = metrics.get("meta", {})
    rows = [["teacher " + t, a] for t, a in meta.get("teachers", {}).items()]
    rows += [["config digest", str(meta["config_digest"])]] if "config_digest" in meta else []
    rows += [["multiple comparisons", CORRECTION]]
    rows += [[f"time: {stage}", f"{float(s):.1f} s"] for stage, s in meta.get("seconds", {}).items() if s is not None]
    return [Heading(2, "Run details"), Table(["Item", "Value"], rows)], {}


# The report, part by part: (metrics, out_dir, Context) -> (blocks, {plot key: path}). A new part (e.g. the
# cache's codec, the views) is one such function inserted here where it should appear.
PARTS: list[Callable[[dict, Path, Context], tuple[list, dict]]] = [
    _warnings_part, _verdicts_part, _table1_part, _premise_part, _findings_part, _sweep_part, _measures_part,
    codec_part, _details_part]


def report_metrics(metrics: dict) -> tuple[dict, Context]:
    """The metrics as metrics.json holds them (with `claim`, `premise` and meta.correction added) and the
    Context the parts are built from; the caller's dict is not changed."""
    views = points(metrics)
    rows = {label: comparisons(view) for label, view in views}
    claims = {label: claim(view, rows[label]) for label, view in views}
    record = premise_record(metrics)
    added = {"claim": claims[""] if len(views) == 1 and views[0][0] == "" else claims, "premise": record,
             "meta": {**metrics.get("meta", {}), "correction": CORRECTION}}
    return {**metrics, **added}, Context(views, rows, record, None)


def write_report(metrics: dict, out_dir: Path, gradcam_grid: dict | None = None) -> dict[str, Path]:
    """Write metrics.json, report.md, report.html and the PNG plots into out_dir.

    metrics: the run's metrics dict (sections "meta", "seeds", "stats", "accuracy", "cka", "cka_initial",
    "fourier", "gradcam", "occlusion", "adversarial", "shape_bias", "probe"; any may be missing). gradcam_grid:
    optional {"images": uint8 (S, H, W, 3), "labels": int (S,), "class_names": [str], "maps": {model: (S, h, w)}}
    for a figure of maps over images. Returns {"markdown", "html", "metrics", "plot_*": path}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full, ctx = report_metrics(metrics)
    ctx = ctx._replace(gradcam_grid=gradcam_grid)
    paths = {"metrics": out_dir / "metrics.json"}
    # whole files or none: a full disk leaves no half-written metrics.json or report under its name
    storage.write_bytes(paths["metrics"], (json.dumps(jsonable(full), indent=2, allow_nan=False, ensure_ascii=False)
                                           + "\n").encode())

    title = f"hakd report: {full['meta'].get('dataset', 'unknown dataset')}"
    blocks = [Heading(1, title)]
    for part in PARTS:
        part_blocks, plot_paths = part(full, out_dir, ctx)
        blocks += part_blocks
        paths.update(plot_paths)

    paths["markdown"] = out_dir / "report.md"
    storage.write_bytes(paths["markdown"], to_markdown(blocks).encode())
    paths["html"] = out_dir / "report.html"
    storage.write_bytes(paths["html"], to_html(blocks, title).encode())
    return paths
