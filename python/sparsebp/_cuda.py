"""CUDA dispatch for ``sparsebp.ops`` (and, through them, ``sparsebp.torch``).

An argument is a *GPU array* when it is a CUDA ``torch.Tensor``, has ``__cuda_array_interface__``
(CuPy, Numba, ...) or has ``__dlpack_device__`` naming a CUDA device. When any array argument of
an ops function is one, the call runs on the GPU kernels (``cpp/src/kernels/cuda``), provided:

- every array argument is on that same device (else a ``ValueError`` naming each argument and its
  device: a weight on the CPU and an input on the GPU is such a mismatch; with a GPU input, pass the
  weight's values as ``values=`` on the same device: the CSR object contributes its structure only,
  copied to the device once and cached);
- sparsebp was built with ``SPARSEBP_CUDA=ON`` and the device exists (else a ``ValueError`` that
  says which is missing).

Device memory comes from PyTorch (foreign arrays are wrapped without copies); results come back as
the input's kind (CuPy in, CuPy out; otherwise torch). Work is queued on PyTorch's current stream.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np

from . import _core

__all__ = ["compiled", "device_count", "device_names", "device_of", "route"]

_KDL_CUDA = (2, 13)  # DLPack: kDLCUDA, kDLCUDAManaged (kDLCUDAHost, 3, is host memory)


def compiled() -> bool:
    """Whether the CUDA kernels are compiled into this build."""
    return bool(_core.cuda_compiled())


def device_count() -> int:
    """GPUs the CUDA runtime sees (0 in builds without CUDA, or without a driver or a GPU)."""
    return int(_core.cuda_device_count())


def device_names() -> list:
    return [_core.cuda_device_name(i) for i in range(device_count())]


def device_of(a) -> Optional[str]:
    """``"cuda:<i>"`` for a GPU array, ``"cpu"`` for a host array, another device type as named
    (``"meta"``, ...), None for None."""
    if a is None:
        return None
    if type(a).__module__.split(".")[0] == "torch" and hasattr(a, "device"):
        d = a.device
        return f"cuda:{d.index or 0}" if d.type == "cuda" else d.type
    if isinstance(a, np.ndarray):
        return "cpu"
    if getattr(a, "__cuda_array_interface__", None) is not None:
        dev = getattr(getattr(a, "device", None), "id", None)  # CuPy names it; the interface does not
        return f"cuda:{int(dev) if dev is not None else 0}"
    dl = getattr(a, "__dlpack_device__", None)
    if dl is not None:
        kind, idx = dl()
        if int(kind) in _KDL_CUDA:
            return f"cuda:{int(idx)}"
    return "cpu"


def route(**arrays) -> Optional[int]:
    """None when no argument is a GPU array (the CPU kernels run); else the device index, after
    checking that every array argument is on it and that the GPU kernels can run there."""
    if all(v is None or type(v) is np.ndarray for v in arrays.values()):  # the common CPU call: no work
        return None
    devs = {k: device_of(v) for k, v in arrays.items() if v is not None}
    gpu = sorted({d for d in devs.values() if d.startswith("cuda")})
    if not gpu:
        return None
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"arguments are on different devices ({desc}); put them all on one device "
                         "(with a GPU input, pass the weight's values as values= on that device)")
    dev = int(gpu[0].split(":")[1])
    if not compiled():
        raise ValueError(f"a GPU array was passed ({gpu[0]}), but this build of sparsebp has no CUDA kernels "
                         "(built with SPARSEBP_CUDA=OFF); reinstall with "
                         "pip install . -Ccmake.define.SPARSEBP_CUDA=ON")
    if dev >= device_count():
        raise ValueError(f"a GPU array on cuda:{dev} was passed, but the CUDA runtime sees {device_count()} "
                         "device(s) here")
    return dev


def kind_of(a) -> str:
    """How an error message names the type of ``a``: qualified outside the builtins
    (``cupy.ndarray``, ``torch.Tensor``: a bare "ndarray" would read like NumPy's), and for a GPU
    array its device, with what to do (the messages that use this are those of host-only functions)."""
    t = type(a)
    mod = t.__module__.split(".")[0]
    if mod == "builtins":
        return t.__name__
    name = f"{mod}.{t.__name__}"
    try:
        dev = device_of(a)
    except Exception:  # (a foreign __dlpack_device__ that fails: the name alone)
        return name
    if dev and dev.startswith("cuda"):
        name += f" on {dev} (this function runs on the CPU only: copy it to the host)"
    return name


# ---- device memory through torch -------------------------------------------------------------------
def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - needs a GPU build without torch
        raise ValueError("sparsebp's CUDA path takes its device memory from PyTorch: pip install "
                         "\"sparsebp[torch]\"") from e
    return torch


def _as_torch(a, dev: int, name: str, dtype=None, ndim: Optional[int] = None):
    torch = _torch()
    if isinstance(a, torch.Tensor):
        t = a
    elif getattr(a, "__cuda_array_interface__", None) is not None:
        t = torch.as_tensor(a, device=f"cuda:{dev}")
    else:
        t = torch.from_dlpack(a)
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {str(dtype).replace('torch.', '')}; got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {tuple(t.shape)}")
    return t


def _back(t, like):
    """t (torch) as the kind of ``like``: CuPy in, CuPy out."""
    if like is not None and type(like).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy.asarray(t)
    return t


def _ptr(t) -> int:
    return 0 if t is None else int(t.data_ptr())


def _stream(dev: int) -> int:
    """PyTorch's current stream on ``dev`` as a raw handle."""
    torch = _torch()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # no Stream object: ~10x cheaper
    return int(raw(dev)) if raw is not None else int(torch.cuda.current_stream(dev).cuda_stream)


# ---- layouts and the two sparse products, shared by sparsebp.ops and sparsebp.torch ----------------
# Below this batch the batch-major kernels run on the operands as they are (no transposes; the
# work is too small for the transposes to pay); from it on, the feature-major kernels (vector loads
# along the batch, coalesced), on a transposed copy of a batch-major operand.
SMALL_BATCH = 32


def _row_major(t) -> bool:
    """Rows contiguous (the batch outermost)."""
    return t.stride(1) == 1 and t.stride(0) >= t.shape[1]


def _feature_major(t) -> bool:
    """The batch innermost (``t.t()`` has contiguous rows), batch > 1."""
    s0, s1 = t.stride()
    return s0 == 1 and t.shape[0] > 1 and s1 >= t.shape[0]


def csr_product(dev: int, st: int, x, rows: int, indptr: int, indices: int, values: int, value_index: int = 0,
                bias: int = 0):
    """``y = x S^T (+ bias)`` on the GPU for S (rows x cols) in CSR, given as device pointers (ints;
    0 = none): indptr int64, indices int32, values float32, value_index int64 (S's entry p is
    ``values[value_index[p]]``), bias float32. ``x`` (batch, cols): a float32 tensor, any strides.
    Returns ``(y, xt)``: ``y`` (batch, rows) in ``x``'s layout (feature-major in, feature-major out;
    else row-major), and ``xt``, x as feature-major (cols, batch) rows (a view of x, or the
    transposed copy made for the product), or None where the small-batch kernel ran on x as it is."""
    torch = _torch()
    batch, cols = x.shape
    f32 = torch.float32
    if _feature_major(x):
        y = torch.empty_strided((batch, rows), (1, batch), dtype=f32, device=x.device)
        _core.cuda_csr_fm(dev, st, batch, rows, indptr, indices, values, value_index, bias, x.data_ptr(),
                          x.stride(1), y.data_ptr(), batch, False)
        return y, x.t()
    if not _row_major(x):
        x = x.contiguous()
    y = torch.empty((batch, rows), dtype=f32, device=x.device)
    if batch < SMALL_BATCH:
        _core.cuda_csr_rows(dev, st, batch, rows, indptr, indices, values, value_index, bias, x.data_ptr(),
                            x.stride(0), y.data_ptr(), rows)
        return y, None
    xt = torch.empty((cols, batch), dtype=f32, device=x.device)  # filled by the call (x transposed first)
    _core.cuda_csr_fm(dev, st, batch, rows, indptr, indices, values, value_index, bias, xt.data_ptr(), batch,
                      y.data_ptr(), rows, True, x.data_ptr(), cols, x.stride(0))
    return y, xt


# Long batches over few rows (a convolution's patches) split the SDDMM's batch into parts computed
# side by side: about this many warps in all (one per row and part), parts of >= 1024 columns.
_SDDMM_WARPS = 4096


def _sddmm_split(torch, batch: int, rows: int, nnz: int, device):
    """``(partials, parts)`` for the SDDMM: a scratch buffer and the number of batch parts, or
    ``(None, 1)`` when the rows alone give the GPU enough warps (or nnz is unknown)."""
    parts = min(-(-_SDDMM_WARPS // max(rows, 1)), batch // 1024)
    if nnz < 0 or parts < 2:
        return None, 1
    return torch.empty(parts * (nnz + rows), dtype=torch.float32, device=device), parts


def sddmm(dev: int, st: int, g, x, indptr: int, indices: int, dvalues: int, dbias: int = 0, gt=None, xt=None,
          nnz: int = -1) -> None:
    """``dvalues[p] = sum_b g[b, row(p)] x[b, indices[p]]`` at the stored positions of a CSR (rows x
    cols; indptr, indices, dvalues, dbias: device pointers, dbias 0 for none) and ``dbias =
    g.sum(0)``; g (batch, rows) and x (batch, cols) float32 tensors, any strides. ``gt``/``xt``:
    feature-major (n, batch) rows of g/x already at hand (from csr_product), or None (x may be None
    when xt is given). ``nnz``: the number of stored entries, where known (it lets a long batch
    over few rows be split across the GPU, see _sddmm_split)."""
    torch = _torch()
    batch, rows = g.shape
    cols = x.shape[1] if x is not None else xt.shape[0]  # (x may be None when xt is given)
    if gt is None and _feature_major(g):
        gt = g.t()
    if xt is None and _feature_major(x):
        xt = x.t()
    if batch < SMALL_BATCH and gt is None and xt is None:  # both batch-major: no transposes
        g = g if _row_major(g) else g.contiguous()
        x = x if _row_major(x) else x.contiguous()
        _core.cuda_sddmm_bm(dev, st, batch, rows, indptr, indices, g.data_ptr(), g.stride(0), x.data_ptr(),
                            x.stride(0), dvalues, dbias)
        return
    if xt is None:
        x = x if _row_major(x) else x.contiguous()
        xt = torch.empty((cols, batch), dtype=torch.float32, device=x.device)
        _core.cuda_transpose(dev, st, batch, cols, x.data_ptr(), x.stride(0), xt.data_ptr(), batch)
    ldx = max(xt.stride(0), batch)
    part, parts = _sddmm_split(torch, batch, rows, nnz, xt.device)
    pp = 0 if part is None else part.data_ptr()
    if gt is not None:
        _core.cuda_sddmm(dev, st, batch, rows, indptr, indices, gt.data_ptr(), max(gt.stride(0), batch), xt.data_ptr(),
                         ldx, dvalues, dbias, partials=pp, parts=parts, nnz=max(nnz, 0))
        return
    g = g if _row_major(g) else g.contiguous()
    gt = torch.empty((rows, batch), dtype=torch.float32, device=g.device)  # filled by the call (g transposed)
    _core.cuda_sddmm(dev, st, batch, rows, indptr, indices, gt.data_ptr(), batch, xt.data_ptr(), ldx, dvalues, dbias,
                     g.data_ptr(), g.stride(0), partials=pp, parts=parts, nnz=max(nnz, 0))


_STRUCTS: "OrderedDict[tuple, tuple]" = OrderedDict()  # (id(structure), device) -> (structure, tensors)


def _structure(w, dev: int) -> dict:
    """W's structure on the device (CSR and its CSC), cached for the 32 most recent structures."""
    torch = _torch()
    s = w.structure
    key = (id(s), dev)
    hit = _STRUCTS.get(key)
    if hit is not None and hit[0] is s:
        _STRUCTS.move_to_end(key)
        return hit[1]
    rows, cols = w.shape
    indptr = np.asarray(w.indptr, dtype=np.int64)
    indices = np.asarray(w.indices, dtype=np.int32)
    row_of = np.repeat(np.arange(rows, dtype=np.int64), np.diff(indptr))
    perm = np.lexsort((row_of, indices))  # by column, then row: the CSC order
    colptr = np.zeros(cols + 1, dtype=np.int64)
    np.cumsum(np.bincount(indices, minlength=cols), out=colptr[1:])
    on = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(f"cuda:{dev}")  # noqa: E731
    d = dict(indptr=on(indptr), indices=on(indices), colptr=on(colptr), rowidx=on(row_of[perm].astype(np.int32)),
             perm=on(perm.astype(np.int64)))
    _STRUCTS[key] = (s, d)
    while len(_STRUCTS) > 32:
        _STRUCTS.popitem(last=False)
    return d


def _f32_2d(a, dev, name, rows=None, cols=None):
    torch = _torch()
    t = _as_torch(a, dev, name, torch.float32, 2)
    if (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        want = f"({'batch' if rows is None else rows}, {'n' if cols is None else cols})"
        raise ValueError(f"{name} must have shape {want}; got {tuple(t.shape)}")
    return t.contiguous()


def _f32_1d(a, dev, name, n):
    torch = _torch()
    t = _as_torch(a, dev, name, torch.float32, 1)
    if t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},); got {tuple(t.shape)}")
    return t.contiguous()


# ---- the operations --------------------------------------------------------------------------------
def linear_forward(x, w, bias, values, dev: int):
    rows, cols = w.shape
    if values is None:
        raise ValueError("with a GPU input, pass the weight's values on the same device as values= "
                         "(the CSR object gives the structure only)")
    xt = _f32_2d(x, dev, "x", cols=cols)
    v = _f32_1d(values, dev, "values", w.nnz)
    b = None if bias is None else _f32_1d(bias, dev, "bias", rows)
    s = _structure(w, dev)
    y, _ = csr_product(dev, _stream(dev), xt, rows, _ptr(s["indptr"]), _ptr(s["indices"]), _ptr(v), bias=_ptr(b))
    return _back(y, x)


def linear_backward(g, x, w, values, input_grad: bool, weight_grad: bool, bias_grad: bool, dev: int):
    torch = _torch()
    rows, cols = w.shape
    xt = _f32_2d(x, dev, "x", cols=cols)
    batch = xt.shape[0]
    gt = _f32_2d(g, dev, "grad_output", batch, rows)
    s = _structure(w, dev)
    st = _stream(dev)
    gi = gv = gb = None
    g_fm = None
    if input_grad:
        if values is None:
            raise ValueError("with a GPU input, pass the weight's values on the same device as values=")
        v = _f32_1d(values, dev, "values", w.nnz)
        gi, g_fm = csr_product(dev, st, gt, cols, _ptr(s["colptr"]), _ptr(s["rowidx"]), _ptr(v), _ptr(s["perm"]))
    if weight_grad:
        gv = torch.empty(w.nnz, dtype=torch.float32, device=xt.device)
        gb = torch.empty(rows, dtype=torch.float32, device=xt.device) if bias_grad else None
        sddmm(dev, st, gt, xt, _ptr(s["indptr"]), _ptr(s["indices"]), _ptr(gv), _ptr(gb), gt=g_fm, nnz=w.nnz)
    elif bias_grad:
        gb = gt.sum(dim=0)
    return tuple(None if t is None else _back(t, x) for t in (gi, gv, gb))


def topk(g, k: int, dev: int, check_nan: bool = True):
    """Top-k columns of each row of g by |value| (the engine's tie rule). ``check_nan``: a NaN in g
    is a ValueError (this reads a flag back: a wait for the device); without the check (the torch
    modules' backwards, which must not wait every step) a NaN ranks above every number, so it is
    selected and propagates into the gradients, as in dense backprop."""
    torch = _torch()
    gt = _f32_2d(g, dev, "g")
    rows, n = gt.shape
    kk = min(k, n)
    if kk == 0 or rows == 0:
        return _back(torch.empty((rows, kk), dtype=torch.int32, device=gt.device), g)
    # The NaN check reads a flag back (a wait for the device). A step being captured in a CUDA graph
    # cannot wait, so there it is skipped: a NaN then counts as a large entry (the kernel's keys
    # order it above every number), and exactly k valid columns are still chosen.
    check = check_nan and not torch.cuda.is_current_stream_capturing()
    if kk == n:
        if check and torch.isnan(gt).any():
            raise ValueError("g holds NaN; top-k is undefined there")
        return _back(torch.arange(n, dtype=torch.int32, device=gt.device).repeat(rows, 1), g)
    idx = torch.empty((rows, kk), dtype=torch.int32, device=gt.device)
    nan_rows = torch.zeros(rows, dtype=torch.uint8, device=gt.device)
    _core.cuda_topk_rows(dev, _stream(dev), _ptr(gt), rows, n, n, kk, _ptr(idx), _ptr(nan_rows))
    if check:
        bad = torch.nonzero(nan_rows).flatten()
        if bad.numel():
            raise ValueError(f"g holds NaN (row {int(bad[0])}); top-k is undefined there")
    return _back(idx, g)


def topk_columns(g, k: int, dev: int, check_nan: bool = True):
    torch = _torch()
    gt = _f32_2d(g, dev, "g")
    rows, n = gt.shape
    scores = torch.empty((1, n), dtype=torch.float32, device=gt.device)
    _core.cuda_abs_colsum(dev, _stream(dev), _ptr(gt), rows, n, n, _ptr(scores))
    return _back(_as_torch(topk(scores, k, dev, check_nan), dev, "scores")[0], g)


def gemm(a, b, dev: int):
    """a @ b for 2-D float32 torch tensors (any strides) on the GPU kernels."""
    torch = _torch()
    m, kk = a.shape
    n = b.shape[1]
    c = torch.empty((m, n), dtype=torch.float32, device=a.device)
    _core.cuda_gemm(dev, _stream(dev), m, n, kk, _ptr(a), a.stride(0), a.stride(1), _ptr(b), b.stride(0), b.stride(1),
                    _ptr(c), n)
    return c


def meprop_backward(g, x, weight, k: int, mode: str, input_grad: bool, weight_grad: bool, bias_grad: bool,
                    dev: int, check_nan: bool = True):
    """(dx, dW, db, selected) of the sparse-gradient backward on the GPU (see ops.meprop_backward)."""
    torch = _torch()
    w = _f32_2d(weight, dev, "weight")
    out_f, in_f = w.shape
    gt = _f32_2d(g, dev, "grad_output", cols=out_f)
    batch = gt.shape[0]
    xt = _f32_2d(x, dev, "x", batch, in_f) if weight_grad else None
    db = gt.sum(dim=0) if bias_grad else None
    if mode == "example":
        sel = _as_torch(topk(gt, k, dev, check_nan), dev, "sel")
        kk = sel.shape[1]
        dx = torch.empty((batch, in_f), dtype=torch.float32, device=w.device) if input_grad else None
        dw = torch.empty((out_f, in_f), dtype=torch.float32, device=w.device) if weight_grad else None
        _core.cuda_meprop_example(dev, _stream(dev), batch, kk, out_f, in_f, _ptr(sel), _ptr(gt), out_f, _ptr(w),
                                  _ptr(xt), in_f, _ptr(dx), _ptr(dw))
    else:
        sel = _as_torch(topk_columns(gt, k, dev, check_nan), dev, "sel")
        si = sel.long()
        gc = gt.index_select(1, si)  # (batch, k): the selected columns
        dx = gemm(gc, w.index_select(0, si), dev) if input_grad else None
        dw = None
        if weight_grad:
            dw = torch.zeros((out_f, in_f), dtype=torch.float32, device=w.device)
            dw.index_copy_(0, si, gemm(gc.t(), xt, dev))
    return tuple(None if t is None else _back(t, g) for t in (dx, dw, db, sel))
