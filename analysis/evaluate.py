"""`hakd analyze`: every (model, measure, test variant) is one Ray task; results merge into metrics.json.

Models are the two teachers and the trained students, all called on float images in [0, 1] at the
dataset's resolution (each resizes and normalises for itself), so every measure, pixel-space
epsilons and Fourier radii included, means the same thing for every model. Tasks are seeded and
see the same images in the same order, so a re-run gives the same numbers.
"""
from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from infra.config import Config, config_from_dict
from infra.errors import UserError
from teacher_cache.datasets import class_names, load_split, test_variants
from teacher_cache.fit import build_teacher

TEACHERS = ("teacher_vit", "teacher_cnn")
STUDENT_LAYERS = ("layer1", "layer2", "layer3", "layer4")


class ModelMismatch(UserError, RuntimeError):
    """A saved model does not fit the config; raised before any task is launched."""


def model_path(out: Path, name: str) -> Path:
    return Path(out) / ("teachers" if name in TEACHERS else "train") / (
        f"{name}.pt" if name in TEACHERS else f"{name}/model.pt")


def build_model(cfg: Config, name: str) -> torch.nn.Module:
    if name in TEACHERS:
        return build_teacher(cfg, name)
    from student_train.students import Student
    return Student(cfg.train.arch, len(class_names(cfg.data)), cfg.data.image_size)


def load_model(cfg: Config, out: Path, name: str) -> torch.nn.Module:
    path = model_path(out, name)
    if not path.is_file():
        stage = "hakd cache" if name in TEACHERS else "hakd train"
        raise ModelMismatch(f"{path} is missing: run `{stage}` for this config first")
    model = build_model(cfg, name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or unsafe file: never unpickle more than tensors
        raise ModelMismatch(f"{path} cannot be read as a weights file ({type(e).__name__}); "
                            f"re-run the stage that wrote it") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelMismatch(f"{path} does not fit the configured architecture of {name} ({str(e)[:200]}...); "
                            f"re-run the stage that wrote it with this config") from None
    return model.eval()


@lru_cache(maxsize=4)
def _split(cfg_json: str, variant: str):
    cfg = config_from_dict(json.loads(cfg_json))
    s = load_split(cfg.data, variant)
    n = len(s["labels"])
    return {"x": torch.from_numpy(s["images"]).permute(0, 3, 1, 2).float() / 255,
            "y": torch.from_numpy(s["labels"]), "tex": None if s["texture_labels"] is None else torch.from_numpy(s["texture_labels"]),
            "masks": s["masks"], "images": s["images"], "n": n}


def _features(model, name: str, x: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Flattened per-layer features: student stages, or every ViT block's patch tokens."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            if name == "teacher_vit":
                net = model.net
                layers = [f"blocks.{j}" for j in range(len(net.blocks))]
                f = model.extract(x[i:i + batch], layers)
                outs.append([f[l][:, net.num_prefix_tokens:].flatten(1) for l in layers])
            else:
                _, f = model.forward_with(x[i:i + batch], STUDENT_LAYERS)
                outs.append([f[l].flatten(1) for l in STUDENT_LAYERS])
    return [torch.cat([o[j] for o in outs]) for j in range(len(outs[0]))]


def _gradcam_target(model, name: str):
    from analysis.gradcam import vit_reshape_transform
    if name == "teacher_vit":
        net = model.net
        gh, gw = net.patch_embed.grid_size
        return net.blocks[-1].norm1, vit_reshape_transform(gh, gw, net.num_prefix_tokens)
    return model.net.layer4[-1], None


def run_task(cfg_dict: dict, out: str, name: str, measure: str, variant: str) -> tuple:
    """One measure of one model; returns (name, measure, variant, result)."""
    torch.set_num_threads(1)  # one core per task: parallelism comes from Ray
    cfg = config_from_dict(cfg_dict)
    a = cfg.analysis
    cfg_json = json.dumps(cfg_dict, sort_keys=True)
    model = load_model(cfg, Path(out), name)
    d = _split(cfg_json, variant)
    if measure == "accuracy":
        from analysis.robustness import accuracy
        return name, measure, variant, accuracy(model, d["x"], d["y"], a.eval_batch_size)
    if measure == "fourier":
        from analysis.fourier import frequency_accuracy, high_frequency_reliance, low_frequency_reliance
        curves = frequency_accuracy(model, d["x"], d["y"], a.fourier_radii, a.eval_batch_size)
        curves["low_frequency_reliance"] = low_frequency_reliance(curves)
        curves["high_frequency_reliance"] = high_frequency_reliance(curves)
        return name, measure, variant, curves
    if measure == "occlusion":
        from analysis.robustness import occlusion_curve
        return name, measure, variant, occlusion_curve(model, d["x"], d["y"], a.occlusion_fractions, grid=8,
                                                       seed=cfg.seed, batch_size=a.eval_batch_size)
    if measure == "adversarial":
        from analysis.robustness import adversarial_curve
        x, y = d["x"][:a.adversarial_samples], d["y"][:a.adversarial_samples]
        return name, measure, variant, {
            atk: adversarial_curve(model, x, y, a.adversarial_eps, attack=atk, steps=a.pgd_steps, seed=cfg.seed)
            for atk in ("fgsm", "pgd")}
    if measure == "shape_bias":
        from analysis.robustness import shape_bias
        return name, measure, variant, shape_bias(model, d["x"], d["y"], d["tex"], a.eval_batch_size)
    if measure == "cka":
        from analysis.cka import MinibatchCKA
        teacher = load_model(cfg, Path(out), "teacher_vit")
        x = d["x"][:a.cka_samples]
        rows, cols = _features(model, name, x, a.cka_batch_size), _features(teacher, "teacher_vit", x, a.cka_batch_size)
        acc = MinibatchCKA(len(rows), len(cols))
        for i in range(0, len(x) - a.cka_batch_size + 1, a.cka_batch_size):  # full minibatches only
            acc.update([r[i:i + a.cka_batch_size] for r in rows], [c[i:i + a.cka_batch_size] for c in cols])
        return name, measure, variant, {"student_layers": list(STUDENT_LAYERS),
                                        "teacher_layers": [f"blocks.{j}" for j in range(len(cols))],
                                        "matrix": acc.result().tolist()}
    if measure == "gradcam":
        return name, measure, variant, _gradcam(cfg, Path(out), model, name, d)
    raise ValueError(f"unknown measure {measure!r}")


def _gradcam(cfg: Config, out: Path, model, name: str, d: dict) -> dict:
    from analysis.gradcam import gradcam_maps, resize_maps, summarize_gradcam
    a = cfg.analysis
    n = min(a.gradcam_eval_samples, d["n"])
    x, y = d["x"][:n], d["y"][:n]
    layer, reshape = _gradcam_target(model, name)
    size = cfg.data.image_size
    maps = resize_maps(gradcam_maps(model, layer, x, y, reshape), size)
    reference = None
    if name != "teacher_vit":
        teacher = load_model(cfg, out, "teacher_vit")
        t_layer, t_reshape = _gradcam_target(teacher, "teacher_vit")
        reference = resize_maps(gradcam_maps(teacher, t_layer, x, y, t_reshape), size)
    masks = None if d["masks"] is None else d["masks"][:n]
    summary = summarize_gradcam(maps, masks=masks, reference=reference)
    return {"summary": summary, "grid_maps": maps[:a.gradcam_samples].tolist()}


def plan_tasks(cfg: Config) -> list[tuple[str, str, str]]:
    variants = test_variants(cfg.data)
    tasks = []
    for m in cfg.analysis.models:
        tasks += [(m, "accuracy", v) for v in variants]
        tasks += [(m, "fourier", "clean"), (m, "occlusion", "clean"), (m, "adversarial", "clean")]
        gradcam_variant = "texture" if "texture" in variants else "clean"
        tasks.append((m, "gradcam", gradcam_variant))
        if "texture" in variants:
            tasks.append((m, "shape_bias", "texture"))
        if m != "teacher_vit" and m not in TEACHERS:
            tasks.append((m, "cka", "clean"))
    return tasks


def run_analysis(cfg: Config, out: Path, log=print) -> dict:
    """Launch every task on Ray (analysis.workers in flight) and return the merged metrics."""
    import ray
    from infra.ray_cluster import ensure_ray

    out = Path(out)
    for m in cfg.analysis.models:  # fail before launching anything
        load_model(cfg, out, m)
    if "teacher_vit" not in cfg.analysis.models:
        load_model(cfg, out, "teacher_vit")  # CKA and GradCAM references
    ensure_ray(cfg.ray)
    remote = ray.remote(num_cpus=1)(run_task)
    tasks = plan_tasks(cfg)
    queue, inflight, results = list(tasks), [], []
    bar = tqdm(total=len(tasks), desc="analyze", unit="task")
    start = time.time()
    while queue or inflight:
        while queue and len(inflight) < cfg.analysis.workers:
            inflight.append(remote.remote(cfg.to_dict(), str(out), *queue.pop(0)))
        ready, inflight = ray.wait(inflight, num_returns=1)
        results.append(ray.get(ready[0]))
        bar.update(1)
    bar.close()
    return merge(cfg, results, time.time() - start)


def merge(cfg: Config, results: list[tuple], seconds: float) -> dict:
    metrics: dict = {"accuracy": {}, "fourier": {}, "occlusion": {}, "adversarial": {}, "gradcam": {},
                     "shape_bias": {}, "cka": {}}
    grid_maps = {}
    for name, measure, variant, value in results:
        if measure == "accuracy":
            metrics["accuracy"].setdefault(name, {})[variant] = value
        elif measure == "gradcam":
            metrics["gradcam"][name] = value["summary"]
            grid_maps[name] = np.array(value["grid_maps"], dtype=np.float32)
        else:
            metrics[measure][name] = value
    for section in ("accuracy", "fourier", "occlusion", "adversarial", "gradcam", "shape_bias", "cka"):
        metrics[section] = {m: metrics[section][m] for m in cfg.analysis.models if m in metrics[section]}
    if not metrics["shape_bias"]:
        del metrics["shape_bias"]
    initial = {"layer": STUDENT_LAYERS[0], "teacher_layer": "blocks.0"}
    for m, entry in metrics["cka"].items():
        initial[m] = entry["matrix"][0][0]
    metrics["cka_initial"] = initial
    grid = None
    if grid_maps:
        variant = "texture" if "texture" in test_variants(cfg.data) else "clean"
        split = load_split(cfg.data, variant)
        k = cfg.analysis.gradcam_samples
        grid = {"images": split["images"][:k], "labels": split["labels"][:k],
                "class_names": class_names(cfg.data), "maps": grid_maps}
    metrics["meta"] = {"dataset": cfg.data.name, "variants": list(test_variants(cfg.data)),
                       "models": list(cfg.analysis.models),
                       "pairs": {"student_kd_vit": "teacher_vit", "student_kd_cnn": "teacher_cnn",
                                 "student_logit_kd": "teacher_vit"},
                       "teachers": {"teacher_vit": cfg.teacher_vit.name, "teacher_cnn": cfg.teacher_cnn.name},
                       "seconds": {"analysis": round(seconds, 1)}}
    return {"metrics": metrics, "gradcam_grid": grid}
