"""sparsebp's torch layers under torch.autocast: they run as autocast's float32 operators do (a
float16 / bfloat16 input from the autocast layer before them is cast up, the output is float32),
against a float64 dense torch twin fed the same autocast layer's output. Outside autocast a
bfloat16 input stays a TypeError."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sparsebp.torch as st  # noqa: E402
from sparsebp import _cuda  # noqa: E402

import reference as ref  # noqa: E402

_GPU = _cuda.compiled() and _cuda.device_count() > 0 and torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not _GPU, reason="no CUDA GPU here (or a build without CUDA kernels): the GPU autocast test has not run"))]
KINDS = ["linear", "linear_topk", "meprop", "conv_zeros", "conv_reflect"]


def build(kind: str):
    """(model, index of the sparsebp layer, input): an autocast-able dense layer, a ReLU, ours."""
    torch.manual_seed(3)
    if kind.startswith("conv"):
        mode = kind.split("_")[1]
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1, padding_mode=mode))
        st.sparsify(m, 0.7, layers=["2"])
        return m, torch.randn(4, 3, 9, 9)
    layer = {"linear": lambda: st.SparseLinear(32, 8, sparsity=0.75),
             "linear_topk": lambda: st.SparseLinear(32, 8, sparsity=0.75, grad_topk=3),
             "meprop": lambda: st.MePropLinear(32, 8, k=3, mode="unified")}[kind]()
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), layer), torch.randn(12, 16)


def dense_weight64(layer) -> torch.Tensor:
    """Our layer's weight in float64, from its raw buffers (not through sparsebp)."""
    if isinstance(layer, st.MePropLinear):
        return layer.weight.detach().cpu().double()
    w = torch.from_numpy(ref.dense_from_csr(layer.indptr.cpu().numpy(), layer.indices.cpu().numpy(),
                                            layer.values.detach().cpu().numpy(), layer._csr_shape))
    if isinstance(layer, st.SparseConv2d):
        w = w.reshape(layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
    return w


def reference(model, x, r, kind, dtype):
    """Loss sum(y * r) in float64 after the first layer (run under autocast, as in the model):
    returns y and the gradients of the first layer's parameters, of our layer's weight (dense) and
    bias. meProp kinds keep the top-k of dL/dz (z: the product before the bias), by numpy's sort."""
    first = copy.deepcopy(model[0])
    layer = model[2]
    w = dense_weight64(layer).to(x.device).requires_grad_(True)
    b = layer.bias.detach().double().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=dtype):
        h = F.relu(first(x))
    assert h.dtype == dtype
    h64 = h.double()
    if kind.startswith("conv"):
        if kind == "conv_reflect":
            z = F.conv2d(F.pad(h64, (1, 1, 1, 1), mode="reflect"), w)
        else:
            z = F.conv2d(h64, w, padding=1)
        y = z + b.reshape(1, -1, 1, 1)
    else:
        z = h64 @ w.t()
        if kind != "linear":
            k, mode = (3, "example") if kind == "linear_topk" else (3, "unified")
            z.register_hook(lambda g: torch.from_numpy(ref.topk_masked(g.cpu().numpy(), k, mode)).to(g.device))
        y = z + b
    (y * r.double()).sum().backward()
    return y.detach(), [p.grad for p in first.parameters()], w.grad, b.grad, h64.detach()


def stored(layer, gw):
    """The dense weight gradient at the layer's stored positions."""
    gw = gw.cpu()
    if isinstance(layer, st.MePropLinear):
        return gw
    rows = torch.from_numpy(ref.rows_of(layer.indptr.cpu().numpy()))
    return gw.reshape(gw.shape[0], -1)[rows, layer.indices.cpu().long()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backward_inside", [False, True])
def test_layers_run_float32_under_autocast(isa, kind, dtype, device, backward_inside):
    with torch.autocast(device, dtype=dtype):
        if nn.Linear(2, 2).to(device)(torch.ones(1, 2, device=device)).dtype != dtype:
            pytest.skip(f"this torch's autocast on {device} does not run {dtype}")
    model, x = build(kind)
    model, x = model.to(device), x.to(device)
    out_shape = model(x).shape
    r = torch.randn(out_shape, generator=torch.Generator().manual_seed(5)).to(device)
    y64, g_first, gw, gb, h64 = reference(model, x, r, kind, dtype)
    with torch.autocast(device, dtype=dtype):
        y = model(x)
        if backward_inside:
            (y * r).sum().backward()
    if not backward_inside:
        (y * r).sum().backward()
    assert y.dtype == torch.float32, "our layer runs float32 under autocast"
    layer = model[2]
    k = h64[0].numel() if not kind.startswith("conv") else 8 * 9
    w64 = dense_weight64(layer).to(device)
    if kind.startswith("conv"):
        scale = F.conv2d(F.pad(h64.abs(), (1, 1, 1, 1), mode="reflect" if kind == "conv_reflect" else "constant"),
                         w64.abs()) + layer.bias.detach().double().abs().reshape(1, -1, 1, 1)
    else:
        scale = h64.abs() @ w64.abs().t() + layer.bias.detach().double().abs()
    ref.assert_close(y.detach().cpu(), y64.cpu().numpy(), scale.cpu().numpy(), k, "y")
    # Our layer's parameter gradients: float32 sums of bf16/fp16 inputs against float64.
    gparam = layer.weight.grad if isinstance(layer, st.MePropLinear) else layer.values.grad
    want = stored(layer, gw).cpu().numpy()
    terms = y64[..., 0].numel() * (1 if not kind.startswith("conv") else y64.shape[2] * y64.shape[3])
    ref.assert_close(gparam.cpu(), want, np.abs(want).max(), terms, "weight gradient")
    ref.assert_close(layer.bias.grad.cpu(), gb.cpu().numpy(), np.abs(gb.cpu().numpy()).max(), terms, "bias")
    # The first layer's gradients went back through the low-precision cast: a last-bit flip of a
    # cast entry (the float32 and float64 input gradients round apart) moves them by ~1 ulp.
    for got, want in zip(model[0].parameters(), g_first):
        assert got.grad.dtype == torch.float32
        tol = 2 ** -6 * float(want.abs().max())
        assert float((got.grad.double() - want).abs().max()) <= tol, "first layer's gradient"


@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_input_outside_autocast_is_a_type_error(kind):
    model, x = build(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[1](model[0](x))
    assert h.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="bfloat16"):
        model[2](h)


def test_a_float64_layer_under_autocast_runs_float64():
    """autocast leaves float64 alone: a float64 layer (the reference path) takes a float64 input as
    it is, and a bfloat16 one cast up to its own dtype."""
    torch.manual_seed(0)
    lin = st.SparseLinear(6, 4, sparsity=0.5, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    w = dense_weight64(lin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        yb = lin(x.bfloat16())
    assert y.dtype == yb.dtype == torch.float64
    assert torch.allclose(y, x @ w.t() + lin.bias.detach(), atol=1e-12)
    assert torch.allclose(yb, x.bfloat16().double() @ w.t() + lin.bias.detach(), atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv_zeros"])
def test_torch_compile_under_autocast(kind):
    """torch.compile (aot_eager: tracing, fake tensors, the registered operators) under autocast:
    the float32 output against the float64 twin, and the gradients reach our layer."""
    model, x = build(kind)
    r = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(5))
    y64, _, gw, _, _ = reference(model, x, r, kind, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.compile(model, backend="aot_eager")(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y.double(), y64, atol=1e-4, rtol=1e-4)
    (y * r).sum().backward()
    want = stored(model[2], gw)
    assert torch.allclose(model[2].values.grad.double(), want, atol=1e-4 * float(want.abs().max()) + 1e-6)
