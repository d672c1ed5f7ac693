"""Sparse gradients in PyTorch: MePropLinear and SparseLinear(grad_topk=...) against dense torch in
float64 with the gradient masked to the top-k chosen by numpy's sort."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import sparsebp.torch as st  # noqa: E402
from sparsebp import algorithms as alg  # noqa: E402

import reference as ref  # noqa: E402


@pytest.mark.parametrize("mode", ["example", "unified"])
@pytest.mark.parametrize("lead", [(2, 9), (18,), ()])
def test_meprop_linear_against_masked_float64(isa, mode, lead):
    """(*, in) inputs: 3-D, 2-D (no reshapes) and 1-D."""
    torch.manual_seed(0)
    lin = st.MePropLinear(37, 50, k=6, mode=mode)
    x = torch.randn(*lead, 37, requires_grad=True)
    y = lin(x)
    assert y.shape == (*lead, 50)
    w64 = lin.weight.detach().double()
    assert torch.allclose(y.double(), x.detach().double() @ w64.T + lin.bias.detach().double(), atol=1e-5)
    g = torch.randn(*lead, 50)
    y.backward(g)
    g2 = g.reshape(-1, 50).double().numpy()
    gh = ref.topk_masked(g2, 6, mode)
    x2 = x.detach().reshape(-1, 37).double().numpy()
    n = x2.shape[0]
    assert x.grad.shape == x.shape
    ref.assert_close(x.grad.reshape(-1, 37), gh @ w64.numpy(), np.abs(gh) @ np.abs(w64.numpy()), 50, "dx")
    ref.assert_close(lin.weight.grad, gh.T @ x2, np.abs(gh).T @ np.abs(x2), n, "dW")
    ref.assert_close(lin.bias.grad, g2.sum(0), np.abs(g2).sum(0), n, "db (full gradient)")


@pytest.mark.parametrize("mode", ["example", "unified"])
@pytest.mark.parametrize("lead", [(11,), (2, 6), ()])
def test_sparse_linear_with_grad_topk_against_masked_float64(isa, mode, lead):
    """(*, in) inputs: 2-D (no reshapes), 3-D and 1-D."""
    torch.manual_seed(1)
    lin = st.SparseLinear(40, 30, sparsity=0.8, grad_topk=4, grad_mode=mode)
    x = torch.randn(*lead, 40, requires_grad=True)
    y = lin(x)
    assert y.shape == (*lead, 30)
    g = torch.randn(*lead, 30)
    y.backward(g)
    wd = lin.weight.detach().double().numpy()
    g2 = g.reshape(-1, 30).double().numpy()
    gh = ref.topk_masked(g2, 4, mode)
    x2 = x.detach().reshape(-1, 40).double().numpy()
    assert x.grad.shape == x.shape
    ref.assert_close(x.grad.reshape(-1, 40), gh @ wd, np.abs(gh) @ np.abs(wd), 30, "dx")
    rows = np.repeat(np.arange(30), np.diff(lin.indptr.numpy()))
    cols = lin.indices.numpy()
    n = x2.shape[0]
    ref.assert_close(lin.values.grad, (gh.T @ x2)[rows, cols], (np.abs(gh).T @ np.abs(x2))[rows, cols], n, "dvalues")
    ref.assert_close(lin.bias.grad, g2.sum(0), np.abs(g2).sum(0), n, "db")


def test_policy_subclass_is_kept_by_the_torch_layers(isa):
    """A policy subclass runs its own select in MePropLinear and SparseLinear (clone used to give
    back the built-in base: plain top-k instead)."""

    class LastColumns(alg.MeProp):
        def select(self, g):
            k = self.k_for(g.shape[1])
            cols = np.tile(np.arange(g.shape[1] - k, g.shape[1], dtype=np.int32), (g.shape[0], 1))
            return alg.Selection("example", cols, g)

    torch.manual_seed(3)
    for lin in (st.MePropLinear(12, 8, policy=LastColumns(k=3)),
                st.SparseLinear(12, 8, sparsity=0.5, grad_policy=LastColumns(k=3))):
        pol = lin.policy if isinstance(lin, st.MePropLinear) else lin.grad_policy
        assert type(pol) is LastColumns
        x = torch.randn(5, 12, requires_grad=True)
        g = torch.randn(5, 8)
        lin(x).backward(g)
        gh = g.double().clone()
        gh[:, :5] = 0
        w = lin.weight.detach().double()
        assert torch.allclose(x.grad.double(), gh @ w, atol=1e-5)


@pytest.mark.parametrize("mode", ["example", "unified"])
def test_sparse_linear_with_grad_topk_follows_an_in_place_structure_change(isa, mode):
    """The backward takes the layer's validated structure from the cache its forward uses: after the
    index buffers are rewritten in place (as load_state_dict or a DDP broadcast does), the next
    step's gradients follow the new structure (against float64), and a structure that is no longer
    valid is a clear ValueError, not a stale or out-of-bounds read."""
    torch.manual_seed(4)
    lin = st.SparseLinear(24, 18, sparsity=0.75, grad_topk=5, grad_mode=mode)
    x = torch.randn(9, 24, requires_grad=True)
    lin(x).sum().backward()  # a first step: the structure is now cached
    new_ix = ref.moved_indices(np.random.default_rng(4), lin.indptr.numpy(), 24, lin.indices.numpy())
    with torch.no_grad():
        lin.indices.copy_(torch.from_numpy(new_ix))
    lin.zero_grad()
    x.grad = None
    g = torch.randn(9, 18)
    lin(x).backward(g)
    wd = ref.dense_from_csr(lin.indptr.numpy(), new_ix, lin.values.detach().double().numpy(), (18, 24))
    gh = ref.topk_masked(g.double().numpy(), 5, mode)
    x2 = x.detach().double().numpy()
    ref.assert_close(x.grad, gh @ wd, np.abs(gh) @ np.abs(wd), 18, "dx")
    rows = ref.rows_of(lin.indptr.numpy())
    ref.assert_close(lin.values.grad, (gh.T @ x2)[rows, new_ix], (np.abs(gh).T @ np.abs(x2))[rows, new_ix], 9,
                     "dvalues")
    with torch.no_grad():
        lin.indices[0] = 24  # out of range
    with pytest.raises(ValueError, match="indices"):
        lin(x).sum().backward()


def test_gradcheck_float64():
    torch.manual_seed(2)
    lin = st.MePropLinear(5, 7, k=3).double()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: lin(a), (x,))
    sp = st.SparseLinear(6, 8, sparsity=0.5, grad_topk=2).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: sp(a), (x,))


def test_no_grad_paths_and_training_steps():
    torch.manual_seed(3)
    model = torch.nn.Sequential(st.MePropLinear(20, 32, policy=alg.MSBP(k=4, alpha=0.5)), torch.nn.ReLU(),
                                st.SparseLinear(32, 16, sparsity=0.5, grad_topk=3), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(64, 20)
    y = torch.randint(0, 4, (64,))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert model[0].policy.memory is not None  # MSBP kept its memory on the layer
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    frozen = torch.randn(5, 20)  # input needing no gradient: fine, no input gradient
    model(frozen).sum().backward()


def test_meprop_arguments():
    with pytest.raises(ValueError, match="needs k, ratio or policy"):
        st.MePropLinear(3, 4)
    with pytest.raises(ValueError, match="not both"):
        st.MePropLinear(3, 4, k=2, policy=alg.MeProp(k=2))
    with pytest.raises(TypeError, match="policy"):
        st.SparseLinear(3, 4, sparsity=0.5, grad_policy="topk")
    lin = torch.nn.Linear(6, 5)
    mp = st.MePropLinear.from_linear(lin, ratio=0.4)
    assert torch.equal(mp.weight, lin.weight) and mp.policy.k_for(5) == 2


@pytest.mark.parametrize("grad", [True, False])
def test_meprop_linear_bad_inputs(grad):
    """A wrong input dtype or width is a TypeError / ValueError naming the input (it was torch's
    RuntimeError from the matmul or the reshape), with and without autograd."""
    m = st.MePropLinear(6, 5, k=2)
    for x, err, what in ((torch.randn(3, 6, dtype=torch.float64), TypeError, "dtype torch.float32"),
                         (torch.randn(3, 6).half(), TypeError, "dtype torch.float32"),
                         (torch.ones(3, 6, dtype=torch.int64), TypeError, "dtype torch.float32"),
                         (torch.randn(3, 7), ValueError, r"\(\*, 6\); got \(3, 7\)"),
                         (torch.tensor(1.0), ValueError, r"\(\*, 6\); got \(\)")):
        with torch.set_grad_enabled(grad), pytest.raises(err, match=what):
            m(x.requires_grad_(grad and x.is_floating_point()))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # nn.Linear's own init warns
def test_meprop_linear_degenerate_shapes():
    """in_features = 0 or out_features = 0 behave as nn.Linear: a bias-only output, empty gradients."""
    torch.manual_seed(0)
    for n_in, n_out in ((0, 4), (4, 0)):
        m = st.MePropLinear(n_in, n_out, k=2)
        x = torch.randn(3, n_in, requires_grad=True)
        y = m(x)
        want = torch.nn.functional.linear(x.detach(), m.weight.detach(), m.bias.detach())
        assert torch.equal(y.detach(), want)
        y.sum().backward()
        assert x.grad.shape == (3, n_in) and m.weight.grad.shape == (n_out, n_in)
        assert torch.equal(m.bias.grad, torch.full((n_out,), 3.0))


def test_sparse_meprop_linear_functional_checks_its_arguments():
    """st.meprop.sparse_meprop_linear (SparseLinear's grad_topk forward): a missing or foreign policy
    and a wrong input width are TypeError / ValueError (AttributeError and torch's reshape error
    before)."""
    f = st.meprop.sparse_meprop_linear
    ip, ix = torch.tensor([0, 2, 3]), torch.tensor([0, 3, 1], dtype=torch.int32)
    v, b, x = torch.randn(3, requires_grad=True), torch.randn(2), torch.randn(5, 4)
    for pol in (None, object()):
        with pytest.raises(TypeError, match="policy must be a sparsebp.algorithms policy"):
            f(x, v, b, ip, ix, 4, 2, pol)
    with pytest.raises(ValueError, match=r"x must have shape \(\*, 4\); got \(5, 3\)"):
        f(torch.randn(5, 3), v, b, ip, ix, 4, 2, alg.MeProp(k=1))
    y = f(x, v, b, ip, ix, 4, 2, alg.MeProp(k=2))  # k = out: the dense gradient
    y.sum().backward()
    w = torch.zeros(2, 4)
    w[0, 0], w[0, 3], w[1, 1] = v.detach()
    assert torch.allclose(y, x @ w.T + b, atol=1e-6)
    assert torch.allclose(v.grad, torch.stack([x[:, 0].sum(), x[:, 3].sum(), x[:, 1].sum()]), atol=1e-5)
