"""What the benchmarks share: the clock, the JSON line, and the cache they read (profiles: infra/bench/profiles.py).

The benchmarks never touch a user's runs: `Context` builds its own small cache in a temporary
directory from generated images and randomly initialised teachers (saved where `load_fitted`
looks for fitted ones, so the real `CacheWorker` loads them), and packs it with the real `pack`.
The random teachers get a trained network's activation scales first (`calibrate`): their BatchNorm
statistics are measured on the generated images, as training would set them.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from infra.bench.profiles import Profile, cores

ROLES = ("teacher_vit", "teacher_cnn")


# ---------------------------------------------------------------------------------- clock

def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds `fn` takes, with the device synchronised before both readings of the clock."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(xs) -> float:
    return float(statistics.median(xs))


def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


# ---------------------------------------------------------------------------------- reporting

def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: str) -> str:
    if str(device).startswith("cuda"):
        import torch
        return slug(torch.cuda.get_device_name(0))
    return f"cpu-{cores()}core"


def device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(0)
    import platform
    return f"{platform.processor() or platform.machine()}, {cores()} cores"


def header(bench: str, p: Profile) -> dict:
    from infra.provenance import commit
    from infra.provenance import now, versions
    return {"bench": bench, "device": device_slug(p.device), "device_name": device_name(p.device),
            "profile": p.name, "created": now(), "commit": commit(), "versions": versions(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}  # other work on the machine skews every figure


def check(value: float | None, target: str) -> bool | None:
    """Whether `value` meets a target written as '>= 0.9' or '<= 1.15'; None when it cannot be judged."""
    if value is None or not target:
        return None
    m = re.match(r"\s*(>=|<=)\s*([0-9.]+)", target)
    if not m:
        return None
    return value >= float(m.group(2)) if m.group(1) == ">=" else value <= float(m.group(2))


def judge(line: dict, targets: dict[str, str]) -> dict:
    """Attach `targets` (dotted figure name -> '>= x') and `met` to a result line."""
    def get(name):
        node = line
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node
    line["targets"] = dict(targets)
    line["met"] = {k: check(get(k), t) for k, t in targets.items()}
    return line


def emit(line: dict, stream=None) -> None:
    stream = stream or sys.stdout
    stream.write(json.dumps(line) + "\n")
    stream.flush()


def log(*args) -> None:
    print("[bench]", *args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- the bench cache

def missing_modules(names) -> list[str]:
    """The modules of `names` that do not import here (a compiled one can be present yet fail to load)."""
    import importlib
    missing = []
    for n in names:
        try:
            importlib.import_module(n)
        except Exception:
            missing.append(n)
    return missing


def calibrate(teacher, images, layers: list[str], batch: int, device: str) -> dict:
    """Set the BatchNorm running statistics of a randomly initialised `teacher` from `images` (uint8,
    N x H x W x 3), as training sets them: torch's `update_bn`, train-mode forwards without gradients,
    a cumulative average over every batch. Returns the largest |x| of the cached `layers` and the
    logits on the first batch before and after, in the precision the cache computes in (bf16 on CUDA).

    Why: a fresh BatchNorm holds mean 0 and variance 1, so in eval mode it passes its input unscaled
    and every block's gain compounds. Random WRN-101's `layer3` reaches about 1.2e5 at 224 px (on CPU:
    116,736 in bf16, 127,900 in float32), beyond float16's 65,504, which the cache rightly refuses to
    store; with measured statistics it is 30 to 60, a trained network's scale. A model without
    BatchNorm (the ViTs: LayerNorm; random ViT-B/16's `blocks.10` reaches about 8) is left as it is."""
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

    def __init__(self, profile: Profile, workdir: Path):
        import torch
        from infra.config import config_from_dict
        self.p, self.dir = profile, Path(workdir)
        self.out = self.dir / "out"          # OUT/teachers/<role>.pt: where load_fitted looks
        # the stores: in the temp dir, or a temporary folder under store_dir (removed with this context)
        self._store_tmp = tempfile.TemporaryDirectory(prefix="hakd-bench-", dir=profile.store_dir) \
            if profile.store_dir else None
        self.store_dir = Path(self._store_tmp.name) if self._store_tmp else self.dir
        self.memo: dict = {}                 # figures one bench hands to another
        p = profile
        self.cfg = config_from_dict({
            "seed": 0,
            "data": {"name": "shapes", "image_size": p.image_size, "train_size": p.n_images, "test_size": 50},
            "teacher_vit": {"name": p.vit}, "teacher_cnn": {"name": p.cnn},
            "cache": {"views": p.views, "shard_size": p.shard_size, "chunk_size": p.chunk_size,
                      "batch_size": p.cache_batch, "codec": p.codec, "feature_dtype": p.feature_dtype,
                      "codec_overrides": [o for o in p.codec_overrides.split(",") if o], "shuffle": p.shuffle,
                      "writers": p.writers},
            "train": {"arch": p.student, "batch_size": p.train_batch, "loader_workers": p.loader_workers,
                      "device": p.device, "amp": p.amp, "channels_last": p.channels_last},
        })
        self._data = None
        self._teachers, self._stores, self._workers = {}, {}, {}
        self._packed = None
        self.threads = profile.threads or cores()
        torch.set_num_threads(self.threads)

    # -- data: generated shapes; above 64 px, 32 px shapes upsampled (generating at 224 px is slow)
    def data(self) -> dict:
        if self._data is None:
            import torch
            import torch.nn.functional as F
            from teacher_cache.datasets import fingerprint, load_split
            from teacher_cache.shapes import make_shapes
            from teacher_cache.views import sample_views
            c, d = self.cfg.cache, self.cfg.data
            if d.image_size <= 64:
                split = load_split(d, "train")
                images, labels = split["images"], split["labels"]
            else:
                split = make_shapes(d.train_size, 32, d.seed)
                x = torch.from_numpy(split["images"]).permute(0, 3, 1, 2).float()
                x = F.interpolate(x, size=(d.image_size, d.image_size), mode="bilinear", align_corners=False)
                images = x.round().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
                labels = split["labels"]
            views = sample_views(len(labels), c.views, d.seed, c.crop_scale, c.crop_ratio, c.flip_prob)
            self._data = {"images": images, "labels": labels, "views": views,
                          "fingerprint": fingerprint({"images": images, "labels": labels})}
        return self._data

    def teacher(self, role: str):
        """The randomly initialised, calibrated teacher of `role` (CPU, eval), saved as OUT/teachers/<role>.pt."""
        if role not in self._teachers:
            import torch
            from teacher_cache.fit import build_teacher
            from teacher_cache.job import cached_layers
            torch.manual_seed(1 + ROLES.index(role))
            t = build_teacher(self.cfg, role).eval()
            images = self.data()["images"][:self.p.calibration_images]
            scales = calibrate(t, images, cached_layers(self.cfg, role, t), self.p.cache_batch, self.p.device)
            self.memo.setdefault("calibration", {})[t.spec.name] = scales
            after = (f"{scales['max_abs_after']} with BatchNorm statistics measured on {scales['images']} images"
                     if scales["batchnorm_layers"] else "no BatchNorm: left as initialised")
            log(f"{t.spec.name}: max |x| of {', '.join(scales['layers'])} and logits in the cache's precision: "
                f"{scales['max_abs_before']} at init; {after}")
            (self.out / "teachers").mkdir(parents=True, exist_ok=True)
            torch.save(t.state_dict(), self.out / "teachers" / f"{role}.pt")
            self._teachers[role] = t
        return self._teachers[role]

    def store(self, role: str):
        """The (possibly still empty) cache store of `role`, created as `hakd cache` creates it."""
        if role not in self._stores:
            from infra.provenance import provenance
            from teacher_cache.job import identity, open_store, plan
            t, d = self.teacher(role), self.data()
            layout = plan(self.cfg, role, len(d["labels"]), t)
            path = self.store_dir / "cache" / f"{t.spec.name}.zarr"
            vit = t.spec.kind == "vit"
            store = open_store(self.cfg, path, layout, identity(self.cfg, role, t, layout, d["fingerprint"]),
                               provenance(self.cfg), params=("live_block",) if vit else (), overwrite=True)
            if vit:
                store.write_params("live_block", {k: v.numpy() for k, v in t.net.blocks[-1].state_dict().items()})
            self._stores[role] = store
        return self._stores[role]

    def worker(self, role: str):
        """The real CacheWorker (in this process: no Ray), on the profile's device."""
        if role not in self._workers:
            from teacher_cache.worker import CacheWorker, WorkerSetup
            store, d = self.store(role), self.data()
            setup = WorkerSetup(self.cfg.to_dict(), role, str(self.out), str(store.path), self.p.device, self.threads)
            self._workers[role] = CacheWorker(setup, d["images"], d["labels"], d["views"])
        return self._workers[role]

    def filled_store(self, role: str):
        """The store of `role` with every unit written (what the loader and train benches read)."""
        store = self.store(role)
        todo = store.pending_units()
        if todo:
            log(f"writing the {role} cache ({len(todo)} units)")
            w = self.worker(role)
            for u in todo:
                w.process(u)
            w.drain()
        return store

    def release(self, role: str) -> None:
        """Drop the teacher and worker of `role` (GPU memory) once their store is written."""
        worker = self._workers.pop(role, None)
        if worker is not None:
            worker.close()
        self._teachers.pop(role, None)
        import gc
        gc.collect()
        if self.p.device == "cuda":
            import torch
            torch.cuda.empty_cache()

    def packed(self) -> tuple[Path, dict, str]:
        """The FFCV file packed from the ViT store, its meta, and the field holding the cached tokens."""
        if self._packed is None:
            from student_train.pack import pack
            store = self.filled_store("teacher_vit")
            layer = next(iter(store.layout.layers))
            beton, meta = pack({"teacher_vit": store.path}, self.dir / "train", workers=self.p.loader_workers,
                               log=log)
            field = next(f for f, info in meta["fields"].items() if info["array"] == f"features/{layer}")
            self._packed = (beton, meta, field)
        return self._packed
