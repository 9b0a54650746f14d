"""Fitting a pca store's basis at cache time, before its first unit is coded (teacher_cache/basis.py).

The basis of each cached layer is fitted on the teacher's features for a seeded sample of the cache's
own (image, view) pairs; a second, disjoint sample is held out to measure the codec's fidelity
(student_train/fidelity.py). The basis is written into the store as the `basis` parameter group
(checksummed like the ViT's live block), its provenance into the store's `basis` attribute.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from infra.codec_spec import parse_feature_codec
from teacher_cache.basis import PARAMS, check_basis, fit_basis, tokens
from teacher_cache.codecs import token_axis
from teacher_cache.feature_codec import Basis, decode_features
from teacher_cache.layout import Layout
from teacher_cache.store import CacheStore, StoreError
from teacher_cache.views import apply_views

FIT_VIEWS = 512       # image-views the basis is fitted on (tens of thousands of tokens per layer)
HELDOUT_VIEWS = 64    # image-views the fidelity is measured on, none of them in the fit sample


def sample_pairs(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) (image, view) pairs, (M, 2) each, disjoint, drawn from the N x K cached views."""
    order = np.random.default_rng([seed, 0xF17]).permutation(n * k)
    fit = min(FIT_VIEWS, max(1, len(order) // 2))
    held = order[fit:fit + HELDOUT_VIEWS]
    return np.stack(np.divmod(order[:fit], k), 1), np.stack(np.divmod(held, k), 1)


@torch.no_grad()
def teacher_features(teacher, images: np.ndarray, views: np.ndarray, pairs: np.ndarray, layers: list[str],
                     device: str, batch: int = 64) -> dict[str, torch.Tensor]:
    """The teacher's outputs (float32, on the host) for (image, view) pairs, as the cache computes them; the
    teacher runs on `device` and is left where it was."""
    out: dict[str, list[torch.Tensor]] = {}
    was = next(teacher.parameters()).device
    teacher.to(device).eval()
    try:
        for i in range(0, len(pairs), batch):
            idx, view = pairs[i:i + batch, 0], pairs[i:i + batch, 1]
            x = apply_views(torch.from_numpy(images[idx]).to(device), torch.from_numpy(views[idx, view]).to(device),
                            teacher.input_size)
            with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
                feats = teacher.extract(x, layers)
            for name in [*layers, "logits"]:
                out.setdefault(name, []).append(feats[name].float().cpu())
    finally:
        teacher.to(was)
    return {name: torch.cat(parts) for name, parts in out.items()}


def fit_layout_basis(layout: Layout, teacher, images: np.ndarray, views: np.ndarray, seed: int, device: str,
                     ranks: dict[str, int] | None = None) -> tuple[Layout, dict[str, np.ndarray], dict]:
    """(layout with the fitted ranks, the basis group's arrays, provenance per layer) of a pca layout;
    `ranks` forces each layer's rank (an existing store's)."""
    codec = parse_feature_codec(layout.feature_codec)
    fit_pairs, _ = sample_pairs(min(layout.n, len(images)), layout.views, seed)  # a bench store repeats its images
    feats = teacher_features(teacher, images, views, fit_pairs, list(layout.layers), device)
    params, info, fitted = {}, {}, {}
    for name, shape in layout.layers.items():
        rows = tokens(feats[name], len(shape)).numpy()
        mean, comps, info[name] = fit_basis(rows, codec, seed, (ranks or {}).get(name))
        info[name]["sample_views"] = len(fit_pairs)
        params[f"{name}.mean"], params[f"{name}.components"] = mean, comps
        fitted[name] = info[name]["rank"]
    return dataclasses.replace(layout, ranks=fitted), params, info


def ensure_basis(store: CacheStore, teacher, images: np.ndarray, views: np.ndarray, seed: int, device: str,
                 fitted: tuple[dict[str, np.ndarray], dict] | None = None) -> None:
    """Write a pca store's basis group unless it is there whole: the one `fitted` with the store's layout, or
    refitted at the store's ranks. A basis missing or damaged once units were coded with it is refused:
    those codes mean nothing without it."""
    if parse_feature_codec(store.layout.feature_codec).kind != "pca" or not store.param_problems(PARAMS):
        return
    if store.done_units().any():
        raise StoreError(f"cache store {store.path} has units coded with a PCA basis that is missing or damaged "
                         f"({store.param_problems(PARAMS)[0]}); its codes cannot be decoded. Re-run `hakd cache "
                         f"--overwrite` to write the store again")
    if fitted is None:
        _, params, info = fit_layout_basis(store.layout, teacher, images, views, seed, device, store.layout.ranks)
    else:
        params, info = fitted
    store.write_params(PARAMS, params)
    store.update_attrs(basis=info)


def store_basis(store: CacheStore, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, components) of `layer` from a pca store's basis group, checked against the layer's shape and rank."""
    shape = store.layout.layers[layer]
    try:
        return check_basis(store.read_params(PARAMS), layer, shape[len(shape) + token_axis(len(shape))],
                           store.layout.ranks[layer])
    except ValueError as e:
        raise StoreError(f"cache store {store.path}: {e}; re-run `hakd cache --overwrite`") from None


def layer_basis(store: CacheStore, layer: str, device: str | torch.device = "cpu") -> Basis | None:
    """`layer`'s (mean, components) as tensors on `device`, as `decode_features` and `encode_features` take them;
    None for a store whose feature codec is not pca."""
    if parse_feature_codec(store.layout.feature_codec).kind != "pca":
        return None
    return tuple(torch.from_numpy(a).to(device) for a in store_basis(store, layer))


def stored_features(store: CacheStore, layer: str, rows, view: int) -> torch.Tensor:
    """features/<layer> of samples `rows` (a slice or index array) at `view` as float16, decoded as the student
    step decodes them: whatever the store's codec, the features a student learns from."""
    lay = store.layout
    codec, shape = parse_feature_codec(lay.feature_codec), lay.layers[layer]
    x = torch.from_numpy(store.array(f"features/{layer}")[rows, view])
    scale = torch.from_numpy(store.array(f"scales/{layer}")[rows, view]) if codec.kind != "float16" else None
    return decode_features(x, scale, codec, len(shape), layer_basis(store, layer))
