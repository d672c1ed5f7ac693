"""Sparse gradients (meProp): top-k selection and the backward products of a linear layer whose
output gradient is k-sparse. Re-exported by ``sparsebp.ops``; the math is in
``design/ALGORITHMS.md`` section 2.

Operands are float32 NumPy arrays of shape (batch, features), any order (C-ordered ones are used as
they are, others copied once). The tie rule of every selection: larger |g| first, then the lower
index; returned indices are sorted increasingly.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import numpy as np

from . import _core, _cuda

__all__ = ["topk", "topk_columns", "meprop_backward", "selected_backward", "csr_selected_backward", "MePropGrads"]

_F32 = np.dtype(np.float32)


def _check_k(k, name: str = "k") -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"{name} must be >= 0; got {k}")
    return int(k)


def _selection(selected, n: int) -> np.ndarray:
    """``selected`` as a C-contiguous int32 array. Any integer dtype is taken; one other than int32
    is range-checked against ``[0, n)`` before the cast (a cast alone would wrap 2**32 + 3 to 3);
    an int32 one is range-checked where it is used. Floats and bools are TypeErrors (a cast would
    truncate 1.7 to 1 without a word)."""
    sel = np.asarray(selected)
    if sel.dtype.kind not in "iu":
        raise TypeError(f"selected must be an integer array (column indices); got dtype {sel.dtype}")
    if sel.dtype != np.int32:
        if sel.size and (sel.min() < 0 or sel.max() >= n):
            raise ValueError(f"selected holds columns outside [0, {n})")
        sel = sel.astype(np.int32)
    return np.ascontiguousarray(sel)


def _host_only(fn: str, **arrays) -> None:
    """A clear error for a GPU array passed to a function that has no GPU kernels (the type checks
    after it would only say "must be a numpy.ndarray")."""
    if all(v is None or type(v) is np.ndarray for v in arrays.values()):  # the common call: no work
        return
    gpu = {k: d for k, d in ((k, _cuda.device_of(v)) for k, v in arrays.items()) if d and d.startswith("cuda")}
    if gpu:
        desc = ", ".join(f"{k} on {d}" for k, d in gpu.items())
        raise ValueError(f"{fn} runs on the CPU only (NumPy arrays); got GPU arrays ({desc}). meprop_backward "
                         "takes GPU arrays (it selects on the GPU too); or copy these to the host")


def _check_range(sel: np.ndarray, n: int) -> None:
    """Every entry of the int32 selection in [0, n)."""
    if not sel.size:
        return
    # A sorted set is bounded by its ends (sel.min() and sel.max() took ~4 us at k = 20).
    lo, hi = (sel[0], sel[-1]) if sel.ndim == 1 and _core.first_not_increasing(sel) < 0 else (sel.min(), sel.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"selected holds columns outside [0, {n})")


def _check_column_set(sel: np.ndarray) -> None:
    """A unified selection is a set of columns: a repeat is a ValueError (its products would count
    the column twice in dx but once in dW)."""
    if sel.size > 1 and _core.first_not_increasing(sel) >= 0:  # (sorted without repeats: the usual case)
        uniq, counts = np.unique(sel, return_counts=True)
        if uniq.size != sel.size:
            raise ValueError(f"selected repeats column {int(uniq[np.argmax(counts > 1)])}; in mode 'unified' it is "
                             "a set of columns (each at most once)")


def _rows_f32(a, name: str, cols: Optional[int] = None, rows: Optional[int] = None) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray; got {_cuda.kind_of(a)}")
    if a.dtype != _F32:
        raise TypeError(f"{name} must be float32; got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (batch, features); got shape {a.shape}")
    if cols is not None and a.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns; got shape {a.shape}")
    if rows is not None and a.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows; got shape {a.shape}")
    return np.ascontiguousarray(a)


def topk(g: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``g`` (batch, n): the ``min(k, n)`` columns of largest |g|, as an int32 array of
    shape (batch, min(k, n)), each row sorted increasingly. A NaN in ``g`` is a ValueError when
    0 < k < n; with k = 0 or k >= n the answer (no column, or every column) does not read ``g``.
    A GPU array runs on the CUDA kernels (same result)."""
    k = _check_k(k)
    dev = _cuda.route(g=g)
    if dev is not None:
        return _cuda.topk(g, k, dev)
    g = _rows_f32(g, "g")
    idx = np.empty((g.shape[0], min(k, g.shape[1])), dtype=np.int32)
    _core.topk_rows(g, k, idx)
    return idx


def topk_columns(g: np.ndarray, k: int) -> np.ndarray:
    """Unified selection: the ``min(k, n)`` columns j of ``g`` (batch, n) with the largest
    ``sum_b |g[b, j]|``, as a sorted int32 array (one set for the whole batch). A NaN in ``g``
    is a ValueError when 0 < k < n, as for ``topk``."""
    k = _check_k(k)
    dev = _cuda.route(g=g)
    if dev is not None:
        return _cuda.topk_columns(g, k, dev)
    g = _rows_f32(g, "g")
    scores = np.empty((1, g.shape[1]), dtype=np.float32)
    _core.abs_colsum(g, scores.reshape(-1))
    idx = np.empty((1, min(k, g.shape[1])), dtype=np.int32)
    _core.topk_rows(scores, k, idx)
    return idx[0]


class MePropGrads(NamedTuple):
    input: Optional[np.ndarray]   # (batch, in)
    weight: Optional[np.ndarray]  # (out, in), zero outside the rows any example selected; with
                                  # compact=True only those rows, (len(weight_rows), in)
    bias: Optional[np.ndarray]    # (out,), from the full output gradient
    selected: np.ndarray          # example mode: (batch, k) per-row columns; unified: (k,) columns
    weight_rows: Optional[np.ndarray] = None  # compact=True: the rows of W that ``weight`` holds


_BUFFER_CACHE_MIN = int(_core.buffer_cache_stats()["min_bytes"])  # outputs from this size use the cache


def _empty_rows(rows: int, cols: int, ld: Optional[int] = None) -> np.ndarray:
    """An uninitialised (rows, cols) float32 array with row stride ``ld`` floats (default cols).
    From 32 MB its memory comes from sparsebp's buffer cache (``sparsebp.buffer_cache_info``):
    reused from an earlier output that is gone, instead of pages the kernel must zero again."""
    ld = cols if ld is None else ld
    if rows * ld * 4 >= _BUFFER_CACHE_MIN:
        return _core.empty_f32(rows, cols, ld)
    if ld == cols:
        return np.empty((rows, cols), dtype=np.float32)
    return np.empty((rows, ld), dtype=np.float32)[:, :cols]


def _padded_rows(rows: int, cols: int) -> np.ndarray:
    """An uninitialised (rows, cols) float32 array whose row stride is cols + 16 floats when cols is a
    multiple of 128 (rows 512 bytes apart, or any power of two from there, share L1 cache sets: the
    scattered and gathered products slow down by a third). A view; np.ascontiguousarray copies."""
    if cols % 128 != 0 or rows <= 1:
        return _empty_rows(rows, cols)
    return _empty_rows(rows, cols, cols + 16)


def _example_dx_form() -> str:
    """How the per-example input gradient dx[b] = sum_j Ĝ[b, j] W[j] is formed; both give the same
    bits (the same sums in increasing j):

    - ``"scatter"``: W streamed once, each Ĝ[b, j] W[j] added into dx's rows, which stay in L2 in
      column panels (512 KB of them). Best with a large L2: ~20 ms at 4096^2, batch 256, k = 164 on
      a Xeon with 1 MB of L2 per core, where a gather without blocks measured 43-118 ms.
    - ``"gather"``: W's rows gathered by example, in tiles of 128 rows reused from cache
      (``spmm_rows`` blocks a large W; the tiles are 1024 columns wide with an 8 MB last-level
      cache share, 4096 with 32 MB): 29 ms against the scatter's 59 ms on a Zen 1 core with
      512 KB of L2, and 1.4x-2.4x faster than it at every benchmarked shape there; ~15.5 ms on
      a Zen 3 core.

    Chosen by the L2 per core the C library reports (scatter from 1 MB); ``SPARSEBP_MEPROP_DX``
    (``scatter`` | ``gather``) forces one. The gather has not been timed on a 1 MB-L2 machine."""
    forced = os.environ.get("SPARSEBP_MEPROP_DX", "")
    if forced:
        if forced not in ("scatter", "gather"):
            raise ValueError(f"SPARSEBP_MEPROP_DX must be 'scatter' or 'gather'; got {forced!r}")
        return forced
    return _dx_form_for_this_cpu()


@functools.lru_cache(maxsize=None)
def _dx_form_for_this_cpu() -> str:
    """The L2-based default of _example_dx_form, asked of the C library once (not every backward)."""
    return "scatter" if _core.l2_cache_bytes() >= (1 << 20) else "gather"


def meprop_backward(grad_output: np.ndarray, x: np.ndarray, weight: np.ndarray, k: int, mode: str = "example", *,
                    input_grad: bool = True, weight_grad: bool = True, bias_grad: bool = True,
                    compact: bool = False) -> MePropGrads:
    """Backward of ``y = x @ weight.T + b`` (weight dense, (out, in)) with the output gradient
    sparsified to ``k`` entries:

    - ``mode="example"`` (meProp as published): each row of ``grad_output`` keeps its own top-k;
      ``dx = Ĝ W`` and ``dW = Ĝᵀ x`` touch only the selected rows of W (cost ∝ batch · k · in).
      ``dx`` may come back as a view with padded rows (when ``in`` is a multiple of 128).
    - ``mode="unified"``: one set T of k columns for the batch (largest ``sum_b |G[b, j]|``);
      ``dx = G[:, T] W[T]``, ``dW[T] = G[:, T]ᵀ x`` as dense products on the compacted rows.

    ``k >= out`` is exactly dense backprop. The bias gradient uses the full ``grad_output``.
    ``compact=True``: the weight gradient holds only the rows the selection touched
    (``weight_rows``, sorted), not the zero rows of a full (out, in) array: what a row-wise
    optimizer update needs, and cheaper for large layers.
    """
    if mode not in ("example", "unified"):
        raise ValueError(f"mode must be 'example' or 'unified'; got {mode!r}")
    k = _check_k(k)
    dev = _cuda.route(grad_output=grad_output, x=x, weight=weight)
    if dev is not None:  # GPU arrays: CUDA kernels (compact= does not apply: full-size dW)
        if compact:
            raise ValueError("compact=True is not supported with GPU arrays")
        dx, dw, db, sel = _cuda.meprop_backward(grad_output, x, weight, k, mode, input_grad, weight_grad, bias_grad,
                                                dev)
        return MePropGrads(dx, dw, db, sel)
    g = _rows_f32(grad_output, "grad_output")
    sel = topk(g, k) if mode == "example" else topk_columns(g, k)
    return selected_backward(g, x, weight, sel, mode, input_grad=input_grad, weight_grad=weight_grad,
                             bias_grad=bias_grad, compact=compact)


def selected_backward(grad_output: np.ndarray, x: np.ndarray, weight: np.ndarray, selected: np.ndarray, mode: str, *,
                      input_grad: bool = True, weight_grad: bool = True, bias_grad: bool = True,
                      bias_from: Optional[np.ndarray] = None, compact: bool = False) -> MePropGrads:
    """``meprop_backward`` with the selection given: ``selected`` is (batch, k) per-row columns
    (``mode="example"``) or (k,) columns (``"unified"``), any integer dtype, sorted as ``topk``
    returns them; entries of ``grad_output`` outside it count as zero. Per example, a column
    repeated in one row counts as many times as it appears (Ĝ is the sum over the listed
    entries); in unified mode ``selected`` is a set, and a repeat is a ValueError. ``bias_from``:
    the (batch, out) gradient the bias gradient sums (default ``grad_output``). ``compact``: as
    for ``meprop_backward``. NumPy arrays only: there are no GPU kernels for a given selection
    (``meprop_backward`` takes GPU arrays, and selects on the GPU)."""
    if mode not in ("example", "unified"):
        raise ValueError(f"mode must be 'example' or 'unified'; got {mode!r}")
    if not (type(grad_output) is type(x) is type(weight) is type(selected) is np.ndarray and bias_from is None):
        _host_only("selected_backward", grad_output=grad_output, x=x, weight=weight, selected=selected,
                   bias_from=bias_from)
    w = _rows_f32(weight, "weight")
    out_f, in_f = w.shape
    g = _rows_f32(grad_output, "grad_output", cols=out_f)
    bsz = g.shape[0]
    xx = _rows_f32(x, "x", cols=in_f, rows=bsz) if weight_grad else None
    sel = _selection(selected, out_f)
    if mode == "example" and (sel.ndim != 2 or sel.shape[0] != bsz):
        raise ValueError(f"selected must have shape ({bsz}, k) in mode 'example'; got {sel.shape}")
    if mode == "unified" and sel.ndim != 1:
        raise ValueError(f"selected must be 1-D in mode 'unified'; got shape {sel.shape}")
    # Every column selected (each once): exactly dense backprop. Per example, a row of out_f entries
    # that is not 0..out_f-1 in order (repeats count with their multiplicity) takes the general path.
    every = sel.shape[-1] == out_f and (mode == "unified" or np.array_equal(sel, np.broadcast_to(
        np.arange(out_f, dtype=np.int32), sel.shape)))
    by_example = mode == "example" and not every
    if not by_example:  # (selection_by_column checks the per-example ones)
        _check_range(sel, out_f)
    if mode == "unified":
        _check_column_set(sel)
    src = g if not bias_grad or bias_from is None else _rows_f32(bias_from, "bias_from", cols=out_f, rows=bsz)
    db = src.sum(axis=0) if bias_grad else None
    dx = dw = wrows = None
    if every:  # every column selected: exactly dense backprop, the same products
        if input_grad:
            dx = g @ w
        if weight_grad:
            dw = g.T @ xx
            wrows = np.arange(out_f, dtype=np.int32) if compact else None
    elif mode == "example":
        # Ĝ by output unit j (CSR of Ĝᵀ: the examples that selected j, in order; it also checks
        # the selection): dW[j] = sum_b Ĝ[b, j] x[b], rows of x gathered. dx: see _example_dx_form.
        indptr, rows_b, gvals, touched, cindptr, vals = _core.selection_by_column(sel, g)
        if input_grad:
            dx = _padded_rows(bsz, in_f)
            if _example_dx_form() == "scatter":
                _core.spmm_scatter(indptr, rows_b, gvals, w, dx)
            else:
                by_row = np.arange(bsz + 1, dtype=np.int64) * sel.shape[1]  # Ĝ's rows: k entries each
                _core.spmm_rows(by_row, sel.reshape(-1), vals, w, dx)  # vals: Ĝ's values row by row
        if weight_grad:
            if in_f % 128 == 0 and bsz > 1:  # gathered rows of x 2^n bytes apart: copy to a padded stride
                xp = _padded_rows(bsz, in_f)
                xp[...] = xx
                xx = xp
            if compact:  # only the rows some example selected
                wrows = touched
                dw = _empty_rows(len(wrows), in_f)
                _core.spmm_rows(cindptr, rows_b, gvals, xx, dw)  # cindptr: the touched rows' pointers
            else:
                dw = _empty_rows(out_f, in_f)
                _core.spmm_rows(indptr, rows_b, gvals, xx, dw)
    else:
        gc = g[:, sel]
        if input_grad:
            dx = gc @ w[sel]
        if weight_grad:
            if compact:
                dw, wrows = gc.T @ xx, sel
            else:
                dw = np.zeros((out_f, in_f), dtype=np.float32)
                dw[sel] = gc.T @ xx
    return MePropGrads(dx, dw, db, sel, wrows)


def csr_selected_backward(grad_output: np.ndarray, x: np.ndarray, weight, selected: np.ndarray, mode: str, *,
                          input_grad: bool = True):
    """Sparse weights and sparse gradients together: the backward of ``y = x @ W.T`` for a CSR
    ``weight`` with the output gradient restricted to ``selected`` (as in ``selected_backward``).
    Unified: sparsebp's CSR kernels on the k selected rows of W. Per example: each example's k
    rows of W scattered into its row of dx, and each selected row's weight gradient summed over
    the examples that chose it (cost ~ batch * k * nonzeros per row; a column repeated in one
    example's selection counts twice, as in ``selected_backward``). Returns ``(dx or None,
    dvalues, positions)``: ``dvalues`` (nnz,) is zero outside the touched rows, whose entries are
    ``positions``. ``x`` is (batch, in) for both modes. NumPy arrays only (no GPU kernels)."""
    from . import ops

    if mode not in ("example", "unified"):
        raise ValueError(f"mode must be 'example' or 'unified'; got {mode!r}")
    if not type(grad_output) is type(x) is type(selected) is np.ndarray:
        _host_only("csr_selected_backward", grad_output=grad_output, x=x, selected=selected)
    ops._check_weight(weight)
    g = _rows_f32(grad_output, "grad_output", cols=weight.shape[0])
    sel = _selection(selected, weight.shape[0])
    if mode == "example":
        # One pass over the selected rows of W per example (cost ~ batch * k * nonzeros per row):
        # dx scattered example by example, dvalues unit by unit over the examples that chose it.
        if sel.ndim != 2 or sel.shape[0] != g.shape[0]:
            raise ValueError(f"selected must have shape ({g.shape[0]}, k) in mode 'example'; got {sel.shape}")
        out_f, in_f = weight.shape
        xx = _rows_f32(x, "x", cols=in_f, rows=g.shape[0])
        dx = np.empty((g.shape[0], in_f), dtype=np.float32) if input_grad else None
        dv = np.empty(weight.nnz, dtype=np.float32)
        # (The structure was validated when built: its indices are not checked again per call.)
        _, pos = _core.csr_example_backward(weight.structure, None, weight.values, in_f, sel, g, xx, dx, dv)
        return dx, dv, pos
    if sel.ndim != 1:
        raise ValueError(f"selected must be 1-D in mode 'unified'; got shape {sel.shape}")
    _check_range(sel, weight.shape[0])
    _check_column_set(sel)
    if _core.first_not_increasing(sel) >= 0:  # a set given out of order (topk_columns sorts its own)
        sel = np.sort(sel)
    out_f, in_f = weight.shape
    xx = ops._dense_in(x, "x", f"({g.shape[0]}, {in_f})", in_f, g.shape[0])
    dx = ops.empty((g.shape[0], in_f), order="C") if input_grad else None  # (C order, as x)
    dv = np.empty(weight.nnz, dtype=np.float32)
    # One C++ call: the selected rows' sub-matrix and G's columns gathered, linear_backward's
    # kernels on them, dv scattered (these steps from Python took ~70 us a call more).
    pos = _core.csr_rows_backward(weight.structure, weight.values, sel, g, xx, dx, dv)
    return dx, dv, pos
