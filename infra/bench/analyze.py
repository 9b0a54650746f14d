"""bench analyze: images/s of every analysis measure, the time they project for the paper's CIFAR-10 analysis,
and (on CPUs) the gain of 2 Ray workers over 1.

Rates: the real `analysis.evaluate.run_measure` with the measure settings of infra/configs/paper_cifar10.yaml, on
the profile's ViT, CNN and student (random weights, `analyze_test_size` synthetic images) in the precision `hakd
analyze` uses there; each measure warmed on a small slice, then timed on all images, counting the test images of
the whole measure (all its passes; the ViT teacher's forwards too for the student's CKA and GradCAM).
`projected_s`: the paper config's tasks over CIFAR-10's 10,000 test images (clean and occluded) at these rates,
for the two teachers and three students. Past `analyze_budget_s` no measure starts; a model missing a rate gets
no projection. `speedup` (CPUs): wall time of the Fourier, occlusion and accuracy tasks (`run_task`) with 1 Ray
worker over 2, alternating; `machine_speedup`, the same on pure CPU work, bounds it on a shared machine."""
from __future__ import annotations

import contextlib
import functools
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
import yaml

from infra.bench.common import free_device_memory, header, judge, log, sig, timed
from infra.bench.profiles import Profile

PROJECTION_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper_cifar10.yaml"
PROJECTION_TEST_IMAGES = 10_000  # CIFAR-10's test set
PROJECTION_MODELS = ("teacher_vit", "teacher_cnn", "student_kd_vit", "student_kd_cnn", "student_independent")
RATE_MODELS = ("teacher_vit", "teacher_cnn", "student_independent")  # one of each architecture
RATE_MEASURES = ("accuracy", "fourier", "occlusion", "adversarial", "gradcam", "cka")
WORKER_MEASURES = ("fourier", "occlusion", "accuracy")  # dearest first, as a scheduler would like


def rate_config(p: Profile):
    """The paper config's measure settings on the profile's models and image size, capped at its test images."""
    from infra.config import config_from_dict
    a = yaml.safe_load(PROJECTION_CONFIG.read_text())["analysis"]
    n = p.analyze_test_size
    a.update(models=list(RATE_MODELS), cka_samples=min(a["cka_samples"], n),
             cka_batch_size=min(a["cka_batch_size"], max(4, n // 2)),
             gradcam_eval_samples=min(a["gradcam_eval_samples"], n), gradcam_samples=min(a.get("gradcam_samples", 8), n),
             adversarial_samples=min(a["adversarial_samples"], n))
    return config_from_dict({
        "seed": 0, "data": {"name": "shapes", "image_size": p.image_size, "train_size": 100, "test_size": n},
        "teacher_vit": {"name": p.vit}, "teacher_cnn": {"name": p.cnn},
        "train": {"students": ["student_independent"], "arch": p.student}, "analysis": a})


def images_per_task(cfg, measure: str, n: int) -> int:
    """Test images one task of `measure` sees when the test split has n images."""
    a = cfg.analysis
    cka = min(a.cka_samples, n) // a.cka_batch_size * a.cka_batch_size  # full minibatches only
    return {"adversarial": min(a.adversarial_samples, n), "gradcam": min(a.gradcam_eval_samples, n),
            "cka": cka}.get(measure, n)


def wall(launches: list, workers: int) -> float:
    """Seconds that `launches` (functions that start one Ray task each) take with at most `workers` in flight."""
    import ray
    queue, inflight = list(launches), []
    start = time.perf_counter()
    while queue or inflight:
        while queue and len(inflight) < workers:
            inflight.append(queue.pop(0)())
        ready, inflight = ray.wait(inflight, num_returns=1)
        ray.get(ready[0])
    return time.perf_counter() - start


def spin(n: int) -> int:
    """Pure CPU work with nothing shared: what two workers could gain on this machine right now."""
    return sum(i * i for i in range(n))


def worker_speedup(p: Profile, cfg, out: Path) -> dict:
    """Wall time of the analysis tasks with 1 and 2 Ray workers in flight, and this machine's own 2-worker gain."""
    import ray
    from analysis.evaluate import run_task
    from infra.config import RayConfig
    from infra.ray_cluster import ensure_ray
    started = not ray.is_initialized()
    ensure_ray(RayConfig(num_cpus=2))
    try:
        task, spin_task = ray.remote(num_cpus=1)(run_task), ray.remote(num_cpus=1)(spin)
        launches = {"tasks": [functools.partial(task.remote, cfg.to_dict(), str(out), name, measure, "clean")
                              for measure in WORKER_MEASURES for name in RATE_MODELS],
                    "spin": [functools.partial(spin_task.remote, 6_000_000)] * 4}
        wall(launches["tasks"][:2], 2)  # start and warm both worker processes
        seconds = {(kind, workers): [] for kind in launches for workers in (1, 2)}
        for _ in range(p.repeats):  # alternate, so drift hits both alike
            for (kind, workers), runs in seconds.items():
                runs.append(wall(launches[kind], workers))
    finally:
        if started:
            ray.shutdown()
    t = {k: median(v) for k, v in seconds.items()}
    log(f"analyze: 1 worker {t['tasks', 1]:.1f} s, 2 workers {t['tasks', 2]:.1f} s")
    return {"one_worker_s": sig(t["tasks", 1]), "two_workers_s": sig(t["tasks", 2]),
            "speedup": sig(t["tasks", 1] / t["tasks", 2]), "machine_speedup": sig(t["spin", 1] / t["spin", 2])}


def run(p: Profile, workdir: Path | None = None) -> dict:
    """Images/s per (architecture, measure), and the projected time of the paper config's CIFAR-10 analysis."""
    from analysis.evaluate import plan_tasks, precision_for, run_measure
    from analysis.models import build_model, load_model, model_path, model_runs
    from infra.config import config_from_dict
    device, cfg, n = torch.device(p.device), rate_config(p), p.analyze_test_size
    g = torch.Generator().manual_seed(0)
    d = {"x": torch.rand(n, 3, p.image_size, p.image_size, generator=g), "y": torch.randint(0, 10, (n,), generator=g),
         "tex": None, "masks": None, "images": None, "n": n}
    warm_n = max(4, cfg.analysis.cka_batch_size)
    warm = {**d, "x": d["x"][:warm_n], "y": d["y"][:warm_n], "n": warm_n}
    arch = {"teacher_vit": p.vit, "teacher_cnn": p.cnn, "student_independent": p.student}
    rates: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        out = Path(tmp)
        for i, name in enumerate(RATE_MODELS):  # random weights where load_model looks for them
            torch.manual_seed(i)
            model_path(out, name).parent.mkdir(parents=True, exist_ok=True)
            torch.save(build_model(cfg, name).state_dict(), model_path(out, name))
        for name in RATE_MODELS:
            model = None
            for measure in RATE_MEASURES:
                if measure == "cka" and name != "student_independent":
                    continue  # CKA compares students with the ViT teacher
                if p.analyze_budget_s and time.perf_counter() - start > p.analyze_budget_s:
                    skipped.append(f"{arch[name]}.{measure}")
                    continue
                model = model or load_model(cfg, out, name).to(device)
                precision = precision_for(cfg, measure, device)
                run_measure(cfg, out, model, name, measure, warm, precision)
                seconds = timed(lambda: run_measure(cfg, out, model, name, measure, d, precision), p.device)
                rates.setdefault(arch[name], {})[measure] = sig(images_per_task(cfg, measure, n) / seconds)
                log(f"analyze: {arch[name]} {measure}: {rates[arch[name]][measure]} img/s")
            del model
            free_device_memory(p.device)
        workers = worker_speedup(p, cfg, out) if p.device == "cpu" else {}  # a GPU runs one task per GPU share

    paper = yaml.safe_load(PROJECTION_CONFIG.read_text())
    paper["analysis"]["models"] = list(PROJECTION_MODELS)
    # one seed per student: the projection is for the paper's five models, each further seed adds a student's share
    paper_cfg = config_from_dict({"data": {**paper["data"], "name": "shapes"}, "analysis": paper["analysis"],
                                  "train": {"seeds": [0]}})
    runs = model_runs(paper_cfg)
    variants = ("clean", "occluded")  # CIFAR-10's test variants (teacher_cache.datasets.test_variants)
    projected: dict[str, float | None] = {}
    for run, measure, variant in plan_tasks(paper_cfg):
        if variant not in variants or measure not in RATE_MEASURES:  # shape_bias, the teachers' probe: not rated
            continue
        name = runs[run][0]
        rate = rates.get(arch.get(name, p.student), {}).get(measure)
        if rate is None or name in projected and projected[name] is None:
            projected[name] = None  # a rate skipped for the budget: no projection for this model
        else:
            projected[name] = projected.get(name, 0.0) + images_per_task(paper_cfg, measure, PROJECTION_TEST_IMAGES) / rate
    if skipped:
        log(f"analyze: budget of {p.analyze_budget_s} s spent; skipped {', '.join(skipped)}")
    complete = all(v is not None for v in projected.values())
    target = {"projected_total_s": "<= 900"} if p.device == "cuda" else {"speedup": ">= 1.6"}  # 15 min on one GPU
    return judge({**header("analyze", p), "rates_img_s": rates, "skipped_rates": skipped, **workers,
            "projected_s": {k: (sig(v) if v is not None else None) for k, v in projected.items()},
            "projected_total_s": sig(sum(projected.values())) if complete else None,
            "params": {"projection": {"config": "infra/configs/paper_cifar10.yaml", "variants": list(variants),
                                      "test_images": PROJECTION_TEST_IMAGES, "models": list(PROJECTION_MODELS),
                                      "seeds": 1},
                       "rates": {"test_images": n, "image_size": p.image_size, "architectures": arch,
                                 "bf16": precision_for(cfg, "accuracy", device) is not contextlib.nullcontext},
                       "workers": {"measures": list(WORKER_MEASURES), "models": list(RATE_MODELS),
                                   "repeats": p.repeats} if workers else None}},
                 target)
