"""sparsebp.torch.SparseLinear and the sparsebp:: operators against dense torch computed in float64,
on every available ISA."""
import copy
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import sparsebp.torch as st  # noqa: E402

import reference as ref  # noqa: E402

U32 = 2.0 ** -24


def dense_ref(m):
    """The layer's weight in float64, built from the raw buffers (not through sparsebp)."""
    counts = (m.indptr[1:] - m.indptr[:-1]).numpy()
    rows = np.repeat(np.arange(m.out_features), counts)
    w = np.zeros((m.out_features, m.in_features))
    w[rows, m.indices.numpy().astype(np.int64)] = m.values.detach().double().numpy()
    return torch.from_numpy(w), torch.from_numpy(rows), m.indices.long()


def close(got, want, scale, k, what):
    tol = 8 * U32 * np.sqrt(max(k, 1)) * (scale + 1e-30) + 1e-30
    err = (got.double() - want).abs()
    assert bool((err <= tol).all()), f"{what}: max error {err.max():.3e}, tolerance {tol.min():.3e}..{tol.max():.3e}"


def layer(rng_seed=0, in_f=37, out_f=29, sparsity=0.7, bias=True):
    g = torch.Generator().manual_seed(rng_seed)
    return st.SparseLinear(in_f, out_f, bias, sparsity=sparsity, generator=g)


@pytest.mark.parametrize("batch", [1, 7, 16, 33, 130])
@pytest.mark.parametrize("layout", ["rows", "batch_inner"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients(isa, batch, layout, bias):
    torch.manual_seed(batch)
    m = layer(batch, bias=bias)
    x = torch.randn(batch, 37)
    if layout == "batch_inner":
        x = x.t().contiguous().t()
    x.requires_grad_()
    y = m(x)
    w, rows, cols = dense_ref(m)
    x64 = x.detach().double()
    want = x64 @ w.t() + (m.bias.detach().double() if bias else 0)
    close(y.detach(), want, x64.abs() @ w.abs().t() + (m.bias.detach().double().abs() if bias else 0), 37, "forward")
    if batch > 1:
        assert (y.stride(0) == 1) == (layout == "batch_inner")
    g = torch.randn(batch, 29)
    y.backward(g)
    g64 = g.double()
    close(x.grad, g64 @ w, g64.abs() @ w.abs(), 29, "grad_input")
    full, fscale = g64.t() @ x64, g64.abs().t() @ x64.abs()
    close(m.values.grad, full[rows, cols], fscale[rows, cols], batch, "grad_values")
    if bias:
        close(m.bias.grad, g64.sum(0), g64.abs().sum(0), batch, "grad_bias")


def test_leading_dimensions_and_1d_input(isa):
    m = layer(3)
    x = torch.randn(2, 3, 5, 37)
    y = m(x)
    assert y.shape == (2, 3, 5, 29)
    w, _, _ = dense_ref(m)
    ref = x.double() @ w.t() + m.bias.detach().double()
    assert torch.allclose(y.double(), ref, atol=1e-5)
    v = torch.randn(37)
    assert m(v).shape == (29,)
    assert torch.allclose(m(v).double(), v.double() @ w.t() + m.bias.detach().double(), atol=1e-5)


def test_empty_batch(isa):
    m = layer(4)
    x = torch.randn(0, 37, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 29)
    y.sum().backward()
    assert x.grad.shape == (0, 37)
    assert torch.equal(m.values.grad, torch.zeros_like(m.values))


def test_gradcheck_float64():
    m = layer(5, in_f=9, out_f=7, sparsity=0.5).double()
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    f = lambda a, v, b: st.ops.linear(a, v, b, m.indptr, m.indices, 9, 7)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, m.values, m.bias))


@pytest.mark.parametrize("layout", ["rows", "batch_inner"])
def test_operator_path_against_float64(isa, monkeypatch, layout):
    """The registered operators and their registered autograd (what tracing uses; eager calls run
    the same functions without the operator machinery) against float64, and gradcheck."""
    from sparsebp.torch import _ops

    monkeypatch.setattr(_ops, "eager", lambda *tensors: False)
    m = layer(11)
    x0 = torch.randn(33, 37)
    x = (x0.t().contiguous().t() if layout == "batch_inner" else x0.clone()).requires_grad_()
    y = m(x)
    g = torch.randn(33, 29)
    y.backward(g)
    w64 = m.weight.detach().double()
    assert torch.allclose(y.double(), x0.double() @ w64.T + m.bias.detach().double(), atol=1e-5)
    assert torch.allclose(x.grad.double(), g.double() @ w64, atol=1e-5)
    gw = (g.double().T @ x0.double())[m.mask()]
    assert torch.allclose(m.values.grad.double(), gw, atol=1e-4)
    assert torch.allclose(m.bias.grad.double(), g.double().sum(0), atol=1e-5)
    m64 = layer(5, in_f=9, out_f=7, sparsity=0.5).double()
    x64 = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, v, b: st.ops.linear(a, v, b, m64.indptr, m64.indices, 9, 7),
                                    (x64, m64.values, m64.bias))


def test_torch_compile_traces_the_operators():
    """torch.compile (aot_eager: tracing, fake tensors, the operators' autograd) against dense float64 torch."""
    from compiled_reference import check_compiled_against_dense

    m = layer(12)
    dense = nn.Linear(37, 29).double()
    with torch.no_grad():
        dense.weight.copy_(m.weight)
        dense.bias.copy_(m.bias)
    check_compiled_against_dense(m, dense, torch.randn(16, 37, requires_grad=True))


def test_opcheck():
    m = layer(6)
    cases = [torch.randn(17, 37), torch.randn(37, 17).t(), torch.randn(1, 37)]
    for x in cases:
        for b in (m.bias, None):
            for req in (True, False):
                torch.library.opcheck(torch.ops.sparsebp.linear.default,
                                      (x.clone().requires_grad_(req), m.values, b, m.indptr, m.indices, 29))
    for flags in [(True, True, True), (False, True, False), (True, False, True)]:
        torch.library.opcheck(torch.ops.sparsebp.linear_backward.default,
                              (torch.randn(17, 29), torch.randn(17, 37), m.values.detach(), m.indptr, m.indices, 29,
                               *flags))


def test_no_input_gradient_when_not_needed():
    m = layer(7)
    x = torch.randn(8, 37)  # requires_grad=False
    m(x).sum().backward()
    assert x.grad is None and m.values.grad is not None
    with torch.no_grad():
        y = m(torch.randn(8, 37, requires_grad=True))
    assert not y.requires_grad
    # Frozen weights: only the input gradient.
    m.values.requires_grad_(False)
    m.bias.requires_grad_(False)
    xr = torch.randn(8, 37, requires_grad=True)
    m(xr).sum().backward()
    w, _, _ = dense_ref(m)
    assert torch.allclose(xr.grad.double(), torch.ones(8, 29, dtype=torch.float64) @ w, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_without_gradients_matches_dense(isa, bias):
    # No gradient wanted (torch.no_grad(), or nothing requires grad): the kernel runs without the
    # autograd Function; the result must be the same as with it, and as dense float64.
    m = layer(13, bias=bias)
    w, _, _ = dense_ref(m)
    b = m.bias.detach().double() if bias else 0.0
    for x in (torch.randn(19, 37), torch.randn(37, 19).t(), torch.randn(1, 37)):
        want = x.double() @ w.T + b
        with_grad = m(x)
        assert with_grad.requires_grad  # (the parameters require grad: the autograd path)
        with torch.no_grad():
            y = m(x)
        assert not y.requires_grad and y.grad_fn is None
        assert torch.allclose(y.double(), want, atol=1e-5)
        assert torch.equal(y, with_grad.detach())
    frozen = layer(13, bias=bias).requires_grad_(False)
    x = torch.randn(19, 37)
    y = frozen(x)
    assert not y.requires_grad and torch.allclose(y.double(), x.double() @ w.T + b, atol=1e-5)
    with torch.no_grad():  # float64: the reference path
        y64 = copy.deepcopy(m).double()(x.double())
    assert y64.dtype == torch.float64 and torch.allclose(y64, x.double() @ w.T + b, atol=1e-10)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_optimizer_steps_match_masked_dense_and_never_regrow(opt):
    torch.manual_seed(0)
    m = layer(8, sparsity=0.8)
    mask = m.mask()
    dense = nn.Linear(37, 29)
    with torch.no_grad():
        dense.weight.copy_(m.weight)
        dense.bias.copy_(m.bias)
    mk = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
          "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)}[opt]
    o1, o2 = mk(m.parameters()), mk(dense.parameters())
    for step in range(5):
        x, t = torch.randn(16, 37), torch.randn(16, 29)
        for mod, o in ((m, o1), (dense, o2)):
            o.zero_grad()
            loss = ((mod(x) - t) ** 2).mean()
            loss.backward()
            if mod is dense:
                dense.weight.grad *= mask  # the masked-dense reference
            o.step()
            if mod is dense:
                with torch.no_grad():
                    dense.weight *= mask
    assert torch.equal(m.mask(), mask)
    assert torch.allclose(m.weight, dense.weight.detach(), atol=1e-5)
    assert torch.allclose(m.bias, dense.bias, atol=1e-5)


def test_state_dict_deepcopy_pickle_to():
    m = layer(9)
    x = torch.randn(5, 37)
    y = m(x)
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torch.equal(other(x), y)
    fresh = st.SparseLinear(37, 29, sparsity=0.3)  # another structure, another nnz
    fresh.load_state_dict(m.state_dict())
    assert fresh.nnz == m.nnz and torch.equal(fresh(x), y)
    assert set(m.state_dict()) == {"values", "bias", "indptr", "indices"}
    d = copy.deepcopy(m).to(torch.float64)
    assert d.values.dtype == torch.float64 and d.indices.dtype == torch.int32
    assert torch.allclose(d(x.double()).float(), y, atol=1e-5)


def test_from_dense_and_to_dense():
    lin = nn.Linear(37, 29)
    m = st.SparseLinear.from_dense(lin, sparsity=0.75)
    assert m.nnz == round(0.25 * 37 * 29)
    kept = lin.weight.detach().abs()[m.mask()]
    dropped = lin.weight.detach().abs()[~m.mask()]
    assert kept.min() >= dropped.max()
    assert torch.equal(m.weight, lin.weight.detach() * m.mask())
    back = m.to_dense()
    assert isinstance(back, nn.Linear) and torch.equal(back.weight, m.weight)


def test_bad_inputs():
    m = layer(10)
    with pytest.raises(ValueError, match=r"x must have shape \(\*, 37\); got \(4, 36\)"):
        m(torch.randn(4, 36))
    with pytest.raises(TypeError, match="x must be float32"):
        m(torch.ones(4, 37, dtype=torch.int64))
    with pytest.raises(TypeError, match="values must have x's dtype"):
        m(torch.randn(4, 37, dtype=torch.float64))
    with pytest.raises(ValueError, match="meta"):
        m(torch.empty(4, 37, device="meta"))
    with pytest.raises(ValueError, match="exactly one of sparsity= .* or mask="):
        st.SparseLinear(4, 3)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        st.SparseLinear(4, 3, sparsity=1.0)
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 4\)"):
        st.SparseLinear(4, 3, mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a boolean tensor"):
        st.SparseLinear(4, 3, mask=torch.ones(3, 4))
    with pytest.raises(TypeError, match="in_features must be an int"):
        st.SparseLinear(4.0, 3, sparsity=0.5)


def test_functional_linear_checks_its_structure_arguments():
    """st.ops.linear: a float or 2-D indptr is refused even when its contents equal those of a
    structure validated before with the same indices tensor (the cache used to match by contents
    only and let it through); in/out_features must be ints."""
    ip = torch.tensor([0, 2, 3])
    ix = torch.tensor([0, 3, 1], dtype=torch.int32)
    v, b, x = torch.randn(3), torch.randn(2), torch.randn(5, 4)
    w = torch.zeros(2, 4)
    w[0, 0], w[0, 3], w[1, 1] = v[0], v[1], v[2]
    assert torch.allclose(st.ops.linear(x, v, b, ip, ix, 4, 2), x @ w.T + b, atol=1e-6)  # fills the cache
    with pytest.raises(TypeError, match="indptr must be an integer tensor; got float32"):
        st.ops.linear(x, v, b, ip.float(), ix, 4, 2)
    with pytest.raises(ValueError, match=r"indptr must be 1-D; got shape \(1, 3\)"):
        st.ops.linear(x, v, b, ip.view(1, 3), ix, 4, 2)
    with pytest.raises(TypeError, match="out_features must be an int >= 0; got '2'"):
        st.ops.linear(x, v, b, ip, ix, 4, "2")
    assert torch.allclose(st.ops.linear(x, v, b, ip.int(), ix, 4, 2), x @ w.T + b, atol=1e-6)  # int32 is fine


def test_bad_state_dicts_are_errors_and_leave_the_layer_usable():
    m = layer(11)
    good = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(3, 37)
    y = m(x)
    bad_cases = {
        "indices out of range": dict(indices=torch.full_like(good["indices"], 37)),
        "unsorted": dict(indices=good["indices"].flip(0)),
        "indptr length": dict(indptr=good["indptr"][:-1]),
        "values length": dict(values=good["values"][:-1]),
        "nan": dict(values=torch.full_like(good["values"], float("nan"))),
    }
    for what, patch in bad_cases.items():
        with pytest.raises(ValueError):
            m.load_state_dict({**good, **patch})
        assert torch.equal(m(x), y), what
    with pytest.raises(TypeError):
        m.load_state_dict({**good, "indices": good["indices"].float()})


@pytest.mark.parametrize("layout", ["row", "batch_inner"])
def test_linear_outputs_are_not_views_so_inplace_ops_work(layout):
    """Outputs in both layouts are tensors of their own, so an in-place ReLU after the layer works
    (as after nn.Linear) and the gradients match dense torch's."""
    torch.manual_seed(8)
    lin = st.SparseLinear(8, 6, sparsity=0.5)
    dense = torch.nn.Linear(8, 6)
    with torch.no_grad():
        dense.weight.copy_(lin.weight)
        dense.bias.copy_(lin.bias)
    x0 = torch.randn(5, 8)
    x = (x0.t().contiguous().t() if layout == "batch_inner" else x0.clone()).requires_grad_()
    xd = x0.clone().requires_grad_()
    y = torch.relu_(lin(x))
    yd = torch.relu_(dense(xd))
    assert y._base is None
    w = torch.arange(30.0).reshape(5, 6)
    (y * w).sum().backward()
    (yd * w).sum().backward()
    torch.testing.assert_close(y, yd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.values.grad, dense.weight.grad[lin.mask()], rtol=1e-5, atol=1e-5)


def test_backward_runs_on_the_structure_its_forward_ran_on(isa):
    """The structure is validated once per forward and kept for the backward: index buffers
    rewritten in place between the forward and the backward do not change that backward (its
    gradients are those of the product the forward computed, against float64), and the next
    forward follows the new structure."""
    torch.manual_seed(5)
    m = layer(5)
    x = torch.randn(6, 37, requires_grad=True)
    w_old, rows_old, cols_old = dense_ref(m)
    y = m(x)
    new_ix = ref.moved_indices(np.random.default_rng(5), m.indptr.numpy(), 37, m.indices.numpy())
    with torch.no_grad():
        m.indices.copy_(torch.from_numpy(new_ix))
    g = torch.randn(6, 29)
    y.backward(g)
    g64, x64 = g.double(), x.detach().double()
    close(x.grad, g64 @ w_old, g64.abs() @ w_old.abs(), 29, "grad_input (the forward's structure)")
    full, fscale = g64.t() @ x64, g64.abs().t() @ x64.abs()
    close(m.values.grad, full[rows_old, cols_old], fscale[rows_old, cols_old], 6, "grad_values (the forward's)")
    w_new, _, _ = dense_ref(m)
    want = x64 @ w_new.t() + m.bias.detach().double()
    close(m(x).detach(), want, x64.abs() @ w_new.abs().t() + m.bias.detach().double().abs(), 37, "next forward")
