"""`hakd cache --dry-run`: what the cache will cost on disk, before any work.

Exact uncompressed bytes from the layer shapes, and a compressed estimate from compressing one
sample batch of each array with its configured codec (`cache.codec`, `cache.codec_overrides`, `cache.shuffle`).
Features are measured on the unfitted teacher, so the estimate is indicative: trained ViT tokens of real
images compressed 1.03-1.09x in our measurements (shared/NOTES.md), i.e. barely, and the demo WRN's
post-ReLU maps 1.38x with lz4 unshuffled (README, "What the cache stores").
"""
from __future__ import annotations

import numpy as np
import torch

from infra.config import Config
from teacher_cache.datasets import load_split
from teacher_cache.fit import build_teacher
from infra.codec_spec import parse_feature_codec
from teacher_cache.basis import encode, fit_basis, tokens
from teacher_cache.codecs import blosc, parse_overrides, quantize, resolve
from teacher_cache.job import ROLES, plan
from teacher_cache.views import apply_views, sample_views
from teacher_cache.writers import shm_free, slot_bytes

# used when the dataset files are not on this machine yet
KNOWN_TRAIN_SIZES = {"cifar10": 50_000, "stl10": 5_000, "fashionmnist": 60_000}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _ratio(a: np.ndarray, cname: str, shuffle: str, clevel: int) -> float:
    if cname == "none":
        return 1.0
    raw = np.ascontiguousarray(a)
    return raw.nbytes / max(1, len(blosc(cname, shuffle, clevel, raw.dtype.itemsize).encode(raw)))


def size_report(cfg: Config) -> str:
    try:
        train = load_split(cfg.data, "train")
        n, sample = len(train["labels"]), train["images"][:16]
        note = ""
    except FileNotFoundError:
        n = KNOWN_TRAIN_SIZES.get(cfg.data.name, cfg.data.train_size)
        sample = np.random.default_rng(0).integers(0, 256, (16, cfg.data.image_size, cfg.data.image_size, 3), dtype=np.uint8)
        note = f" (dataset files not found: N = {n}, the official training-set size; images measured on noise)"
    k = cfg.cache.views
    lines = [f"cache plan: {cfg.data.name}, N = {n:,} images x K = {k} views{note}", ""]
    grand_raw = grand_est = 0.0
    for role in ROLES:
        teacher = build_teacher(cfg, role).eval()
        layout = plan(cfg, role, n, teacher)
        views = torch.from_numpy(sample_views(len(sample), k, cfg.data.seed)[:, -1])
        x = apply_views(torch.from_numpy(sample), views, teacher.input_size)
        with torch.no_grad():
            out = teacher.extract(x, list(layout.layers))
        samples = {"images": sample, "logits": out["logits"].half().numpy()}
        codec = parse_feature_codec(cfg.cache.feature_codec)
        for l, shape in layout.layers.items():
            if codec.kind == "pca":  # a pca store's codes are bounded by its rank cap (planned_ranks): measured
                # with a basis fitted on this sample at that rank
                mean, comps, _ = fit_basis(tokens(out[l], len(shape)).numpy(), codec, cfg.data.seed, layout.ranks[l])
                q, scale = encode(out[l], torch.from_numpy(mean), torch.from_numpy(comps), len(shape), codec.bits)
                samples[f"features/{l}"], samples[f"scales/{l}"] = q.numpy(), scale.numpy()
            elif codec.kind == "int8":
                q, scale = quantize(out[l], len(shape))
                samples[f"features/{l}"], samples[f"scales/{l}"] = q.numpy(), scale.numpy()
            else:
                samples[f"features/{l}"] = out[l].half().numpy()
        overrides = parse_overrides(cfg.cache.codec_overrides)
        lines.append(f"{role}: {teacher.spec.name} at {teacher.input_size} px")
        lines.append(f"  {'array':<24} {'shape per image':<18} {'bytes/sample':>14} {'total raw':>12} {'est. stored':>12}")
        role_raw = role_est = 0.0
        for name, per_sample in layout.bytes_per_sample().items():
            shape = layout.arrays()[name][0][1:]
            cname, shuffle = resolve(name, len(shape) - 1, cfg.cache.codec, cfg.cache.shuffle, overrides)
            ratio = _ratio(samples[name], cname, shuffle, cfg.cache.clevel) if name in samples else 1.0
            raw = per_sample * n
            role_raw += raw
            role_est += raw / ratio
            lines.append(f"  {name:<24} {str(tuple(shape)):<18} {per_sample:>14,} {_human(raw):>12} {_human(raw / ratio):>12}")
        lines.append(f"  {'total':<24} {'':<18} {'':>14} {_human(role_raw):>12} {_human(role_est):>12}")
        unit = slot_bytes(layout.unit_spec())
        w = cfg.cache.writers
        lines.append(f"  writer buffers: {_human(unit)} of shared memory per unit, writers + 1 units per cache actor: "
                     + (f"{_human((w + 1) * unit)}" if w else f"cache.writers auto, within half of the "
                        f"{_human(shm_free())} free in /dev/shm here"))
        lines.append("")
        grand_raw += role_raw
        grand_est += role_est
    codecs = ", ".join([f"default {cfg.cache.codec}", *cfg.cache.codec_overrides])
    lines.append(f"all stores: {_human(grand_raw)} uncompressed, about {_human(grand_est)} stored "
                 f"(codecs: {codecs}; Blosc level {cfg.cache.clevel}, shuffle {cfg.cache.shuffle}); "
                 f"the FFCV file adds about the same again")
    return "\n".join(lines)
