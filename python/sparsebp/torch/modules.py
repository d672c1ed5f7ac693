"""Drop-in sparse modules: ``SparseLinear`` (for ``nn.Linear``)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .. import _core
from . import _conv, _ops

__all__ = ["SparseLinear", "SparseConv2d", "magnitude_mask", "random_mask"]


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a float in [0, 1); got {type(sparsity).__name__}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0):
        raise ValueError(f"sparsity must be in [0, 1); got {sparsity}")
    return s


def _kept(n: int, sparsity: float) -> int:
    return max(1, int(round((1.0 - sparsity) * n))) if n > 0 else 0


def _first_bad(weight: Tensor, bad_of) -> Optional[tuple]:
    """The position of the first entry of ``weight`` where ``bad_of(weight)`` is True, or None
    (also for a meta weight: no values; the converters' own checks say so)."""
    if weight.device.type == "meta":
        return None
    bad = bad_of(weight.detach())
    return tuple(int(i) for i in bad.nonzero()[0]) if bool(bad.any()) else None


def _check_no_nan(weight: Tensor, name: str) -> None:
    at = _first_bad(weight, torch.isnan)
    if at is not None:
        raise ValueError(f"{name} holds NaN (first at {at}); magnitude pruning is undefined there")


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Boolean mask keeping the ``round((1 - sparsity) * numel)`` entries of largest |weight|
    (ties broken by position, so the result is deterministic), on the CPU whatever the weight's
    device. A NaN in ``weight`` is a ValueError (its magnitude orders against nothing; the sort
    would drop it without a word)."""
    return _magnitude_mask(weight, _check_sparsity(sparsity), "weight")


def _magnitude_mask(weight: Tensor, s: float, name: Optional[str]) -> Tensor:
    """magnitude_mask at a checked sparsity s; name: how a NaN is reported (None: the caller has
    checked the weight for NaN already)."""
    if name is not None:
        _check_no_nan(weight, name)
    # On the CPU, where the mask is made (indexing it with a GPU weight's order would be an error);
    # a meta weight stays (no values to move: the converters say so).
    w = weight.detach().reshape(-1).abs()
    w = w.to(torch.float64) if w.device.type == "meta" else w.to("cpu", torch.float64)
    k = _kept(w.numel(), s)
    # Stable sort on -|w|: equal magnitudes keep their order (lower index first).
    order = torch.sort(-w, stable=True).indices[:k]
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.reshape(weight.shape)


def random_mask(shape, sparsity: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Boolean mask with exactly ``round((1 - sparsity) * numel)`` entries, uniformly at random."""
    s = _check_sparsity(sparsity)
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (int(shape),)
    if (not isinstance(shape, (tuple, list, torch.Size))
            or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in shape)):
        raise TypeError(f"shape must be a tuple of ints; got {shape!r}")
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must be non-negative; got {tuple(shape)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape))
    k = _kept(n, s)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:k]] = True
    return mask.reshape(shape)


def _check_mask(mask, shape, name: str = "mask") -> Tensor:
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(np.asarray(mask))
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a boolean tensor of shape {tuple(shape)}; got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(mask.shape)}")
    return mask.cpu()


def _csr_from_mask(mask2d: Tensor) -> Tuple[Tensor, Tensor]:
    """(indptr int64, indices int32) of a 2-D boolean mask, row-major."""
    m = mask2d.cpu().numpy()
    rows, cols = np.nonzero(m)
    indptr = np.zeros(m.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=m.shape[0]), out=indptr[1:])
    return torch.from_numpy(indptr), torch.from_numpy(cols.astype(np.int32))


class _SparseWeight(nn.Module):
    """What SparseLinear and SparseConv2d share: a weight of ``weight_shape`` stored as a CSR matrix
    with one row per output (rows = weight_shape[0], columns = the rest flattened), the parameter
    ``values`` at the stored entries, the buffers ``indptr`` / ``indices``, and ``bias``."""

    def _init_weight(self, shape: tuple, bias: bool, sparsity, mask, generator, device, dtype) -> None:
        if (mask is None) == (sparsity is None):
            raise ValueError("give exactly one of sparsity= (a random mask) or mask= (a boolean tensor of shape "
                             f"{shape}); got {'both' if mask is not None else 'neither'}")
        dtype = dtype or torch.get_default_dtype()
        if dtype not in (torch.float32, torch.float64):  # what the kernels (float32) and the reference path run
            raise TypeError(f"{type(self).__name__} supports float32 (and float64, a slow reference path); "
                            f"got dtype {dtype}")
        mask = _check_mask(mask, shape) if mask is not None else random_mask(shape, sparsity, generator)
        indptr, indices = _csr_from_mask(mask.reshape(shape[0], -1))
        self.register_buffer("indptr", indptr.to(device))
        self.register_buffer("indices", indices.to(device))
        self.values = nn.Parameter(torch.empty(indices.numel(), device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(shape[0], device=device, dtype=dtype)) if bias else None
        self.reset_parameters(generator)

    @property
    def _csr_shape(self) -> tuple:
        return self.weight_shape[0], math.prod(self.weight_shape[1:])

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Values (and bias) uniform in ±1/sqrt(kept fan-in): nn's default init, scaled to the
        entries a row really has, so the output variance does not shrink with the density."""
        fan_in = self.values.numel() / max(self.weight_shape[0], 1)
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        with torch.no_grad():
            self.values.uniform_(-bound, bound, generator=generator)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound, generator=generator)

    @staticmethod
    def _dense_mask(dense: nn.Module, mask, sparsity) -> Tensor:
        """The mask ``from_dense`` keeps: ``mask``, else magnitude at ``sparsity``, else the nonzeros."""
        if mask is not None and sparsity is not None:
            raise ValueError("give at most one of mask= and sparsity=")
        w = dense.weight.detach()
        if mask is None:
            mask = magnitude_mask(w, sparsity) if sparsity is not None else (w != 0)
        return _check_mask(mask, tuple(w.shape))

    def _copy_from_dense(self, dense: nn.Module, mask: Tensor) -> "_SparseWeight":
        with torch.no_grad():
            self.values.copy_(dense.weight.detach().cpu()[mask])  # row-major: the CSR order
            if dense.bias is not None:
                self.bias.copy_(dense.bias.detach())
        return self

    def _copy_to_dense(self, dense: nn.Module) -> nn.Module:
        with torch.no_grad():
            dense.weight.copy_(self.weight)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    @property
    def weight(self) -> Tensor:
        """The dense weight (``weight_shape``), a new tensor: not a parameter (that is ``values``)."""
        rows, cols = self._csr_shape
        return _ops._dense_weight(self.values.detach(), self.indptr, self.indices, rows, cols).reshape(
            self.weight_shape)

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @property
    def density(self) -> float:
        n = math.prod(self.weight_shape)
        return self.nnz / n if n else 0.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def mask(self) -> Tensor:
        """The boolean mask (``weight_shape``) of stored entries."""
        rows, cols = self._csr_shape
        m = torch.zeros(rows, cols, dtype=torch.bool)
        m[_ops._rows_of(self.indptr.cpu(), rows), self.indices.cpu().to(torch.int64)] = True
        return m.reshape(self.weight_shape)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        _load_structure(self, *self._csr_shape, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _check_int(v, name: str, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int; got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {v}")


class SparseLinear(_SparseWeight):
    """``nn.Linear`` with an unstructured-sparse weight held in CSR form.

    ``y = x @ W.T + bias`` for ``x`` of shape ``(*, in_features)``, as ``nn.Linear``; forward, input
    gradient and weight gradient all cost ∝ nnz (sparsebp's C++ kernels). Only the stored values
    are trained: the parameter ``values`` (nnz,) and ``bias``; the structure lives in the buffers
    ``indptr`` (int64, out_features + 1) and ``indices`` (int32, nnz), so ``state_dict()``,
    ``.to()``, ``copy.deepcopy`` and pickling keep it, and the mask never regrows under any optimizer.

    Give the structure as ``mask`` (bool, out_features x in_features) or as ``sparsity`` (a mask
    drawn uniformly at random with exactly ``round((1 - sparsity) * numel)`` entries). Values start
    like ``nn.Linear``'s but scaled to the *kept* fan-in (uniform in ±1/sqrt(nnz per row on
    average)), so the output variance does not shrink with the density. To keep trained weights,
    use ``SparseLinear.from_dense(linear, ...)`` instead.

    float32 runs the kernels; float64 runs a slow dense reference path (for gradcheck).
    Outputs follow the input's layout (see ``sparsebp.torch``).
    """

    __constants__ = ["in_features", "out_features"]

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, sparsity: Optional[float] = None,
                 mask: Optional[Tensor] = None, generator: Optional[torch.Generator] = None, device=None,
                 dtype=None, grad_topk: Optional[int] = None, grad_mode: str = "example",
                 grad_policy=None) -> None:
        super().__init__()
        _check_int(in_features, "in_features", 0)
        _check_int(out_features, "out_features", 0)
        self.in_features, self.out_features = in_features, out_features
        self._init_weight((out_features, in_features), bias, sparsity, mask, generator, device, dtype)
        from .meprop import make_policy

        # Sparse gradients too (meProp on this layer's output gradient): grad_topk=k with grad_mode,
        # or grad_policy= any sparsebp.algorithms policy. None: the full gradient.
        self.grad_policy = make_policy(grad_topk, None, grad_mode, grad_policy)

    @property
    def weight_shape(self) -> tuple:
        return (self.out_features, self.in_features)

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, mask: Optional[Tensor] = None,
                   sparsity: Optional[float] = None) -> "SparseLinear":
        """A ``SparseLinear`` holding ``linear``'s weights at the kept positions: ``mask`` if given,
        else the ``sparsity`` fraction of smallest |weight| dropped, else the nonzeros of the weight."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear; got {type(linear).__name__}")
        mask = cls._dense_mask(linear, mask, sparsity)
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, mask=mask,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        return mod._copy_from_dense(linear, mask)

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` with this layer's weights (zeros outside the mask)."""
        return self._copy_to_dense(nn.Linear(self.in_features, self.out_features, self.bias is not None,
                                             device=self.values.device, dtype=self.values.dtype))

    def forward(self, input: Tensor) -> Tensor:
        policy = self.__dict__.get("grad_policy")  # (a plain attribute: no nn.Module __getattr__ fallback)
        if policy is not None and torch.is_grad_enabled() and (input.requires_grad or self.values.requires_grad):
            from .meprop import sparse_meprop_linear

            _ops._check_tensor(input, "input")  # (named "input" here; sparse_meprop_linear's says "x")
            return sparse_meprop_linear(input, self.values, self.bias, self.indptr, self.indices, self.in_features,
                                        self.out_features, policy)
        return _ops.linear(input, self.values, self.bias, self.indptr, self.indices, self.in_features,
                           self.out_features)

    def extra_repr(self) -> str:
        extra = "" if getattr(self, "grad_policy", None) is None else f", grad={self.grad_policy!r}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.nnz}, sparsity={self.sparsity:.4f}" + extra)


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def conv_padding(padding, kernel_size, stride, dilation):
    """``nn.Conv2d``'s padding argument (int, pair, ``"valid"`` or ``"same"``) as the layer keeps
    it: a pair of ints, or ``"same"`` where 'same' needs one more row or column on one side (an odd
    kernel reach ``dilation * (kernel - 1)``; torch puts the extra one at the bottom or right)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            if tuple(stride) != (1, 1):
                raise ValueError("padding='same' needs stride 1 (as nn.Conv2d)")
            reach = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
            return "same" if any(r % 2 for r in reach) else (reach[0] // 2, reach[1] // 2)
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same'; got {padding!r}")
    return _conv._pair(padding, "padding", 0)


def conv_pads(padding, kernel_size, dilation) -> Tuple[int, int, int, int]:
    """``torch.nn.functional.pad``'s ``(left, right, top, bottom)`` for a padding as
    ``conv_padding`` returns it."""
    if padding == "same":
        (top, bottom), (left, right) = [(r // 2, r - r // 2) for r in
                                        (d * (k - 1) for d, k in zip(dilation, kernel_size))]
        return (left, right, top, bottom)
    ph, pw = padding
    return (pw, pw, ph, ph)


class SparseConv2d(_SparseWeight):
    """``nn.Conv2d`` with an unstructured-sparse weight held in CSR form (one row per output
    channel, columns ``(in_channel_in_group, kh, kw)``).

    Same constructor and forward as ``nn.Conv2d`` (stride, padding incl. ``"valid"``/``"same"``,
    dilation, groups, bias, every ``padding_mode``), plus the structure: ``mask`` (bool, the
    weight's shape) or ``sparsity`` (uniformly random). Parameters: ``values`` (nnz,) and ``bias``;
    buffers ``indptr``, ``indices``. Values start uniform in ±1/sqrt(kept fan-in).

    Forward, input gradient and weight gradient run sparsebp's implicit-GEMM gather kernels (see
    ``sparsebp.torch._conv``); they read activations stored batch-innermost without conversion
    (``sparsebp.torch.batch_inner``) and return outputs in the input's layout. On CUDA tensors
    (builds with SPARSEBP_CUDA=ON) the CSR kernels run over the input's patches (im2col): correct
    for every option, but slower than cuDNN (see the README).

    Zero padding the same on both sides is done inside the kernels. Another ``padding_mode``, and
    ``padding="same"`` where it needs one more row or column on one side, pad the input first (as
    ``nn.Conv2d`` does), which costs one padded copy of the input per call (see ``_conv.pad_input``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, sparsity: Optional[float] = None,
                 mask: Optional[Tensor] = None, generator: Optional[torch.Generator] = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        for v, name in ((in_channels, "in_channels"), (out_channels, "out_channels"), (groups, "groups")):
            _check_int(v, name, 1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                             f"groups ({groups})")
        if padding_mode not in _PADDING_MODES:
            modes = ", ".join(map(repr, _PADDING_MODES))
            raise ValueError(f"padding_mode must be one of {modes}; got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _conv._pair(kernel_size, "kernel_size", 1)
        self.stride = _conv._pair(stride, "stride", 1)
        self.dilation = _conv._pair(dilation, "dilation", 1)
        self.padding = conv_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.padding_mode = padding_mode
        # F.pad's (left, right, top, bottom) when the input is padded before the kernels, else None
        pads = conv_pads(self.padding, self.kernel_size, self.dilation)
        self._input_pads = None if padding_mode == "zeros" and self.padding != "same" else pads
        self._init_weight(self.weight_shape, bias, sparsity, mask, generator, device, dtype)

    @property
    def weight_shape(self) -> tuple:
        return (self.out_channels, self.in_channels // self.groups) + self.kernel_size

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, mask: Optional[Tensor] = None,
                   sparsity: Optional[float] = None) -> "SparseConv2d":
        """A ``SparseConv2d`` holding ``conv``'s weights at the kept positions: ``mask`` if given,
        else the ``sparsity`` fraction of smallest |weight| dropped, else the nonzeros."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d; got {type(conv).__name__}")
        mask = cls._dense_mask(conv, mask, sparsity)
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, mask=mask, device=conv.weight.device,
                  dtype=conv.weight.dtype)
        return mod._copy_from_dense(conv, mask)

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with this layer's weights (zeros outside the mask)."""
        return self._copy_to_dense(nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                             self.padding, self.dilation, self.groups, self.bias is not None,
                                             self.padding_mode, device=self.values.device, dtype=self.values.dtype))

    def forward(self, input: Tensor) -> Tensor:
        pads = getattr(self, "_input_pads", None)
        if pads is None:  # (conv2d casts a float16 / bfloat16 input up under autocast)
            return _conv.conv2d(input, self.values, self.bias, self.indptr, self.indices, self.in_channels,
                                self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                                self.groups)
        input = _ops.autocast_input(input, self.values.dtype)
        padded = _conv.pad_input(input, pads, self.padding_mode, self.in_channels, self.kernel_size, self.dilation)
        y = _conv.conv2d(padded, self.values, self.bias, self.indptr, self.indices, self.in_channels,
                         self.out_channels, self.kernel_size, self.stride, (0, 0), self.dilation, self.groups)
        # a row-major input padded batch-innermost (see pad_input): the output back in its layout
        return _conv.row_major(y) if _conv.is_batch_inner(padded) and not _conv.is_batch_inner(input) else y

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding!r}")
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bias={self.bias is not None}, nnz={self.nnz}, sparsity={self.sparsity:.4f}"

def _load_structure(mod: nn.Module, rows: int, cols: int, state_dict, prefix: str) -> None:
    """Checks a checkpoint's structure and values for ``mod`` (rows x cols CSR) and resizes the
    module's buffers and parameter when the checkpoint has another nnz. Errors name the entry."""
    nnz = check_structure_entries(mod, rows, cols, state_dict, prefix)
    if nnz is not None and nnz != mod.indices.numel():
        # Another structure: resize (parameters are replaced: build optimizers after loading).
        mod.indices = torch.empty(nnz, dtype=torch.int32, device=mod.indices.device)
        mod.values = nn.Parameter(torch.empty(nnz, dtype=mod.values.dtype, device=mod.values.device),
                                  requires_grad=mod.values.requires_grad)


def check_structure_entries(mod: nn.Module, rows: int, cols: int, state_dict, prefix: str) -> Optional[int]:
    """The checks of ``_load_structure``, changing nothing: the checkpoint's nnz for ``mod`` at
    ``prefix``, or None when the state has no structure entries for it. Errors name the entry."""
    keys = {k: prefix + k for k in ("indptr", "indices", "values")}
    if not all(keys[k] in state_dict for k in keys):
        return None
    ip, ix, v = (state_dict[keys[k]] for k in ("indptr", "indices", "values"))
    where = prefix.rstrip(".") or type(mod).__name__
    for t, name in ((ip, "indptr"), (ix, "indices"), (v, "values")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: checkpoint entry {name} must be a tensor; got {type(t).__name__}")
    if ip.dtype.is_floating_point or ip.dtype == torch.bool or ix.dtype.is_floating_point or ix.dtype == torch.bool:
        raise TypeError(f"{where}: checkpoint indptr/indices must be integer tensors; got {ip.dtype}/{ix.dtype}")
    if not v.dtype.is_floating_point:
        raise TypeError(f"{where}: checkpoint values must be floating point; got {v.dtype}")
    if ip.dim() != 1 or ip.numel() != rows + 1:
        raise ValueError(f"{where}: checkpoint indptr must have shape ({rows + 1},) for a weight with {rows} rows; "
                         f"got {tuple(ip.shape)}")
    if ix.dim() != 1 or v.dim() != 1 or v.numel() != ix.numel():
        raise ValueError(f"{where}: checkpoint values and indices must be 1-D of equal length (nnz); "
                         f"got {tuple(v.shape)} and {tuple(ix.shape)}")
    try:
        _core.csr_structure(rows, cols, ip.detach().cpu().to(torch.int64).numpy(), ix.detach().cpu().to(torch.int64).numpy())
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: the checkpoint's sparsity structure is invalid for a {rows}x{cols} weight: {e}") from None
    if not torch.isfinite(v).all():
        raise ValueError(f"{where}: checkpoint values hold NaN or infinity")
    return ix.numel()


class BatchInner(nn.Module):
    """Identity in value; stores its (N, C, H, W) output batch-innermost (see ``batch_inner``).

    sparsebp's convolutions give their output in the layout of their input, and torch's
    element-wise ops (ReLU, residual adds) keep it, so one ``BatchInner`` in front of the first
    sparse convolution (e.g. after a dense stem) spares every later sparse layer a conversion.
    Dense ``nn.Conv2d`` layers are slower on such inputs, so place it after the last dense one.
    The gradient flows back through it unchanged in value, copied to the layout of the input (so
    that the backward of the op before it, e.g. a ReLU over an (N, C, H, W)-contiguous tensor,
    sees its own layout: torch's element-wise backward over two layouts runs 4-5x slower)."""

    def forward(self, input: Tensor) -> Tensor:
        from ._conv import is_batch_inner

        if input.dim() != 4:
            raise ValueError(f"BatchInner expects a 4-D (N, C, H, W) input; got shape {tuple(input.shape)}")
        return input if is_batch_inner(input) else _ToBatchInner.apply(input)


class _ToBatchInner(torch.autograd.Function):
    """``batch_inner`` whose backward gives the gradient in the input's layout (its strides when it
    is dense without overlaps, else (N, C, H, W)-contiguous)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.layout = (tuple(x.shape), x.stride()) if _dense_strides(x) else None
        return _conv._chwn(x).permute(3, 0, 1, 2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if ctx.layout is None:
            return _conv._nchw(grad)
        shape, stride = ctx.layout
        if grad.stride() == stride:
            return grad
        if stride == torch.empty(shape, device="meta").stride():
            return _conv._nchw(grad)  # (N, C, H, W)-contiguous, the usual case: the fast transpose
        out = torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device)
        out.copy_(grad)
        return out


def _dense_strides(t: Tensor) -> bool:
    """True when t's elements fill exactly t.numel() consecutive slots (any order of dimensions)."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return False
        expect *= sz
    return True
