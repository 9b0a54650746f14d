"""`hakd cache`: fit each teacher once, then run it over K views of every training image on Ray.

Work is cut into shard-aligned units; each unit is computed and written by exactly one Ray actor
(zarr loses data when two writers touch one shard). An actor hands a finished unit to its writer
thread and starts computing the next, so compression and disk writes overlap compute. A unit is
marked done only after its bytes are fsynced; re-running skips done units and rewrites the rest,
so a killed job resumes and ends with the same store as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from infra.config import Config, config_from_dict
from infra.provenance import provenance
from teacher_cache.datasets import class_names, fingerprint, load_split
from teacher_cache.fit import build_teacher, fit_teacher, head_mode, load_fitted
from teacher_cache.store import CacheStore, Layout
from teacher_cache.views import apply_views, sample_views

ROLES = ("teacher_vit", "teacher_cnn")


def store_path(out: Path, cfg: Config, role: str) -> Path:
    return Path(out) / "cache" / f"{getattr(cfg, role).name}.zarr"


def cached_layers(cfg: Config, role: str, teacher=None) -> list[str]:
    tc = getattr(cfg, role)
    teacher = teacher or build_teacher(cfg, role)
    return list(tc.layers) or teacher.default_layers()


def layer_shapes(teacher, layers: list[str]) -> dict[str, tuple[int, ...]]:
    with torch.no_grad():
        out = teacher.eval().extract(torch.zeros(1, 3, teacher.input_size, teacher.input_size), layers)
    return {l: tuple(out[l].shape[1:]) for l in layers}


def plan(cfg: Config, role: str, n: int | None = None, teacher=None) -> Layout:
    teacher = teacher or build_teacher(cfg, role)
    layers = cached_layers(cfg, role, teacher)
    n = n if n is not None else len(load_split(cfg.data, "train")["labels"])
    return Layout(n, cfg.cache.views, cfg.data.image_size, len(class_names(cfg.data)),
                  layer_shapes(teacher, layers), cfg.cache.shard_size, cfg.cache.chunk_size)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def identity(cfg: Config, role: str, teacher, layout: Layout, data_fp: str) -> dict:
    """Everything a cached value depends on; a store whose identity differs is never reused."""
    c = cfg.cache
    return {"teacher": teacher.spec.name, "weights_sha256": state_digest(teacher.state_dict()),
            "layers": {k: list(v) for k, v in layout.layers.items()},
            "preprocessing": {"input_size": teacher.input_size, "mean": list(teacher.spec.mean),
                              "std": list(teacher.spec.std), "resample": "bilinear, align_corners=False"},
            "views": {"k": c.views, "scale": list(c.crop_scale), "ratio": list(c.crop_ratio),
                      "flip_prob": c.flip_prob, "seed": cfg.data.seed},
            "dataset": {"name": cfg.data.name, "fingerprint": data_fp, "n": layout.n,
                        "image_size": cfg.data.image_size, "num_classes": layout.num_classes},
            "shards": {"shard_size": layout.shard_size, "chunk_size": layout.chunk_size}}


def ensure_teacher(cfg: Config, role: str, out: Path, device: str, overwrite: bool) -> dict:
    """Fit the teacher unless a fit for the same teacher and data config is already saved."""
    info_path = Path(out) / "teachers" / f"{role}.json"
    c = cfg.cache  # the fit also depends on the seed and on the augmentation it trains with
    key = (cfg.digest(role, "data", "seed") + f":{list(c.crop_scale)}:{list(c.crop_ratio)}:{c.flip_prob}:"
           + head_mode(getattr(cfg, role)))
    if info_path.is_file() and not overwrite:
        info = json.loads(info_path.read_text())
        if info.get("key") == key and (Path(out) / "teachers" / f"{role}.pt").is_file():
            return info
    info = fit_teacher(cfg, role, out, device=device)
    info["key"] = key
    info_path.write_text(json.dumps(info, indent=2))
    return info


class CacheWorker:
    """One Ray actor: a teacher in memory, a writer thread, and the units it is handed."""

    def __init__(self, cfg_dict: dict, role: str, out: str, path: str, images, labels, views, device: str,
                 threads: int):
        torch.set_num_threads(threads)
        self.cfg = config_from_dict(cfg_dict)
        self.device = device
        self.teacher = load_fitted(self.cfg, role, Path(out), device)
        if device == "cuda":
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.layers = cached_layers(self.cfg, role, self.teacher)
        self.store = CacheStore.open(path)
        self.images, self.labels, self.views = images, labels, views
        self.writer = ThreadPoolExecutor(1)
        self.pending = []

    @torch.no_grad()
    def forward(self, u: int):
        """Yield the teacher's outputs (on the device) for unit u's (image, view) pairs, batch by batch."""
        lo, hi = self.store.layout.unit_range(u)
        k, bs = self.store.layout.views, self.cfg.cache.batch_size
        images = torch.from_numpy(np.ascontiguousarray(self.images[lo:hi]))
        views = torch.from_numpy(np.ascontiguousarray(self.views[lo:hi]))
        pairs = torch.stack(torch.meshgrid(torch.arange(hi - lo), torch.arange(k), indexing="ij"), -1).view(-1, 2)
        cuda = self.device == "cuda"
        for i in range(0, len(pairs), bs):
            idx, view = pairs[i:i + bs, 0], pairs[i:i + bs, 1]
            x = apply_views(images[idx].to(self.device, non_blocking=True), views[idx, view], self.teacher.input_size)
            with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
                yield self.teacher.extract(x.contiguous(memory_format=torch.channels_last) if cuda else x, self.layers)

    def compute(self, u: int) -> dict[str, np.ndarray]:
        """Unit u's arrays on the host, ready to write."""
        outs: dict[str, list] = {"logits": [], **{l: [] for l in self.layers}}
        for feats in self.forward(u):
            for name in outs:
                outs[name].append(feats[name].to(torch.float16).cpu())
        lo, hi = self.store.layout.unit_range(u)
        k = self.store.layout.views
        arrays = {"images": self.images[lo:hi], "labels": self.labels[lo:hi], "views": self.views[lo:hi]}
        for name, parts in outs.items():
            t = torch.cat(parts).view(hi - lo, k, *parts[0].shape[1:]).numpy()
            arrays["logits" if name == "logits" else f"features/{name}"] = t
        return arrays

    def process(self, u: int) -> list[int]:
        """Compute unit u, queue its write, and report the units whose writes have finished."""
        arrays = self.compute(u)
        self.pending.append((u, self.writer.submit(self.store.write_unit, u, arrays)))
        return self._finished(block=len(self.pending) > 1)

    def drain(self) -> list[int]:
        return self._finished(block=True, all_=True)

    def _finished(self, block: bool, all_: bool = False) -> list[int]:
        done = []
        while self.pending and (self.pending[0][1].done() or block):
            u, fut = self.pending.pop(0)
            fut.result()  # re-raises a failed write
            done.append(u)
            if not all_:
                block = False
        return done


def run_cache(cfg: Config, out: Path, overwrite: bool = False, log=print) -> dict:
    """Fit both teachers and write both stores; returns a summary per role."""
    import ray
    from infra.ray_cluster import ensure_ray, gpus_available

    out = Path(out)
    ensure_ray(cfg.ray)
    gpus = gpus_available()
    device = "cuda" if gpus else "cpu"
    train = load_split(cfg.data, "train")
    data_fp = fingerprint(train)
    views = sample_views(len(train["labels"]), cfg.cache.views, cfg.data.seed, cfg.cache.crop_scale,
                         cfg.cache.crop_ratio, cfg.cache.flip_prob)
    refs = [ray.put(train["images"]), ray.put(train["labels"]), ray.put(views)]
    summary = {}
    for role in ROLES:
        start = time.time()
        path = store_path(out, cfg, role)
        if path.exists() and not overwrite:  # refuse a store for another config before (re)fitting its teacher
            fresh = build_teacher(cfg, role)
            CacheStore.check_identity(path, identity(cfg, role, fresh, plan(cfg, role, len(train["labels"]), fresh),
                                                     data_fp), ignore=("weights_sha256",))
        info = ensure_teacher(cfg, role, out, device if torch.cuda.is_available() else "cpu", overwrite)
        teacher = load_fitted(cfg, role, out)
        layout = plan(cfg, role, len(train["labels"]), teacher)
        store = CacheStore.create_or_open(path, layout, identity(cfg, role, teacher, layout, data_fp),
                                          provenance(cfg), cfg.cache.clevel, overwrite=overwrite)
        if teacher.spec.kind == "vit" and "live_block" not in store.group:
            last = teacher.net.blocks[-1]
            store.write_params("live_block", {k: v.numpy() for k, v in last.state_dict().items()})
        store.mark_pending(store.bad_units())  # repair: damaged shards are rewritten
        todo = store.pending_units()
        if todo:
            _run_units(cfg, role, out, path, todo, refs, gpus, desc=f"cache {role} ({teacher.spec.name})")
        problems = store.verify()
        if problems:
            raise RuntimeError(f"cache store {path} failed verification after writing: {problems[0]}")
        store.update_attrs(teacher_accuracy={"clean": info["clean_accuracy"], "head": info["mode"]},
                           complete=True)
        summary[role] = {"store": str(path), "units_written": len(todo), "units": layout.units,
                         "teacher_clean_accuracy": info["clean_accuracy"], "seconds": round(time.time() - start, 1)}
    return summary


def _run_units(cfg: Config, role: str, out: Path, path: Path, todo: list[int], refs, gpus: int, desc: str) -> None:
    import ray
    n_workers = max(1, min(cfg.cache.workers, len(todo), gpus or cfg.cache.workers))
    cpus = ray.cluster_resources().get("CPU", 1)
    threads = max(1, int(cpus // n_workers))
    actor_cls = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)(CacheWorker)
    actors = [actor_cls.remote(cfg.to_dict(), role, str(out), str(path), *refs, "cuda" if gpus else "cpu", threads)
              for _ in range(n_workers)]
    queue = list(todo)
    inflight = {}
    bar = tqdm(total=len(todo), desc=desc, unit="shard")
    try:
        for a in actors:
            if queue:
                inflight[a.process.remote(queue.pop(0))] = a
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            actor = inflight.pop(ready[0])
            bar.update(len(ray.get(ready[0])))
            if queue:
                inflight[actor.process.remote(queue.pop(0))] = actor
        for done in ray.get([a.drain.remote() for a in actors]):
            bar.update(len(done))
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)
