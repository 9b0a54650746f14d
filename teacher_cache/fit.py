"""Give each teacher a classifier for the target dataset, once, before its features are cached.

- `trained`: the whole network is trained on the training split (the demo teachers, which start
  from random weights; or full fine-tuning of a real teacher from its pretrained weights).
- `probe`: the backbone stays frozen and a linear head is fitted on its pooled features of the
  plain training images (the default for real teachers: cheap, and the features stay the
  pretrained ones the paper distils).
- `pretrained`: nothing is fitted; the head is the one that came with the weights (the embedded,
  shape-pretrained `vit_demo`, whose head already names the demo's shapes: the analogue of CLIP's
  zero-shot classifier).
The result is saved as `OUT/teachers/<role>.pt` (a state dict, loaded back with weights_only) with
`<role>.json` beside it holding the clean test accuracy.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from infra import storage
from infra.config import Config, DataConfig, TeacherConfig
from teacher_cache.datasets import class_names, load_split
from teacher_cache.embedded import load_embedded, uses_embedded
from teacher_cache.teachers import Teacher, find_weights, get_spec, load_backbone_weights
from teacher_cache.views import apply_views, sample_views


def head_mode(tc: TeacherConfig, data: DataConfig) -> str:
    if tc.head != "auto":
        return tc.head
    if uses_embedded(tc, data):  # the embedded head names the shapes; elsewhere their features get a probe
        return "pretrained" if data.name == "shapes" else "probe"
    return "trained" if get_spec(tc.name).demo else "probe"


def build_teacher(cfg: Config, role: str) -> Teacher:
    tc: TeacherConfig = getattr(cfg, role)
    return Teacher(get_spec(tc.name), len(class_names(cfg.data)), cfg.data.image_size)


def cached_layers(cfg: Config, role: str, teacher: Teacher | None = None) -> list[str]:
    """The layers whose features the cache stores for `role`: its config's, else the teacher's defaults."""
    return list(getattr(cfg, role).layers) or (teacher or build_teacher(cfg, role)).default_layers()


def load_fitted(cfg: Config, role: str, out: Path | str, device="cpu") -> Teacher:
    """The fitted teacher saved under `out` (OUT or cache.location: a path or a URL)."""
    path = storage.join(out, "teachers", f"{role}.pt")
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} is missing: run `hakd cache` first (it fits the teachers)")
    teacher = build_teacher(cfg, role)
    teacher.load_state_dict(storage.load_tensors(path))
    return teacher.to(device).eval()


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 256,
             device="cpu") -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).to(device).permute(0, 3, 1, 2).float() / 255
        correct += (model(x).argmax(1).cpu() == torch.from_numpy(labels[i:i + batch])).sum().item()
    return correct / max(1, len(images))


def fit_teacher(cfg: Config, role: str, out: Path | str, device="cpu") -> dict:
    """Fit (or load) the teacher of `role` and save it under `out` (a path or a URL); returns {"accuracy": ..., "mode": ...}.

    On the CPU the fit runs on as many torch threads as the process has cores, whatever the process set before
    (importing ffcv sets 1): a sum split over another number of threads rounds differently, and a refit of a
    damaged teacher file must give the weights its store was written with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        return _fit(cfg, role, out, device)
    finally:
        torch.set_num_threads(threads)


def _fit(cfg: Config, role: str, out: Path | str, device) -> dict:
    tc: TeacherConfig = getattr(cfg, role)
    torch.manual_seed(cfg.seed)  # the fresh weights (demo init, new head) must not depend on earlier RNG use
    teacher = build_teacher(cfg, role)
    mode = head_mode(tc, cfg.data)
    if uses_embedded(tc, cfg.data):
        load_embedded(teacher)
    elif tc.weights or not teacher.spec.demo:
        load_backbone_weights(teacher, find_weights(teacher.spec, tc.weights))
    train = load_split(cfg.data, "train")
    teacher.to(device)
    start = time.time()
    if mode == "trained":
        _train_end_to_end(teacher, train, tc, cfg, device, desc=f"fit {role} ({tc.name})")
    elif mode == "probe":
        _fit_probe(teacher, train, cfg, device, desc=f"probe {role} ({tc.name})")
    clean = load_split(cfg.data, "clean")
    acc = evaluate(teacher, clean["images"], clean["labels"], device=device)
    teacher.cpu()
    storage.save_tensors(teacher.state_dict(), storage.join(out, "teachers", f"{role}.pt"))
    info = {"teacher": tc.name, "mode": mode, "clean_accuracy": acc, "seconds": round(time.time() - start, 1)}
    storage.write_bytes(storage.join(out, "teachers", f"{role}.json"), json.dumps(info, indent=2).encode())
    return info


def _train_end_to_end(teacher: Teacher, train: dict, tc: TeacherConfig, cfg: Config, device, desc: str) -> None:
    torch.manual_seed(cfg.seed)
    images = torch.from_numpy(train["images"])
    labels = torch.from_numpy(train["labels"])
    n, bs = len(images), 128
    steps = tc.fit_epochs * math.ceil(n / bs)
    opt = torch.optim.AdamW(teacher.parameters(), lr=tc.fit_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.fit_lr, total_steps=max(1, steps), pct_start=0.2)
    teacher.train()
    bar = tqdm(total=steps, desc=desc, unit="step", leave=False)
    for epoch in range(tc.fit_epochs):
        # fresh random views every epoch: the teacher learns the augmentations the cache will use
        views = torch.from_numpy(sample_views(n, 2, cfg.seed * 1000 + epoch, cfg.cache.crop_scale,
                                              cfg.cache.crop_ratio, cfg.cache.flip_prob)[:, 1])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            x = apply_views(images[idx].to(device), views[idx], teacher.input_size)
            loss = F.cross_entropy(teacher(x), labels[idx].to(device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    teacher.eval()


def _fit_probe(teacher: Teacher, train: dict, cfg: Config, device, desc: str) -> None:
    """Multinomial logistic regression on frozen pooled features (full batch, L-BFGS)."""
    teacher.eval()
    feats = []
    with torch.no_grad():
        for i in tqdm(range(0, len(train["images"]), cfg.cache.batch_size), desc=desc, leave=False):
            x = torch.from_numpy(train["images"][i:i + cfg.cache.batch_size]).to(device)
            feats.append(teacher.pooled(x.permute(0, 3, 1, 2).float() / 255).float().cpu())
    x = torch.cat(feats)
    y = torch.from_numpy(train["labels"])
    head = teacher.head()
    w = torch.zeros(head.out_features, x.shape[1], requires_grad=True)
    b = torch.zeros(head.out_features, requires_grad=True)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = (x - mu) / sd
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w.T + b, y) + 1e-4 * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():  # fold the standardisation into the head
        head.weight.copy_((w / sd).to(head.weight.device))
        head.bias.copy_((b - (w * mu / sd).sum(1)).to(head.bias.device))
