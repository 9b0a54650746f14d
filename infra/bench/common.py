"""What the benchmarks share: the clock, the JSON line's header, and `Context`, the cache they read: built in a
temporary directory from generated images and random teachers given a trained network's activation scales
(`calibrate`) and saved where `load_fitted` looks, by the real `CacheWorker`, and packed by the real `pack`.
"""
from __future__ import annotations

import functools
import os
import re
import sys
import time
from pathlib import Path

from infra.bench.profiles import Profile, cores

def timed(fn, device: str) -> float:
    """Seconds `fn` takes, with the device synchronised before both readings of the clock."""
    import torch
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else lambda: None
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def machine(device: str) -> tuple[str, str]:
    """(slug, name) of the machine: the GPU's, or the CPU's with its core count."""
    import platform

    import torch
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), f"{name}, {cores()} cores"
    return f"cpu-{cores()}core", f"{platform.processor() or platform.machine()}, {cores()} cores"


def header(bench: str, p: Profile) -> dict:
    from infra.provenance import commit, now, versions
    slug, name = machine(p.device)
    return {"bench": bench, "device": slug, "device_name": name,
            "profile": p.name, "created": now(), "commit": commit(), "versions": versions(), "cores": cores(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}  # other work on the machine skews every figure


def judge(line: dict, targets: dict[str, str]) -> dict:
    """Attach `targets` (dotted figure name -> '>= x' or '<= x') and `met` (None where a figure is missing)."""
    def met(name: str, target: str) -> bool | None:
        value = line
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        op, bound = target.split()
        return None if value is None else (value >= float(bound) if op == ">=" else value <= float(bound))
    line["targets"] = dict(targets)
    line["met"] = {k: met(k, t) for k, t in targets.items()}
    return line


def log(*args) -> None:
    print("[bench]", *args, file=sys.stderr, flush=True)


def calibrate(teacher, images, layers: list[str], batch: int, device: str) -> dict:
    """Set the BatchNorm statistics of a random `teacher` from `images` (uint8 NHWC) as training does (`update_bn`):
    a fresh BatchNorm passes its input unscaled, so every block's gain compounds (random WRN-101's `layer3` reaches
    1.2e5 at 224 px, past float16's 65,504; calibrated, 30 to 60). The largest |x| of `layers` and the logits on
    the first batch before and after, in the cache's precision (bf16 on CUDA); LayerNorm ViTs are left as they are."""
    import torch
    from torch.optim.swa_utils import update_bn

    cuda = str(device).startswith("cuda")
    teacher.to(device).eval()
    batches = [torch.from_numpy(images[i:i + batch]).to(device).permute(0, 3, 1, 2).float().div_(255)
               for i in range(0, len(images), batch)]

    @torch.no_grad()
    def max_abs() -> dict[str, float]:
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            out = teacher.extract(batches[0], layers)
        return {name: sig(float(t.float().abs().amax())) for name, t in out.items()}

    before = max_abs()
    bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in teacher.modules())
    if bn:
        update_bn(batches, teacher)  # restores eval mode
    after = max_abs() if bn else before
    teacher.cpu()
    return {"layers": list(layers), "images": len(images), "batchnorm_layers": bn, "max_abs_before": before,
            "max_abs_after": after}


class Context:
    """A small cache (both teachers), its packed FFCV file, and figures shared between benchmarks."""

    def __init__(self, profile: Profile, workdir: Path, results: Path | None = None):
        import torch
        from infra.config import config_from_dict
        self.p, self.dir, self.results, p = profile, Path(workdir), results, profile
        self.out = self.dir / "out"          # OUT/teachers/<role>.pt: where load_fitted looks
        self.memo: dict = {}                 # figures one bench hands to another
        self.cfg = config_from_dict({
            "seed": 0,
            "data": {"name": "shapes", "image_size": p.image_size, "train_size": p.n_images, "test_size": 50},
            "teacher_vit": {"name": p.vit}, "teacher_cnn": {"name": p.cnn},
            "cache": {"views": p.views, "shard_size": p.shard_size, "chunk_size": p.chunk_size,
                      "batch_size": p.cache_batch, "codec": p.codec, "feature_codec": p.feature_codec,
                      "codec_overrides": [o for o in p.codec_overrides.split(",") if o], "shuffle": p.shuffle,
                      "writers": p.writers},
            "train": {"arch": p.student, "batch_size": p.train_batch, "loader_workers": p.loader_workers,
                      "device": p.device, "amp": p.amp, "channels_last": p.channels_last}})
        self.threads = profile.threads or cores()
        torch.set_num_threads(self.threads)

    @functools.cache
    def data(self) -> dict:
        """Generated shapes; above 64 px, 32 px shapes upsampled (generating at 224 px is slow)."""
        import torch
        import torch.nn.functional as F
        from teacher_cache.datasets import fingerprint, load_split
        from teacher_cache.shapes import make_shapes
        from teacher_cache.views import sample_views
        c, d = self.cfg.cache, self.cfg.data
        split = load_split(d, "train") if d.image_size <= 64 else make_shapes(d.train_size, 32, d.seed)
        images = split["images"]
        if d.image_size > 64:
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=(d.image_size, d.image_size), mode="bilinear", align_corners=False)
            images = x.round().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        views = sample_views(len(split["labels"]), c.views, d.seed, c.crop_scale, c.crop_ratio, c.flip_prob)
        return {"images": images, "labels": split["labels"], "views": views,
                "fingerprint": fingerprint({"images": images, "labels": split["labels"]})}

    @functools.cache
    def teacher(self, role: str):
        """The randomly initialised, calibrated teacher of `role` (CPU, eval), saved as OUT/teachers/<role>.pt."""
        import torch
        from teacher_cache.fit import build_teacher, cached_layers
        from teacher_cache.job import ROLES
        torch.manual_seed(1 + ROLES.index(role))
        t = build_teacher(self.cfg, role).eval()
        images = self.data()["images"][:self.p.calibration_images]
        scales = calibrate(t, images, cached_layers(self.cfg, role, t), self.p.cache_batch, self.p.device)
        self.memo.setdefault("calibration", {})[t.spec.name] = scales
        log(f"{t.spec.name}: max |x| of {', '.join(scales['layers'])} and logits: {scales['max_abs_before']} at init, "
            f"{scales['max_abs_after']} calibrated")
        (self.out / "teachers").mkdir(parents=True, exist_ok=True)
        torch.save(t.state_dict(), self.out / "teachers" / f"{role}.pt")
        return t

    def new_store(self, role: str, path: Path, n: int):
        """A store of `role` for `n` images at `path`, created as `hakd cache` creates it."""
        from teacher_cache.job import identity, plan, prepare_store
        t, d = self.teacher(role), self.data()
        layout = plan(self.cfg, role, n, t)
        return prepare_store(self.cfg, path, t, layout, identity(self.cfg, role, t, layout, f"{d['fingerprint']} x{n}"),
                             d["images"][:n], d["views"][:n], self.p.device, replace=True)

    @functools.cache
    def store(self, role: str):
        """The (still empty) cache store of `role` over the context's images."""
        return self.new_store(role, self.dir / "cache" / f"{self.teacher(role).spec.name}.zarr",
                              len(self.data()["labels"]))

    def worker(self, role: str, store=None, data: dict | None = None):
        """The real CacheWorker (in this process: no Ray) over `store` and `data` (default: the context's)."""
        from teacher_cache.worker import CacheWorker, WorkerSetup
        store, d = store or self.store(role), data or self.data()
        setup = WorkerSetup(self.cfg.to_dict(), role, str(self.out), str(store.path), self.p.device, self.threads)
        return CacheWorker(setup, d["images"], d["labels"], d["views"])

    def filled_store(self, role: str):
        """The store of `role` with every unit written (what the loader, train and codecs benches read)."""
        store = self.store(role)
        todo = store.pending_units()
        if todo:
            log(f"writing the {role} cache ({len(todo)} units)")
            w = self.worker(role)
            for u in todo:
                w.process(u)
            w.drain()
            w.close()
        return store

    @functools.cache
    def packed(self) -> tuple[Path, dict, str]:
        """The FFCV file packed from the ViT store, its meta, and the field holding the cached tokens."""
        from student_train.pack import pack
        store = self.filled_store("teacher_vit")
        layer = next(iter(store.layout.layers))
        beton, meta = pack({"teacher_vit": store.path}, self.dir / "train", workers=self.p.loader_workers, log=log)
        return beton, meta, next(f for f, info in meta["fields"].items() if info["array"] == f"features/{layer}")


def free_device_memory(device: str) -> None:
    import gc
    gc.collect()
    if device == "cuda":
        import torch
        torch.cuda.empty_cache()
