"""`hakd cache --dry-run`: what a run will cost on disk, before any work: the stores, the packed file, the teachers.

Exact uncompressed bytes from the layer shapes, and a compressed estimate from compressing one
sample batch of each array with its configured codec (`cache.codec`, `cache.codec_overrides`, `cache.shuffle`).
Features are measured on the unfitted teacher, so the estimate is indicative: trained ViT tokens of real
images compressed 1.03-1.09x in our measurements, i.e. barely, and the demo WRN's post-ReLU maps 1.38x
with lz4 unshuffled (docs/cache-format.md). The packed file holds its rows uncompressed, so it is exact.
"""
from __future__ import annotations

import numpy as np
import torch

from infra.config import Config
from teacher_cache.datasets import load_split
from infra.codec_spec import parse_feature_codec
from teacher_cache.fit import build_teacher
from teacher_cache.basis import fit_basis, tokens
from teacher_cache.codecs import blosc, parse_overrides, resolve
from teacher_cache.feature_codec import encode_features
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


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def disk_plan(cfg: Config) -> dict:
    """Every byte a run of `cfg` puts on disk before the students' checkpoints: per teacher its fitted weights
    and its store (each array raw and as stored), the packed FFCV file (one row per image and view: the image,
    its label, index and view, and every per-view array of both stores, uncompressed: FFCV reads rows as they
    lie) and the ViT's live block copied beside it. `total_bytes` is their sum."""
    try:
        train = load_split(cfg.data, "train")
        n, sample = len(train["labels"]), train["images"][:16]
        note = None
    except FileNotFoundError:
        n = KNOWN_TRAIN_SIZES.get(cfg.data.name, cfg.data.train_size)
        sample = np.random.default_rng(0).integers(0, 256, (16, cfg.data.image_size, cfg.data.image_size, 3), dtype=np.uint8)
        note = f"dataset files not found: N = {n}, the official training-set size; images measured on noise"
    k, s = cfg.cache.views, cfg.data.image_size
    plan_ = {"dataset": cfg.data.name, "images": n, "views": k, "note": note, "stores": {}, "teachers": {}}
    row_bytes = s * s * 3 + 5 * 4 + 2 * 8  # image, view box, label and index
    params_bytes = 0
    overrides = parse_overrides(cfg.cache.codec_overrides)
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
            basis = None
            if codec.kind == "pca":  # a pca store's codes are bounded by its rank cap (planned_ranks): measured
                # with a basis fitted on this sample at that rank; the basis (float32) is copied beside the packed file
                mean, comps, _ = fit_basis(tokens(out[l], len(shape)).numpy(), codec, cfg.data.seed, layout.ranks[l])
                basis = (torch.from_numpy(mean), torch.from_numpy(comps))
                params_bytes += mean.nbytes + comps.nbytes
            q, scale = encode_features(out[l], codec, len(shape), basis)
            samples[f"features/{l}"] = q.numpy()
            if scale is not None:
                samples[f"scales/{l}"] = scale.numpy()
        arrays = {}
        for name, per_sample in layout.bytes_per_sample().items():
            shape = layout.arrays()[name][0][1:]
            cname, shuffle = resolve(name, len(shape) - 1, cfg.cache.codec, cfg.cache.shuffle, overrides)
            ratio = _ratio(samples[name], cname, shuffle, cfg.cache.clevel) if name in samples else 1.0
            arrays[name] = {"shape_per_image": list(shape), "bytes_per_image": per_sample, "codec": f"{cname}:{shuffle}",
                            "raw_bytes": per_sample * n, "stored_bytes": round(per_sample * n / ratio)}
        row_bytes += sum(b // k for b in (layout.bytes_per_sample()[a] for a in layout.per_view_arrays()))
        if teacher.spec.kind == "vit":
            params_bytes += _param_bytes(teacher.net.blocks[-1])
        plan_["stores"][role] = {
            "teacher": teacher.spec.name, "input_size": teacher.input_size, "arrays": arrays,
            "raw_bytes": sum(a["raw_bytes"] for a in arrays.values()),
            "stored_bytes": sum(a["stored_bytes"] for a in arrays.values()),
            "unit_buffer_bytes": slot_bytes(layout.unit_spec())}
        plan_["teachers"][role] = _param_bytes(teacher)
    plan_["packed"] = {"rows": n * k, "row_bytes": row_bytes, "bytes": n * k * row_bytes + params_bytes}
    plan_["total_bytes"] = (sum(st["stored_bytes"] for st in plan_["stores"].values()) + plan_["packed"]["bytes"]
                            + sum(plan_["teachers"].values()))
    return plan_


def render(plan_: dict, cfg: Config) -> str:
    """`disk_plan` as the table `hakd cache --dry-run` prints."""
    note = f" ({plan_['note']})" if plan_["note"] else ""
    n = plan_["images"]
    lines = [f"cache plan: {plan_['dataset']}, N = {n:,} images x K = {plan_['views']} views{note}", ""]
    for role, st in plan_["stores"].items():
        lines.append(f"{role}: {st['teacher']} at {st['input_size']} px")
        lines.append(f"  {'array':<24} {'shape per image':<18} {'bytes/sample':>14} {'total raw':>12} {'est. stored':>12}")
        for name, a in st["arrays"].items():
            lines.append(f"  {name:<24} {str(tuple(a['shape_per_image'])):<18} {a['bytes_per_image']:>14,} "
                         f"{_human(a['raw_bytes']):>12} {_human(a['stored_bytes']):>12}")
        lines.append(f"  {'total':<24} {'':<18} {'':>14} {_human(st['raw_bytes']):>12} {_human(st['stored_bytes']):>12}")
        unit, w = st["unit_buffer_bytes"], cfg.cache.writers
        lines.append(f"  writer buffers: {_human(unit)} of shared memory per unit, writers + 1 units per cache actor: "
                     + (f"{_human((w + 1) * unit)}" if w else f"cache.writers auto, within half of the "
                        f"{_human(shm_free())} free in /dev/shm here"))
        lines.append("")
    stores = plan_["stores"].values()
    codecs = ", ".join([f"default {cfg.cache.codec}", *cfg.cache.codec_overrides])
    lines.append(f"all stores: {_human(sum(s['raw_bytes'] for s in stores))} uncompressed, about "
                 f"{_human(sum(s['stored_bytes'] for s in stores))} stored (codecs: {codecs}; Blosc level "
                 f"{cfg.cache.clevel}, shuffle {cfg.cache.shuffle})")
    p = plan_["packed"]
    lines.append(f"packed file (train/data.beton): {p['rows']:,} rows x {_human(p['row_bytes'])} = {_human(p['bytes'])}")
    lines.append(f"fitted teachers: {_human(sum(plan_['teachers'].values()))}")
    lines.append(f"total: about {_human(plan_['total_bytes'])} on disk (stores, packed file and teachers; "
                 f"`--json` prints this plan as one JSON object)")
    return "\n".join(lines)
