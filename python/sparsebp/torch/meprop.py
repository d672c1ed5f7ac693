"""Sparse gradients in PyTorch: ``MePropLinear`` (a drop-in ``nn.Linear`` whose backward keeps only
the top-k of its output gradient) and the ``grad_topk`` / ``grad_policy`` option of
``SparseLinear`` (sparse weights and sparse gradients together).

The policies are those of ``sparsebp.algorithms`` (MeProp per example or unified, MSBP-style
memory, MeSimp counters); each module keeps its own copy (its state, e.g. MSBP's memory, is per
layer). The backward runs sparsebp's kernels on float32 CPU tensors; float64 takes a dense masked
reference path (same selection) so that ``torch.autograd.gradcheck`` can check the formulas.
Under DDP each process selects on its own gradient; DDP then averages the (sparse) weight gradients.

On CUDA tensors (builds with SPARSEBP_CUDA=ON), meProp selects on the GPU (the top-k kernels)
without waiting for the device, so a step can be captured in a CUDA graph; a NaN in the output
gradient is then selected and propagates into the gradients, as in dense backprop (the CPU path
raises a ValueError instead). The stateful policies (MSBP's memory, meSimp's counters) keep their
state on the host, as on the CPU: each of their backwards copies the output gradient to the host
and waits for it. The selected gradient (zeros outside the selection) then goes through the
layer's GPU products: for ``MePropLinear`` with plain meProp, sparsebp's sparse-gradient kernels,
with another policy dense products; for ``SparseLinear``, its CSR kernels (whose cost follows the
stored weights, not k).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from .. import algorithms as _alg
from ..csr import CSR
from ..sparse_grad import csr_selected_backward, selected_backward
from . import _ops

__all__ = ["MePropLinear", "make_policy"]


def make_policy(k: Optional[int] = None, ratio: Optional[float] = None, mode: str = "example",
                policy: Optional[_alg.SparseGrad] = None) -> Optional[_alg.SparseGrad]:
    """A fresh policy from ``k`` / ``ratio`` / ``mode`` (meProp), or a clone of ``policy``; None
    when neither is given."""
    if policy is not None:
        if k is not None or ratio is not None:
            raise ValueError("give either policy or k/ratio, not both")
        if not isinstance(policy, _alg.SparseGrad):
            raise TypeError(f"policy must be a sparsebp.algorithms policy; got {type(policy).__name__}")
        return policy.clone()
    if k is None and ratio is None:
        return None
    return _alg.MeProp(k=k, ratio=ratio, mode=mode)


def _select(policy: _alg.SparseGrad, g: Tensor):
    """The policy's selection for the gradient g, made on the host from a float32 copy of g."""
    return policy.select(g.detach().to(torch.float32).cpu().contiguous().numpy())


def _selected_grad(policy, sel, g: Tensor) -> Tensor:
    """The gradient the selection applies to, in g's dtype: g itself for meProp (so float64 stays
    exact), the policy's own (G plus memory) for MSBP."""
    if isinstance(policy, _alg.MeProp) or (isinstance(policy, _alg.MSBP) and policy.alpha == 0.0):
        return g
    return torch.from_numpy(sel.grad).to(g.dtype)


def _masked(policy: _alg.SparseGrad, sel, g: Tensor):
    """``(Ĝ, mask)`` of a host selection ``sel``: the gradient it applies to, zero outside it, and
    the selection as a 0/1 tensor, both on g's device in g's dtype."""
    mask = torch.from_numpy(_mask_of(sel, tuple(g.shape))).to(g.device, g.dtype)
    return _selected_grad(policy, sel, g).to(g.device) * mask, mask


def _cuda_selected(policy: _alg.SparseGrad, g: Tensor, with_mask: bool = False):
    """Ĝ for a CUDA gradient g: the gradient the policy propagates, zero outside its selection, on
    g's device in g's dtype. meProp selects on the GPU (on g rounded to float32, as on the CPU),
    without waiting for the device (a NaN is selected and propagates, where the CPU path raises);
    another policy selects on the host (its state lives there), from a float32 copy of g.
    ``with_mask``: ``(Ĝ, the selection as a 0/1 tensor in g's dtype)``."""
    from .. import _cuda

    if type(policy) is _alg.MeProp:
        dev = _ops._cuda_dev(g)
        g32 = g.detach().to(torch.float32).contiguous()
        k = policy.k_for(g.shape[1])
        out = torch.zeros_like(g)
        if policy.mode == "example":
            idx = _cuda.topk(g32, k, dev, check_nan=False).long()
            gh = out.scatter_(1, idx, g.gather(1, idx))
            return (gh, torch.zeros_like(g).scatter_(1, idx, 1.0)) if with_mask else gh
        cols = _cuda.topk_columns(g32, k, dev, check_nan=False).long()
        gh = out.index_copy_(1, cols, g.index_select(1, cols))
        if with_mask:
            mask = torch.zeros_like(g)
            mask[:, cols] = 1.0
            return gh, mask
        return gh
    gh, mask = _masked(policy, _select(policy, g), g)
    return (gh, mask) if with_mask else gh


def _selected_graphed(policy: _alg.SparseGrad, g: Tensor) -> Tensor:
    """Ĝ for a graph-building backward (create_graph=True): Ĝ's values, with the derivative in g
    of ``mask * g`` (the selection is piecewise constant in g; MSBP's memory is a constant)."""
    gd = g.detach()
    gh, mask = _cuda_selected(policy, gd, with_mask=True) if g.is_cuda else _masked(policy, _select(policy, gd), gd)
    return gh + (g - gd) * mask


def _mask_of(sel, shape) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    if sel.mode == "example":
        np.put_along_axis(m, sel.cols.astype(np.int64), True, axis=1)
    else:
        m[:, sel.cols] = True
    return m


class _MePropLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, policy):
        ctx.save_for_backward(x, weight)
        ctx.policy, ctx.has_bias = policy, bias is not None
        with _ops.no_autocast(x):  # (float32 under autocast, as the sparse backward)
            return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        gb = g.sum(0) if need_b else None
        if torch.is_grad_enabled():  # a graph-building backward (create_graph=True): dense, differentiable
            gh = _selected_graphed(ctx.policy, g)
        elif g.is_cuda:
            if type(ctx.policy) is _alg.MeProp and g.dtype == torch.float32:  # sparsebp's CUDA kernels
                from .. import _cuda

                dev = _ops._cuda_dev(g)
                dx, dw, _, _ = _cuda.meprop_backward(g.contiguous(), x.contiguous(), w.detach().contiguous(),
                                                     ctx.policy.k_for(g.shape[1]), ctx.policy.mode, need_x, need_w,
                                                     False, dev, check_nan=False)
                return dx, dw, gb, None
            gh = _cuda_selected(ctx.policy, g)  # another policy (state on the host), or float64
        else:
            sel = _select(ctx.policy, g)
            if g.dtype == torch.float32:  # sparsebp's CPU kernels
                res = selected_backward(sel.grad, x.detach().contiguous().numpy(), w.detach().contiguous().numpy(),
                                        sel.cols, sel.mode, input_grad=need_x, weight_grad=need_w, bias_grad=False)
                return (torch.from_numpy(res.input) if need_x else None,
                        torch.from_numpy(res.weight) if need_w else None, gb, None)
            # the reference path (gradcheck): the same selection
            gh, _ = _masked(ctx.policy, sel, g)
        # the selected gradient through dense products (autocast off: a backward may run inside its region)
        with _ops.no_autocast(g):
            return (gh @ w if need_x else None), (gh.t() @ x if need_w else None), gb, None


class MePropLinear(nn.Linear):
    """``nn.Linear`` whose backward propagates only the top-k of its output gradient (meProp).

    ``MePropLinear(in, out, bias=True, k=20)`` (or ``ratio=0.04``; ``mode="example"`` as published,
    or ``"unified"``), or ``policy=`` any ``sparsebp.algorithms`` policy (e.g. ``MSBP(k=20,
    alpha=0.8)``). The forward is ``nn.Linear``'s; parameters, ``state_dict`` and optimizers are
    unchanged; the bias gradient uses the full output gradient. ``from_linear(linear, k=...)``
    wraps trained weights. Inputs of shape ``(*, in_features)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, k: Optional[int] = None,
                 ratio: Optional[float] = None, mode: str = "example", policy: Optional[_alg.SparseGrad] = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.policy = make_policy(k, ratio, mode, policy)
        if self.policy is None:
            raise ValueError("MePropLinear needs k, ratio or policy")

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> "MePropLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear; got {type(linear).__name__}")
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                  dtype=linear.weight.dtype, **kw)
        with torch.no_grad():
            mod.weight.copy_(linear.weight)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias)
        return mod

    def forward(self, input: Tensor) -> Tensor:
        _ops._check_tensor(input, "input")
        input = _ops.autocast_input(input, self.weight.dtype)
        if input.dtype != self.weight.dtype:
            raise TypeError(f"input must have the weight's dtype {self.weight.dtype}; got {input.dtype}")
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise ValueError(f"input must have shape (*, {self.in_features}); got {tuple(input.shape)}")
        if not torch.is_grad_enabled() or not (input.requires_grad or self.weight.requires_grad):
            with _ops.no_autocast(input):
                return super().forward(input)
        if input.dim() == 2:  # (no reshapes: each would add a view node to the graph)
            return _MePropLinearFn.apply(input, self.weight, self.bias, self.policy)
        lead = input.shape[:-1]
        x2 = input.reshape(lead.numel(), self.in_features)  # (-1 is ambiguous when in_features is 0)
        y = _MePropLinearFn.apply(x2, self.weight, self.bias, self.policy)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", grad={self.policy!r}"


class _SparseMePropFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, indptr, indices, in_f, out_f, policy):
        ctx.save_for_backward(x, values, indptr, indices)
        ctx.shape, ctx.policy, ctx.has_bias = (out_f, in_f), policy, bias is not None
        ctx.cpu_structure = None
        if (x.dtype == torch.float32 and x.device.type == "cpu"
                and _ops._common_call(x, values, bias, indptr, indices, in_f, out_f)):
            # The kernel on the validated structure, kept for the backward (one cache lookup a step,
            # not two, and no second pass through linear's checks: ~15 us a step at 784 x 500).
            ctx.cpu_structure = _ops.structure_of(indptr, indices, out_f, in_f)
            return _ops._cpu_forward(ctx.cpu_structure, x, values, bias, out_f)
        return _ops.linear(x, values, bias, indptr, indices, in_f, out_f)

    @staticmethod
    def backward(ctx, g):
        x, values, indptr, indices = ctx.saved_tensors
        need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        gb = g.sum(0) if need_b else None
        none5 = (None,) * 5
        out_f, in_f = ctx.shape
        if torch.is_grad_enabled():  # a graph-building backward (create_graph=True): dense, differentiable
            gh = _selected_graphed(ctx.policy, g)
        elif g.is_cuda:
            gh = _cuda_selected(ctx.policy, g)
            if g.dtype == torch.float32:  # the selected gradient through the layer's GPU products
                ptrs = _ops._cuda_structure(indptr, indices, out_f, in_f)
                dx, dv, _ = _ops._cuda_backward(gh, x, None, values.detach(), _ops._cuda_dev(g), ptrs, in_f, out_f,
                                                need_x, need_v, False)
                return dx, dv, gb, *none5
        else:
            sel = _select(ctx.policy, g)
            if g.dtype == torch.float32:
                # (the structure the forward ran on, validated once and cached per index tensors)
                s = ctx.cpu_structure
                if s is None:  # (a forward that did not run the CPU kernel itself)
                    s = _ops.structure_of(indptr, indices, *ctx.shape)
                w = CSR._from_structure(s, values.detach().numpy())
                dx, dv, _ = csr_selected_backward(sel.grad, x.detach().contiguous().numpy(), w, sel.cols, sel.mode,
                                                  input_grad=need_x)
                return ((torch.from_numpy(dx) if need_x else None), (torch.from_numpy(dv) if need_v else None), gb,
                        *none5)
            gh, _ = _masked(ctx.policy, sel, g)  # (gradcheck)
        # float64 (the reference path) or a graph-building backward: dense products
        gi, gv, _ = _ops.linear_grads_dense(gh, x, values, indptr, indices, out_f, need_x, need_v, False)
        return gi, gv, gb, *none5


def sparse_meprop_linear(x: Tensor, values: Tensor, bias: Optional[Tensor], indptr: Tensor, indices: Tensor,
                         in_features: int, out_features: int, policy: _alg.SparseGrad) -> Tensor:
    """The forward of a ``SparseLinear`` with a sparse-gradient policy (its backward: the selected
    rows' stored weights only)."""
    if not isinstance(policy, _alg.SparseGrad):
        raise TypeError(f"policy must be a sparsebp.algorithms policy; got {type(policy).__name__}")
    _ops._check_tensor(x, "x")
    x = _ops.autocast_input(x, values.dtype)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (*, {in_features}); got {tuple(x.shape)}")
    if x.dim() == 2:  # (no reshapes: each would add a view node to the graph, ~10 us a step together)
        return _SparseMePropFn.apply(x, values, bias, indptr, indices, in_features, out_features, policy)
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), in_features)
    y = _SparseMePropFn.apply(x2, values, bias, indptr, indices, in_features, out_features, policy)
    return y.reshape(*lead, out_features)
