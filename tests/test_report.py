"""The report writer on synthetic metrics: files, Table 1, self-contained HTML, JSON, and computed findings."""
import json
import re

import numpy as np
import pytest

from scipy import stats as scipy_stats

from analysis.report import write_report
from analysis.stats import difference, holm, summarize

VARIANTS = ["clean", "occluded", "texture"]
TEACHERS = ["teacher_vit", "teacher_cnn"]
STUDENTS = ["student_kd_vit", "student_kd_cnn", "student_independent", "student_logit_kd"]
MODELS = TEACHERS + STUDENTS
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _curve(rng, xs, start, stop):
    """A noisy decreasing accuracy curve from about `start` to about `stop`."""
    ys = np.linspace(start, stop, len(xs)) + rng.normal(0, 0.02, len(xs))
    return np.clip(ys, 0, 1).round(4).tolist()


def _metrics(seed=0):
    """Plausible random values for every section and model, with one NaN (a constant GradCAM map)."""
    rng = np.random.default_rng(seed)
    radius, fraction, eps = [0.1, 0.25, 0.5, 0.75, 1.0], [0.0, 0.25, 0.5, 0.75], [0.0, 1 / 255, 4 / 255, 8 / 255]
    metrics = {
        "meta": {"dataset": "shapes", "variants": VARIANTS, "models": MODELS,
                 "pairs": {"student_kd_vit": "teacher_vit", "student_kd_cnn": "teacher_cnn",
                           "student_logit_kd": "teacher_vit"},
                 "teachers": {"teacher_vit": "vit_demo", "teacher_cnn": "wrn_demo"}, "commit": "abc123",
                 "config_digest": "d1g35t", "created": "2025-01-01T12:00:00",
                 "seconds": {"teachers": 12.5, "students": 30.1}},
        "accuracy": {m: {v: float(rng.uniform(0.4, 0.99)) for v in VARIANTS} for m in MODELS},
        "cka": {m: {"student_layers": ["layer1", "layer2", "layer3"],
                    "teacher_layers": ["blocks.0", "blocks.1", "blocks.2", "blocks.3"],
                    "matrix": rng.uniform(0, 1, (3, 4)).tolist()} for m in STUDENTS},
        "cka_initial": {"layer": "layer1", "teacher_layer": "blocks.0",
                        **{m: float(rng.uniform(0.4, 0.9)) for m in STUDENTS}},
        "fourier": {}, "gradcam": {}, "occlusion": {}, "adversarial": {}, "shape_bias": {},
    }
    for m in MODELS:
        clean = float(rng.uniform(0.8, 0.99))
        metrics["fourier"][m] = {"radius": radius, "low": _curve(rng, radius, 0.3, clean),
                                 "high": _curve(rng, radius, clean, 0.1), "clean": clean,
                                 "low_frequency_reliance": float(rng.uniform(0.3, 0.9)),
                                 "high_frequency_reliance": float(rng.uniform(0.1, 0.6))}
        metrics["gradcam"][m] = {"entropy": float(rng.uniform(0.6, 0.95)), "mass50": float(rng.uniform(0.1, 0.4)),
                                 "mass90": float(rng.uniform(0.4, 0.8)), "energy_inside": float(rng.uniform(0.3, 0.9)),
                                 "rank_corr_teacher": float(rng.uniform(-0.2, 0.9)), "maps": 100, "dropped": 3}
        metrics["occlusion"][m] = {"fraction": fraction, "accuracy": _curve(rng, fraction, 0.95, 0.3)}
        metrics["adversarial"][m] = {"fgsm": {"eps": eps, "accuracy": _curve(rng, eps, 0.95, 0.2)},
                                     "pgd": {"eps": eps, "accuracy": _curve(rng, eps, 0.95, 0.05)}}
        shape, texture = int(rng.integers(50, 300)), int(rng.integers(50, 300))
        metrics["shape_bias"][m] = {"shape_bias": shape / (shape + texture), "shape_decisions": shape,
                                    "texture_decisions": texture, "n": 400}
    metrics["gradcam"]["teacher_vit"]["rank_corr_teacher"] = float("nan")
    return metrics


def _grid(seed=0, s=3):
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 256, (s, 32, 32, 3), dtype=np.uint8), "labels": np.arange(s),
            "class_names": [f"class {i}" for i in range(s)], "maps": {m: rng.random((s, 4, 4)) for m in MODELS[:3]}}


def _section(markdown: str, heading: str) -> str:
    return markdown.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]


def _rows(section: str) -> dict[str, list[str]]:
    """Table rows of a section by their first non-empty cell (several rows may share it: the last wins)."""
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and "---" not in line:
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[next(c for c in cells if c)] = cells
    return rows


def test_full_report(tmp_path):
    metrics = _metrics()
    paths = write_report(metrics, tmp_path, gradcam_grid=_grid())

    plot_keys = [k for k in paths if k.startswith("plot_")]
    assert {"plot_accuracy", "plot_fourier", "plot_occlusion", "plot_adversarial", "plot_gradcam",
            "plot_gradcam_grid", *(f"plot_cka_{m}" for m in STUDENTS)} == set(plot_keys)
    for key in plot_keys:
        assert paths[key].parent == tmp_path and paths[key].read_bytes().startswith(PNG_SIGNATURE)

    markdown = paths["markdown"].read_text(encoding="utf-8")
    headings = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert headings[:4] == ["## Verdicts: the paper's claim", "## Table 1: top-1 accuracy (%) per test variant",
                            "## Premise (measured on the teachers)", "## Findings (exploratory)"]
    table1 = _section(markdown, "Table 1")
    header = next(line for line in table1.splitlines() if line.startswith("| Distillation"))
    assert all(v in header for v in VARIANTS)
    kd_row = next(line for line in table1.splitlines() if "KD student (ViT→CNN" in line)
    assert f"| {metrics['accuracy']['student_kd_vit']['occluded'] * 100:.1f} |" in kd_row  # one run: one decimal
    rows = [line.split(" | ")[:3] for line in table1.splitlines() if line.startswith("| ") and "---" not in line]
    # one row per teacher, then its students
    assert rows[1:] == [["| ViT → ResNet", "Teacher", "ViT teacher (vit_demo)"],
                        ["| ", "Student", "KD student (ViT→CNN, PCA+GL)"],
                        ["| ", "Student", "Logit-KD student (ViT logits)"],
                        ["| CNN → ResNet", "Teacher", "CNN teacher (wrn_demo)"],
                        ["| ", "Student", "Control student (CNN→CNN, hint)"],
                        ["| none (CE only)", "Student", "Independent student (CE only)"]]
    assert "Not measured:" not in markdown and "Not measured." not in markdown
    assert all(f"({p.name})" in markdown for k, p in paths.items() if k.startswith("plot_"))
    gradcam = _rows(_section(markdown, "GradCAM attention"))
    assert gradcam["KD student (ViT→CNN, PCA+GL)"][-1] == "3 of 100"  # maps dropped, counted
    verdicts = _rows(_section(markdown, "Verdicts"))
    assert verdicts["more shape-biased"][-1] == "fewer than 3 runs: cannot judge"  # one run per model

    page = paths["html"].read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(plot_keys) and all(s.startswith("data:image/png;base64,") for s in sources)
    # base64 text may contain any letters, so look for URLs only outside the embedded images
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "http" not in text and "<link" not in text and "<script" not in text
    assert "<table>" in page and "KD student (ViT→CNN, PCA+GL)" in page

    loaded = json.loads(paths["metrics"].read_text())
    assert loaded["gradcam"]["teacher_vit"]["rank_corr_teacher"] is None
    assert "NaN" not in paths["metrics"].read_text()
    assert loaded["meta"].pop("correction").startswith("Holm")
    assert set(loaded.pop("claim")) == {"shape_bias", "low_frequency", "occlusion"}
    assert loaded.pop("premise")["claim_depends_on"] == "features"
    metrics["gradcam"]["teacher_vit"]["rank_corr_teacher"] = None
    assert loaded == metrics


def _seeded(values: dict, variant: str = "occluded", num_classes: int = 10, test_images: int = 500) -> dict:
    """Metrics whose models have per-seed values: {model: [acc per seed on `variant`]}."""
    n = max(len(v) for v in values.values())
    stats = {m: {f"accuracy.{variant}": {**summarize(v, "accuracy"), "seeds": list(range(len(v)))}}
             for m, v in values.items()}
    return {"meta": {"variants": [variant], "num_classes": num_classes, "models": list(values),
                     "test_images": test_images, "occlusion_fraction": 0.4},
            "seeds": list(range(n)), "accuracy": {m: {variant: float(np.mean(v))} for m, v in values.items()},
            "stats": stats}


def _add(metrics: dict, measure: str, values: dict) -> None:
    for model, v in values.items():
        metrics["stats"].setdefault(model, {})[measure] = summarize(v, measure)


KD, CONTROL, INDEPENDENT = "student_kd_vit", "student_kd_cnn", "student_independent"


def test_verdicts_first_with_holm_within_the_claims_tests(tmp_path):
    """The three claim tests form one family: each p is Holm-adjusted over those three, independently of the
    exploratory comparisons; the verdict follows the adjusted p."""
    occluded = {KD: [0.66, 0.61, 0.71], CONTROL: [0.70, 0.72, 0.73], INDEPENDENT: [0.60, 0.62, 0.64]}
    shape = {KD: [0.30, 0.32, 0.31], CONTROL: [0.10, 0.12, 0.11], INDEPENDENT: [0.10, 0.13, 0.11]}
    low = {KD: [0.50, 0.55, 0.60], CONTROL: [0.50, 0.56, 0.62], INDEPENDENT: [0.4, 0.45, 0.5]}
    metrics = _seeded(occluded)
    _add(metrics, "shape_bias", shape)
    _add(metrics, "fourier.low_frequency_reliance", low)
    paths = write_report(metrics, tmp_path)
    markdown = paths["markdown"].read_text()
    assert markdown.index("## Verdicts") < markdown.index("## Table 1") < markdown.index("## Findings")
    raw = [scipy_stats.ttest_ind(m[KD], m[CONTROL], equal_var=False).pvalue for m in (shape, low, occluded)]
    adjusted = holm(raw)
    claim = json.loads(paths["metrics"].read_text())["claim"]
    for key, p, p_holm in zip(("shape_bias", "low_frequency", "occlusion"), raw, adjusted):
        assert claim[key]["p"] == pytest.approx(p) and claim[key]["p_holm"] == pytest.approx(p_holm)
        assert claim[key]["family"] == "primary"
    assert claim["shape_bias"]["verdict"] == "yes" and claim["shape_bias"]["measure"] == "shape_bias"
    assert claim["low_frequency"]["verdict"] == "not shown"
    assert claim["occlusion"]["measure"] == "accuracy.occluded" and claim["occlusion"]["verdict"] == "not shown"
    d = difference(shape[KD], shape[CONTROL])
    assert claim["shape_bias"]["difference"] == pytest.approx(0.2) and claim["shape_bias"]["ci95"] == pytest.approx(list(d.ci95))
    assert '<td class="n">66 ± 5 [54, 78]</td>' in paths["html"].read_text()
    verdicts = _rows(_section(markdown, "Verdicts"))
    row = verdicts["more shape-biased"]
    assert row[2] == "0.31 ± 0.01 [0.29, 0.33] vs 0.11 ± 0.01 [0.09, 0.13]"
    assert row[3] == "+0.200 [0.177, 0.223]" and row[5] == "yes"
    assert row[4] == ("< 0.001" if adjusted[0] < 0.001 else f"{adjusted[0]:.3f}")
    # 66.0 ± 5.0 and 71.7 ± 1.5: each mean to the digit of its standard deviation's first figure
    assert verdicts["more robust to occlusion"][2] == "66 ± 5 [54, 78] vs 72 ± 2 [68, 75]"
    assert "accuracy on *occluded* (40% of the image)" in verdicts["more robust to occlusion"][1]


def test_exploratory_comparisons_are_holm_corrected_across_all_of_them(tmp_path):
    occluded = {KD: [0.80, 0.81, 0.82], CONTROL: [0.70, 0.71, 0.72], INDEPENDENT: [0.78, 0.82, 0.80]}
    clean = {KD: [0.90, 0.91, 0.92], CONTROL: [0.85, 0.86, 0.88], INDEPENDENT: [0.90, 0.92, 0.91]}
    metrics = _seeded(occluded)
    metrics["meta"]["variants"] = ["clean", "occluded"]
    _add(metrics, "accuracy.clean", clean)
    markdown = write_report(metrics, tmp_path)["markdown"].read_text()
    exploratory = [(occluded[KD], occluded[INDEPENDENT]), (clean[KD], clean[CONTROL]), (clean[KD], clean[INDEPENDENT])]
    adjusted = holm([scipy_stats.ttest_ind(a, b, equal_var=False).pvalue for a, b in exploratory])
    lines = [line for line in _section(markdown, "Findings").splitlines() if line.startswith("| ") and "---" not in line]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:]]
    assert [(c[0], c[2]) for c in cells] == [("Accuracy on *occluded* (40% of the image)", "Independent student (CE only)"),
                                             ("Accuracy on *clean*", "Control student (CNN→CNN, hint)"),
                                             ("Accuracy on *clean*", "Independent student (CE only)")]
    assert [c[5] for c in cells] == [f"{p:.3f}" for p in adjusted]
    assert cells[1][6] == ("higher" if adjusted[1] < 0.05 else "not separated")
    assert cells[0][6] == "not separated"
    # the claim's own test is not in the exploratory family
    assert _rows(_section(markdown, "Verdicts"))["more robust to occlusion"][-1] == "yes"


def test_occlusion_is_judged_on_the_variant_with_the_curves_area_beside(tmp_path):
    """At the curve's largest fraction every model is near chance; the claim reads the occluded variant."""
    metrics = _seeded({KD: [0.66, 0.61, 0.71], CONTROL: [0.70, 0.72, 0.73]})
    _add(metrics, "occlusion@0.9", {KD: [0.10, 0.11, 0.12], CONTROL: [0.15, 0.16, 0.17]})
    _add(metrics, "occlusion.area", {KD: [0.50, 0.52, 0.51], CONTROL: [0.55, 0.56, 0.57]})
    paths = write_report(metrics, tmp_path)
    claim = json.loads(paths["metrics"].read_text())["claim"]["occlusion"]
    assert claim["measure"] == "accuracy.occluded" and claim["verdict"] == "not shown"
    assert claim["beside"]["measure"] == "occlusion.area" and claim["beside"]["family"] == "exploratory"
    assert claim["beside"]["difference"] == pytest.approx(-0.05)
    verdicts = _section(paths["markdown"].read_text(), "Verdicts")
    assert "| beside it: mean accuracy over the occlusion curve | 51 ± 1 [49, 53] vs 56 ± 1 [54, 58] |" in verdicts
    assert "occlusion@0.9" not in verdicts and "90%" not in verdicts


def test_at_chance_is_no_verdict(tmp_path):
    """Both students within the binomial 95% interval of chance for 500 images and 10 classes (7.4-12.8%):
    'at chance', however well the runs separate them."""
    metrics = _seeded({KD: [0.115, 0.12, 0.118], CONTROL: [0.08, 0.082, 0.081], INDEPENDENT: [0.5, 0.52, 0.51]})
    lo, hi = scipy_stats.binom.interval(0.95, 500, 0.1)
    assert (lo / 500, hi / 500) == (0.074, 0.128)
    paths = write_report(metrics, tmp_path)
    claim = json.loads(paths["metrics"].read_text())["claim"]["occlusion"]
    assert claim["verdict"] == "at chance" and claim["p_holm"] is None
    findings = _rows(_section(paths["markdown"].read_text(), "Findings"))
    assert findings["Accuracy on *occluded* (40% of the image)"][-1] == "lower"  # one model above chance: judged
    # with 5,000 test images the band is 9.2-10.8%: the same accuracies are above it and are judged
    wide = _seeded({KD: [0.115, 0.12, 0.118], CONTROL: [0.08, 0.082, 0.081]}, test_images=5000)
    assert json.loads(write_report(wide, tmp_path)["metrics"].read_text())["claim"]["occlusion"]["verdict"] == "yes"


def test_two_seeds_cannot_be_judged(tmp_path):
    """The digits run: 2 seeds gave '93.45 ± 2.56 [70.45, 116.46]'. Now: no interval, no test, and the report says why."""
    metrics = _seeded({KD: [0.9345 - 0.0181, 0.9345 + 0.0181], CONTROL: [0.3886 - 0.0766, 0.3886 + 0.0766]})
    paths = write_report(metrics, tmp_path)
    markdown = paths["markdown"].read_text()
    assert '<td class="n">93 ± 3</td>' in paths["html"].read_text()  # numbers right-aligned, with or without interval
    table1 = _rows(_section(markdown, "Table 1"))
    assert table1["Student"][-1] == "40 ± 10"  # the control: 38.86 ± 10.83, to the tens
    assert "| 93 ± 3 |" in _section(markdown, "Table 1") and "116" not in markdown
    assert "With fewer than 3 seeds the spread cannot be judged" in markdown
    assert _rows(_section(markdown, "Verdicts"))["more robust to occlusion"][-1] == "fewer than 3 runs: cannot judge"


def test_zero_spread_is_not_separated(tmp_path):
    metrics = _seeded({KD: [0.8, 0.8, 0.8], CONTROL: [0.7, 0.7, 0.7]})
    paths = write_report(metrics, tmp_path)
    assert json.loads(paths["metrics"].read_text())["claim"]["occlusion"]["verdict"] == "no spread: cannot judge"


@pytest.mark.slow
def test_single_runs_make_no_claim(tmp_path):
    metrics = _metrics()
    findings = _section(write_report(metrics, tmp_path)["markdown"].read_text(), "Findings")
    assert "One run per model: no spread over seeds" in findings or "One run per model" in \
        _section(write_report(metrics, tmp_path)["markdown"].read_text(), "Verdicts")
    verdicts = [row[-1] for row in _rows(findings).values()][1:]
    assert verdicts and set(verdicts) == {"fewer than 3 runs: cannot judge"}


def test_premise_on_head_and_features_and_warnings_first(tmp_path):
    metrics = _metrics()
    metrics["meta"]["num_classes"] = 10
    metrics["meta"]["teacher_training"] = {
        "teacher_vit": "was pretrained on shape-only images", "teacher_cnn": "was trained on this run's training split"}
    metrics["accuracy"]["teacher_vit"]["clean"] = 0.329  # the demo ViT on sklearn digits: near chance
    metrics["accuracy"]["teacher_cnn"]["clean"] = 0.5
    metrics["accuracy"]["student_independent"]["clean"] = 0.6
    metrics["shape_bias"]["teacher_vit"]["shape_bias"] = 0.88
    metrics["shape_bias"]["teacher_cnn"]["shape_bias"] = 0.1
    metrics["fourier"]["teacher_vit"]["low_frequency_reliance"] = 0.4
    metrics["fourier"]["teacher_cnn"]["low_frequency_reliance"] = 0.6
    metrics["probe"] = {t: {"layer": layer, "pooling": "mean", "train_samples": 10000, "l2": 0.001,
                            "holdout_accuracy": 0.8, "accuracy.clean": 0.85, "shape_bias": bias,
                            "low_frequency_reliance": 0.5} for t, layer, bias in
                        (("teacher_vit", "blocks.2", 0.35), ("teacher_cnn", "layer3", 0.05))}
    paths = write_report(metrics, tmp_path)
    markdown = paths["markdown"].read_text()
    head = markdown.split("## Verdicts", 1)[0]
    lines = [line for line in head.splitlines() if line]
    assert lines[1].startswith("Warning: the ViT teacher's clean accuracy (32.9%) is less than a third of the way "
                               "from chance (10.0%) to 100%")
    assert "Warning: the CNN teacher (50.0% clean) is not better than the independent student (60.0%)" in head
    premise = _section(markdown, "Premise (measured on the teachers)")
    assert "| ViT teacher | its head | 32.9% | 0.880 | 0.400 |" in premise
    assert "| ViT teacher | its features (linear probe) | 85.0% | 0.350 | 0.500 |" in premise
    assert "On the features (what the claim depends on): shape bias as the premise assumes; low-frequency reliance " \
           "not as the premise assumes: the premise does not hold." in premise
    assert "On the heads: shape bias as the premise assumes; low-frequency reliance not as" in premise
    assert "trained on different data: the ViT teacher was pretrained on shape-only images; the CNN teacher was " \
           "trained on this run's training split" in premise
    record = json.loads(paths["metrics"].read_text())["premise"]
    assert record["teacher_vit"]["head"]["shape_bias"] == 0.88 and record["teacher_vit"]["features"]["shape_bias"] == 0.35
    assert record["holds_on_features"] == {"shape_bias": True, "low_frequency_reliance": False}


@pytest.mark.slow
def test_report_on_data_it_was_not_built_for(tmp_path):
    """An ImageFolder run: no texture variant, no shape bias, a subset for the attacks, GradCAM grid stated."""
    metrics = _metrics()
    for m in MODELS:
        metrics["accuracy"][m].pop("texture")
    del metrics["shape_bias"]
    metrics["meta"].update(dataset="imagefolder", variants=["clean", "occluded"], num_classes=10,
                           adversarial_images=200,
                           shape_bias_note="not measured: imagefolder has no cue-conflict variant (no texture stands "
                                           "for a class)",
                           gradcam_common_grid={"size": [2, 2], "native": {"teacher_vit": [8, 8], "student_kd_vit": [2, 2]},
                                                "resampling": "the coarsest model's grid; finer maps area-averaged onto it"})
    paths = write_report(metrics, tmp_path)
    markdown = paths["markdown"].read_text()
    assert "*texture*" not in markdown and "*occluded*" in markdown
    assert "Shape bias on imagefolder: not measured: imagefolder has no cue-conflict variant" in markdown
    assert "Measured on a subset: the first 200 clean test images (analysis.adversarial_samples)" in markdown
    assert "Maps are compared on one common 2×2 grid: the coarsest model's grid; finer maps area-averaged onto it. " \
           "Native map sizes: ViT teacher 8×8; KD student (ViT→CNN, PCA+GL) 2×2." in markdown
    assert "paper (published)" not in markdown
    assert json.loads(paths["metrics"].read_text())["claim"]["shape_bias"]["verdict"] == "not measured"


def test_published_numbers_beside_the_measured_ones(tmp_path):
    metrics = _metrics()
    metrics["meta"]["dataset"] = "stl10"
    table1 = _section(write_report(metrics, tmp_path)["markdown"].read_text(), "Table 1")
    rows = {line.split(" | ")[2]: line for line in table1.splitlines() if line.count(" | ") > 3}
    assert rows["Model"].endswith("| paper (published) |")
    assert rows["ViT teacher (vit_demo)"].endswith("| 95.16 |")
    assert rows["KD student (ViT→CNN, PCA+GL)"].endswith("| 36.83 |")
    assert rows["Control student (CNN→CNN, hint)"].endswith("| 26.65 |")
    assert rows["Independent student (CE only)"].endswith("| — |")
    assert "STL-10 with occlusions added" in table1


def test_sweep_report(tmp_path):
    """Grid points are models "<student>@<point>": verdicts, Table 1 and findings per point, a sweep table and plot."""
    values = {}
    for point, shift in (("kd_lambda=0.5", 0.0), ("kd_lambda=2", 0.1)):
        values.update({f"student_kd_vit@{point}": [0.6 + shift, 0.62 + shift, 0.61 + shift],
                       f"student_independent@{point}": [0.55, 0.56, 0.57]})
    metrics = _seeded(values, variant="clean")
    metrics["meta"]["sweep"] = {"train.kd_lambda": [0.5, 2]}
    _add(metrics, "accuracy.occluded", {m: [v - 0.2 for v in vs] for m, vs in values.items()})
    _add(metrics, "occlusion@0.9", {m: [0.1, 0.1, 0.1] for m in values})
    paths = write_report(metrics, tmp_path)
    markdown = paths["markdown"].read_text()
    assert "## Table 1: top-1 accuracy (%) per test variant at kd_lambda=0.5" in markdown
    assert "## Findings (exploratory) at kd_lambda=2" in markdown and "## Verdicts: the paper's claim at kd_lambda=2" in markdown
    sweep = _section(markdown, "Sweep")
    assert "Swept: train.kd_lambda ∈ {0.5, 2}." in sweep
    assert "| KD student (ViT→CNN, PCA+GL) | kd_lambda=2 | 71 ± 1 [69, 73] | 51 ± 1 [49, 53] |" in sweep
    assert "accuracy, occluded variant" in sweep and "90%" not in sweep  # the claim's measure, not the curve's end
    assert paths["plot_sweep"].read_bytes().startswith(PNG_SIGNATURE)
    assert set(json.loads(paths["metrics"].read_text())["claim"]) == {"kd_lambda=0.5", "kd_lambda=2"}


def test_only_accuracy(tmp_path):
    metrics = {"meta": {"variants": ["occluded"]}, "accuracy": {
        "student_kd_vit": {"occluded": 0.8}, "student_kd_cnn": {"occluded": 0.7}, "student_independent": {"occluded": 0.6}}}
    metrics["meta"]["models"] = ["teacher_vit", "student_kd_vit", "student_kd_cnn", "student_independent"]
    paths = write_report(metrics, tmp_path)
    assert set(paths) == {"markdown", "html", "metrics", "plot_accuracy"}
    markdown = paths["markdown"].read_text()
    assert "Not measured: Fourier analysis, CKA with the ViT teacher, GradCAM attention, Occlusion, " \
           "Adversarial robustness, Shape bias." in markdown
    assert markdown.count("Not measured.") == 6
    assert "Not measured for: ViT teacher." in markdown  # in meta.models but without accuracy
    assert "| ViT → ResNet | Teacher | ViT teacher | — |" in markdown
    assert "data:image/png;base64," in paths["html"].read_text()


def test_empty_sections(tmp_path):
    """Empty sections, as a run that measured nothing leaves them, count as not measured."""
    metrics = {"accuracy": {}, "fourier": {}, "cka": {},
               "cka_initial": {"layer": "layer1", "teacher_layer": "blocks.0"}}
    paths = write_report(metrics, tmp_path / "new")
    markdown = paths["markdown"].read_text()
    assert "CKA with the ViT teacher" in _section(markdown, "Findings")
    assert "Accuracy was not measured." in markdown and "The KD student was not measured: no verdict." in markdown
    loaded = json.loads(paths["metrics"].read_text())
    assert {k: loaded[k] for k in metrics} == metrics
    assert markdown.count("Not measured.") == 7
    assert "<img" not in paths["html"].read_text()


@pytest.mark.slow
def test_report_of_a_tiny_run(tiny_run):
    """End to end: the claim judged on the occluded variant, the premise on heads and cached features, dropped
    GradCAM maps counted, the correction named; one seed, so nothing is judged."""
    m = json.loads((tiny_run / "report" / "metrics.json").read_text())
    assert m["claim"]["occlusion"]["measure"] == "accuracy.occluded" and m["claim"]["occlusion"]["beside"]["measure"] == \
        "occlusion.area"
    assert {c["verdict"] for c in m["claim"].values()} <= {"fewer than 3 runs: cannot judge", "at chance"}
    assert m["meta"]["correction"].startswith("Holm") and m["meta"]["test_images"] == 40
    for teacher in ("teacher_vit", "teacher_cnn"):
        features = m["premise"][teacher]["features"]
        assert features == m["probe"][teacher] and features["train_samples"] == 128 * 3
        assert 0 <= features["accuracy.clean"] <= 1 and 0 <= features["low_frequency_reliance"] <= 1
        assert m["premise"][teacher]["trained_on"] and m["premise"][teacher]["head"]["accuracy.clean"] is not None
    for model, entry in m["gradcam"].items():
        assert entry["maps"] == 8 and 0 <= entry["dropped"] <= 8 and entry["cue_conflict"]["maps"] == 8
    markdown = (tiny_run / "report" / "report.md").read_text()
    assert markdown.index("## Verdicts") < markdown.index("## Table 1") < markdown.index("## Premise") < \
        markdown.index("## Findings")
    assert "maps dropped (no mass)" in markdown and "its features (linear probe)" in markdown


def test_a_full_disk_leaves_no_half_written_report(tmp_path):
    """Each of metrics.json, report.md and report.html is written whole under its name or not at all: a full disk is
    an OSError naming the file (the disk's one line in `hakd`), with no part of it left behind."""
    import errno
    (tmp_path / "metrics.json.tmp").symlink_to("/dev/full")  # every write into it fails with ENOSPC
    with pytest.raises(OSError) as e:
        write_report(_metrics(), tmp_path, gradcam_grid=_grid())
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "metrics.json")
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "metrics.json.tmp").is_symlink()
