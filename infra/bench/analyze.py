"""bench analyze: wall time of a fixed list of analysis tasks with 1 vs 2 Ray workers in flight.

The tasks are the real `analysis.evaluate.run_task` (accuracy, Fourier, occlusion, adversarial on
the demo models with random weights, one thread each, as `hakd analyze` runs them), on the CPU
whatever the machine: analysis is CPU work. Both worker processes are started and warmed (torch
imported, test split generated) before the clock runs; the two settings alternate.
`machine_speedup` is what 2 workers gain on plain CPU work on this machine at the same time: on a
machine shared with other jobs it falls below 2, and `speedup` cannot exceed it.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from infra.bench.common import Profile, header, judge, log, median, sig

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


def write_models(cfg, out: Path) -> None:
    """Random-weight models where `analysis.evaluate.load_model` looks for them."""
    from analysis.evaluate import build_model, model_path
    for i, name in enumerate(MODELS):
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
        line = {**header("analyze", p), "one_worker_s": sig(t1), "two_workers_s": sig(t2), "speedup": sig(t1 / t2),
                "machine_speedup": sig(machine),
                "params": {"tasks": len(todo), "measures": list(MEASURES), "models": list(MODELS),
                           "test_images": p.analyze_test_size, "ray_cpus": cpus, "repeats": p.analyze_repeats,
                           "threads_per_task": 1, "warmup_s": sig(warm)}}
        return judge(line, {"speedup": ">= 1.6"})
    finally:
        if started:
            ray.shutdown()
