"""Model display names and colours, and the report's figures (matplotlib, Agg canvas, PNG at 150 dpi).

Every plot function takes one section of the metrics dict (see `analysis.report`), writes one PNG
and returns its path. Each model keeps one colour in every figure, so a reader can follow it.
"""
from __future__ import annotations

import textwrap
import zlib
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 150


class ModelStyle(NamedTuple):
    display: str  # legends, tables
    short: str  # inside sentences
    colour: str


# Okabe-Ito colours, distinguishable with the common colour-vision deficiencies. Teachers come first;
# students of the ViT teacher are blues, those of the CNN teacher oranges.
MODEL_STYLES: dict[str, ModelStyle] = {
    "teacher_vit": ModelStyle("ViT teacher", "the ViT teacher", "#0072B2"),
    "teacher_cnn": ModelStyle("CNN teacher", "the CNN teacher", "#D55E00"),
    "student_kd_vit": ModelStyle("KD student (ViT→CNN, PCA+GL)", "the KD student", "#56B4E9"),
    "student_kd_cnn": ModelStyle("Control student (CNN→CNN, hint)", "the control student", "#E69F00"),
    "student_independent": ModelStyle("Independent student (CE only)", "the independent student", "#009E73"),
    "student_logit_kd": ModelStyle("Logit-KD student (ViT logits)", "the logit-KD student", "#CC79A7"),
}
_EXTRA_COLOURS = ["#000000", "#7F7F7F", "#8C564B", "#BCBD22", "#17BECF", "#9467BD"]


def style(model: str) -> ModelStyle:
    """The model's style; a model outside MODEL_STYLES keeps its name and gets a colour fixed by that name.

    A sweep's grid point of a student, "<student>@<key>=<value>", is named after the student and its point.
    """
    if model in MODEL_STYLES:
        return MODEL_STYLES[model]
    base, _, point = model.partition("@")
    if point and base in MODEL_STYLES:
        known = MODEL_STYLES[base]
        return ModelStyle(f"{known.display} [{point}]", f"{known.short} at {point}",
                          _EXTRA_COLOURS[zlib.crc32(model.encode()) % len(_EXTRA_COLOURS)])
    # crc32 rather than hash(): str hashes change between interpreter runs
    return ModelStyle(model, model, _EXTRA_COLOURS[zlib.crc32(model.encode()) % len(_EXTRA_COLOURS)])


def order_models(models: Iterable[str]) -> list[str]:
    """Distinct models in MODEL_STYLES order (a sweep's grid points beside their student), unknown ones last."""
    known = list(MODEL_STYLES)
    unique = list(dict.fromkeys(models))

    def rank(m: str) -> tuple[int, int]:
        base = m.partition("@")[0]
        return (known.index(base) if base in known else len(known), unique.index(m))
    return sorted(unique, key=rank)


def file_stem(model: str) -> str:
    """A file-name-safe form of a model name (grid points hold '=', ',' and '.')."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in model)


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Figure, path: Path) -> Path:
    # No "Software" text chunk: it carries a URL and the matplotlib version, neither needed in a report.
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})
    return path


def _grouped_bars(ax, groups: list[str], values: dict[str, list[float]], scale: float = 1.0) -> None:
    """One bar per model within each group, in model order; nan values leave a gap."""
    models = order_models(values)
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(groups))
    for i, model in enumerate(models):
        heights = np.asarray(values[model], dtype=float) * scale
        ax.bar(x + (i - (len(models) - 1) / 2) * width, heights, width, label=style(model).display,
               color=style(model).colour, edgecolor="white", linewidth=0.5)
    ax.set_xticks(x, groups)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _curves(ax, section: dict, x_key: str, y_key: str, x_scale: float = 1.0) -> None:
    """One line with markers per model: section[model][x_key] against 100 * section[model][y_key]."""
    for model in order_models(section):
        curve = section[model]
        ax.plot(np.asarray(curve[x_key], dtype=float) * x_scale, np.asarray(curve[y_key], dtype=float) * 100,
                marker="o", markersize=3.5, linewidth=1.5, color=style(model).colour, label=style(model).display)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)


def _legend_below(fig: Figure, ax) -> None:
    """One legend for the whole figure, under the axes, so it never hides data."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=8, frameon=False)


def plot_accuracy(accuracy: dict, variants: list[str], path: Path) -> Path:
    """Grouped bars: top-1 accuracy (%) per test variant, one bar per model."""
    fig, (ax,) = _new_figure(7, 4.2)
    values = {m: [accuracy[m].get(v, np.nan) for v in variants] for m in accuracy}
    _grouped_bars(ax, variants, values, scale=100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("test variant")
    ax.set_ylabel("top-1 accuracy (%)")
    _legend_below(fig, ax)
    return _save(fig, path)


def plot_fourier(fourier: dict, path: Path) -> Path:
    """Two panels: accuracy (%) on low-pass and on high-pass filtered images against the cut-off radius."""
    fig, axes = _new_figure(9, 4, ncols=2)
    titles = ("low-pass (frequencies ≤ r kept)", "high-pass (frequencies > r kept)")
    for ax, key, title in zip(axes, ("low", "high"), titles):
        _curves(ax, fourier, "radius", key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("cut-off radius r (fraction of Nyquist)")
    axes[0].set_ylabel("top-1 accuracy (%)")
    _legend_below(fig, axes[0])
    return _save(fig, path)


def plot_cka(entry: dict, student: str, teacher: str, path: Path) -> Path:
    """Heatmap of linear CKA, student layers (rows) against teacher layers (columns), colour scale 0..1."""
    matrix = np.asarray(entry["matrix"], dtype=float)
    rows, cols = entry["student_layers"], entry["teacher_layers"]
    fig, (ax,) = _new_figure(max(4.5, 0.45 * len(cols) + 2.5), max(3.5, 0.35 * len(rows) + 1.8))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel(f"{style(teacher).display} layer")
    ax.set_ylabel("student layer")
    ax.set_title(style(student).display, fontsize=10)
    if matrix.size <= 64:  # beyond that the numbers no longer fit in the cells
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 else "white")
    fig.colorbar(image, ax=ax, label="linear CKA (debiased)")
    return _save(fig, path)


def plot_occlusion(occlusion: dict, path: Path) -> Path:
    """Accuracy (%) against the fraction of the image occluded (%)."""
    fig, (ax,) = _new_figure(6.5, 4.2)
    _curves(ax, occlusion, "fraction", "accuracy", x_scale=100)
    ax.set_xlabel("image area occluded (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    _legend_below(fig, ax)
    return _save(fig, path)


def plot_adversarial(adversarial: dict, path: Path) -> Path:
    """Two panels, FGSM and PGD: accuracy (%) against the L-inf budget eps, in units of 1/255."""
    fig, axes = _new_figure(9, 4, ncols=2)
    for ax, attack in zip(axes, ("fgsm", "pgd")):
        # budgets are usually quoted as k/255 for images in [0, 1], so the axis shows k
        _curves(ax, {m: a[attack] for m, a in adversarial.items() if attack in a}, "eps", "accuracy", x_scale=255)
        ax.set_title(attack.upper(), fontsize=10)
        ax.set_xlabel("ε × 255 (L∞ budget, images in [0, 1])")
    axes[0].set_ylabel("top-1 accuracy (%)")
    _legend_below(fig, axes[0] if axes[0].lines else axes[1])
    return _save(fig, path)


def plot_gradcam_measures(gradcam: dict, measures: list[str], path: Path) -> Path:
    """Grouped bars: each GradCAM measure (unitless), one bar per model."""
    fig, (ax,) = _new_figure(7.5, 4.2)
    _grouped_bars(ax, measures, {m: [gradcam[m].get(k, np.nan) for k in measures] for m in gradcam})
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)  # the Spearman correlation may go negative
    ax.set_ylabel("value (fraction; Spearman ρ for rank_corr)")
    _legend_below(fig, ax)
    return _save(fig, path)


def _minmax(heat: np.ndarray) -> np.ndarray:
    """Scale a map to [0, 1] for display; a constant map becomes zeros."""
    heat = np.nan_to_num(np.asarray(heat, dtype=float))
    span = heat.max() - heat.min()
    return (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)


def plot_gradcam_grid(grid: dict, path: Path) -> Path:
    """One row per model (teachers first), one column per image: the image under its min-max scaled map."""
    images, labels, names = grid["images"], grid["labels"], grid["class_names"]
    models = order_models(grid["maps"])
    n_rows, n_cols = len(models), len(images)
    fig = Figure(figsize=(1.5 * n_cols + 1.4, 1.5 * n_rows + 0.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, model in enumerate(models):
        for c, image in enumerate(images):
            ax = axes[r, c]
            h, w = image.shape[:2]
            ax.imshow(image)
            # extent stretches the coarse map over the image; bilinear interpolation smooths its cells
            ax.imshow(_minmax(grid["maps"][model][c]), cmap="jet", alpha=0.45, vmin=0, vmax=1,
                      extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(str(names[int(labels[c])]), fontsize=8)
            if c == 0:
                ax.set_ylabel(textwrap.fill(style(model).display, 16), fontsize=7)
    return _save(fig, path)


def plot_sweep(series: dict, points: list[str], measures: list[tuple[str, str, float]], path: Path,
               swept: tuple[str, list[float]] | None = None) -> Path:
    """One panel per measure: mean ± std over seeds against the grid point, one line per student.

    series: {student: {measure: [stats dict or None per point]}}; measures: [(key, axis label, scale)].
    swept: (key, numeric value per point) when one numeric setting was swept: the x axis is then that value.
    """
    fig, axes = _new_figure(max(7.0, 3.6 * len(measures)), 3.8, ncols=max(1, len(measures)))  # room for the legend
    x = np.asarray(swept[1], dtype=float) if swept else np.arange(len(points))
    for ax, (key, label, scale) in zip(axes, measures):
        for student in order_models(series):
            stats = series[student][key]
            mean = np.array([np.nan if not s or s.get("mean") is None else s["mean"] for s in stats]) * scale
            std = np.array([np.nan if not s or s.get("std") is None else s["std"] for s in stats]) * scale
            ax.errorbar(x, mean, yerr=np.nan_to_num(std), marker="o", markersize=3.5, capsize=3, linewidth=1.5,
                        color=style(student).colour, label=style(student).display)
        if swept:
            ax.set_xticks(x, [f"{v:g}" for v in x], fontsize=8)
        else:
            ax.set_xticks(x, points, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_xlabel(swept[0] if swept else "grid point")
    _legend_below(fig, axes[0])
    return _save(fig, path)
