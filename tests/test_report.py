"""The report writer on synthetic metrics: files, Table 1, self-contained HTML, JSON, and computed findings."""
import json
import re

import numpy as np

from analysis.report import write_report

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


def _two_students(kd, control, independent):
    accuracy = {"student_kd_vit": {"occluded": kd}, "student_kd_cnn": {"occluded": control},
                "student_independent": {"occluded": independent}}
    return {"meta": {"variants": ["occluded"]}, "accuracy": accuracy}


def test_findings_follow_the_numbers(tmp_path):
    findings = _findings(write_report(_two_students(0.8123, 0.7778, 0.8323), tmp_path)["markdown"].read_text())
    assert "On *occluded*, the most accurate student is the independent student (83.23%)" in findings
    assert "the KD student (81.23%) is 3.45 points higher than the control student (77.78%)" in findings
    assert "2.00 points lower than the independent student (83.23%)" in findings

    findings = _findings(write_report(_two_students(0.7778, 0.8123, 0.5), tmp_path)["markdown"].read_text())
    assert "the most accurate student is the control student (81.23%)" in findings
    assert "the KD student (77.78%) is 3.45 points lower than the control student (81.23%)" in findings
    assert "27.78 points higher than the independent student (50.00%)" in findings


def test_findings_for_the_other_measures(tmp_path):
    metrics = _metrics()
    metrics["fourier"]["student_kd_vit"]["low_frequency_reliance"] = 0.8
    metrics["fourier"]["student_kd_cnn"]["low_frequency_reliance"] = 0.7
    metrics["cka_initial"].update(student_kd_vit=0.73, student_independent=0.68)
    metrics["gradcam"]["student_kd_vit"].update(entropy=0.9, mass90=0.7)
    metrics["gradcam"]["student_kd_cnn"].update(entropy=0.8, mass90=0.6)
    metrics["adversarial"]["student_kd_vit"]["pgd"]["accuracy"][-1] = 0.1
    metrics["adversarial"]["student_kd_cnn"]["pgd"]["accuracy"][-1] = 0.25
    findings = _findings(write_report(metrics, tmp_path)["markdown"].read_text())
    assert "low-frequency reliance is 0.800, 0.100 higher than the control student (0.700)" in findings
    assert "CKA with the ViT teacher is 0.730, 0.050 higher than the independent student (0.680)" in findings
    assert "against the control student (0.800 and 0.600) both are higher (more global)" in findings
    assert "Under PGD at the largest ε (8/255), the KD student keeps 10.00% accuracy, " \
           "15.00 points lower than the control student (25.00%)" in findings


def test_only_accuracy(tmp_path):
    metrics = _two_students(0.8, 0.7, 0.6)
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
