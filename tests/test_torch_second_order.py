"""Second derivatives through sparsebp's torch layers (a gradient taken with create_graph=True and
differentiated again: gradient penalties, double backward), against a float64 dense torch twin:
the same weights (zeros off the structure) in nn.Linear / nn.Conv2d, and for the meProp layers a
hook keeping the top-k of every gradient that reaches the product (numpy's sort), which is what
their backward does. Before, such gradients came back without a graph: the penalty's gradient of
the sparse layer's own parameters was silently missing (None), and MePropLinear's wrong."""
import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sparsebp.torch as st  # noqa: E402
from sparsebp import _cuda  # noqa: E402

import reference as ref  # noqa: E402

_GPU = _cuda.compiled() and _cuda.device_count() > 0 and torch.cuda.is_available()
KINDS = ["linear", "linear_batch_inner", "linear_topk", "meprop_example", "meprop_unified", "conv_zeros",
         "conv_reflect", "conv_batch_inner", "conv_strided_1x1", "conv_groups_dilation"]


class TopkGradLinear(nn.Module):
    """The float64 twin of a meProp layer: y = x W^T + b, with every gradient reaching x W^T kept at
    its top-k (per example or unified columns, numpy's sort); the bias sees the full gradient."""

    def __init__(self, weight, bias, k, mode):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)
        self.k, self.mode = k, mode

    def forward(self, x):
        z = x @ self.weight.t()
        if z.requires_grad:
            z.register_hook(lambda g: g * torch.from_numpy(ref.topk_masked(g.detach().numpy(), self.k, self.mode) != 0)
                            .to(g.dtype))
        return z + self.bias


def stored_mask(layer) -> torch.Tensor:
    """Where the sparse layer stores entries, from its raw buffers (not through sparsebp)."""
    rows, cols = layer._csr_shape
    m = torch.zeros(rows, cols, dtype=torch.bool)
    m[torch.from_numpy(ref.rows_of(layer.indptr.cpu().numpy())), layer.indices.cpu().long()] = True
    return m


def build(kind):
    """(sparse float32 model, float64 dense twin, input, index of our layer)."""
    torch.manual_seed(7)
    if kind.startswith("conv"):
        geo = {"conv_zeros": dict(kernel_size=3, padding=1), "conv_reflect": dict(kernel_size=3, padding=1,
                                                                                    padding_mode="reflect"),
               "conv_batch_inner": dict(kernel_size=3, padding=1), "conv_strided_1x1": dict(kernel_size=1, stride=2),
               "conv_groups_dilation": dict(kernel_size=3, padding=2, dilation=2, groups=2)}[kind]
        dense = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 6, **geo), nn.Tanh())
        x = torch.randn(3, 2, 7, 7)
    else:
        dense = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 7), nn.Tanh())
        x = torch.randn(6, 5)
    sparse = copy.deepcopy(dense)
    if kind.startswith("meprop"):
        mode = kind.split("_")[1]
        sparse[2] = st.MePropLinear(12, 7, k=3, mode=mode)
        sparse[2].load_state_dict(dense[2].state_dict())
    else:
        st.sparsify(sparse, 0.6, layers=["2"])
        if kind == "linear_topk":
            from sparsebp.algorithms import MeProp

            sparse[2].grad_policy = MeProp(k=3)
    twin = copy.deepcopy(dense).double()
    with torch.no_grad():
        if kind.startswith("meprop"):
            twin[2] = TopkGradLinear(dense[2].weight.detach().double(), dense[2].bias.detach().double(), 3,
                                     kind.split("_")[1])
        else:
            keep = stored_mask(sparse[2]).reshape(twin[2].weight.shape)
            twin[2].weight.mul_(keep)
            if kind == "linear_topk":
                twin[2] = TopkGradLinear(twin[2].weight.detach(), twin[2].bias.detach(), 3, "example")
    if kind == "conv_batch_inner":  # (the sparse layer then reads and writes the batch-innermost layout)
        sparse.insert(2, st.BatchInner())
        twin.insert(2, nn.Identity())
    return sparse, twin, x


def penalty(model, x):
    """||d sum(out^2) / dx||^2 + ||d sum(out) / dx||^2 (the second: a first backward whose incoming
    gradient needs no graph)."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    g1, = torch.autograd.grad((out ** 2).sum(), x, create_graph=True)
    g2, = torch.autograd.grad(out.sum(), x, create_graph=True)
    return (g1 ** 2).sum() + (g2 ** 2).sum()


def params_by_role(model, twin):
    """[(name, our gradient, the twin's float64 gradient)] for every parameter; a sparse layer's
    values against the twin's dense weight gradient at the stored positions."""
    out = []
    for (name, mod), (_, tmod) in zip(model.named_children(), twin.named_children()):
        if isinstance(mod, (st.SparseLinear, st.SparseConv2d)):
            keep = stored_mask(mod)
            want = tmod.weight.grad.reshape(keep.shape)[keep.to(tmod.weight.device)]
            out.append((name + ".values", mod.values.grad, want))
            out.append((name + ".bias", mod.bias.grad, tmod.bias.grad))
        else:
            for (pn, p), (_, tp) in zip(mod.named_parameters(), tmod.named_parameters()):
                out.append((f"{name}.{pn}", p.grad, tp.grad))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_penalty_against_float64_dense_twin(isa, kind):
    model, twin, x = build(kind)
    xin = x.t().contiguous().t() if kind == "linear_batch_inner" else x
    p = penalty(model, xin)
    p.backward()
    pt = penalty(twin, x.double())
    pt.backward()
    assert abs(float(p.detach()) - float(pt.detach())) <= 1e-5 * abs(float(pt.detach())) + 1e-6
    for name, got, want in params_by_role(model, twin):
        assert got is not None, f"{name}: no gradient (the second-order term went missing)"
        scale = float(want.abs().max())
        err = float((got.double() - want).abs().max())
        assert err <= 1e-5 * scale + 1e-7, f"{name}: max error {err:.3e} (scale {scale:.3e})"  # (3.5e-7 seen)
    # the sparse layer's parameters did get a second-order gradient (the test is not vacuous)
    ours = [g for n, g, _ in params_by_role(model, twin) if n.startswith(("2.", "3."))]
    assert any(float(g.abs().max()) > 0 for g in ours)


@pytest.mark.parametrize("kind", ["linear", "conv_zeros", "meprop_example"])
def test_first_derivatives_unchanged_when_the_backward_builds_a_graph(kind):
    """The graph-building backward's first derivatives equal the kernels' (same values)."""
    model, _, x = build(kind)
    x = x.requires_grad_(True)
    out = model(x)
    ga = torch.autograd.grad(out.sum(), [x] + list(model.parameters()), create_graph=True)
    out = model(x)
    gb = torch.autograd.grad(out.sum(), [x] + list(model.parameters()))
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert ga[0].requires_grad


@pytest.mark.skipif(not _GPU, reason="no CUDA GPU here (or a build without CUDA kernels): the GPU "
                                     "second-derivative test has not run")
@pytest.mark.parametrize("kind", ["conv_zeros", "meprop_example", "linear_small_batch"])
def test_gpu_gradient_penalty_against_float64_dense_twin(kind):
    model, twin, x = build("linear" if kind == "linear_small_batch" else kind)
    model = model.cuda()
    p = penalty(model, x.cuda())
    p.backward()
    pt = penalty(twin, x.double())
    pt.backward()
    for name, got, want in params_by_role(model, twin):
        assert got is not None, name
        err = float((got.double().cpu() - want).abs().max())
        assert err <= 1e-4 * float(want.abs().max()) + 1e-6, name


@pytest.mark.skipif(not _GPU, reason="no CUDA GPU here (or a build without CUDA kernels): the GPU "
                                     "second-derivative test has not run")
def test_gpu_linear_large_batch_second_derivative_of_weight_gradient_is_an_error():
    """A row-major batch large enough that the CUDA forward keeps a transposed copy of x, not x: the
    weight gradient's link to x is gone, so differentiating it again is an error, not a silent
    missing term."""
    torch.manual_seed(0)
    lin = st.SparseLinear(16, 8, sparsity=0.5).cuda()
    x = torch.randn(512, 16, device="cuda", requires_grad=True)
    gv, = torch.autograd.grad((lin(x) ** 2).sum(), lin.values, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        (gv ** 2).sum().backward()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradgradcheck_float64(kind):
    """torch.autograd.gradgradcheck (finite differences of the first derivatives) on float64
    layers: the graph-building backward's second derivatives in x, the values and the bias."""
    torch.manual_seed(2)
    if kind == "linear":
        layer = st.SparseLinear(5, 4, sparsity=0.5, dtype=torch.float64)
        x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

        def f(x, values, bias):
            return st.ops.linear(x, values, bias, layer.indptr, layer.indices, 5, 4)
    else:
        layer = st.SparseConv2d(2, 3, 3, padding=1, sparsity=0.5, dtype=torch.float64)
        x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)

        def f(x, values, bias):
            return st.conv_ops.conv2d(x, values, bias, layer.indptr, layer.indices, 2, 3, 3, padding=1)
    assert torch.autograd.gradgradcheck(f, (x, layer.values, layer.bias))
