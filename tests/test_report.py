"""The report writer on synthetic metrics: files, Table 1, self-contained HTML, JSON, and computed findings."""
import json
import re

import numpy as np

from analysis.report import write_report
from analysis.stats import summarize

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
                                 "rank_corr_teacher": float(rng.uniform(-0.2, 0.9))}
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


def _findings(markdown: str) -> str:
    return markdown.split("## Findings", 1)[1].split("\n## ", 1)[0]


def test_full_report(tmp_path):
    metrics = _metrics()
    paths = write_report(metrics, tmp_path, gradcam_grid=_grid())

    plot_keys = [k for k in paths if k.startswith("plot_")]
    assert {"plot_accuracy", "plot_fourier", "plot_occlusion", "plot_adversarial", "plot_gradcam",
            "plot_gradcam_grid", *(f"plot_cka_{m}" for m in STUDENTS)} == set(plot_keys)
    for key in plot_keys:
        assert paths[key].parent == tmp_path and paths[key].read_bytes().startswith(PNG_SIGNATURE)

    markdown = paths["markdown"].read_text(encoding="utf-8")
    table1 = markdown.split("## Table 1", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in table1.splitlines() if line.startswith("| Distillation"))
    assert all(v in header for v in VARIANTS)
    for name in ["ViT teacher (vit_demo)", "CNN teacher (wrn_demo)", "KD student (ViT→CNN, PCA+GL)",
                 "Control student (CNN→CNN, hint)", "Independent student (CE only)", "Logit-KD student (ViT logits)"]:
        assert name in table1
    kd_row = next(line for line in table1.splitlines() if "KD student (ViT→CNN" in line)
    assert f"{metrics['accuracy']['student_kd_vit']['occluded'] * 100:.2f}" in kd_row
    rows = [line.split(" | ")[:3] for line in table1.splitlines() if line.startswith("| ") and "---" not in line]
    # one row per teacher, then its students
    assert rows[1:] == [["| ViT → ResNet", "Teacher", "ViT teacher (vit_demo)"],
                        ["| ", "Student", "KD student (ViT→CNN, PCA+GL)"],
                        ["| ", "Student", "Logit-KD student (ViT logits)"],
                        ["| CNN → ResNet", "Teacher", "CNN teacher (wrn_demo)"],
                        ["| ", "Student", "Control student (CNN→CNN, hint)"],
                        ["| none (CE only)", "Student", "Independent student (CE only)"]]
    assert "Not measured" not in markdown
    assert all(f"({p.name})" in markdown for k, p in paths.items() if k.startswith("plot_"))

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
    metrics["gradcam"]["teacher_vit"]["rank_corr_teacher"] = None
    assert loaded == metrics


def _seeded(values: dict, variant: str = "occluded", num_classes: int = 10) -> dict:
    """Metrics whose students have per-seed accuracies on one variant: {model: [acc per seed]}."""
    stats = {m: {f"accuracy.{variant}": {**summarize(v), "seeds": list(range(len(v)))}} for m, v in values.items()}
    return {"meta": {"variants": [variant], "num_classes": num_classes, "models": list(values)},
            "seeds": [0, 1, 2], "accuracy": {m: {variant: float(np.mean(v))} for m, v in values.items()},
            "stats": stats}


def test_findings_say_whether_the_runs_separate_the_models(tmp_path):
    metrics = _seeded({"student_kd_vit": [0.80, 0.81, 0.82], "student_kd_cnn": [0.70, 0.71, 0.72],
                       "student_independent": [0.78, 0.82, 0.80]})
    findings = _findings(write_report(metrics, tmp_path)["markdown"].read_text())
    assert "mean ± standard deviation over 3 seeds" in findings
    assert "On *occluded*, the most accurate student is the KD student (81.00% ± 1.00 (95% interval " in findings
    # KD vs control: +10 points, interval (Welch, df 4) about 7.7 to 12.3: separated
    assert "against the control student (71.00% ± 1.00 (95% interval 68.52–73.48)) +10.00 points " \
           "(95% interval of the difference 7.73 to 12.27, Welch): the runs separate the models" in findings
    assert "against the independent student (80.00% ± 2.00 (95% interval 75.03–84.97)) difference +1.00 points " \
           "(95% interval -3.1" in findings and "includes 0): the runs do not separate the models" in findings
    table1 = write_report(metrics, tmp_path)["markdown"].read_text().split("## Table 1", 1)[1].split("\n## ", 1)[0]
    assert "| 81.00 ± 1.00 [78.52, 83.48] |" in table1
    assert '<td class="n">81.00 ± 1.00 [78.52, 83.48]</td>' in (tmp_path / "report.html").read_text()  # right-aligned


def test_the_claim_is_judged_over_seeds(tmp_path):
    metrics = _seeded({"student_kd_vit": [0.6, 0.61, 0.62], "student_kd_cnn": [0.6, 0.61, 0.62]}, variant="clean")
    for model, shape, low in (("student_kd_vit", [0.8, 0.82, 0.81], [0.5, 0.6, 0.7]),
                              ("student_kd_cnn", [0.3, 0.32, 0.31], [0.55, 0.6, 0.65])):
        metrics["stats"][model].update(shape_bias=summarize(shape), **{"fourier.low_frequency_reliance": summarize(low)})
    findings = _findings(write_report(metrics, tmp_path)["markdown"].read_text())
    assert "than the CNN-taught one, on this data: more shape-biased: yes (the runs separate the two); more reliant " \
           "on low frequencies: not shown (the runs do not separate the two); more robust to occlusion: not " \
           "measured." in findings


def test_single_runs_make_no_claim(tmp_path):
    metrics = _metrics()
    metrics["fourier"]["student_kd_vit"]["low_frequency_reliance"] = 0.8
    metrics["fourier"]["student_kd_cnn"]["low_frequency_reliance"] = 0.7
    metrics["adversarial"]["student_kd_vit"]["pgd"]["accuracy"][-1] = 0.1
    metrics["adversarial"]["student_kd_cnn"]["pgd"]["accuracy"][-1] = 0.25
    findings = _findings(write_report(metrics, tmp_path)["markdown"].read_text())
    assert "One run per model: no spread over seeds" in findings
    assert "Low-frequency reliance: the KD student 0.800; against the control student (0.700) difference +0.100, " \
           "but one of the two is a single run: no spread, so no claim" in findings
    assert "Accuracy under PGD at ε = 8/255: the KD student 10.00%; against the control student (25.00%) " \
           "difference -15.00 points" in findings
    assert "separate the models" not in findings


def test_premise_and_warnings_come_first(tmp_path):
    metrics = _metrics()
    metrics["meta"]["num_classes"] = 10
    metrics["accuracy"]["teacher_vit"]["clean"] = 0.329  # the demo ViT on sklearn digits: near chance
    metrics["accuracy"]["teacher_cnn"]["clean"] = 0.5
    metrics["accuracy"]["student_independent"]["clean"] = 0.6
    metrics["shape_bias"]["teacher_vit"]["shape_bias"] = 0.8
    metrics["shape_bias"]["teacher_cnn"]["shape_bias"] = 0.3
    metrics["fourier"]["teacher_vit"]["low_frequency_reliance"] = 0.4
    metrics["fourier"]["teacher_cnn"]["low_frequency_reliance"] = 0.6
    markdown = write_report(metrics, tmp_path)["markdown"].read_text()
    head = markdown.split("## Table 1", 1)[0]
    lines = [line for line in head.splitlines() if line]
    assert lines[1].startswith("Warning: the ViT teacher's clean accuracy (32.90%) is less than a third of the way "
                               "from chance (10.00%) to 100%")
    assert "Warning: the CNN teacher (50.00% clean) is not better than the independent student (60.00%)" in head
    premise = head.split("## Premise (measured on the teachers)", 1)[1]
    assert "Shape bias: ViT teacher 0.800, CNN teacher 0.300: as the premise assumes." in premise
    assert "Low-frequency reliance: ViT teacher 0.400, CNN teacher 0.600: not as the premise assumes." in premise
    assert "The premise does not hold on this data" in premise


def test_below_chance_is_not_a_finding(tmp_path):
    metrics = _seeded({"student_kd_vit": [0.08, 0.09, 0.07], "student_kd_cnn": [0.02, 0.03, 0.04],
                       "student_independent": [0.30, 0.31, 0.32]}, variant="texture")
    findings = _findings(write_report(metrics, tmp_path)["markdown"].read_text())
    assert "against the control student (3.00% ± 1.00 (95% interval 0.52–5.48)) the KD student and the control " \
           "student are at or below chance (10.00%): not read as a finding" in findings
    assert "against the independent student (31.00% ± 1.00 (95% interval 28.52–33.48)) the KD student is at or " \
           "below chance" in findings
    all_at_chance = _seeded({"student_kd_vit": [0.1, 0.1, 0.1], "student_kd_cnn": [0.05, 0.1, 0.1]})
    findings = _findings(write_report(all_at_chance, tmp_path)["markdown"].read_text())
    assert "On *occluded*, no student is above chance (10.00%)." in findings
    assert "the KD student and the control student are at or below chance" in findings


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
    markdown = write_report(metrics, tmp_path)["markdown"].read_text()
    assert "*texture*" not in markdown and "*occluded*" in markdown
    assert "Shape bias on imagefolder: not measured: imagefolder has no cue-conflict variant" in markdown
    assert "Measured on a subset: the first 200 clean test images (analysis.adversarial_samples)" in markdown
    assert "Maps are compared on one common 2×2 grid: the coarsest model's grid; finer maps area-averaged onto it. " \
           "Native map sizes: ViT teacher 8×8; KD student (ViT→CNN, PCA+GL) 2×2." in markdown
    assert "paper (published)" not in markdown


def test_published_numbers_beside_the_measured_ones(tmp_path):
    metrics = _metrics()
    metrics["meta"]["dataset"] = "stl10"
    table1 = write_report(metrics, tmp_path)["markdown"].read_text().split("## Table 1", 1)[1].split("\n## ", 1)[0]
    rows = {line.split(" | ")[2]: line for line in table1.splitlines() if line.count(" | ") > 3}
    assert rows["Model"].endswith("| paper (published) |")
    assert rows["ViT teacher (vit_demo)"].endswith("| 95.16 |")
    assert rows["KD student (ViT→CNN, PCA+GL)"].endswith("| 36.83 |")
    assert rows["Control student (CNN→CNN, hint)"].endswith("| 26.65 |")
    assert rows["Independent student (CE only)"].endswith("| — |")
    assert "STL-10 with occlusions added" in table1


def test_sweep_report(tmp_path):
    """Grid points are models "<student>@<point>": Table 1 and findings per point, a sweep table and plot."""
    values = {}
    for point, shift in (("kd_lambda=0.5", 0.0), ("kd_lambda=2", 0.1)):
        values.update({f"student_kd_vit@{point}": [0.6 + shift, 0.62 + shift, 0.61 + shift],
                       f"student_independent@{point}": [0.55, 0.56, 0.57]})
    metrics = _seeded(values, variant="clean")
    metrics["meta"]["sweep"] = {"train.kd_lambda": [0.5, 2]}
    paths = write_report(metrics, tmp_path)
    markdown = paths["markdown"].read_text()
    assert "## Table 1: top-1 accuracy (%) per test variant at kd_lambda=0.5" in markdown
    assert "## Findings at kd_lambda=2" in markdown
    sweep = markdown.split("## Sweep", 1)[1].split("\n## ", 1)[0]
    assert "Swept: train.kd_lambda ∈ {0.5, 2}." in sweep
    assert "| KD student (ViT→CNN, PCA+GL) | kd_lambda=2 | 71.00 ± 1.00 [68.52, 73.48] |" in sweep
    assert paths["plot_sweep"].read_bytes().startswith(PNG_SIGNATURE)


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
    assert "CKA with the ViT teacher" in _findings(paths["markdown"].read_text())
    assert "Accuracy was not measured." in paths["markdown"].read_text()
    assert json.loads(paths["metrics"].read_text()) == metrics
    assert paths["markdown"].read_text().count("Not measured.") == 7
    assert "<img" not in paths["html"].read_text()
