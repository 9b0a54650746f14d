"""Properties of linear CKA and of the minibatch accumulator, on small random features."""
import pytest
import torch

from analysis.cka import MinibatchCKA, linear_cka


def _features(n=50, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _correlated(n, seed=0):
    """Two feature sets sharing a 5-dimensional signal plus independent noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, generator=g, dtype=torch.float64)
    x = z @ torch.randn(5, 12, generator=g, dtype=torch.float64) + torch.randn(n, 12, generator=g, dtype=torch.float64)
    y = z @ torch.randn(5, 8, generator=g, dtype=torch.float64) + torch.randn(n, 8, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("debiased", [False, True])
def test_self_similarity_is_one(debiased):
    x = _features()
    assert linear_cka(x, x, debiased) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_symmetric(debiased):
    x, y = _correlated(60)
    assert linear_cka(x, y, debiased) == pytest.approx(linear_cka(y, x, debiased), abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_invariances(debiased):
    x, y = _correlated(60)
    q, _ = torch.linalg.qr(_features(12, 12, seed=1))  # random orthogonal matrix
    base = linear_cka(x, y, debiased)
    assert linear_cka(x @ q, y, debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * x, y, debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x + 5.0, y - 2.0, debiased) == pytest.approx(base, abs=1e-10)


def test_not_invariant_to_general_linear_map():
    z, noise = _features(200, 4, seed=4), _features(200, 4, seed=5)
    x = torch.cat([z, noise], dim=1)  # half shared signal, half unrelated
    # Invertible but anisotropic: stretching the unrelated half makes it dominate x's similarity structure.
    a = torch.diag(torch.tensor([1.0] * 4 + [20.0] * 4, dtype=torch.float64))
    before, after = linear_cka(x, z), linear_cka(x @ a, z)
    assert before > 0.5
    assert after < 0.1


def test_gram_form_equals_feature_form():
    x, y = _correlated(40)
    h = torch.eye(40, dtype=torch.float64) - 1.0 / 40  # centring matrix
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    gram = float((k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum()))
    assert linear_cka(x, y) == pytest.approx(gram, abs=1e-10)
    # numpy input and trailing dimensions (flattened) give the same answer as the 2-D tensor
    assert linear_cka(x.numpy().reshape(40, 3, 4), y.numpy()) == pytest.approx(gram, abs=1e-10)


def _hsic_kornblith(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Biased HSIC with the centring matrix H = I - 11^T/n: tr(K H L H) (the 1/(n-1)^2 cancels in CKA)."""
    n = k.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    return torch.trace(k @ h @ l @ h)


def _hsic_song(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012, eq. 5; Nguyen et al. 2021), written out from the paper: with K~, L~ the
    Gram matrices with zeroed diagonals, [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))."""
    n = k.shape[0]
    kt, lt = k - torch.diag(torch.diag(k)), l - torch.diag(torch.diag(l))
    one = torch.ones(n, 1, dtype=torch.float64)
    return (torch.trace(kt @ lt) + (one.T @ kt @ one) * (one.T @ lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one.T @ kt @ lt @ one)).squeeze() / (n * (n - 3))


@pytest.mark.parametrize("seed, n, d1, d2", [(0, 30, 5, 7), (1, 12, 40, 3), (2, 50, 20, 20)])
def test_against_the_papers_formulas(seed, n, d1, d2):
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels K = XX^T, L = YY^T on random data: the
    biased estimate with Kornblith et al.'s centring matrices, the debiased one with Song et al.'s estimator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64) + 3.0  # uncentred: H must do the centring
    y = x[:, :min(d1, d2)].repeat(1, 1 + d2 // d1)[:, :d2] * 0.5 + torch.randn(n, d2, generator=g, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T
    for hsic, debiased in ((_hsic_kornblith, False), (_hsic_song, True)):
        direct = float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))
        assert linear_cka(x, y, debiased=debiased) == pytest.approx(direct, abs=1e-10)
        assert linear_cka(x.numpy(), y.numpy(), debiased=debiased) == pytest.approx(direct, abs=1e-10)
    acc = MinibatchCKA(1, 1)
    acc.update([x], [y])
    assert acc.result()[0, 0] == pytest.approx(float(_hsic_song(k, l) / torch.sqrt(_hsic_song(k, k) * _hsic_song(l, l))),
                                               abs=1e-10)


def test_debiased_removes_small_sample_bias():
    x, y = _features(30, 2000, seed=2), _features(30, 2000, seed=3)
    assert linear_cka(x, y) > 0.3
    assert abs(linear_cka(x, y, debiased=True)) < 0.1


def test_debiased_needs_more_than_three_samples():
    with pytest.raises(ValueError):
        linear_cka(_features(3), _features(3), debiased=True)


def test_minibatch_identical_layers_diagonal_is_one():
    x, y = _correlated(64)
    acc = MinibatchCKA(2, 3)
    for i in range(0, 64, 16):
        batch = [x[i:i + 16], y[i:i + 16]]
        acc.update(batch, batch + [x[i:i + 16].reshape(16, 3, 4).float()])
    result = acc.result()
    assert result.shape == (2, 3)
    assert result[0, 0] == pytest.approx(1.0, abs=1e-10)
    assert result[1, 1] == pytest.approx(1.0, abs=1e-10)
    assert result[0, 2] == pytest.approx(1.0, abs=1e-6)
    assert result[0, 1] == pytest.approx(result[1, 0], abs=1e-12)


def test_minibatch_approximates_full_debiased_cka():
    x, y = _correlated(1000)
    acc = MinibatchCKA(1, 1)
    for i in range(0, 1000, 50):
        acc.update([x[i:i + 50]], [y[i:i + 50].numpy()])
    full = linear_cka(x, y, debiased=True)
    assert 0.3 < full < 0.9  # really correlated, yet not identical
    assert acc.result()[0, 0] == pytest.approx(full, abs=0.03)


@pytest.mark.parametrize("seed", range(4))
def test_one_minibatch_is_the_full_debiased_cka(seed):
    """Property: over a single minibatch holding every sample, the accumulator is exactly the debiased CKA."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(8, 60, (1,), generator=g))
    x, y = _correlated(n, seed)
    x = x[:, :int(torch.randint(1, 12, (1,), generator=g))]
    acc = MinibatchCKA(2, 1)
    acc.update([x, 2 * y], [y])
    assert acc.result()[0, 0] == pytest.approx(linear_cka(x, y, debiased=True), abs=1e-10)
    assert acc.result()[1, 0] == pytest.approx(1.0, abs=1e-10)


def _demo_models():
    from analysis.models import build_model
    from infra.config import load_config
    cfg = load_config(None, ["data.image_size=32"])
    torch.manual_seed(0)
    student, teacher = build_model(cfg, "student_independent").eval(), build_model(cfg, "teacher_vit").eval()
    return student, teacher


def _state_bytes(acc: MinibatchCKA) -> int:
    """Bytes the accumulator keeps between updates: every array or tensor it holds."""
    return sum(v.nbytes if hasattr(v, "nbytes") else v.numel() * v.element_size()
               for v in vars(acc).values() if hasattr(v, "nbytes") or isinstance(v, torch.Tensor))


def test_streaming_cka_equals_all_features_at_once():
    """`streaming_cka` computes features one minibatch at a time; the result is the same as computing every
    layer's features for all images first (what the analysis did before) and accumulating their slices."""
    from analysis.evaluate import layer_features, streaming_cka
    student, teacher = _demo_models()
    x = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    streamed = streaming_cka(student, "student_independent", teacher, x, batch=8)
    rows, cols = layer_features(student, "student_independent", x), layer_features(teacher, "teacher_vit", x)
    at_once = MinibatchCKA(len(rows), len(cols))
    for i in range(0, 24, 8):
        at_once.update([r[i:i + 8] for r in rows], [c[i:i + 8] for c in cols])
    assert streamed.result().shape == (4, 4)  # 4 student stages x 4 demo ViT blocks
    assert abs(streamed.result() - at_once.result()).max() < 1e-6


def test_streaming_cka_memory_does_not_grow_with_images(monkeypatch):
    """Features are computed for one minibatch at a time, and the accumulator keeps (R, C) + R + C float64
    sums and no features, however many images it has seen."""
    import analysis.evaluate as evaluate
    student, teacher = _demo_models()
    x = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    seen = []
    original = evaluate.layer_features
    monkeypatch.setattr(evaluate, "layer_features", lambda m, name, xb: seen.append(len(xb)) or original(m, name, xb))
    small = evaluate.streaming_cka(student, "student_independent", teacher, x[:8], batch=8)
    large = evaluate.streaming_cka(student, "student_independent", teacher, x, batch=8)
    assert seen == [8] * 12  # (1 + 5 minibatches) x (student, teacher): never more than one minibatch
    r, c = large.n_rows, large.n_cols
    assert _state_bytes(small) == _state_bytes(large) == 8 * (r * c + r + c)
