"""Blocks of dense matrices picked by unit masks (VR-PGE, ``design/ALGORITHMS.md`` section 5):
gather the kept rows/columns into a compact matrix, scatter-add a compact gradient back, a lazy
momentum-SGD that updates only a block and catches the other entries up in closed form when they
are next touched, and a fast Bernoulli mask -> CSR build for the per-weight variant. Re-exported
by ``sparsebp.ops``.

Index lists (``rows``, ``cols``) are 1-D integer arrays, strictly increasing, inside the matrix;
``None`` means all. Matrices are float32 and C-ordered (a 1-D array counts as one column).
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import numpy as np

from . import _core, _cuda

__all__ = ["gather_block", "scatter_add_block", "bernoulli_csr", "LazySGD", "relu", "relu_backward"]

_F32 = np.dtype(np.float32)


def _matrix(a, name: str, writable: bool = False) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray; got {_cuda.kind_of(a)}")
    if a.dtype != _F32:
        raise TypeError(f"{name} must be float32; got {a.dtype}")
    if a.ndim not in (1, 2):
        raise ValueError(f"{name} must be 1-D or 2-D; got shape {a.shape}")
    if writable:
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (it is written in place)")
        if not a.flags.writeable:
            raise ValueError(f"{name} must be writeable")
        return a
    return np.ascontiguousarray(a)


def _index(idx, name: str, bound: int) -> Optional[np.ndarray]:
    if idx is None:
        return None
    idx = np.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers; got dtype {idx.dtype}")
    if idx.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {idx.shape}")
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    if idx.size:
        if idx[0] < 0 or idx[-1] >= bound:
            raise ValueError(f"{name} must lie in [0, {bound}); got values from {idx.min()} to {idx.max()}")
        if np.any(np.diff(idx) <= 0):
            raise ValueError(f"{name} must be strictly increasing (sorted, no duplicates)")
    return idx


def _shape2(a: np.ndarray) -> Tuple[int, int]:
    return (a.shape[0], a.shape[1] if a.ndim == 2 else 1)


def _block(a: np.ndarray, rows, cols, name: str):
    """Validated (rows, cols) of a block of ``a`` (a 1-D ``a`` takes rows only) and its shape."""
    r, c = _shape2(a)
    if a.ndim == 1 and cols is not None:
        raise ValueError(f"cols must be None for a 1-D {name}")
    rows, cols = _index(rows, "rows", r), _index(cols, "cols", c)
    return rows, cols, _block_shape(a, rows, cols)


def _block_shape(a: np.ndarray, rows, cols) -> tuple:
    r, c = _shape2(a)
    return (r if rows is None else len(rows),) + ((c if cols is None else len(cols),) if a.ndim == 2 else ())


def gather_block(src: np.ndarray, rows=None, cols=None, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``src[rows][:, cols]`` as a new C-ordered float32 array (or into ``out``), threaded.
    A 1-D ``src`` (a bias) takes ``rows`` only and gives a 1-D result."""
    src = _matrix(src, "src")
    rows, cols, shape = _block(src, rows, cols, "src")
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    else:
        out = _matrix(out, "out", writable=True)
        if out.shape != shape:
            raise ValueError(f"out must have shape {shape}; got {out.shape}")
    _core.gather_block(src, rows, cols, out)
    return out


def scatter_add_block(dst: np.ndarray, src: np.ndarray, rows=None, cols=None, alpha: float = 1.0) -> None:
    """In place: ``dst[rows][:, cols] += alpha * src`` (``dst`` C-ordered float32)."""
    dst = _matrix(dst, "dst", writable=True)
    src = _matrix(src, "src")
    rows, cols, shape = _block(dst, rows, cols, "dst")
    if src.shape != shape:
        raise ValueError(f"src must have shape {shape}; got {src.shape}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)):
        raise TypeError(f"alpha must be a number; got {type(alpha).__name__}")
    _core.scatter_add_block(dst, rows, cols, src, float(alpha))


def _eltwise_out(x: np.ndarray, out, name: str) -> np.ndarray:
    if out is None:
        return np.empty(x.shape, dtype=np.float32)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray; got {_cuda.kind_of(out)}")
    if out.shape != x.shape or out.dtype != _F32 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable C-contiguous float32 array of {name}'s shape {x.shape}")
    return out


def _float_array(a, name: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray; got {_cuda.kind_of(a)}")
    if a.dtype != _F32:
        raise TypeError(f"{name} must be float32; got {a.dtype}")
    return np.ascontiguousarray(a)


def relu(x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``max(x, 0)`` (NaN stays NaN), any shape, threaded; ``out`` may be ``x`` (in place).
    (NumPy's ``np.maximum(x, 0)`` takes ~5x longer on 128 x 500 here: a slow path for the scalar.)"""
    x = _float_array(x, "x")
    y = _eltwise_out(x, out, "x")
    _core.relu(x.reshape(-1), None, y.reshape(-1))
    return y


def relu_backward(grad: np.ndarray, y: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The ReLU's input gradient: ``grad`` where the forward's output ``y`` is > 0, else 0;
    ``out`` may be ``grad`` (in place)."""
    g = _float_array(grad, "grad")
    y = _float_array(y, "y")
    if y.shape != g.shape:
        raise ValueError(f"y must have grad's shape {g.shape}; got {y.shape}")
    o = _eltwise_out(g, out, "grad")
    _core.relu(g.reshape(-1), y.reshape(-1), o.reshape(-1))
    return o


def bernoulli_csr(s: np.ndarray, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """A Bernoulli(s) mask of a 2-D array of probabilities ``s`` as a CSR structure
    ``(indptr int64, indices int32)``, built in two threaded passes without a dense mask.
    Entry e = r * cols + j is kept when u(seed, e) < s[r, j], u a counter-based uniform (24 bits;
    see ``cpp/src/kernels/kernel_table.h``): the same mask for the same (seed, s) on every ISA
    and thread count. ``seed``: an int in [0, 2^64). An ``s`` outside [0, 1] (NaN included) is a
    ValueError naming the first such entry (checked in the same pass)."""
    s = _matrix(s, "s")
    if s.ndim != 2:
        raise ValueError(f"s must be 2-D; got shape {s.shape}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2 ** 64:
        raise ValueError(f"seed must be an int in [0, 2^64); got {seed!r}")
    return _core.bernoulli_csr(s, int(seed))


def check_sgd_args(momentum, weight_decay) -> None:
    """The hyper-parameter checks shared by ``LazySGD`` and ``sparsebp.nn.SGD``."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1); got {momentum!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0; got {weight_decay!r}")


def check_lr(lr) -> None:
    """The learning-rate check of the optimizers (``sparsebp.nn``, ``MaskAdam``, the torch VR-PGE
    trainer's default SGD): a positive finite number."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
        raise ValueError(f"lr must be a positive finite number; got {lr!r}")


def check_adam_args(betas, eps) -> None:
    """Adam's own hyper-parameter checks, shared by ``sparsebp.nn.Adam`` and VR-PGE's ``MaskAdam``."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair of numbers in [0, 1); got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must lie in [0, 1); got {b!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"eps must be a number >= 0; got {eps!r}")


def param_rows(p) -> Optional[np.ndarray]:
    """``Param.rows`` as int64, None for all rows. Not integers is a TypeError (a cast would take
    row 1 for 1.5); range, order and repeats are checked by the C++ steps."""
    if p.rows is None:
        return None
    rows = np.asarray(p.rows)
    if rows.dtype.kind not in "iu" and rows.size:  # (an empty list is float64 to NumPy)
        raise TypeError(f"{p.name}.rows must hold integers (row indices); got dtype {rows.dtype}")
    return rows.astype(np.int64, copy=False)


def row_gradient(p):
    """(rows, g) for one optimizer step on ``p``: rows None (all) or ``Param.rows`` as int64, and the
    C-contiguous float32 gradient of those rows (``p.grad`` may hold all rows or only those)."""
    rows = param_rows(p)
    g = p.grad if rows is None or p.grad.shape[0] != p.data.shape[0] else p.grad[rows]
    return rows, np.ascontiguousarray(g, dtype=np.float32)


class LazySGD:
    """SGD with momentum and weight decay (PyTorch's rule, ``dampening=0``:
    ``b = momentum * b + g + weight_decay * w``; ``w -= lr * b``) that can update a *block* of a
    parameter: the entries outside it take steps with g = 0, which are linear in (w, b), so they
    are not touched now but caught up exactly (in double, the matrix power of that linear step)
    when a later ``gather`` or ``step_block`` reaches them. The cost of a step is then the cost of
    the blocks, not of the whole parameter.

    Protocol per training step: ``gather`` the blocks the step reads (the caught-up values),
    ``step_block`` each block with its gradient (each entry at most once), then ``advance()``.
    ``step()`` is the plain form (every parameter with a ``grad``, all rows or ``Param.rows``) and
    advances by itself. The entries of ``Param.data`` outside recent blocks lag behind: call
    ``flush()`` before reading them directly (evaluation, saving). ``flush()`` also runs every
    ``max_lag`` steps (at most that many pending steps per entry) and before a change of ``lr``.
    ``whole_rows``: parameters whose blocks always span whole rows (``cols=None``): they keep one
    step counter per row instead of per entry (less memory traffic, vectorised catch-up). A
    ``gather`` with ``peek=True`` (which writes nothing) may still select columns.
    Arithmetic in float32, as PyTorch's step; the catch-up coefficients are computed in double.
    """

    def __init__(self, params: Iterable, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0,
                 max_lag: int = 256, whole_rows: Iterable = ()):
        self.params = list(params)
        if not self.params:
            raise ValueError("the optimizer got no parameters")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
            raise ValueError(f"lr must be a number >= 0.0; got {lr!r}")
        check_sgd_args(momentum, weight_decay)
        if isinstance(max_lag, bool) or not isinstance(max_lag, int) or max_lag < 1:
            raise ValueError(f"max_lag must be a positive int; got {max_lag!r}")
        self.lr, self.momentum, self.weight_decay, self.max_lag = float(lr), float(momentum), float(weight_decay), max_lag
        self.now = 0
        self._flushed = 0
        self.state = {}
        rowwise = {id(p) for p in whole_rows}
        for p in self.params:
            if p.data.dtype != _F32 or not p.data.flags.c_contiguous:
                raise ValueError(f"{p!r}: LazySGD needs C-contiguous float32 parameters")
            stamp = np.zeros(p.data.shape[:1] if id(p) in rowwise else p.data.shape, dtype=np.int32)
            self.state[id(p)] = dict(buf=np.zeros_like(p.data), stamp=stamp, rowwise=id(p) in rowwise)
        self._powers = self._make_powers()

    def _make_powers(self) -> np.ndarray:
        lr, mu, wd = self.lr, self.momentum, self.weight_decay
        a = np.array([[1.0 - lr * wd, -lr * mu], [wd, mu]])
        out = np.empty((self.max_lag + 1, 2, 2))
        out[0] = np.eye(2)
        for d in range(1, self.max_lag + 1):
            out[d] = a @ out[d - 1]
        return out.astype(np.float32)

    def _st(self, p):
        st = self.state.get(id(p))
        if st is None:
            raise ValueError(f"{p!r} is not a parameter of this optimizer")
        if st["buf"].shape != p.data.shape:
            raise ValueError(f"{p!r} changed shape since the optimizer was made")
        return st

    def set_lr(self, lr: float) -> None:
        """Change the learning rate (pending catch-ups are applied at the old one first)."""
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
            raise ValueError(f"lr must be a number >= 0; got {lr!r}")
        self.flush()
        self.lr = float(lr)
        self._powers = self._make_powers()

    def _run(self, p, rows, cols, g, out, peek: bool = False, g_cols=None) -> None:
        # g_cols (int64, strictly increasing; with g and cols=None): whole rows step, g holds only the
        # columns g_cols (zero elsewhere)
        st = self._st(p)
        if st["rowwise"] and cols is not None and p.data.ndim == 2 and not peek:
            raise ValueError(f"{p!r} was declared whole_rows: its blocks must span all columns (cols=None), "
                             "except in a gather with peek=True")
        _core.lazy_sgd(p.data, st["buf"], st["stamp"], rows, cols, self._powers, self.now, g, out, self.lr,
                       self.momentum, self.weight_decay, peek, g_cols)

    def gather(self, p, rows=None, cols=None, peek: bool = False) -> np.ndarray:
        """A compact copy of the block's values, caught up to now. The entries are caught up in
        place too, unless ``peek`` (then nothing is written: cheaper when the same block is stepped
        in this training step anyway, which catches it up itself)."""
        rows, cols, _ = _block(p.data, rows, cols, "parameter")
        return self._gather(p, rows, cols, peek=peek)

    def _gather(self, p, rows: Optional[np.ndarray], cols: Optional[np.ndarray], out=None,
                peek: bool = False) -> np.ndarray:
        # rows / cols: None or int64 arrays (the C++ side still checks order and bounds)
        if out is None:
            out = np.empty(_block_shape(p.data, rows, cols), dtype=np.float32)
        self._run(p, rows, cols, None, out, peek)
        return out

    def step_block(self, p, g: np.ndarray, rows=None, cols=None, g_cols=None) -> None:
        """One step on the block rows x cols of p with gradient g (its shape).

        ``g_cols`` (a 2-D p, ``cols=None``): the block spans whole rows but the gradient is nonzero
        only at the columns ``g_cols``; g then holds those columns only (shape ``(rows, len(g_cols))``)
        and the other entries of the rows step with a zero gradient, as if g were scattered into a
        zero block (without the scatter)."""
        rows, cols, shape = _block(p.data, rows, cols, "parameter")
        if g_cols is not None:
            if cols is not None or p.data.ndim != 2:
                raise ValueError("g_cols needs a 2-D parameter and cols=None (the block spans whole rows)")
            g_cols = _index(g_cols, "g_cols", p.data.shape[1])
            shape = (shape[0], len(g_cols))
        g = _matrix(g, "g")
        if g.shape != shape:
            raise ValueError(f"g must have {'the block' if g_cols is None else 'its g_cols'} shape {shape}; "
                             f"got {g.shape}")
        self._run(p, rows, cols, g, None, g_cols=g_cols)

    def advance(self) -> None:
        """End a training step."""
        self.now += 1
        if self.now - self._flushed >= self.max_lag:
            self.flush()

    def flush(self) -> None:
        """Catch every entry up to now."""
        for p in self.params:
            self._run(p, None, None, None, None)
        self._flushed = self.now

    def step(self) -> None:
        """A whole step: every parameter with a gradient (all of it, or its ``Param.rows``)."""
        for p in self.params:
            if p.grad is None:
                continue
            rows, g = row_gradient(p)
            self.step_block(p, g, rows)
        self.advance()

    def select(self, p, keep: np.ndarray, axis: int) -> None:
        """Follow a parameter that lost rows (axis 0) or columns (axis 1): call before the parameter
        shrinks (its pending catch-ups are applied first)."""
        st = self._st(p)
        self._run(p, None, None, None, None)
        for k in ("buf", "stamp"):
            if st[k].ndim > axis:
                st[k] = np.ascontiguousarray(np.compress(keep, st[k], axis=axis))
