"""Independent truth for the tests: everything recomputed densely in float64 NumPy from the raw CSR
arrays (indptr, indices, values), never through sparsebp's own code."""
from __future__ import annotations

import numpy as np

U32 = 2.0 ** -24  # unit roundoff of float32


def dense_from_csr(indptr, indices, values, shape) -> np.ndarray:
    d = np.zeros(shape, dtype=np.float64)
    np.add.at(d, (rows_of(indptr), np.asarray(indices, dtype=np.int64)), np.asarray(values, dtype=np.float64))
    return d


def rows_of(indptr) -> np.ndarray:
    return np.repeat(np.arange(len(indptr) - 1), np.diff(np.asarray(indptr)))


def linear_forward(x, indptr, indices, values, shape, bias=None):
    wd = dense_from_csr(indptr, indices, values, shape)
    y = x.astype(np.float64) @ wd.T
    if bias is not None:
        y = y + bias.astype(np.float64)
    # |x| @ |W|^T (+|b|): the scale the float32 rounding error is proportional to.
    scale = np.abs(x.astype(np.float64)) @ np.abs(wd).T
    if bias is not None:
        scale = scale + np.abs(bias.astype(np.float64))
    return y, scale


def linear_backward(g, x, indptr, indices, values, shape):
    """(grad_input, grad_values, grad_bias) and their error scales. grad_values is picked by the
    sparsity pattern (indptr/indices), never by values != 0."""
    wd = dense_from_csr(indptr, indices, values, shape)
    g64, x64 = g.astype(np.float64), x.astype(np.float64)
    r, c = rows_of(indptr), np.asarray(indices, dtype=np.int64)
    gi = g64 @ wd
    gi_scale = np.abs(g64) @ np.abs(wd)
    full = g64.T @ x64
    full_scale = np.abs(g64).T @ np.abs(x64)
    gb = g64.sum(axis=0)
    gb_scale = np.abs(g64).sum(axis=0)
    return (gi, gi_scale), (full[r, c], full_scale[r, c]), (gb, gb_scale)


def topk_masked(g, k: int, mode: str) -> np.ndarray:
    """meProp's Ĝ in float64: g kept at the top-k |entries| of each row (mode "example") or at the
    k columns of largest sum of |g| (mode "unified"), by numpy's stable sort; zeros elsewhere."""
    g = np.asarray(g, dtype=np.float64)
    m = np.zeros(g.shape, bool)
    if mode == "example":
        np.put_along_axis(m, np.argsort(-np.abs(g), axis=1, kind="stable")[:, :k], True, axis=1)
    else:
        m[:, np.argsort(-np.abs(g).sum(0), kind="stable")[:k]] = True
    return np.where(m, g, 0.0)


def assert_close(actual, expected, scale, k: int, what: str = "") -> None:
    """|actual - expected| <= 8 * u32 * sqrt(k) * scale elementwise (k: the reduction length), the
    size of float32 rounding over k terms, plus a floor for exact zeros."""
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == np.shape(expected), f"{what}: shape {actual.shape} != {np.shape(expected)}"
    tol = 8.0 * U32 * np.sqrt(max(k, 1)) * np.asarray(scale) + 1e-30
    err = np.abs(actual - expected)
    bad = err > tol
    if np.any(bad):
        i = np.unravel_index(np.argmax(err - tol), err.shape)
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} entries off; worst at {i}: got {actual[i]!r}, "
                             f"expected {expected[i]!r} (tolerance {tol[i]:.3g})")


def random_csr(rng, rows: int, cols: int, density: float, empty_rows=(), dtype=np.float32):
    """indptr (int64), indices (int32), values; a uniformly random pattern, some rows forced empty."""
    mask = rng.random((rows, cols)) < density
    for r in empty_rows:
        if r < rows:
            mask[r] = False
    r_idx, c_idx = np.nonzero(mask)
    indptr = np.zeros(rows + 1, np.int64)
    np.cumsum(mask.sum(axis=1), out=indptr[1:])
    values = rng.standard_normal(len(c_idx)).astype(dtype)
    return indptr, c_idx.astype(np.int32), values


def moved_indices(rng, indptr, cols: int, old_indices) -> np.ndarray:
    """New column indices (int32) for the same row counts: each row's entries drawn afresh, sorted;
    a pattern other than old_indices (to rewrite a layer's index buffer in place)."""
    counts = np.diff(np.asarray(indptr))
    while True:
        new = np.concatenate([np.sort(rng.choice(cols, c, replace=False)) for c in counts] +
                             [np.zeros(0, np.int64)]).astype(np.int32)
        if not np.array_equal(new, old_indices):
            return new


def mix64(z):
    """SplitMix64's output mixer on uint64 NumPy values (callers silence overflow warnings): the
    counter-based generator of the Bernoulli-mask and dropout kernels, re-implemented here."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
