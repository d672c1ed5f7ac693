"""The example CNN, BatchInner, and the transfer-learning example (a smoke run)."""
import copy
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
import sparsebp.torch as st  # noqa: E402
from sparsebp.torch.models import SmallResNet  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_batch_inner_module_is_identity_in_value_and_gradient():
    x = torch.randn(5, 3, 4, 6, requires_grad=True)
    y = st.BatchInner()(x)
    assert st.conv_ops.is_batch_inner(y) and torch.equal(y, x)
    g = torch.randn(5, 3, 4, 6)
    y.backward(g)
    assert torch.equal(x.grad, g)
    with pytest.raises(ValueError, match="4-D"):
        st.BatchInner()(torch.randn(3, 4))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced", "float64"])
def test_batch_inner_gradient_comes_back_in_the_input_layout(isa, layout):
    """The gradient reaching the op before BatchInner has that op's layout (torch's element-wise
    backward over mixed layouts is several times slower); values equal."""
    x0 = torch.randn(6, 5, 7, 9, dtype=torch.float64 if layout == "float64" else torch.float32)
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    x = (torch.randn(6, 5, 7, 12)[..., 1:10] if layout == "sliced" else x0).detach().requires_grad_()
    y = st.BatchInner()(x)
    assert st.conv_ops.is_batch_inner(y) and torch.equal(y, x)
    g = st.batch_inner(torch.randn(6, 5, 7, 9, dtype=x.dtype))
    y.backward(g)
    assert torch.equal(x.grad, g)
    if layout == "sliced":  # not dense in memory: an (N, C, H, W)-contiguous gradient
        assert x.grad.is_contiguous()
    else:
        assert x.grad.stride() == x.stride()
    # batch_inner itself: differentiable the same way, and no copy when already batch-innermost
    x.grad = None
    st.batch_inner(x).backward(g)
    assert torch.equal(x.grad, g)
    assert st.batch_inner(y) is y


def test_sparse_small_resnet_matches_dense_with_the_same_mask():
    """The sparse model (layout switched after the stem) against the dense model holding the
    pruned weights, computed in float64 by torch: outputs and every gradient."""
    torch.manual_seed(0)
    dense = SmallResNet(widths=(8, 16), blocks=1)
    sparse = copy.deepcopy(dense)
    report = st.sparsify(sparse, 0.8, layers=SmallResNet.prunable)
    assert len(report.converted) == 5  # 2 + 2 convs + 1 shortcut; stem and fc stay dense
    sparse.layout = st.BatchInner()
    with torch.no_grad():
        for name, m in sparse.named_modules():
            if isinstance(m, st.SparseConv2d):
                dense.get_submodule(name).weight.copy_(m.weight)
    d64 = copy.deepcopy(dense).double()
    x = torch.randn(6, 1, 28, 28)
    y = torch.randint(0, 10, (6,))
    out = sparse(x)
    ref = d64(x.double())
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-5)
    torch.nn.functional.cross_entropy(out, y).backward()
    torch.nn.functional.cross_entropy(ref, y).backward()
    for name, m in sparse.named_modules():
        if isinstance(m, st.SparseConv2d):
            gref = d64.get_submodule(name).weight.grad.reshape(m.out_channels, -1)
            rows = torch.repeat_interleave(torch.arange(m.out_channels), (m.indptr[1:] - m.indptr[:-1]).long())
            assert torch.allclose(m.values.grad.double(), gref[rows, m.indices.long()], rtol=1e-3, atol=1e-5), name
    assert torch.allclose(sparse.stem.weight.grad.double(), d64.stem.weight.grad, rtol=1e-3, atol=1e-5)


def test_small_resnet_arguments():
    with pytest.raises(ValueError, match="widths"):
        SmallResNet(widths=())
    with pytest.raises(ValueError, match="blocks"):
        SmallResNet(blocks=0)


def test_transfer_learning_example_runs(tmp_path):
    """The example end to end on a few batches: pretrain, prune with torch.nn.utils.prune, save,
    from_pruned, fine-tune, table."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "transfer_learning.py"), "--quick",
                           "--pretrain-epochs", "1", "--epochs", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| sparsebp 95% |" in proc.stdout and "| dense (torch) |" in proc.stdout
    assert (tmp_path / "pruned_90.pt").exists() and (tmp_path / "pruned_95.pt").exists()
    assert "overall density 0.0500" in proc.stdout
