"""`hakd cache`: fit each teacher once, then run it over K views of every training image on Ray.

Work is cut into shard-aligned units; each unit is computed by exactly one Ray actor
(teacher_cache/worker.py) and written by one of its writer processes (zarr loses data when two
writers touch one shard), so encoding and disk writes overlap compute. A unit is marked done only
after its bytes are fsynced, with each shard file's checksum taken as it was written; nothing is
read back. Re-running verifies those checksums, rewrites damaged or missing
units (and the ViT's `live_block/` weights, a unit of their own), and skips the rest, so a killed job
resumes and ends with the same store as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from infra import storage
from infra.config import Config
from infra.provenance import provenance
from teacher_cache.datasets import class_names, fingerprint, load_split
from teacher_cache.embedded import embedded_identity
from teacher_cache.codecs import parse_overrides
from teacher_cache.fit import build_teacher, cached_layers, fit_teacher, head_mode, load_fitted
from teacher_cache.basis import PARAMS as BASIS
from teacher_cache.basis_fit import ensure_basis, fit_layout_basis
from teacher_cache.layout import Layout, planned_ranks
from teacher_cache.paths import storage_root, store_path, teacher_file, teacher_loads
from teacher_cache.store import CacheStore, StoreError
from teacher_cache.views import sample_views
from teacher_cache.worker import CacheWorker, WorkerSetup
from teacher_cache.writers import wait_for_other_writers

ROLES = ("teacher_vit", "teacher_cnn")


def layer_shapes(teacher, layers: list[str]) -> dict[str, tuple[int, ...]]:
    with torch.no_grad():
        out = teacher.eval().extract(torch.zeros(1, 3, teacher.input_size, teacher.input_size), layers)
    return {l: tuple(out[l].shape[1:]) for l in layers}


def plan(cfg: Config, role: str, n: int | None = None, teacher=None) -> Layout:
    teacher = teacher or build_teacher(cfg, role)
    layers = cached_layers(cfg, role, teacher)
    n = n if n is not None else len(load_split(cfg.data, "train")["labels"])
    shapes = layer_shapes(teacher, layers)
    return Layout(n, cfg.cache.views, cfg.data.image_size, len(class_names(cfg.data)),
                  shapes, cfg.cache.shard_size, cfg.cache.chunk_size, cfg.cache.feature_codec,
                  planned_ranks(cfg.cache.feature_codec, shapes))


def open_store(cfg: Config, path: Path, layout: Layout, ident: dict, prov: dict, params: tuple[str, ...] = (),
               overwrite: bool = False) -> CacheStore:
    """The store at `path` as `hakd cache` creates it (codecs from cache.*), or the existing one for `ident`."""
    c = cfg.cache
    return CacheStore.create_or_open(path, layout, ident, prov, codec=c.codec,
                                     codec_overrides=parse_overrides(c.codec_overrides), clevel=c.clevel,
                                     shuffle=c.shuffle,
                                     params=params, overwrite=overwrite)


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
            "shards": {"shard_size": layout.shard_size, "chunk_size": layout.chunk_size},
            "feature_codec": layout.feature_codec}


def ensure_teacher(cfg: Config, role: str, out: Path, device: str) -> dict:
    """Fit the teacher unless a fit for the same teacher and data config is already saved."""
    info_path = teacher_file(out, cfg, role, ".json")
    c = cfg.cache  # the fit also depends on the seed and on the augmentation it trains with
    key = (cfg.digest(role, "data", "seed") + f":{list(c.crop_scale)}:{list(c.crop_ratio)}:{c.flip_prob}:"
           + head_mode(getattr(cfg, role), cfg.data) + embedded_identity(getattr(cfg, role), cfg.data))
    if storage.exists(info_path):  # a fit for this key is reused, also under --overwrite: only another key refits
        info = json.loads(storage.read_bytes(info_path))
        if info.get("key") == key and teacher_loads(teacher_file(out, cfg, role)):
            return info
    info = fit_teacher(cfg, role, storage_root(out, cfg), device=device)
    info["key"] = key
    storage.write_bytes(info_path, json.dumps(info, indent=2).encode())
    return info


def written_for(path: Path, ident: dict) -> bool:
    """True when the store at `path` exists and was written for exactly `ident`."""
    try:
        CacheStore.check_identity(path, ident)
    except StoreError:
        return False
    return True


def prepare_store(cfg: Config, path: Path | str, teacher, layout: Layout, ident: dict, images, views, device: str,
                  replace: bool = False) -> CacheStore:
    """The store at `path` opened, created or (`replace`) recreated, with all but its units: a pca codec's basis
    (fitted on `images` and their `views` when the store is new) and a ViT's live block."""
    fitted = None
    if layout.ranks and (replace or not storage.exists(path)):  # a new pca store: its ranks come from the fit
        layout, *fitted = fit_layout_basis(layout, teacher, images, views, cfg.data.seed, device)
    vit = teacher.spec.kind == "vit"
    params = (("live_block",) if vit else ()) + ((BASIS,) if layout.ranks else ())
    store = open_store(cfg, path, layout, ident, provenance(cfg), params=params, overwrite=replace)
    ensure_basis(store, teacher, images, views, cfg.data.seed, device, fitted)
    if vit and store.param_problems("live_block"):  # never written, or a run died while writing it
        store.write_params("live_block", {k: v.numpy() for k, v in teacher.net.blocks[-1].state_dict().items()})
    return store


def run_cache(cfg: Config, out: Path, overwrite: bool = False, log=print) -> dict:
    """Fit both teachers and write both stores; returns a summary per role."""
    import ray
    from infra.ray_cluster import ensure_ray, gpus_available

    out = Path(out)
    ensure_ray(cfg.ray)
    storage.probe(storage_root(out, cfg), f"{storage.node_name()} (the driver)")  # it fits and saves the teachers
    gpus = gpus_available()
    probe_actor_nodes(cfg, out, gpus)  # before any teacher is fitted: a node that cannot write fails now
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
        if storage.exists(path) and not overwrite:  # refuse a store for another config before (re)fitting its teacher
            fresh = build_teacher(cfg, role)
            CacheStore.check_identity(path, identity(cfg, role, fresh, plan(cfg, role, len(train["labels"]), fresh),
                                                     data_fp), ignore=("weights_sha256",))
        info = ensure_teacher(cfg, role, out, device if torch.cuda.is_available() else "cpu")
        teacher = load_fitted(cfg, role, storage_root(out, cfg))
        layout = plan(cfg, role, len(train["labels"]), teacher)
        ident = identity(cfg, role, teacher, layout, data_fp)
        # --overwrite replaces a store written for another identity; one for this identity is kept and resumed
        if storage.exists(path):  # writers of a run killed moments ago may still be finishing a unit
            wait_for_other_writers(str(path))
        store = prepare_store(cfg, path, teacher, layout, ident, train["images"], views,
                              device if torch.cuda.is_available() else "cpu",
                              replace=overwrite and not written_for(path, ident))
        store.mark_pending(store.bad_units())  # repair: damaged shards are rewritten
        todo = store.pending_units()
        nodes, rate = [], None
        if todo:
            nodes, seconds = _run_units(cfg, role, out, path, todo, refs, gpus, layout,
                                        desc=f"cache {role} ({teacher.spec.name})")
            rate = round(_image_views(layout, todo) / seconds, 1)
        # each unit was checksummed as written and marked done only once durable: nothing is read back
        left = store.pending_units()
        if left:
            raise RuntimeError(f"cache store {path}: units {left} were not written; re-run `hakd cache`")
        store.update_attrs(teacher_accuracy={"clean": info["clean_accuracy"], "head": info["mode"]},
                           complete=True)
        summary[role] = {"store": str(path), "units_written": len(todo), "units": layout.units,
                         "teacher_clean_accuracy": info["clean_accuracy"], "seconds": round(time.time() - start, 1),
                         "image_views_per_s": rate, "nodes": nodes}
    return summary


def actor_nodes(cfg: Config, gpus: int) -> list[str]:
    """Ids of the alive Ray nodes that offer what a cache actor asks for (a GPU when there are GPUs, and
    cache.actor_resources)."""
    import ray
    need = {**({"GPU": 1} if gpus else {}), **cfg.cache.actor_resources}
    return [n["NodeID"] for n in ray.nodes()
            if n["Alive"] and all(n["Resources"].get(k, 0) >= v for k, v in need.items())]


def probe_actor_nodes(cfg: Config, out: Path, gpus: int) -> None:
    """Check the storage location from every node a cache actor may run on, with the driver's mark there,
    before the minutes of a teacher fit; the actors check again when they start."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root = storage_root(out, cfg)
    mark = storage.leave_mark(root)
    probe = ray.remote(num_cpus=0)(lambda: storage.probe(root, storage.node_name(), mark))
    try:
        ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
                 for node in actor_nodes(cfg, gpus)])
    except ray.exceptions.RayTaskError as e:
        raise _from_actor(e) from None
    finally:
        storage.delete(mark[0])


def _image_views(layout: Layout, units: list[int]) -> int:
    """Teacher inputs of the units: each sample's views."""
    return sum(hi - lo for lo, hi in map(layout.unit_range, units)) * layout.views


def _run_units(cfg: Config, role: str, out: Path, path: Path | str, todo: list[int], refs, gpus: int,
               layout: Layout, desc: str) -> tuple[list[str], float]:
    """Write the units `todo` from Ray actors, with a progress bar in teacher inputs (image-views) per second;
    returns the nodes the actors ran on and the seconds from the actors' start-up (teacher loaded, writer
    processes running) to the last unit durable."""
    import ray

    n_workers = max(1, min(cfg.cache.workers, len(todo), gpus or cfg.cache.workers))
    cpus = ray.cluster_resources().get("CPU", 1)
    threads = max(1, int(cpus // n_workers))
    actor_cls = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
                           resources=dict(cfg.cache.actor_resources) or None)(CacheWorker)
    mark = storage.leave_mark(storage_root(out, cfg))
    setup = WorkerSetup(cfg.to_dict(), role, str(out), str(path), "cuda" if gpus else "cpu", threads, mark)
    actors = [actor_cls.remote(setup, *refs) for _ in range(n_workers)]
    try:
        nodes = sorted(set(ray.get([a.where.remote() for a in actors])))
        began = time.time()
    except ray.exceptions.RayActorError as e:
        for a in actors:
            ray.kill(a)
        raise _from_actor(e) from None
    finally:
        storage.delete(mark[0])
    waiting = list(todo)
    inflight = {}
    bar = tqdm(total=_image_views(layout, todo), desc=desc, unit="img", unit_scale=True)
    try:
        for a in [*actors, *actors]:  # two calls queued per actor: it starts the next unit as soon as one returns
            if waiting:
                inflight[a.process.remote(waiting.pop(0))] = a
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            actor = inflight.pop(ready[0])
            bar.update(_image_views(layout, ray.get(ready[0])))
            if waiting:
                inflight[actor.process.remote(waiting.pop(0))] = actor
        for done in ray.get([a.drain.remote() for a in actors]):
            bar.update(_image_views(layout, done))
        ray.get([a.close.remote() for a in actors])  # writer processes stopped, shared buffers freed
    except ray.exceptions.RayTaskError as e:  # a unit failed: its writer's error, in one line
        raise _from_actor(e) from None
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)
    return nodes, time.time() - began


def _from_actor(e: Exception) -> Exception:
    """The user's one-line error out of an actor's failure (Ray keeps only its text): a location the actor's
    node cannot use, a store or teacher it cannot open or write (a full disk); anything else as it came."""
    for line in reversed(str(e).splitlines()):
        m = re.match(r"\S*(StorageError|StoreError|FileNotFoundError): (.+)", line.strip())
        if m:
            return (storage.StorageError if m[1] == "StorageError" else StoreError)(m[2])
    return e
