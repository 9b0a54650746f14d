"""A pca-coded cache end to end: its basis, its codes through pack and loader, its fidelity and the refusals.

One tiny cache (64 images, 3 views) written with pca:0.99:int4 (the int4 path; int8 shares everything else)
is shared by the module; tests that damage something work on a copy.
"""
import dataclasses
import shutil

import numpy as np
import pytest
import torch

from student_cache import make_cfg, quiet, stores_of
from student_train.fidelity import CodecTooLossy, check_bound, measure, round_trip, stronger

pytestmark = pytest.mark.slow
CODEC = "pca:0.99:int4"


@pytest.fixture(scope="module")
def pca_cache(tmp_path_factory, ray_session):
    from student_train.pack import pack
    from teacher_cache.job import run_cache
    cfg = make_cfg(f"cache.feature_codec={CODEC}")
    out = tmp_path_factory.mktemp("pca") / "out"
    run_cache(cfg, out, log=quiet)
    beton, meta = pack(stores_of(cfg, out), out / "train", workers=1, log=quiet)
    return cfg, out, beton, meta


def test_store_holds_codes_a_basis_and_its_provenance(pca_cache):
    from teacher_cache.basis import PARAMS
    from teacher_cache.store import CacheStore
    cfg, out, _, _ = pca_cache
    for role, path in stores_of(cfg, out).items():
        store = CacheStore.open(path)
        assert store.verify() == []
        (layer, shape), = store.layout.layers.items()
        rank = store.layout.ranks[layer]
        info = store.attrs["basis"][layer]
        assert info["rank"] == rank and info["variance_kept"] >= 0.99 and info["seed"] == cfg.data.seed
        dim = shape[-1] if len(shape) == 2 else shape[0]
        assert 0 < rank < dim  # the demo teachers' features are low-rank
        codes = store.group[f"features/{layer}"]
        assert codes.dtype == np.uint8 and codes.shape[2:] == ((shape[0], -(-rank // 2)) if len(shape) == 2
                                                               else (-(-rank // 2), *shape[1:]))
        assert store.read_params(PARAMS)[f"{layer}.components"].shape == (rank, dim)


def test_packed_codes_decode_to_what_the_store_decodes(pca_cache):
    """The loader's decoded output is the store's codes decoded with the store's basis, bit for bit, and a
    packed row holds the codes (a quarter of float16's bytes or fewer at int4)."""
    from student_train.loader import StudentLoader
    from teacher_cache.basis import PARAMS, decode
    from teacher_cache.store import CacheStore
    cfg, out, beton, meta = pca_cache
    store = CacheStore.open(stores_of(cfg, out)["teacher_cnn"])
    (layer, shape), = store.layout.layers.items()
    field = next(f for f, i in meta["fields"].items() if i["array"] == f"features/{layer}")
    assert meta["fields"][field]["feature_shape"] == list(shape)
    assert np.prod(meta["fields"][field]["shape"]) * 4 <= np.prod(shape) * 2  # bytes: uint8 codes, float16 features
    loader = StudentLoader(beton, meta, [field], batch_size=16, workers=1, seed=0, timeout_s=60, drop_last=False,
                           shuffle=False)  # view 0 of every image, in order
    got = torch.cat([loader.teacher_output(b, field, "cpu") for b in loader])
    p = store.read_params(PARAMS)
    want = decode(torch.from_numpy(store.group[f"features/{layer}"][:, 0]),
                  torch.from_numpy(store.group[f"scales/{layer}"][:, 0]),
                  torch.from_numpy(p[f"{layer}.mean"]), torch.from_numpy(p[f"{layer}.components"]), 3, 4)
    assert got.dtype == torch.float16 and tuple(got.shape[1:]) == shape
    assert torch.equal(got, want)


def test_fidelity_is_recorded(pca_cache):
    cfg, out, _, _ = pca_cache
    from teacher_cache.store import CacheStore
    records = {role: measure(cfg, out, role) for role in ("teacher_vit", "teacher_cnn")}
    assert set(records["teacher_vit"]["terms"]) == {"pca_attn", "pca_value", "gl"}
    assert set(records["teacher_vit"]["targets"]) == {"attention", "value_relation", "h"}
    assert set(records["teacher_cnn"]["terms"]) == {"hint"}
    for role, r in records.items():
        assert CacheStore.open(stores_of(cfg, out)[role]).attrs["fidelity"] == r
        assert 0 < r["feature_error"] < 0.5 and r["bytes_per_view"]["ratio_vs_float16"] > 4
        for t in r["terms"].values():
            assert t["value_error"] >= 0 and -1 <= t["grad_cosine"] <= 1 + 1e-9
    # the float16 codec gives the features back as they are
    store = CacheStore.open(stores_of(cfg, out)["teacher_cnn"])
    x = torch.randn(2, *store.layout.layers["layer3"]).half()
    store.layout = dataclasses.replace(store.layout, feature_codec="float16", ranks={})
    assert torch.equal(round_trip(store, "layer3", x), x)


def test_float16_store_measures_exact(tiny_cache):
    cfg, out = tiny_cache
    r = measure(cfg, out, "teacher_cnn")
    assert r["codec"] == "float16" and r["feature_error"] == 0 and r["bytes_per_view"]["ratio_vs_float16"] == 1
    assert r["terms"]["hint"]["value_error"] == 0 and r["terms"]["hint"]["grad_cosine"] == pytest.approx(1, abs=1e-9)


def test_a_codec_above_the_bound_is_refused_naming_a_stronger_one():
    record = {"codec": CODEC, "worst": 0.2, "terms": {"hint": {"value_error": 0.01, "grad_cosine": 0.8}}}
    cfg = make_cfg("cache.codec_max_error=0.05")
    with pytest.raises(CodecTooLossy, match=r"pca:0.99:int4 changes teacher_cnn's hint loss term by 20.0%.*"
                                            r"use cache.feature_codec=pca:0.99:int8 instead"):
        check_bound(cfg, {"teacher_cnn": record})
    check_bound(make_cfg("cache.codec_max_error=0.25"), {"teacher_cnn": record})
    assert [stronger(c) for c in ("pca:0.9:int4:64", "pca:0.99:int8", "pca:0.999:int8", "int8")] == \
        ["pca:0.9:int8:64", "pca:0.999:int8", "int8", "float16"]


def test_training_refuses_a_cache_of_another_codec(pca_cache):
    from student_train.trainer import CacheMismatch, check_cache
    _, _, _, meta = pca_cache
    with pytest.raises(CacheMismatch, match="holds features coded pca:0.99:int4, cache.feature_codec is int8"):
        check_cache(make_cfg("cache.feature_codec=int8"), "student_kd_cnn", meta)


def test_damaged_basis_is_one_clear_error(pca_cache, tmp_path):
    from student_train.loader import StudentLoader
    from teacher_cache.basis_fit import ensure_basis
    from teacher_cache.store import CacheStore, StoreError
    cfg, out, beton, meta = pca_cache
    # beside the packed file: its CRC no longer matches
    copy = tmp_path / "train"
    shutil.copytree(beton.parent, copy)
    entry = meta["params"]["teacher_cnn/basis"]
    f = copy / entry["file"]
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    field = next(k for k, i in meta["fields"].items() if i["role"] == "teacher_cnn" and i.get("codec") == CODEC)
    with pytest.raises(StoreError, match="no whole copy of teacher_cnn's basis/"):
        StudentLoader(copy / beton.name, meta, [field], batch_size=16, workers=1, seed=0, timeout_s=60)
    # in the store: verify names it, and a re-run refuses to recode with another basis
    store_copy = tmp_path / "wrn.zarr"
    shutil.copytree(stores_of(cfg, out)["teacher_cnn"], store_copy)
    comps = next(p for p in store_copy.glob("basis/*components*/c/**/*") if p.is_file())
    comps.write_bytes(b"\0" * len(comps.read_bytes()))
    store = CacheStore.open(store_copy)
    assert any("basis/" in p for p in store.verify())
    with pytest.raises(StoreError, match="units coded with a PCA basis that is missing or damaged"):
        ensure_basis(store, None, None, None, 0, "cpu")


def test_hakd_cache_refuses_a_codec_above_the_bound_and_keeps_the_stores(pca_cache, capsys):
    """Through the CLI: exit 2, one line naming a stronger codec; the stores stay whole and complete."""
    from infra.cli import main
    from student_cache import OVERRIDES
    from teacher_cache.store import CacheStore
    cfg, out, _, _ = pca_cache
    code = main(["cache", "--out", str(out), *OVERRIDES, f"cache.feature_codec={CODEC}",
                 "cache.codec_max_error=0.0001"])
    err = capsys.readouterr().err
    assert code == 2
    assert "above cache.codec_max_error 0.0001; use cache.feature_codec=pca:0.99:int8 instead" in err
    for path in stores_of(cfg, out).values():
        store = CacheStore.open(path)
        assert store.verify() == [] and not store.pending_units()
