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
