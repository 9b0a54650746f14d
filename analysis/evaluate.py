"""`hakd analyze`: every (model, measure, test variant) is one Ray task; results merge into metrics.json.

Models are the two teachers and the trained students, all called on float images in [0, 1] at the
dataset's resolution (each resizes and normalises for itself), so every measure, pixel-space
epsilons and Fourier radii included, means the same thing for every model. Tasks are seeded and
see the same images in the same order, so a re-run gives the same numbers.

On a Ray cluster with GPUs each task takes `analysis.gpus_per_task` of one and runs its models
there; test images stay on the host and go to the GPU a batch at a time. With `analysis.bf16` the
measures in BF16_MEASURES run under bf16 autocast. GradCAM and the adversarial attacks stay in
float32: grad-cam hands activations and gradients to numpy, which has no bfloat16, and the
smallest attack step (eps 0.002 of [0, 1] pixels, about 0.008 after normalisation) is about one
bf16 step of the normalised input, so bf16 would round the perturbation itself. CKA runs its
forwards in bf16 but accumulates its statistics in float64 (analysis/cka.py), one minibatch of
features at a time.
"""
from __future__ import annotations

import contextlib
import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from analysis.models import TEACHERS, build_model, load_model, model_runs
from analysis.stats import merge_runs
from infra.config import Config, config_from_dict
from infra.errors import UserError
from teacher_cache.bias import shape_bias_note
from teacher_cache.datasets import class_names, load_split, test_variants

STUDENT_LAYERS = ("layer1", "layer2", "layer3", "layer4")
BF16_MEASURES = ("accuracy", "fourier", "occlusion", "shape_bias", "cka")  # the others need float32 (see above)


@lru_cache(maxsize=4)
def _split(cfg_json: str, variant: str):
    cfg = config_from_dict(json.loads(cfg_json))
    s = load_split(cfg.data, variant)
    n = len(s["labels"])
    return {"x": torch.from_numpy(s["images"]).permute(0, 3, 1, 2).float() / 255,
            "y": torch.from_numpy(s["labels"]), "tex": None if s["texture_labels"] is None else torch.from_numpy(s["texture_labels"]),
            "masks": s["masks"], "images": s["images"], "n": n, "variant": variant}


@torch.no_grad()
def layer_features(model, name: str, x: torch.Tensor) -> list[torch.Tensor]:
    """Flattened per-layer features of one minibatch: student stages, or every ViT block's patch tokens."""
    if name == "teacher_vit":
        net = model.net
        layers = [f"blocks.{j}" for j in range(len(net.blocks))]
        f = model.extract(x, layers)
        return [f[l][:, net.num_prefix_tokens:].flatten(1) for l in layers]
    _, f = model.forward_with(x, STUDENT_LAYERS)
    return [f[l].flatten(1) for l in STUDENT_LAYERS]


def streaming_cka(model, name: str, teacher, x: torch.Tensor, batch: int, precision=contextlib.nullcontext):
    """MinibatchCKA between the model's layers and every ViT block over x, one minibatch at a time.

    Only one minibatch of features exists at any moment: memory is bounded by the batch and the
    layer count, never by len(x). Full minibatches only (the unbiased HSIC of each must use m
    samples). x stays where it is; each minibatch goes to the model's device.
    """
    from analysis.cka import MinibatchCKA
    from analysis.robustness import model_device
    device = model_device(model)
    acc = None
    for i in range(0, len(x) - batch + 1, batch):
        xb = x[i:i + batch].to(device)
        with precision():
            rows, cols = layer_features(model, name, xb), layer_features(teacher, "teacher_vit", xb)
        if acc is None:
            acc = MinibatchCKA(len(rows), len(cols))
        acc.update(rows, cols)
        del rows, cols
    return acc


def _gradcam_target(model, name: str):
    from analysis.gradcam import vit_reshape_transform
    if name == "teacher_vit":
        net = model.net
        gh, gw = net.patch_embed.grid_size
        return net.blocks[-1].norm1, vit_reshape_transform(gh, gw, net.num_prefix_tokens)
    return model.net.layer4[-1], None


def task_resources(cfg: Config, cluster: dict) -> dict:
    """Ray resources of one analysis task: one CPU, plus analysis.gpus_per_task of a GPU when the
    cluster has GPUs (ray.cluster_resources()), so that tasks land on GPU nodes and use them."""
    gpus = cfg.analysis.gpus_per_task if cluster.get("GPU", 0) > 0 else 0.0
    return {"num_cpus": 1, "num_gpus": gpus}


def task_device() -> torch.device:
    """The GPU Ray gave this task (Ray sets CUDA_VISIBLE_DEVICES to it), else the CPU."""
    import ray
    if not (ray.is_initialized() and ray.get_gpu_ids()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        node = ray.util.get_node_ip_address()
        raise UserError(f"Ray gave an analysis task GPU {ray.get_gpu_ids()} on node {node}, but torch there sees "
                        f"no CUDA device; install a CUDA build of torch on that node, or set analysis.gpus_per_task=0")
    return torch.device("cuda")


def precision_for(cfg: Config, measure: str, device: torch.device):
    """A context factory: bf16 autocast for the measures that allow it (on GPU, with analysis.bf16), else none."""
    if cfg.analysis.bf16 and device.type == "cuda" and measure in BF16_MEASURES:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def run_task(cfg_dict: dict, out: str, name: str, measure: str, variant: str) -> tuple:
    """One measure of one model, as a Ray task; returns (name, measure, variant, result)."""
    torch.set_num_threads(1)  # one core per task: parallelism comes from Ray
    cfg = config_from_dict(cfg_dict)
    device = task_device()
    model = load_model(cfg, Path(out), name).to(device)
    d = _split(json.dumps(cfg_dict, sort_keys=True), variant)
    return name, measure, variant, run_measure(cfg, Path(out), model, name, measure, d, precision_for(cfg, measure, device))


def run_measure(cfg: Config, out: Path, model, name: str, measure: str, d: dict, precision=contextlib.nullcontext):
    """The result of one measure of one model on the split `d` (host tensors), on the model's device.

    `precision` is a context factory the forwards run under (bf16 autocast from `precision_for`);
    teachers that a measure compares against are loaded onto the model's device.
    """
    from analysis.robustness import model_device
    a = cfg.analysis
    if measure == "accuracy":
        from analysis.robustness import accuracy
        with precision():
            return accuracy(model, d["x"], d["y"], a.eval_batch_size)
    if measure == "fourier":
        from analysis.fourier import frequency_accuracy, high_frequency_reliance, low_frequency_reliance
        with precision():
            curves = frequency_accuracy(model, d["x"], d["y"], a.fourier_radii, a.eval_batch_size)
        curves["low_frequency_reliance"] = low_frequency_reliance(curves)
        curves["high_frequency_reliance"] = high_frequency_reliance(curves)
        return curves
    if measure == "occlusion":
        from analysis.robustness import occlusion_curve
        with precision():
            curve = occlusion_curve(model, d["x"], d["y"], a.occlusion_fractions, grid=8, seed=cfg.seed,
                                    batch_size=a.eval_batch_size)
        return {**curve, "area": occlusion_area(curve)}
    if measure == "adversarial":
        from analysis.robustness import adversarial_curve
        x, y = d["x"][:a.adversarial_samples], d["y"][:a.adversarial_samples]
        return {atk: adversarial_curve(model, x, y, a.adversarial_eps, attack=atk, steps=a.pgd_steps, seed=cfg.seed)
                for atk in ("fgsm", "pgd")}
    if measure == "shape_bias":
        from analysis.robustness import shape_bias
        with precision():
            return shape_bias(model, d["x"], d["y"], d["tex"], a.eval_batch_size)
    if measure == "cka":
        teacher = load_model(cfg, out, "teacher_vit").to(model_device(model))
        acc = streaming_cka(model, name, teacher, d["x"][:a.cka_samples], a.cka_batch_size, precision)
        return {"student_layers": list(STUDENT_LAYERS), "teacher_layers": [f"blocks.{j}" for j in range(acc.n_cols)],
                "matrix": acc.result().tolist()}
    if measure == "gradcam":
        return _gradcam(cfg, out, model, name, d)
    if measure == "probe":
        from analysis.probe import probe_measures
        variants = test_variants(cfg.data)
        texture = (_split(json.dumps(cfg.to_dict(), sort_keys=True), "texture")
                   if "texture" in variants and shape_bias_note(cfg.data.name)[0] else None)
        return probe_measures(cfg, out, model, name, d, texture, precision)
    raise ValueError(f"unknown measure {measure!r}")


def occlusion_area(curve: dict) -> float:
    """The mean accuracy over an occlusion curve: its area (trapezoids) divided by the range of fractions."""
    x, y = np.asarray(curve["fraction"], dtype=float), np.asarray(curve["accuracy"], dtype=float)
    if len(x) < 2 or x.max() == x.min():
        return float(y.mean())
    order = np.argsort(x)
    return float(np.trapezoid(y[order], x[order]) / (x.max() - x.min()))


@lru_cache(maxsize=2)
def gradcam_grids(cfg_json: str) -> dict[str, tuple[int, int]]:
    """Each compared model's native GradCAM grid, from its architecture alone (weights do not change it)."""
    from analysis.gradcam import layer_grid
    cfg = config_from_dict(json.loads(cfg_json))
    grids = {}
    for name in dict.fromkeys([*cfg.analysis.models, "teacher_vit"]):  # teacher_vit: every map's reference
        model = build_model(cfg, name)
        layer, reshape = _gradcam_target(model, name)
        grids[name] = layer_grid(model, layer, cfg.data.image_size, reshape)
    return grids


def gradcam_grid_meta(cfg: Config) -> dict:
    """metrics["meta"]["gradcam_common_grid"]: the grid GradCAM maps are compared on, and how they got there."""
    from analysis.gradcam import common_grid
    grids = gradcam_grids(json.dumps(cfg.to_dict(), sort_keys=True))
    return {"size": list(common_grid(grids.values())), "native": {m: list(g) for m, g in grids.items()},
            "resampling": "the coarsest model's grid; finer maps area-averaged onto it, object masks as the "
                          "fraction of each cell they cover (no map is upsampled)"}


def _gradcam(cfg: Config, out: Path, model, name: str, d: dict) -> dict:
    """GradCAM measures on the first analysis.gradcam_eval_samples images of the split: on clean images for
    the class each model predicts (the primary measure: where a model looks for its own decision); on the
    cue-conflict variant for the true (shape) class (secondary). The ViT teacher's maps, for the same rule,
    are the reference of rank_corr_teacher."""
    from analysis.gradcam import gradcam_maps, summarize_gradcam, to_grid
    from analysis.robustness import model_device, predict
    a = cfg.analysis
    n = min(a.gradcam_eval_samples, d["n"])
    x, y = d["x"][:n], d["y"][:n]
    predicted = d.get("variant", "clean") == "clean"
    layer, reshape = _gradcam_target(model, name)
    grid = tuple(gradcam_grid_meta(cfg)["size"])
    maps = to_grid(gradcam_maps(model, layer, x, predict(model, x) if predicted else y, reshape), grid)
    reference = None
    if name != "teacher_vit":
        teacher = load_model(cfg, out, "teacher_vit").to(model_device(model))
        t_layer, t_reshape = _gradcam_target(teacher, "teacher_vit")
        reference = to_grid(gradcam_maps(teacher, t_layer, x, predict(teacher, x) if predicted else y, t_reshape), grid)
    masks = None if d["masks"] is None else to_grid(d["masks"][:n], grid)
    summary = summarize_gradcam(maps, masks=masks, reference=reference)
    return {"summary": summary, "grid_maps": maps[:a.gradcam_samples].tolist() if predicted else None}


def teacher_training(cfg: Config) -> dict[str, str]:
    """What each teacher learnt from, in words (metrics meta.teacher_training): the premise's gap between them is
    partly a training-data difference when these differ."""
    from teacher_cache.fit import head_mode
    from teacher_cache.teachers import get_spec
    out = {}
    for role in TEACHERS:
        tc = getattr(cfg, role)
        mode = head_mode(tc, cfg.data)
        if mode == "pretrained":
            out[role] = ("was pretrained on shape-only images, textures drawn independently of the class (the "
                         "embedded weights), with nothing fitted on this run's training split")
        elif mode == "trained":
            start = "from random weights" if get_spec(tc.name).demo else "from its pretrained weights"
            out[role] = f"was trained end to end on this run's training split ({cfg.data.name}), {start}"
        else:
            out[role] = (f"keeps its pretrained backbone; a linear head was fitted on this run's training split "
                         f"({cfg.data.name})")
    return out


def plan_tasks(cfg: Config) -> list[tuple[str, str, str]]:
    variants = test_variants(cfg.data)
    tasks = []
    for m in model_runs(cfg):
        tasks += [(m, "accuracy", v) for v in variants]
        tasks += [(m, "fourier", "clean"), (m, "occlusion", "clean"), (m, "adversarial", "clean")]
        tasks.append((m, "gradcam", "clean"))  # the primary measure: predicted class, clean images
        if "texture" in variants:
            tasks.append((m, "gradcam", "texture"))  # secondary: the shape's class on cue-conflict images
        if "texture" in variants and shape_bias_note(cfg.data.name)[0]:
            tasks.append((m, "shape_bias", "texture"))
        if m != "teacher_vit" and m not in TEACHERS:
            tasks.append((m, "cka", "clean"))
        if m in TEACHERS:
            tasks.append((m, "probe", "clean"))  # the premise on the cached features (analysis/probe.py)
    return tasks


def run_analysis(cfg: Config, out: Path, log=print) -> dict:
    """Launch every task on Ray (analysis.workers in flight) and return the merged metrics."""
    import ray
    from infra.ray_cluster import ensure_ray

    out = Path(out)
    for m in model_runs(cfg):  # fail before launching anything
        load_model(cfg, out, m)
    if "teacher_vit" not in cfg.analysis.models:
        load_model(cfg, out, "teacher_vit")  # CKA and GradCAM references
    ensure_ray(cfg.ray)
    remote = ray.remote(**task_resources(cfg, ray.cluster_resources()))(run_task)
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
                     "shape_bias": {}, "cka": {}, "probe": {}}
    grid_maps = {}
    for name, measure, variant, value in results:
        if measure == "accuracy":
            metrics["accuracy"].setdefault(name, {})[variant] = value
        elif measure == "gradcam" and variant == "clean":
            metrics["gradcam"].setdefault(name, {}).update(value["summary"])
            grid_maps[name] = np.array(value["grid_maps"], dtype=np.float32)
        elif measure == "gradcam":
            metrics["gradcam"].setdefault(name, {})["cue_conflict"] = value["summary"]
        else:
            metrics[measure][name] = value
    for section in ("shape_bias", "probe"):
        if not metrics[section]:
            del metrics[section]
    initial = {"layer": STUDENT_LAYERS[0], "teacher_layer": "blocks.0"}
    for m, entry in metrics["cka"].items():
        initial[m] = entry["matrix"][0][0]
    metrics["cka_initial"] = initial
    runs = model_runs(cfg)
    merge_runs(metrics, runs)  # per-run entries -> per-model means, with per-seed values in metrics["stats"]
    first_run = {}
    for run, (model, _) in runs.items():
        first_run.setdefault(model, run)
    grid_maps = {model: grid_maps[run] for model, run in first_run.items() if run in grid_maps}  # the first seed's maps
    grid = None
    if grid_maps:
        split = load_split(cfg.data, "clean")
        k = cfg.analysis.gradcam_samples
        grid = {"images": split["images"][:k], "labels": split["labels"][:k],
                "class_names": class_names(cfg.data), "maps": grid_maps}
    metrics["meta"] = {"dataset": cfg.data.name, "variants": list(test_variants(cfg.data)),
                       "models": list(first_run), "num_classes": len(class_names(cfg.data)),
                       "adversarial_images": min(cfg.analysis.adversarial_samples,
                                                 len(load_split(cfg.data, "clean")["labels"])),
                       "sweep": {key: list(values) for key, values in cfg.sweep.items()},
                       "pairs": {"student_kd_vit": "teacher_vit", "student_kd_cnn": "teacher_cnn",
                                 "student_logit_kd": "teacher_vit"},
                       "teachers": {"teacher_vit": cfg.teacher_vit.name, "teacher_cnn": cfg.teacher_cnn.name},
                       "shape_bias_note": shape_bias_note(cfg.data.name)[1],
                       "test_images": len(load_split(cfg.data, "clean")["labels"]),
                       "occlusion_fraction": cfg.data.occlusion_fraction,
                       "teacher_training": teacher_training(cfg),
                       "gradcam_common_grid": gradcam_grid_meta(cfg),
                       "seconds": {"analysis": round(seconds, 1)}}
    return {"metrics": metrics, "gradcam_grid": grid}
