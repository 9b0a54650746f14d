"""What a feature codec changes in what the students learn: its error measured on the KD targets and loss terms.

After `hakd cache`, for each teacher the features of a held-out sample of the cache's own (image, view)
pairs (teacher_cache/basis_fit.py: none of them in the basis's fit sample) are computed twice: exact
(float16, as the float16 codec stores them) and coded then decoded as the store's codec does. From both:

- the targets the students use, and their relative error ||decoded - exact|| / ||exact||: for the ViT the
  last block's attention relation softmax(Q K^T / sqrt d), value relation V V^T / sqrt d and output h_T
  (trainer.LastBlockTargets on each residual stream); for the CNN the hint target, its feature map.
  Logits are stored float16 by every codec and are not measured.
- every KD loss term of the student that learns from that teacher (student_kd_vit: pca_attn, pca_value,
  gl; student_kd_cnn: hint), for a student and projectors initialised from cfg.seed: the relative error
  of the term's value and the cosine between its gradients with respect to the student's KD feature map.

A codec is judged by these, not by the features' own error: a loss term weighs directions of a feature
unevenly (an MSE target truncated to its top principal directions loses exactly the discarded variance,
which the MSE weighs least). The worst of (value error, 1 - gradient cosine) over the terms must stay
within cache.codec_max_error; above it `check_bound` refuses in one line and names a codec to use instead.
The figures go into the store's `fidelity` attribute, `hakd verify`'s output and metrics.json's meta.codec.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from infra.codec_spec import parse_feature_codec
from infra.config import Config
from infra.errors import UserError
from student_train.losses import KDObjective
from student_train.students import Student
from student_train.trainer import OBJECTIVE_KEYS, LastBlockTargets
from teacher_cache.basis_fit import layer_basis, sample_pairs, teacher_features
from teacher_cache.feature_codec import decode_features, encode_features
from teacher_cache.fit import load_fitted
from teacher_cache.paths import storage_root, store_path
from teacher_cache.store import CacheStore
from teacher_cache.views import apply_views

KD_KIND = {"teacher_vit": "student_kd_vit", "teacher_cnn": "student_kd_cnn"}


class CodecTooLossy(UserError):
    """The feature codec changes a KD loss term by more than cache.codec_max_error."""


def bytes_per_view(store: CacheStore) -> dict:
    """The bytes one view takes in the store (uncompressed, as the packed file holds them): features and their
    scales, logits, in all; and float16 features' bytes over the coded ones."""
    lay = store.layout
    per = {name: lay.bytes_per_sample()[name] // lay.views for name in lay.per_view_arrays()}
    coded = sum(b for name, b in per.items() if name.startswith(("features/", "scales/")))
    plain = sum(int(np.prod(shape)) * 2 for shape in lay.layers.values())
    return {"arrays": per, "total": sum(per.values()), "features": coded, "ratio_vs_float16": round(plain / coded, 2)}


def round_trip(store: CacheStore, layer: str, exact: torch.Tensor) -> torch.Tensor:
    """`exact` features (float16) as the store's codec gives them back after coding."""
    lay = store.layout
    codec, ndim = parse_feature_codec(lay.feature_codec), len(lay.layers[layer])
    basis = layer_basis(store, layer, exact.device)
    return decode_features(*encode_features(exact, codec, ndim, basis), codec, ndim, basis)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _relations(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    d = t["q"].shape[-1]
    return {"attention": torch.softmax(t["q"].float() @ t["k"].float().transpose(-1, -2) * d**-0.5, -1),
            "value_relation": t["v"].float() @ t["v"].float().transpose(-1, -2) * d**-0.5, "h": t["h"].float()}


def measure(cfg: Config, out: Path | str, role: str, device: str = "cpu") -> dict:
    """The fidelity record of `role`'s store (see the module docstring)."""
    store = CacheStore.open(store_path(out, cfg, role))
    lay = store.layout
    teacher = load_fitted(cfg, role, storage_root(out, cfg), device)
    _, held = sample_pairs(lay.n, lay.views, cfg.data.seed)
    idx = np.unique(held[:, 0])  # read the held-out images only
    images, views, labels = (store.array(a).get_orthogonal_selection((idx,)) for a in ("images", "views", "labels"))
    held = np.stack([np.searchsorted(idx, held[:, 0]), held[:, 1]], 1)
    feats = teacher_features(teacher, images, views, held, list(lay.layers), device)
    kind = KD_KIND[role]
    torch.manual_seed(cfg.seed)
    student = Student(cfg.train.arch, lay.num_classes, cfg.data.image_size).to(device)
    kw = dict(kind=kind, student_channels=student.channels(student.spec.kd_layer),
              label_smoothing=cfg.train.label_smoothing,
              **{arg: getattr(cfg.train, key) for key, arg in OBJECTIVE_KEYS[kind].items()})
    if role == "teacher_vit":
        layer = f"blocks.{len(teacher.net.blocks) - 2}"  # the residual stream entering the last block
        live = LastBlockTargets(teacher.spec.name, lay.num_classes, cfg.data.image_size,
                                store.read_params("live_block"), amp=False).to(device)
        kw.update(teacher_dim=lay.layers[layer][-1], num_heads=live.heads, grid=live.grid)
        targets = lambda f: live(f)  # noqa: E731
    else:
        layer = next(iter(lay.layers))
        kw.update(teacher_channels=lay.layers[layer][0])
        targets = lambda f: {"feature": f}  # noqa: E731
    objective = KDObjective(**kw).to(device)
    exact = feats[layer].half().to(device)
    decoded = round_trip(store, layer, exact)
    t_exact, t_dec = targets(exact), targets(decoded)
    record = {"codec": lay.feature_codec, "heldout_views": int(len(held)), "bytes_per_view": bytes_per_view(store),
              "feature_error": round(_rel(decoded, exact), 6), "targets": {}, "terms": {}}
    if role == "teacher_vit":
        for name, (a, b) in {n: (_relations(t_dec)[n], r) for n, r in _relations(t_exact).items()}.items():
            record["targets"][name] = round(_rel(a, b), 6)
    else:
        record["targets"]["hint_target"] = record["feature_error"]
    x = apply_views(torch.from_numpy(images[held[:, 0]]).to(device),
                    torch.from_numpy(views[held[:, 0], held[:, 1]]).to(device), student.input_size)
    labels = torch.from_numpy(labels[held[:, 0]]).to(device)
    student.train()
    logits, fmap = student.forward_with(x, (student.spec.kd_layer,))
    fmap = fmap[student.spec.kd_layer]
    terms, grads = {}, {}
    for which, t in (("exact", t_exact), ("decoded", t_dec)):
        torch.manual_seed(cfg.seed)  # the same PCA swap draws for both
        _, raw = objective(logits, labels, fmap, t)
        for name, c in objective.contributions(raw).items():
            if name == "ce":
                continue
            terms.setdefault(name, {})[which] = c.detach()
            grads.setdefault(name, {})[which] = torch.autograd.grad(c, fmap, retain_graph=True)[0].flatten().double()
    for name in terms:
        cos = torch.nn.functional.cosine_similarity(grads[name]["exact"], grads[name]["decoded"], dim=0)
        record["terms"][name] = {"value_error": round(_rel(terms[name]["decoded"], terms[name]["exact"]), 6),
                                 "grad_cosine": round(float(cos), 6)}
    record["worst"] = max(max(t["value_error"], 1 - t["grad_cosine"]) for t in record["terms"].values())
    store.update_attrs(fidelity=record)
    return record


def stronger(codec: str) -> str:
    """The next codec to try when `codec` is too lossy: int4 -> int8 coefficients, then 0.999 of the variance
    with no rank cap, then per-token int8, then float16."""
    c = parse_feature_codec(codec)
    if c.kind == "pca" and c.bits == 4:
        return f"pca:{c.fraction:g}:int8" + (f":{c.max_rank}" if c.max_rank else "")
    if c.kind == "pca" and (c.fraction < 0.999 or c.max_rank):
        return "pca:0.999:int8"
    return "int8" if c.kind == "pca" else "float16"


def check_bound(cfg: Config, records: dict[str, dict]) -> None:
    """Refuse (one line) a codec whose worst loss-term change exceeds cache.codec_max_error; the stores stay."""
    bound = cfg.cache.codec_max_error
    for role, r in records.items():
        if r["worst"] > bound:
            term, t = max(r["terms"].items(), key=lambda kv: max(kv[1]["value_error"], 1 - kv[1]["grad_cosine"]))
            raise CodecTooLossy(
                f"cache.feature_codec {r['codec']} changes {role}'s {term} loss term by {r['worst']:.1%} (value "
                f"error {t['value_error']:.1%}, gradient cosine {t['grad_cosine']:.4f}), above cache.codec_max_error "
                f"{bound:g}; use cache.feature_codec={stronger(r['codec'])} instead (or raise the bound). The stores "
                f"written are kept")


def measure_all(cfg: Config, out: Path | str, device: str = "cpu") -> dict[str, dict]:
    """Each teacher's fidelity record, measured once per store (kept in its `fidelity` attribute), then the bound."""
    records = {}
    for role in KD_KIND:
        store = CacheStore.open(store_path(out, cfg, role))
        old = store.attrs.get("fidelity")
        fresh = old is None or old.get("codec") != store.layout.feature_codec
        records[role] = measure(cfg, out, role, device) if fresh else old
    check_bound(cfg, records)
    return records


def summary_line(record: dict) -> str:
    """One line of a fidelity record: codec, bytes per view, the worst loss-term change."""
    b = record["bytes_per_view"]
    terms = ", ".join(f"{n} value {t['value_error']:.2%} grad cos {t['grad_cosine']:.4f}"
                      for n, t in record["terms"].items())
    return (f"codec {record['codec']}: {b['total']:,} bytes per view ({b['ratio_vs_float16']}x fewer feature bytes "
            f"than float16); feature error {record['feature_error']:.2%}; {terms}")


def codec_meta(cfg: Config, out: Path | str) -> dict[str, dict]:
    """metrics.json's meta.codec: each teacher's fidelity record (codec, bytes per view, errors), from its store."""
    found = {}
    for role in KD_KIND:
        try:
            record = CacheStore.open(store_path(out, cfg, role)).attrs.get("fidelity")
        except UserError:  # no store here (an analysis of copied models): nothing to report
            continue
        if record:
            found[role] = record
    return found
