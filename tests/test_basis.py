"""The fitted-basis codec (teacher_cache/basis.py): the rank it picks, its round trips, int4 packing; and every
feature codec through the one encoder and decoder (teacher_cache/feature_codec.py)."""
import numpy as np
import pytest
import torch

from infra.codec_spec import parse_feature_codec
from teacher_cache.basis import check_basis, code_shape, decode, encode, fit_basis, tokens
from teacher_cache.codecs import dequantize, quantize


def low_rank(rows: int, dim: int, rank: int, seed: int = 0, noise: float = 0.01) -> np.ndarray:
    """Rows of a `rank`-dimensional signal with decaying variances, an offset and a little isotropic noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T
    coeffs = rng.standard_normal((rows, rank)) * np.geomspace(3, 0.3, rank)
    return (coeffs @ basis + rng.standard_normal(dim) + noise * rng.standard_normal((rows, dim))).astype(np.float32)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99, 0.999])
@pytest.mark.parametrize("seed", [0, 1])
def test_rank_is_the_smallest_reaching_the_fraction(fraction, seed):
    x = low_rank(2000, 24, 12, seed)
    mean, comps, info = fit_basis(x, parse_feature_codec(f"pca:{fraction}:int8"), seed)
    r = info["rank"]
    assert comps.shape == (r, 24) and mean.shape == (24,)
    np.testing.assert_allclose(comps @ comps.T, np.eye(r), atol=1e-5)  # orthonormal rows, rotated or not
    eig = np.sort(np.linalg.eigvalsh(np.cov(x.T.astype(np.float64))))[::-1]
    kept = np.cumsum(eig) / eig.sum()
    assert kept[r - 1] >= fraction - 1e-9 and (r == 1 or kept[r - 2] < fraction)
    assert info["variance_kept"] == pytest.approx(kept[r - 1], rel=1e-6)
    # the variance the basis keeps on the data is what it reports
    centred = x - mean
    assert np.linalg.norm(centred @ comps.T) ** 2 / np.linalg.norm(centred) ** 2 == pytest.approx(kept[r - 1], rel=1e-3)


def test_rank_cap_and_forced_rank():
    x = low_rank(1000, 24, 12)
    assert fit_basis(x, parse_feature_codec("pca:0.999:int8:5"), 0)[2]["rank"] == 5
    assert fit_basis(x, parse_feature_codec("pca:0.5:int8"), 0, rank=9)[2]["rank"] == 9


@pytest.mark.parametrize("view_shape", [(9, 24), (24, 3, 3)])  # ViT tokens (T, D), CNN map (C, H, W)
@pytest.mark.parametrize("bits,bound", [(8, 0.01), (4, 0.2)])
def test_round_trip_error_is_bounded(view_shape, bits, bound):
    """Decoded features are within the truncation error plus the coefficients' quantisation error."""
    rows = low_rank(50 * 9, 24, 12)
    x = torch.from_numpy(rows.reshape(50, 9, 24))
    if len(view_shape) == 3:
        x = x.reshape(50, 3, 3, 24).permute(0, 3, 1, 2).contiguous()
    codec = parse_feature_codec(f"pca:0.9999:int{bits}")
    mean, comps, info = fit_basis(tokens(x, len(view_shape)).numpy(), codec, 0)
    codes, scale = encode(x, torch.from_numpy(mean), torch.from_numpy(comps), len(view_shape), bits)
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert tuple(codes.shape[1:]) == code_shape(view_shape, info["rank"], bits)
    assert scale.dtype == torch.float16 and tuple(scale.shape) == ((50, 9) if len(view_shape) == 2 else (50, 3, 3))
    y = decode(codes, scale, torch.from_numpy(mean), torch.from_numpy(comps), len(view_shape), bits)
    assert y.dtype == torch.float16 and y.shape == x.shape
    err = (y.float() - x).norm() / (tokens(x, len(view_shape)) - torch.from_numpy(mean)).norm()
    assert err < bound, err


def test_int4_packs_two_codes_per_byte_and_odd_ranks_round_trip():
    x = torch.from_numpy(low_rank(40 * 5, 16, 7).reshape(40, 5, 16))
    codec = parse_feature_codec("pca:1.0:int4:7")
    mean, comps, info = fit_basis(tokens(x, 2).numpy(), codec, 0)
    assert info["rank"] == 7
    m, c = torch.from_numpy(mean), torch.from_numpy(comps)
    codes, scale = encode(x, m, c, 2, 4)
    assert codes.shape == (40, 5, 4)
    coeffs = ((x - m) @ c.T)
    q = torch.round(coeffs / scale.float().unsqueeze(-1)).clamp(-7, 7)
    y = decode(codes, scale, m, c, 2, 4)
    np.testing.assert_allclose(y.float().numpy(), ((q * scale.float().unsqueeze(-1)) @ c + m).numpy(), atol=2e-2)


def test_full_rank_int8_matches_per_token_int8_error():
    """At full rank the codec is per-token int8 in a rotated frame: its error is of the same order."""
    x = torch.from_numpy(low_rank(64 * 9, 24, 24).reshape(64, 9, 24))
    mean, comps, _ = fit_basis(tokens(x, 2).numpy(), parse_feature_codec("pca:1.0:int8"), 0)
    m, c = torch.from_numpy(mean), torch.from_numpy(comps)
    ours = (decode(*encode(x, m, c, 2, 8), m, c, 2, 8).float() - x).norm() / x.norm()
    theirs = (dequantize(*quantize(x, 2), 2).float() - x).norm() / x.norm()
    assert ours < 3 * theirs + 1e-3 and ours < 0.01


def test_all_mean_token_codes_zero():
    x = torch.zeros(2, 3, 8)
    mean, comps = torch.zeros(8), torch.eye(8)[:4]
    codes, scale = encode(x, mean, comps, 2, 8)
    assert codes.abs().sum() == 0 and torch.isfinite(decode(codes, scale, mean, comps, 2, 8)).all()


def test_check_basis_refuses_a_damaged_or_mismatched_basis():
    good = {"l.mean": np.zeros(8, np.float32), "l.components": np.eye(8, dtype=np.float32)[:4]}
    check_basis(good, "l", 8, 4)
    with pytest.raises(ValueError, match="no basis for layer m"):
        check_basis(good, "m", 8, 4)
    with pytest.raises(ValueError, match=r"expected \(5, 8\)"):
        check_basis(good, "l", 8, 5)
    bad = {**good, "l.components": np.full((4, 8), np.nan, np.float32)}
    with pytest.raises(ValueError, match="finite"):
        check_basis(bad, "l", 8, 4)


@pytest.mark.parametrize("spec, bound", [("float16", 0.0), ("int8", 0.01), ("pca:1.0:int8", 0.01),
                                         ("pca:1.0:int4", 0.2)])
@pytest.mark.parametrize("view_shape", [(5, 16), (16, 3, 3)])  # a ViT's tokens, a CNN's map
def test_every_feature_codec_round_trips_through_one_encoder_and_decoder(spec, bound, view_shape):
    """encode_features / decode_features, what the worker stores and every reader decodes: contiguous stored values,
    a scale per token for the coded kinds only, float16 features back of the same shape, float16 unchanged."""
    from teacher_cache.feature_codec import decode_features, encode_features
    codec = parse_feature_codec(spec)
    x = torch.randn(4, *view_shape, generator=torch.Generator().manual_seed(0)).half()
    basis = None
    if codec.kind == "pca":
        mean, comps, _ = fit_basis(tokens(x.float(), len(view_shape)).numpy(), codec, seed=0)
        basis = (torch.from_numpy(mean), torch.from_numpy(comps))
    values, scale = encode_features(x, codec, len(view_shape), basis)
    assert values.is_contiguous() and (scale is None) == (codec.kind == "float16")
    if scale is not None:
        tokens_per_view = view_shape[0] if len(view_shape) == 2 else view_shape[1] * view_shape[2]
        assert scale.dtype == torch.float16 and scale.numel() == 4 * tokens_per_view and scale.is_contiguous()
    back = decode_features(values, scale, codec, len(view_shape), basis)
    assert back.dtype == torch.float16 and back.shape == x.shape
    error = float((back.float() - x.float()).norm() / x.float().norm())
    assert error <= bound, (spec, error)
