"""bench analyze: images/s of every analysis measure on the profile's device and models, the time
they project for the paper's CIFAR-10 analysis, and (on CPUs) the gain of 2 Ray workers over 1.

Rates (every profile): the real `analysis.evaluate.run_measure`, with the measure settings of
infra/configs/paper_cifar10.yaml (radii, occlusion fractions, eps, PGD steps, batch sizes), on the
profile's ViT, CNN and student with random weights and `analyze_test_size` synthetic test images at
the profile's image size, in the precision `hakd analyze` uses there (bf16 where the measure
allows, on GPU). Each measure runs once on a small slice first (lazy initialisation, cuDNN
autotuning), then on all images with the device synchronised around the clock. A rate is test
images per second of the whole measure (all its filtered, occluded or attacked passes, and for
the student's CKA and GradCAM the ViT teacher's forwards too). `projected_s` divides the images
each task of that config sees on CIFAR-10's 10,000 test images (per variant) by these rates, for
the two teachers and three students, the students at the student architecture's rates.

Workers (CPU profiles only): wall time of a fixed list of `run_task` calls (accuracy, Fourier,
occlusion, adversarial on the demo models, one thread each, as `hakd analyze` runs them on a
machine without GPUs) with 1 vs 2 Ray workers in flight. Both worker processes are started and
warmed before the clock runs; the two settings alternate. `machine_speedup` is what 2 workers
gain on plain CPU work on this machine at the same time: on a machine shared with other jobs it
falls below 2, and `speedup` cannot exceed it.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import torch
import yaml

from infra.bench.common import header, judge, log, median, sig, timed
from infra.bench.profiles import Profile

PROJECTION_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper_cifar10.yaml"
PROJECTION_TEST_IMAGES = 10_000  # CIFAR-10's test set
PROJECTION_MODELS = ("teacher_vit", "teacher_cnn", "student_kd_vit", "student_kd_cnn", "student_independent")
RATE_MODELS = ("teacher_vit", "teacher_cnn", "student_independent")  # one of each architecture
RATE_MEASURES = ("accuracy", "fourier", "occlusion", "adversarial", "gradcam", "cka")

MODELS = ("teacher_vit", "teacher_cnn", "student_independent")
MEASURES = ("adversarial", "fourier", "occlusion", "accuracy")  # dearest first, as a scheduler would like


def analysis_config(p: Profile):
    from infra.config import config_from_dict
    n = p.analyze_test_size
    return config_from_dict({
        "seed": 0, "data": {"name": "shapes", "image_size": 32, "train_size": 100, "test_size": n},
        "train": {"students": ["student_independent"], "arch": "resnet_demo"},
        "analysis": {"models": list(MODELS), "eval_batch_size": 100, "fourier_radii": [0.1, 0.3, 0.6, 1.0],
                     "occlusion_fractions": [0.0, 0.3, 0.6], "adversarial_eps": [0.0, 0.01],
                     "adversarial_samples": min(n, 100), "pgd_steps": 3},
    })


def write_models(cfg, out: Path, models=MODELS) -> None:
    """Random-weight models where `analysis.evaluate.load_model` looks for them."""
    from analysis.evaluate import build_model, model_path
    for i, name in enumerate(models):
        torch.manual_seed(i)
        path = model_path(out, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(build_model(cfg, name).state_dict(), path)


def tasks(p: Profile) -> list[tuple[str, str, str]]:
    every = [(m, meas, "clean") for meas in MEASURES for m in MODELS]
    return (every * (1 + p.analyze_tasks // len(every)))[:p.analyze_tasks]


def wall(remote, cfg_dict: dict, out: str, todo: list, workers: int) -> float:
    import ray
    queue, inflight = list(todo), []
    start = time.perf_counter()
    while queue or inflight:
        while queue and len(inflight) < workers:
            inflight.append(remote.remote(cfg_dict, out, *queue.pop(0)))
        ready, inflight = ray.wait(inflight, num_returns=1)
        ray.get(ready[0])
    return time.perf_counter() - start


def spin(n: int) -> int:
    """Pure CPU work with nothing shared: what two workers could gain on this machine right now."""
    total = 0
    for i in range(n):
        total += i
    return total


def machine_speedup() -> float:
    """Speed-up of 4 spin tasks with 2 in flight over 1: about 2 on two idle cores, less when the
    machine is busy with other work (the context for `speedup`)."""
    import ray
    remote = ray.remote(num_cpus=1)(spin)

    def wall(inflight: int) -> float:
        start = time.perf_counter()
        for i in range(0, 4, inflight):
            ray.get([remote.remote(6_000_000) for _ in range(inflight)])
        return time.perf_counter() - start
    wall(2)
    return median([wall(1) / wall(2) for _ in range(2)])


def run(p: Profile, workdir: Path | None = None) -> dict:
    """The rates on every profile; on CPUs also the gain of 2 Ray workers (a GPU runs one task per GPU share)."""
    line = {**header("analyze", p), **measure_rates(p, workdir)}
    targets = {"projected_total_s": "<= 900"} if p.device == "cuda" else {}  # the target: 15 min on one H100
    if p.device == "cpu":
        workers = worker_speedup(p, workdir)
        line.update({**workers, "params": {**workers["params"], **line["params"]}})
        targets["speedup"] = ">= 1.6"
    return judge(line, targets)


def worker_speedup(p: Profile, workdir: Path | None = None) -> dict:
    """Wall time of the task list with 1 and 2 Ray workers in flight, and this machine's own 2-worker gain."""
    import ray
    from analysis.evaluate import run_task
    from infra.config import RayConfig
    from infra.ray_cluster import ensure_ray

    started = not ray.is_initialized()
    ensure_ray(RayConfig(num_cpus=2))
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            cfg = analysis_config(p)
            write_models(cfg, Path(tmp))
            remote = ray.remote(num_cpus=1)(run_task)
            todo, cfg_dict = tasks(p), cfg.to_dict()
            warm = wall(remote, cfg_dict, tmp, (todo * 2)[:2], 2)  # start and warm both worker processes
            one, two = [], []
            for _ in range(p.analyze_repeats):
                one.append(wall(remote, cfg_dict, tmp, todo, 1))
                two.append(wall(remote, cfg_dict, tmp, todo, 2))
        machine = machine_speedup()
        t1, t2 = median(one), median(two)
        log(f"analyze: 1 worker {t1:.1f} s, 2 workers {t2:.1f} s")
        return {"one_worker_s": sig(t1), "two_workers_s": sig(t2), "speedup": sig(t1 / t2),
                "machine_speedup": sig(machine),
                "params": {"tasks": len(todo), "measures": list(MEASURES), "models": list(MODELS),
                           "test_images": p.analyze_test_size, "ray_cpus": cpus, "repeats": p.analyze_repeats,
                           "threads_per_task": 1, "warmup_s": sig(warm)}}
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------- per-measure rates

def rate_config(p: Profile):
    """The paper config's measure settings on the profile's models and image size, capped at its test images."""
    from infra.config import config_from_dict
    a = yaml.safe_load(PROJECTION_CONFIG.read_text())["analysis"]
    n = p.analyze_test_size
    cka_batch = min(a["cka_batch_size"], max(4, n // 2))
    a.update(models=list(RATE_MODELS), cka_samples=min(a["cka_samples"], n), cka_batch_size=cka_batch,
             gradcam_eval_samples=min(a["gradcam_eval_samples"], n),
             gradcam_samples=min(a.get("gradcam_samples", 8), n),
             adversarial_samples=min(a["adversarial_samples"], n))
    return config_from_dict({
        "seed": 0, "data": {"name": "shapes", "image_size": p.image_size, "train_size": 100, "test_size": n},
        "teacher_vit": {"name": p.vit}, "teacher_cnn": {"name": p.cnn},
        "train": {"students": ["student_independent"], "arch": p.student}, "analysis": a})


def images_per_task(cfg, measure: str, n: int) -> int:
    """Test images one task of `measure` sees when the test split has n images."""
    a = cfg.analysis
    if measure == "adversarial":
        return min(a.adversarial_samples, n)
    if measure == "gradcam":
        return min(a.gradcam_eval_samples, n)
    if measure == "cka":
        return min(a.cka_samples, n) // a.cka_batch_size * a.cka_batch_size  # full minibatches only
    return n


def measure_rates(p: Profile, workdir: Path | None = None) -> dict:
    """Images/s per (architecture, measure), and the projected time of the paper config's CIFAR-10 analysis."""
    from analysis.evaluate import load_model, model_runs, plan_tasks, precision_for, run_measure
    from infra.config import config_from_dict
    device = torch.device(p.device)
    cfg = rate_config(p)
    n = p.analyze_test_size
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
        write_models(cfg, Path(tmp), RATE_MODELS)
        for name in RATE_MODELS:
            model = None
            for measure in RATE_MEASURES:
                if measure == "cka" and name in ("teacher_vit", "teacher_cnn"):
                    continue  # CKA compares students with the ViT teacher
                if p.analyze_budget_s and time.perf_counter() - start > p.analyze_budget_s:
                    skipped.append(f"{arch[name]}.{measure}")  # a short run keeps what it measured
                    continue
                if model is None:
                    model = load_model(cfg, Path(tmp), name).to(device)
                precision = precision_for(cfg, measure, device)
                run_measure(cfg, Path(tmp), model, name, measure, warm, precision)
                seconds = timed(lambda: run_measure(cfg, Path(tmp), model, name, measure, d, precision), p.device)
                rates.setdefault(arch[name], {})[measure] = sig(images_per_task(cfg, measure, n) / seconds)
                log(f"analyze: {arch[name]} {measure}: {rates[arch[name]][measure]} img/s")
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    paper = yaml.safe_load(PROJECTION_CONFIG.read_text())
    paper["analysis"]["models"] = list(PROJECTION_MODELS)
    # one seed per student: the projection is for the paper's five models, each further seed adds a student's share
    paper_cfg = config_from_dict({"data": {**paper["data"], "name": "shapes"}, "analysis": paper["analysis"],
                                  "train": {"seeds": [0]}})
    runs = model_runs(paper_cfg)
    variants = ("clean", "occluded")  # CIFAR-10's test variants (teacher_cache.datasets.test_variants)
    projected: dict[str, float] = {}
    for run, measure, variant in plan_tasks(paper_cfg):
        if variant not in variants or measure == "shape_bias":
            continue
        name = runs[run][0]
        a = arch.get(name, p.student)
        if measure not in rates.get(a, {}):  # skipped for the budget: no projection for this model
            projected[name] = None
        elif projected.get(name, 0.0) is not None:
            projected[name] = projected.get(name, 0.0) + images_per_task(paper_cfg, measure, PROJECTION_TEST_IMAGES) / rates[a][measure]
    complete = all(v is not None for v in projected.values())
    if skipped:
        log(f"analyze: budget of {p.analyze_budget_s} s spent; skipped {', '.join(skipped)}")
    return {"rates_img_s": rates, "skipped_rates": skipped,
            "projected_s": {k: (sig(v) if v is not None else None) for k, v in projected.items()},
            "projected_total_s": sig(sum(projected.values())) if complete else None,
            "params": {"projection": {"config": str(PROJECTION_CONFIG.relative_to(PROJECTION_CONFIG.parents[2])),
                                      "test_images": PROJECTION_TEST_IMAGES, "variants": list(variants),
                                      "models": list(PROJECTION_MODELS), "seeds": 1},
                       "rates": {"test_images": n, "image_size": p.image_size, "bf16": precision_for(
                           cfg, "accuracy", device) is not contextlib.nullcontext, "architectures": arch}}}
