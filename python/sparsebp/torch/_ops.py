"""sparsebp's kernels as PyTorch custom operators (``torch.library``), with autograd.

Operators (namespace ``sparsebp``):

- ``sparsebp::linear(x, values, bias, indptr, indices, out_features) -> y``
- ``sparsebp::linear_backward(grad_y, x, values, indptr, indices, out_features,
  input_grad, weight_grad, bias_grad) -> (grad_x, grad_values, grad_bias)``

``x`` is 2-D (batch, in_features). float32 tensors run the C++ kernels (the ISA chosen at import,
``sparsebp.get_num_threads()`` threads, the GIL released). float64 tensors run a slow dense
reference path: it exists so that ``torch.autograd.gradcheck`` can check the autograd formulas in
double precision, not for training.

Layouts: an output follows the layout of the tensor it is computed from (``y`` follows ``x``,
``grad_x`` follows ``grad_y``): row-major in, row-major out; batch-innermost (``x.t()`` contiguous)
in, batch-innermost out, which the kernels take without any transpose.

The CSR structure arrives as two index tensors. Validating it and building its transpose for the
input gradient costs O(nnz), so validated structures are cached per index tensor; a cached
structure is reused only while the tensors still hold the same indices (compared on every call,
which is cheap next to the kernels).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import _core, _cuda

# ---------------------------------------------------------------------------------------------
# Validated structures, cached per index tensor
# ---------------------------------------------------------------------------------------------


class IndexKeyedCache:
    """Values derived from a pair of index tensors (indptr, indices) plus other hashable facts,
    cached per ``indices`` tensor object (dropped when it dies). A cached value is reused only while
    the tensors still hold the contents it was made from: they are compared on every lookup (O(nnz)
    reads, cheap next to any kernel), so in-place changes, such as DDP's buffer broadcasts or
    ``load_state_dict``, never reuse a stale value and never force a needless rebuild."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict = {}

    def get(self, indptr: Tensor, indices: Tensor, facts: tuple, make):
        # Dtypes and shapes in the key: contents alone would let a float or reshaped indptr that
        # compares equal to a validated one skip validation.
        key = (id(indices), indptr.dtype, tuple(indptr.shape), indices.dtype, tuple(indices.shape)) + facts
        hit = self._entries.get(key)  # (a dict read is atomic; the lock guards the writes)
        if hit is not None:
            ref, ip0, ix0, value = hit
            if ref() is indices and _holds(indptr, ip0) and _holds(indices, ix0):
                return value
        ip0 = np.ascontiguousarray(indptr.detach().numpy()).copy()
        ix0 = np.ascontiguousarray(indices.detach().numpy()).copy()
        value = make(ip0, ix0)

        def _drop(_, key=key, entries=self._entries, lock=self._lock):
            with lock:
                entries.pop(key, None)

        with self._lock:
            self._entries[key] = (weakref.ref(indices, _drop), (ip0, ip0.ctypes.data), (ix0, ix0.ctypes.data), value)
        return value


def _holds(t: Tensor, copy) -> bool:
    """Whether the CPU tensor t holds the same contents as (array, its address), a copy made earlier
    (one memcmp for a contiguous tensor)."""
    a, addr = copy
    if t.is_contiguous() and t.numel() == a.size and t.element_size() == a.itemsize:
        return _core.memeq(t.data_ptr(), addr, a.nbytes)
    return t.shape == a.shape and np.array_equal(a, t.detach().numpy())


_structures = IndexKeyedCache()


def _checked_structure(rows: int, cols: int, ip: np.ndarray, ix: np.ndarray):
    # Integer 1-D index arrays only: the binding would otherwise cast a float indptr, or flatten a
    # 2-D one, without a word.
    for a, name in ((ip, "indptr"), (ix, "indices")):
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an integer tensor; got {a.dtype}")
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D; got shape {a.shape}")
    return _core.csr_structure(rows, cols, ip, ix)


def structure_of(indptr: Tensor, indices: Tensor, rows: int, cols: int):
    """The validated ``_core.CsrStructure`` for these index tensors (cached)."""
    return _structures.get(indptr, indices, (rows, cols), lambda ip, ix: _checked_structure(rows, cols, ip, ix))


# ---------------------------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------------------------


def _feature_major(t: Tensor) -> bool:
    # (batch, features) with the batch innermost, and not also row-major (batch 1).
    return t.dim() == 2 and t.stride(0) == 1 and not t.is_contiguous()


def _kernel_ready(t: Tensor) -> Tensor:
    """A 2-D tensor the kernels take as it is: contiguous along one axis, else a row-major copy."""
    s0, s1 = t.stride()
    if (s1 == 1 and s0 >= t.shape[1]) or (s0 == 1 and s1 >= t.shape[0]):
        return t
    return t.contiguous()


def _new_like_layout(t: Tensor, rows: int, cols: int) -> Tensor:
    """An empty (rows, cols) tensor, batch-innermost if ``t`` is, else row-major. A tensor of its
    own, not a view (the operators return these, and in-place ops on an operator's view outputs
    are refused by autograd)."""
    if _feature_major(t):
        return t.new_empty_strided((rows, cols), (1, rows))
    return t.new_empty((rows, cols))


def _np(t: Optional[Tensor]):
    return None if t is None else t.detach().numpy()


def _rows_of(indptr: Tensor, rows: int) -> Tensor:
    """The row of every stored entry (int64, nnz), on indptr's device."""
    return torch.repeat_interleave(torch.arange(rows, dtype=torch.int64, device=indptr.device),
                                   (indptr[1:] - indptr[:-1]).to(torch.int64))


def _dense_weight(values: Tensor, indptr: Tensor, indices: Tensor, rows: int, cols: int) -> Tensor:
    w = values.new_zeros((rows, cols))
    w[_rows_of(indptr, rows), indices.to(torch.int64)] = values
    return w


def _linear_ref(x, values, bias, indptr, indices, out_features) -> Tensor:
    """float64 (gradcheck) path of the forward: dense products, any device, x's layout."""
    w = _dense_weight(values, indptr, indices, out_features, x.shape[1])
    y = _new_like_layout(x, x.shape[0], out_features)
    y.copy_(x @ w.t() if bias is None else torch.addmm(bias, x, w.t()))
    return y


def _linear_backward_ref(gy, x, values, indptr, indices, out_features, gi, gv, gb):
    """float64 path of the backward into the given outputs (an empty one is skipped)."""
    grads = linear_grads_dense(gy, x, values, indptr, indices, out_features, gi.numel() > 0, gv.numel() > 0,
                               gb.numel() > 0)
    for out, g in zip((gi, gv, gb), grads):
        if g is not None:
            out.copy_(g)
    return gi, gv, gb


# ---------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------


def _linear_impl(x: Tensor, values: Tensor, bias: Optional[Tensor], indptr: Tensor, indices: Tensor,
              out_features: int) -> Tensor:
    if x.dtype == torch.float64:
        return _linear_ref(x, values, bias, indptr, indices, out_features)
    return _cpu_forward(structure_of(indptr, indices, out_features, x.shape[1]), x, values, bias, out_features)


def _cpu_forward(s, x: Tensor, values: Tensor, bias: Optional[Tensor], out_features: int) -> Tensor:
    """The float32 CPU kernel of the forward on the validated structure s."""
    y = _new_like_layout(x, x.shape[0], out_features)
    _core.linear_forward(s, _np(values), _np(_kernel_ready(x)), _np(bias), _np(y))
    return y


linear_op = torch.library.custom_op("sparsebp::linear", mutates_args=())(_linear_impl)


@linear_op.register_fake
def _(x, values, bias, indptr, indices, out_features):
    return _new_like_layout(x, x.shape[0], out_features)


def _linear_backward_impl(grad_y: Tensor, x: Tensor, values: Tensor, indptr: Tensor, indices: Tensor,
                       out_features: int, input_grad: bool, weight_grad: bool,
                       bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    batch, cols = x.shape
    gy = _kernel_ready(grad_y)
    gi = _new_like_layout(gy, batch, cols) if input_grad else x.new_empty((0,))
    gv = values.new_empty(values.shape) if weight_grad else values.new_empty((0,))
    gb = values.new_empty((out_features,)) if bias_grad else values.new_empty((0,))
    if x.dtype == torch.float64:
        return _linear_backward_ref(gy, x, values, indptr, indices, out_features, gi, gv, gb)
    _cpu_backward(structure_of(indptr, indices, out_features, cols), gy, x, values, gi if input_grad else None,
                  gv if weight_grad else None, gb if bias_grad else None)
    return gi, gv, gb


def _cpu_backward(s, gy: Tensor, x: Tensor, values: Tensor, gi: Optional[Tensor], gv: Optional[Tensor],
                  gb: Optional[Tensor]) -> None:
    """The float32 CPU kernel of the backward on the validated structure s, into the given outputs
    (None: not wanted); gy as _kernel_ready returns it."""
    _core.linear_backward(s, _np(values), _np(gy), _np(_kernel_ready(x)), _np(gi), _np(gv), _np(gb))


linear_backward_op = torch.library.custom_op("sparsebp::linear_backward", mutates_args=())(_linear_backward_impl)


@linear_backward_op.register_fake
def _(grad_y, x, values, indptr, indices, out_features, input_grad, weight_grad, bias_grad):
    batch, cols = x.shape
    gi = _new_like_layout(grad_y, batch, cols) if input_grad else x.new_empty((0,))
    gv = values.new_empty(values.shape) if weight_grad else values.new_empty((0,))
    gb = values.new_empty((out_features,)) if bias_grad else values.new_empty((0,))
    return gi, gv, gb


def _linear_setup(ctx, inputs, output):
    x, values, bias, indptr, indices, out_features = inputs
    ctx.save_for_backward(x, values, indptr, indices)
    ctx.out_features = out_features
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad_y):
    x, values, indptr, indices = ctx.saved_tensors
    need_x, need_v, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
    if not (need_x or need_v or need_b):
        return None, None, None, None, None, None
    if torch.is_grad_enabled():  # a graph-building backward (see with_graphed_backward)
        return (*linear_grads_dense(grad_y, x, values, indptr, indices, ctx.out_features, need_x, need_v, need_b),
                None, None, None)
    gi, gv, gb = linear_backward_op(grad_y, x, values, indptr, indices, ctx.out_features, need_x, need_v, need_b)
    return (gi if need_x else None, gv if need_v else None, gb if need_b else None, None, None, None)


linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def with_graphed_backward(kernels, graphed):
    """An autograd Function's ``backward``: ``kernels`` (sparsebp's kernels, whose results carry no
    graph) normally; ``graphed`` when the backward is itself being differentiated (it runs with
    grad mode on: ``create_graph=True``, as gradient penalties, double backward and
    Hessian-vector products ask), which gives the same gradients by torch's differentiable dense
    products, at a dense layer's cost."""

    def backward(ctx, *grads):
        return graphed(ctx, *grads) if torch.is_grad_enabled() else kernels(ctx, *grads)

    return staticmethod(backward)


def no_second_derivative(t: Optional[Tensor], why: str) -> Optional[Tensor]:
    """t's values with a grad_fn that raises (RuntimeError, saying ``why``) if anything is
    differentiated through it: for a gradient whose dependence on some input the backward cannot
    follow, an error instead of a silently missing term."""
    if t is None:
        return None
    return torch._C._functions.DelayedError(why.encode(), 1)(t.detach().requires_grad_())


def linear_grads_dense(grad_y: Tensor, x: Tensor, values: Tensor, indptr: Tensor, indices: Tensor,
                         out_features: int, need_x: bool, need_v: bool, need_b: bool):
    """``(gi, gv, gb)`` of ``y = x W^T + b`` by differentiable dense torch products (None where not
    needed): the float64 reference path, and the backward of a graph-building (create_graph=True)
    backward."""
    w = _dense_weight(values, indptr, indices, out_features, x.shape[1])  # (differentiable in values)
    gi = grad_y @ w if need_x else None
    gv = (grad_y.t() @ x)[_rows_of(indptr, out_features), indices.to(torch.int64)] if need_v else None
    gb = grad_y.sum(0) if need_b else None
    return gi, gv, gb


def _structure_tensors(s, device) -> Tuple[Tensor, Tensor]:
    """(indptr int64, indices int64) of a validated CsrStructure, as tensors on ``device``."""
    return (torch.from_numpy(np.array(s.indptr, dtype=np.int64)).to(device),
            torch.from_numpy(np.array(s.indices, dtype=np.int64)).to(device))


def _linear_backward_graphed(ctx, grad_y):
    need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    if ctx.cuda_state is not None:
        x_or_xt, values = ctx.saved_tensors
        _dev, ((ip, ix, *_), _ptrs), transposed, _cols = ctx.cuda_state
        x = x_or_xt.t() if transposed else x_or_xt
    elif ctx.cpu_structure is not None:
        x, values = ctx.saved_tensors
        ip, ix = _structure_tensors(ctx.cpu_structure, x.device)
        transposed = False
    else:
        x, values, ip, ix = ctx.saved_tensors
        transposed = False
    gi, gv, gb = linear_grads_dense(grad_y, x, values, ip, ix, ctx.out_features, need_x, need_v, need_b)
    if transposed and gv is not None:
        # (the forward kept a feature-major copy of x instead of x: gv's link to x is not there)
        gv = no_second_derivative(gv, "sparsebp: this weight gradient of a SparseLinear on a CUDA tensor cannot "
                                      "be differentiated again (its forward kept a transposed copy of the input, "
                                      "not the input)")
    return gi, gv, gb, None, None, None


def _linear_backward_eager(ctx, grad_y):
    need_x, need_v, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    need_b = need_b and ctx.has_bias
    if not (need_x or need_v or need_b):
        return (None,) * 6
    if ctx.cuda_state is not None:
        return _linear_cuda_eager_backward(ctx, grad_y, need_x, need_v, need_b)
    if ctx.cpu_structure is not None:
        return _linear_cpu_eager_backward(ctx, grad_y, need_x, need_v, need_b)
    x, values, indptr, indices = ctx.saved_tensors
    impl = _linear_backward_cuda if x.is_cuda else _linear_backward_impl
    gi, gv, gb = impl(grad_y, x, values, indptr, indices, ctx.out_features, need_x, need_v, need_b)
    return (gi if need_x else None, gv if need_v else None, gb if need_b else None, None, None, None)


def _linear_cpu_eager_backward(ctx, grad_y, need_x, need_v, need_b):
    """The float32 CPU backward of _LinearEager, on the structure its forward ran on."""
    x, values = ctx.saved_tensors
    gy = _kernel_ready(grad_y)
    gi = _new_like_layout(gy, x.shape[0], x.shape[1]) if need_x else None
    gv = values.new_empty(values.shape) if need_v else None
    gb = values.new_empty((ctx.out_features,)) if need_b else None
    _cpu_backward(ctx.cpu_structure, gy, x, values, gi, gv, gb)
    return gi, gv, gb, None, None, None


class _LinearEager(torch.autograd.Function):
    """The same forward and backward as the registered operators (CPU or CUDA kernels), called
    directly in eager mode (the operator machinery costs ~0.2-0.5 ms per layer forward + backward,
    more than a small layer's kernels); tracing goes through the operators (see linear)."""

    @staticmethod
    def forward(ctx, x, values, bias, indptr, indices, out_features):
        ctx.out_features = out_features
        ctx.has_bias = bias is not None
        ctx.cuda_state = ctx.cpu_structure = None
        if x.is_cuda and x.dtype == torch.float32:
            # Kept for the backward: the device structure (its tensors stay alive with it) and x as
            # the backward's SDDMM reads it (the feature-major copy made here, if one was; then x
            # itself need not be kept).
            y, xt, dev, entry = _cuda_forward(x, values, bias, indptr, indices, out_features)
            ctx.save_for_backward(x if xt is None else xt, values)
            ctx.cuda_state = (dev, entry, xt is not None, x.shape[1])
            return y
        if x.dtype == torch.float32 and not x.is_cuda:
            # Kept for the backward: the validated structure the forward ran on (it holds its own
            # copy of the indices, so the backward needs neither a cache lookup nor the index tensors).
            ctx.cpu_structure = structure_of(indptr, indices, out_features, x.shape[1])
            ctx.save_for_backward(x, values)
            return _cpu_forward(ctx.cpu_structure, x, values, bias, out_features)
        y = (_linear_cuda if x.is_cuda else _linear_impl)(x, values, bias, indptr, indices, out_features)
        ctx.save_for_backward(x, values, indptr, indices)
        return y

    backward = with_graphed_backward(_linear_backward_eager, _linear_backward_graphed)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _linear_eager(x, values, bias, indptr, indices, out_features: int) -> Tensor:
    """The eager call (a 2-D x, checked). On the CPU with no gradient wanted (inference,
    torch.no_grad()), the kernel alone, without the autograd Function around it (measured: 16x16,
    batch 8, the whole module call 38.7 us against 44.3 us for the Function alone)."""
    if x.device.type == "cpu" and not (torch.is_grad_enabled() and (
            x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad))):
        return _linear_impl(x, values, bias, indptr, indices, out_features)
    return _LinearEager.apply(x, values, bias, indptr, indices, out_features)


def eager(*tensors) -> bool:
    """Whether a call can skip the operator machinery: plain CPU or CUDA tensors (or parameters; no
    fake or other subclass tensors), not being traced."""
    return (not torch.compiler.is_compiling() and all(t is None or type(t) in _PLAIN for t in tensors)
            and tensors[0].device.type in ("cpu", "cuda"))


# ---------------------------------------------------------------------------------------------
# CUDA kernels of the same operators (builds with SPARSEBP_CUDA=ON; see sparsebp/_cuda.py)
# ---------------------------------------------------------------------------------------------

_cuda_structs: "dict" = {}


def _cuda_structure(indptr: Tensor, indices: Tensor, rows: int, cols: int):
    """W's CSR and its CSC on the device, as raw pointers ``(indptr, indices, colptr, rowidx, perm)``
    (indptr, colptr, perm int64; indices, rowidx int32), cached per index tensors (dropped with them).
    The kernels read the cache's own validated copies, never the index tensors themselves."""
    return _cuda_structure_entry(indptr, indices, rows, cols)[1]


def _cuda_structure_entry(indptr: Tensor, indices: Tensor, rows: int, cols: int):
    """``(tensors, pointers)`` of the device structure (see _cuda_structure). A cached entry is
    reused while the index tensors' version counters are unchanged; when they changed (an in-place
    write: DDP's buffer broadcast on every forward, ``load_state_dict``), their contents are compared
    with the entry's copies on the device and the entry kept if they are equal (one small sync,
    instead of a rebuild per step), else rebuilt."""
    key = (indices.data_ptr(), indptr.data_ptr(), rows, cols)
    versions = (indices._version, indptr._version)
    hit = _cuda_structs.get(key)
    if hit is not None and hit[0]() is indices:
        ref, entry, seen = hit
        if seen == versions:
            return entry
        ip0, ix0 = entry[0][0], entry[0][1]
        if (indptr.shape == ip0.shape and indices.shape == ix0.shape and torch.equal(indptr.to(ip0.dtype), ip0)
                and torch.equal(indices.to(ix0.dtype), ix0)):
            _cuda_structs[key] = (ref, entry, versions)
            return entry
    # validated once per structure, on the host (a clear error for a bad one, never a kernel reading
    # out of bounds): the engine's CSR checks
    _core.csr_structure(rows, cols, indptr.detach().to("cpu", torch.int64).numpy(),
                        indices.detach().to("cpu", torch.int32).numpy())
    row_of = _rows_of(indptr, rows)
    ix = indices.to(torch.int64)
    perm = torch.argsort(ix * max(rows, 1) + row_of, stable=True)  # by column, then row
    colptr = torch.zeros(cols + 1, dtype=torch.int64, device=indices.device)
    colptr[1:] = torch.cumsum(torch.bincount(ix, minlength=cols), 0)
    tensors = (indptr.detach().to(torch.int64, copy=True).contiguous(),
               indices.detach().to(torch.int32, copy=True).contiguous(), colptr,
               row_of[perm].to(torch.int32).contiguous(), perm.contiguous())
    entry = (tensors, tuple(int(t.data_ptr()) for t in tensors))
    # (the dict bound as a default: at interpreter exit the module's globals may already be None)
    _cuda_structs[key] = (weakref.ref(indices, lambda _, k=key, d=_cuda_structs: d.pop(k, None)), entry, versions)
    return entry


def _cuda_dev(t: Tensor) -> int:
    dev = t.get_device()  # a CUDA tensor's device index
    if not _cuda.compiled():
        raise ValueError(f"a tensor on {t.device} was passed, but this build of sparsebp has no CUDA kernels "
                         "(SPARSEBP_CUDA=OFF); reinstall with pip install . -Ccmake.define.SPARSEBP_CUDA=ON")
    return dev


def _cuda_forward(x, values, bias, indptr, indices, out_features):
    """The float32 CUDA forward: ``(y, xt, dev, entry)``: xt as from ``_cuda.csr_product``, the
    device and the device structure (``_cuda_structure_entry``)."""
    dev = _cuda_dev(x)
    entry = _cuda_structure_entry(indptr, indices, out_features, x.shape[1])
    values = values if values.is_contiguous() else values.contiguous()
    bias = None if bias is None else (bias if bias.is_contiguous() else bias.contiguous())
    y, xt = _cuda.csr_product(dev, _cuda._stream(dev), x, out_features, entry[1][0], entry[1][1], values.data_ptr(),
                              0, 0 if bias is None else bias.data_ptr())
    return y, xt, dev, entry


def _cuda_backward(grad_y, x, xt, values, dev, ptrs, cols, out_features, need_x, need_v, need_b):
    """The float32 CUDA backward: ``(gi, gv, gb)``, None where not needed. ``x`` (batch, cols) or,
    when x is None, ``xt``: its feature-major (cols, batch) rows."""
    ip, ix, colptr, rowidx, perm = ptrs
    st = _cuda._stream(dev)
    gi = gv = gb = gt = None
    if need_x:  # dX = G W: the same product over W's CSC; gt: G's feature-major rows, reused below
        v = values if values.is_contiguous() else values.contiguous()
        gi, gt = _cuda.csr_product(dev, st, grad_y, cols, colptr, rowidx, v.data_ptr(), perm)
    if need_v:
        gv = torch.empty_like(values)
        gb = values.new_empty((out_features,)) if need_b else None
        _cuda.sddmm(dev, st, grad_y, x, ip, ix, gv.data_ptr(), 0 if gb is None else gb.data_ptr(), gt=gt, xt=xt,
                    nnz=gv.numel())
    elif need_b:
        gb = grad_y.sum(0)
    return gi, gv, gb


def _linear_cuda_eager_backward(ctx, grad_y, need_x, need_v, need_b):
    x_or_xt, values = ctx.saved_tensors
    dev, (_, ptrs), transposed, cols = ctx.cuda_state
    x, xt = (None, x_or_xt) if transposed else (x_or_xt, None)
    return _cuda_backward(grad_y, x, xt, values, dev, ptrs, cols, ctx.out_features, need_x, need_v, need_b) + \
        (None, None, None)


@linear_op.register_kernel("cuda")
def _linear_cuda(x, values, bias, indptr, indices, out_features):
    if x.dtype == torch.float64:  # the dense reference path, on the device
        return _linear_ref(x, values, bias, indptr, indices, out_features)
    return _cuda_forward(x, values, bias, indptr, indices, out_features)[0]


@linear_backward_op.register_kernel("cuda")
def _linear_backward_cuda(grad_y, x, values, indptr, indices, out_features, input_grad, weight_grad, bias_grad):
    batch, cols = x.shape
    empty = values.new_empty((0,))
    if x.dtype == torch.float64:
        gi = _new_like_layout(grad_y, batch, cols) if input_grad else empty
        gv = values.new_empty(values.shape) if weight_grad else empty
        gb = values.new_empty((out_features,)) if bias_grad else empty
        return _linear_backward_ref(grad_y, x, values, indptr, indices, out_features, gi, gv, gb)
    ptrs = _cuda_structure(indptr, indices, out_features, cols)
    grads = _cuda_backward(grad_y, x, None, values, _cuda_dev(x), ptrs, cols, out_features, input_grad, weight_grad,
                           bias_grad)
    return tuple(empty if g is None else g for g in grads)


# ---------------------------------------------------------------------------------------------
# The functional entry point (argument checks, any leading dimensions)
# ---------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float64)
_LOW = (torch.float16, torch.bfloat16)


def autocasting(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` ("cpu" or "cuda") in this thread."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def autocast_input(x, dtype: torch.dtype):
    """Under ``torch.autocast`` sparsebp's layers run in their own dtype (float32; float64 on the
    reference path), as autocast's float32 operators do: a float16 / bfloat16 input, what an
    autocast layer before them gives, is cast up (differentiably: its gradient comes back in the
    input's dtype). Any other input is returned as it is, so outside autocast a float16 / bfloat16
    input stays a TypeError."""
    if (isinstance(x, torch.Tensor) and x.dtype in _LOW and dtype in _FLOATS
            and x.device.type in ("cpu", "cuda") and autocasting(x.device.type)):
        return x.to(dtype)
    return x


_NO_CONTEXT = contextlib.nullcontext()
# (a cheap first test; torch releases without it: always ask per device)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def no_autocast(t: Tensor):
    """A context with autocast off for ``t``'s device type (a shared no-op one when it is off): for
    the torch products that the layers run themselves (the dense forward of ``MePropLinear``, some
    of the GPU backwards), which autocast would otherwise run in its lower precision."""
    if not _any_autocast():
        return _NO_CONTEXT
    dev = t.device.type
    if dev in ("cpu", "cuda") and autocasting(dev):
        return torch.autocast(dev, enabled=False)
    return _NO_CONTEXT


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.device.type == "cuda" and not _cuda.compiled():
        raise ValueError(f"{name} is on {t.device}, but this build of sparsebp runs on the CPU only "
                         "(CUDA kernels are not compiled in: SPARSEBP_CUDA=OFF); move it with .cpu() or reinstall "
                         "with pip install . -Ccmake.define.SPARSEBP_CUDA=ON")
    if t.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{name} is on {t.device}; sparsebp runs on the CPU and on CUDA GPUs")


def _check_same_device(**tensors) -> None:
    devs = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"the layer's tensors and its input are on different devices ({desc}); move the module "
                         "with .to(device) or the input to the module's device")


def _common_call(x, values, bias, indptr, indices, in_features: int, out_features: int) -> bool:
    """Whether a call of linear is the common one, everything right (a 2-D float x of the right
    width, plain tensors on one CPU or usable CUDA device, not being traced): it may go straight to
    the kernels, and linear's checks give the errors (and the slow path) otherwise."""
    dev = x.device if type(x) in _PLAIN else None
    return (dev is not None and type(values) in _PLAIN and x.dim() == 2 and x.shape[1] == in_features
            and x.dtype in _FLOATS and values.dtype == x.dtype and values.device == dev
            and type(indices) in _PLAIN and type(indptr) in _PLAIN and indices.device == dev and indptr.device == dev
            and values.dim() == 1 and indices.dim() == 1 and values.shape[0] == indices.shape[0]
            and (bias is None or (type(bias) in _PLAIN and bias.dtype == x.dtype and bias.device == dev
                                  and bias.dim() == 1 and bias.shape[0] == out_features))
            and (dev.type == "cpu" or (dev.type == "cuda" and _cuda.compiled()))
            and not torch.compiler.is_compiling())


def linear(x: Tensor, values: Tensor, bias: Optional[Tensor], indptr: Tensor, indices: Tensor,
           in_features: int, out_features: int) -> Tensor:
    """``y = x @ W.T + bias`` with ``W`` (out_features x in_features) in CSR form (``indptr`` int64,
    ``indices`` int32, ``values`` the stored entries). ``x`` has shape ``(*, in_features)``;
    differentiable in ``x``, ``values`` and ``bias``."""
    # The common call goes straight to the kernels; the checks below give the errors, and the slow
    # path, when anything is off.
    if _common_call(x, values, bias, indptr, indices, in_features, out_features):
        return _linear_eager(x, values, bias, indptr, indices, out_features)
    for v, name in ((in_features, "in_features"), (out_features, "out_features")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise TypeError(f"{name} must be an int >= 0; got {v!r}")
    _check_tensor(x, "x")
    _check_tensor(values, "values")
    if bias is not None:
        _check_tensor(bias, "bias")
    _check_same_device(x=x, values=values, bias=bias, indptr=indptr, indices=indices)
    x = autocast_input(x, values.dtype)
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be float32 (or float64, a slow reference path); got {x.dtype}")
    for t, name in ((values, "values"), (bias, "bias")):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}; got {t.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (*, {in_features}); got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},); got {tuple(bias.shape)}")
    if values.dim() != 1 or (indices.dim() == 1 and values.shape[0] != indices.shape[0]):
        raise ValueError(f"values must have shape ({indices.shape[0] if indices.dim() == 1 else 'nnz'},) (one per "
                         f"stored entry); got {tuple(values.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features) if x.dim() != 2 else x
    if eager(x2, values, bias, indptr, indices):
        y = _linear_eager(x2, values, bias, indptr, indices, out_features)
    else:
        y = linear_op(x2, values, bias, indptr, indices, out_features)
    return y.reshape(*lead, out_features) if x.dim() != 2 else y
