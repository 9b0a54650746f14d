"""Linear centred kernel alignment (CKA) between two sets of representations of the same inputs.

`linear_cka` compares two full feature matrices (Kornblith et al. 2019), biased or debiased.
`MinibatchCKA` builds a layer-by-layer CKA matrix from minibatches (Nguyen et al. 2021): it sums
the unbiased HSIC estimator (Song et al. 2012) over minibatches, so it only ever holds m x m Gram
matrices, never an n x n one for the whole data set.

Everything is computed in float64, on the device of the first input (a GPU's features are
reduced on the GPU). Between updates the accumulator keeps only its (R, C) + R + C float64 sums, so
a caller that feeds it one minibatch of features at a time (analysis.evaluate.streaming_cka) needs
memory for one minibatch of every layer, whatever the number of images.
"""
from __future__ import annotations

import numpy as np
import torch

Features = torch.Tensor | np.ndarray


def _as_matrix(x: Features, device: torch.device | None = None) -> torch.Tensor:
    """(n, ...) features -> (n, d) float64 tensor with centred columns."""
    t = torch.as_tensor(x).detach()
    if device is not None:
        t = t.to(device)
    t = t.reshape(t.shape[0], -1).to(torch.float64)
    # HSIC and CKA are invariant to mean shifts; centring here keeps the Gram matrices small when
    # activations have large means (e.g. after a ReLU), which avoids float cancellation.
    return t - t.mean(dim=0, keepdim=True)


def _cross_sq(x: torch.Tensor, y: torch.Tensor) -> float:
    """||Y^T X||_F^2 = tr(X X^T Y Y^T), through whichever of the two forms is cheaper."""
    n, d1 = x.shape
    d2 = y.shape[1]
    if d1 * d2 <= n * n:
        return float((y.T @ x).square().sum())
    # Wide features (e.g. flattened conv maps): the (n, n) Gram form avoids a (d2, d1) matrix.
    return float(((x @ x.T) * (y @ y.T)).sum())


def _gram(x: torch.Tensor) -> torch.Tensor:
    """Linear Gram matrix X X^T with its diagonal zeroed, as the unbiased HSIC estimator needs."""
    return (x @ x.T).fill_diagonal_(0.0)


def _hsic_matrix(ks: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012) between each Gram matrix of ks (R, m, m) and of ls (C, m, m).

    HSIC_1(K, L) = [tr(KL) + 1'K1 1'L1 / ((m-1)(m-2)) - 2/(m-2) 1'KL1] / (m(m-3)), with zero diagonals.
    Returns an (R, C) tensor.
    """
    m = ks.shape[-1]
    trace = torch.einsum("rij,cij->rc", ks, ls)  # tr(K L), as L is symmetric
    k1, l1 = ks.sum(dim=-1), ls.sum(dim=-1)  # K 1 and L 1
    total = torch.outer(k1.sum(dim=-1), l1.sum(dim=-1)) / ((m - 1) * (m - 2))
    cross = 2.0 * (k1 @ l1.T) / (m - 2)  # 1'KL1 = (K1).(L1)
    return (trace + total - cross) / (m * (m - 3))


def linear_cka(x: Features, y: Features, debiased: bool = False) -> float:
    """Linear CKA between features x (n, d1) and y (n, d2) of the same n inputs, as a float.

    Trailing dimensions are flattened. Biased: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred
    columns, in [0, 1]; it is inflated when n is small relative to the dimensions. Debiased: the
    same ratio with the unbiased HSIC estimator on linear Gram matrices (needs n > 3); it is about 0
    for unrelated features and can be slightly negative.
    """
    xm = _as_matrix(x)
    ym = _as_matrix(y, device=xm.device)
    n = xm.shape[0]
    if ym.shape[0] != n:
        raise ValueError(f"x and y must have the same number of rows, got {n} and {ym.shape[0]}")
    if not debiased:
        return _cross_sq(xm, ym) / float(np.sqrt(_cross_sq(xm, xm) * _cross_sq(ym, ym)))
    if n <= 3:
        raise ValueError(f"debiased CKA needs more than 3 samples, got {n}")
    grams = torch.stack([_gram(xm), _gram(ym)])
    h = _hsic_matrix(grams, grams)
    return float(h[0, 1] / torch.sqrt(h[0, 0] * h[1, 1]))


class MinibatchCKA:
    """Accumulates a debiased CKA matrix between `n_rows` layers and `n_cols` layers over minibatches.

    Each `update` gets one minibatch of activations per layer, all for the same images in the same
    order. `result()` returns sum HSIC(X, Y) / sqrt(sum HSIC(X, X) * sum HSIC(Y, Y)) per pair, which
    converges to the debiased CKA of the full data set as the number of minibatches grows.
    """

    def __init__(self, n_rows: int, n_cols: int):
        self.n_rows = n_rows
        self.n_cols = n_cols
        self.cross = np.zeros((n_rows, n_cols), dtype=np.float64)
        self.self_rows = np.zeros(n_rows, dtype=np.float64)
        self.self_cols = np.zeros(n_cols, dtype=np.float64)

    def update(self, rows: list[Features], cols: list[Features]) -> None:
        """Add one minibatch: `rows[i]` and `cols[j]` are (m, ...) activations of the same m inputs."""
        if len(rows) != self.n_rows or len(cols) != self.n_cols:
            raise ValueError(f"expected {self.n_rows} row and {self.n_cols} column layers, "
                             f"got {len(rows)} and {len(cols)}")
        device = torch.as_tensor(rows[0]).device
        row_grams = torch.stack([_gram(_as_matrix(r, device)) for r in rows])
        col_grams = torch.stack([_gram(_as_matrix(c, device)) for c in cols])
        m = row_grams.shape[-1]
        if m <= 3 or col_grams.shape[-1] != m:
            raise ValueError(f"every layer needs the same minibatch size m > 3, got {m} and {col_grams.shape[-1]}")
        self.cross += _hsic_matrix(row_grams, col_grams).cpu().numpy()
        self.self_rows += np.array([float(_hsic_matrix(g[None], g[None])) for g in row_grams])
        self.self_cols += np.array([float(_hsic_matrix(g[None], g[None])) for g in col_grams])

    def result(self) -> np.ndarray:
        """The (n_rows, n_cols) CKA matrix from all minibatches seen so far."""
        return self.cross / np.sqrt(np.outer(self.self_rows, self.self_cols))
