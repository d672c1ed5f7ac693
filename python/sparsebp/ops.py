"""Sparse-weight linear layer kernels over NumPy arrays.

Layout. The kernels keep the batch innermost (feature-major). A float32 array of shape
(batch, features) in Fortran order *is* that layout, so Fortran-ordered inputs go straight to the
kernels, and outputs made for them are Fortran-ordered too (allocated by ``empty``: aligned, with a
padded column stride), so a network whose activations stay in Fortran order pays no transposes and
no copies. A Fortran array whose column stride is a multiple of 512 bytes (batch 128, 256, ...)
is copied into a padded one first (cheap, and faster than gathering from it). C-ordered arrays work
the same and give C-ordered outputs; they are transposed by a blocked SIMD kernel on the way in and
out. Arrays contiguous along neither axis are copied first.

All functions release the GIL, use ``sparsebp.get_num_threads()`` threads, and give bit-identical
results for any thread count.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from . import _core, _cuda
from .csr import CSR, _values_array
from .sparse_grad import MePropGrads, meprop_backward, selected_backward, topk, topk_columns  # noqa: F401
from .blocks import LazySGD, bernoulli_csr, gather_block, relu, relu_backward, scatter_add_block  # noqa: F401

__all__ = ["linear_forward", "linear_backward", "LinearGrads", "empty", "padded_ld",
           "topk", "topk_columns", "meprop_backward", "selected_backward", "MePropGrads",
           "gather_block", "scatter_add_block", "bernoulli_csr", "LazySGD", "relu", "relu_backward"]

_F32 = np.dtype(np.float32)


def padded_ld(batch: int) -> int:
    """The column stride (in elements) sparsebp gives Fortran-ordered (batch, features) arrays it
    allocates, and its own scratch copies: the batch rounded up to 16 (64-byte rows), plus 16 more
    when that is a multiple of 128 (rows 512 bytes apart map onto a fraction of the cache sets;
    measured up to 40% slower)."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)):
        raise TypeError(f"batch must be an int; got {type(batch).__name__}")
    if batch < 0:
        raise ValueError(f"batch must be >= 0; got {batch}")
    return _core.padded_ld(int(batch))


def empty(shape, order: str = "F") -> np.ndarray:
    """An uninitialised float32 (batch, features) array laid out the way the kernels read fastest.

    Data starts on a 64-byte boundary. With ``order="F"`` (the default: batch innermost) the column
    stride is ``padded_ld(batch)`` elements, so the array is a view into a slightly taller buffer:
    it behaves like any NumPy array, but ``flags.f_contiguous`` is False when padding was added.
    sparsebp returns Fortran-ordered results in this form, so that the next layer takes them as they
    are. ``order="C"`` gives a plain, aligned C-contiguous array.
    """
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    if len(dims) != 2 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"shape must be a pair of ints (batch, features); got {shape!r}")
    if dims[0] < 0 or dims[1] < 0:
        raise ValueError(f"shape must be non-negative; got {tuple(dims)}")
    shape = (int(dims[0]), int(dims[1]))
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F'; got {order!r}")
    if order == "F" and len(shape) == 2 and shape[0] > 16:
        ld = padded_ld(shape[0])
        return _aligned((ld, shape[1]), "F")[: shape[0]]
    return _aligned(shape, order)


def _aligned(shape, order) -> np.ndarray:
    n = math.prod(int(d) for d in shape)  # (np.prod took ~4.5 us of this function's ~9 a call)
    raw = np.empty(n * 4 + 64, dtype=np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off:off + n * 4].view(np.float32).reshape(shape, order=order)


def _bias_array(bias, rows: int) -> np.ndarray:
    """``bias`` checked as a float32 (rows,) array (C-contiguous; a TypeError or ValueError naming
    it otherwise)."""
    if not isinstance(bias, np.ndarray) or bias.dtype != _F32:
        raise TypeError(f"bias must be a float32 numpy.ndarray with shape ({rows},); got "
                        f"{getattr(bias, 'dtype', type(bias).__name__)}")
    if bias.shape != (rows,):
        raise ValueError(f"bias must have shape ({rows},); got {bias.shape}")
    return np.ascontiguousarray(bias)


def _check_weight(weight) -> CSR:
    if not isinstance(weight, CSR):
        raise TypeError(f"weight must be a sparsebp.CSR; got {type(weight).__name__}")
    return weight


def _dense_in(a, name: str, shape_desc: str, features: Optional[int], batch: Optional[int] = None) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of float32 with shape {shape_desc}; got {_cuda.kind_of(a)}")
    if a.dtype != _F32:
        raise TypeError(f"{name} must be float32 with shape {shape_desc}; got {a.dtype} {a.shape}"
                        " (convert with .astype(np.float32))")
    if a.ndim != 2 or (features is not None and a.shape[1] != features) or (batch is not None and a.shape[0] != batch):
        raise ValueError(f"{name} must have shape {shape_desc}; got {a.shape}")
    if not (a.flags.c_contiguous or a.flags.f_contiguous) or not a.flags.aligned:
        # Contiguous along one axis with a larger leading stride is fine for the kernels.
        s0, s1 = a.strides
        ok = a.flags.aligned and s0 >= 0 and s1 >= 0 and (
            (s0 == 4 and s1 >= 4 * a.shape[0]) or (s1 == 4 and s0 >= 4 * a.shape[1]))
        if not ok:
            a = np.ascontiguousarray(a)
    return a


def _feature_major(a: np.ndarray) -> bool:
    # A (batch, features) array with the batch innermost (Fortran-like), and not also C-contiguous.
    return a.strides[0] == 4 and not a.flags.c_contiguous


def _dense_out(out, name: str, shape: tuple, like: np.ndarray) -> np.ndarray:
    if out is None:
        return empty(shape, order="F" if _feature_major(like) else "C")
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray; got {_cuda.kind_of(out)}")
    if out.dtype != _F32:
        raise TypeError(f"{name} must be float32 with shape {shape}; got {out.dtype} {out.shape}")
    if out.shape != shape:
        raise ValueError(f"{name} must have shape {shape}; got {out.shape}")
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    s0, s1 = out.strides
    if not out.flags.aligned or not ((s0 == 4 and s1 >= 4 * shape[0]) or (s1 == 4 and s0 >= 4 * shape[1])
                                     or out.flags.c_contiguous or out.flags.f_contiguous):
        raise ValueError(f"{name} must be aligned and contiguous along one axis (C or Fortran order); "
                         f"got strides {out.strides}")
    return out


def _vec_out(out, name: str, n: int) -> np.ndarray:
    if out is None:
        return np.empty(n, dtype=np.float32)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray; got {_cuda.kind_of(out)}")
    if out.dtype != _F32:
        raise TypeError(f"{name} must be float32 with shape ({n},); got {out.dtype} {out.shape}")
    if out.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},); got {out.shape}")
    if not out.flags.writeable or not out.flags.c_contiguous or not out.flags.aligned:
        raise ValueError(f"{name} must be a writeable, contiguous, aligned array")
    return out


def linear_forward(x: np.ndarray, weight: CSR, bias: Optional[np.ndarray] = None, *,
                   values: Optional[np.ndarray] = None, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``y = x @ weight.T + bias`` for a sparse ``weight`` (out_features x in_features).

    Parameters
    ----------
    x : float32 (batch, in_features)
    weight : sparsebp.CSR
    bias : float32 (out_features,), optional
    values : float32 (nnz,), optional; used instead of ``weight.values`` (same structure)
    out : float32 (batch, out_features), optional; overwritten and returned. Must not overlap
        the inputs.

    Returns
    -------
    y : float32 (batch, out_features); Fortran-ordered if ``x`` is (see the module doc).

    Cost: 2 * nnz * batch flops.

    GPU arrays (CUDA torch tensors, CuPy, DLPack; see ``sparsebp._cuda``) run on the CUDA kernels:
    then ``values`` must be given on the input's device, and ``out`` is not supported.
    """
    dev = _cuda.route(x=x, values=values, bias=bias, out=out)
    if dev is not None:
        if out is not None:
            raise ValueError("out= is not supported with GPU arrays")
        return _cuda.linear_forward(x, _check_weight(weight), bias, values, dev)
    w = _check_weight(weight)
    rows, cols = w.shape
    v = w.values if values is None else _values_array(values, w.nnz)
    x = _dense_in(x, "x", f"(batch, {cols})", cols)
    if bias is not None:
        bias = _bias_array(bias, rows)
    y = _dense_out(out, "out", (x.shape[0], rows), x)
    # (the engine refuses outputs that share memory with an input, naming both, before writing)
    _core.linear_forward(w.structure, v, x, bias, y)
    return y


class LinearGrads(NamedTuple):
    """Gradients of a sparse linear layer. ``grad_values[p]`` is the gradient of stored entry p."""

    grad_input: Optional[np.ndarray]
    grad_values: Optional[np.ndarray]
    grad_bias: Optional[np.ndarray]


def linear_backward(grad_output: np.ndarray, x: np.ndarray, weight: CSR, *, input_grad: bool = True,
                    weight_grad: bool = True, bias_grad: bool = True, values: Optional[np.ndarray] = None,
                    grad_input: Optional[np.ndarray] = None, grad_values: Optional[np.ndarray] = None,
                    grad_bias: Optional[np.ndarray] = None) -> LinearGrads:
    """Gradients of ``y = x @ weight.T + b`` given ``grad_output = dL/dy``, in one fused sweep.

    - ``grad_input = grad_output @ weight_dense`` (batch, in_features); skipped when
      ``input_grad=False`` (e.g. the first layer), which saves half the work;
    - ``grad_values[p] = sum_b grad_output[b, row(p)] * x[b, col(p)]`` at the stored entries only
      (stored zeros included: the structure, not the values, decides); skipped when
      ``weight_grad=False`` (frozen weights);
    - ``grad_bias = grad_output.sum(0)``; skipped when ``bias_grad=False``.

    ``grad_input`` / ``grad_values`` / ``grad_bias`` may be given to be overwritten. Cost:
    2 * nnz * batch flops per product. Returns a ``LinearGrads`` tuple (skipped entries are None).
    GPU arrays run on the CUDA kernels (``values`` on the device, no output arguments).
    """
    dev = _cuda.route(grad_output=grad_output, x=x, values=values, grad_input=grad_input, grad_values=grad_values,
                      grad_bias=grad_bias)
    if dev is not None:
        if grad_input is not None or grad_values is not None or grad_bias is not None:
            raise ValueError("grad_input= / grad_values= / grad_bias= are not supported with GPU arrays")
        return LinearGrads(*_cuda.linear_backward(grad_output, x, _check_weight(weight), values, input_grad,
                                                  weight_grad, bias_grad, dev))
    w = _check_weight(weight)
    rows, cols = w.shape
    v = w.values if values is None else _values_array(values, w.nnz)
    x = _dense_in(x, "x", f"(batch, {cols})", cols)
    batch = x.shape[0]
    g = _dense_in(grad_output, "grad_output", f"({batch}, {rows})", rows, batch)
    gi = _dense_out(grad_input, "grad_input", (batch, cols), g) if input_grad else None
    gv = _vec_out(grad_values, "grad_values", w.nnz) if weight_grad else None
    gb = _vec_out(grad_bias, "grad_bias", rows) if bias_grad else None
    # (the engine refuses outputs that share memory with an input or each other, naming both,
    # before writing anything)
    _core.linear_backward(w.structure, v, g, x, gi, gv, gb)
    return LinearGrads(gi, gv, gb)
