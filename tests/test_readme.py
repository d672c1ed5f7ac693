"""The README's NumPy example runs as written, and computes what it says (checked against float64)."""
import os
import re

import numpy as np

import reference as ref


def test_readme_numpy_example():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
    with open(path) as f:
        text = f.read()
    code = re.search(r"## NumPy example\n\n```python\n(.*?)```", text, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    W, x, y, g, b = ns["W"], ns["x"], ns["y"], ns["g"], ns["b"]
    before = ns["dense"]
    yr, ys = ref.linear_forward(x, W.indptr, W.indices, before[before != 0], W.shape, b)
    ref.assert_close(y, yr, ys, x.shape[1], "README forward")
    (gi, gis), (gv, gvs), _ = ref.linear_backward(g, x, W.indptr, W.indices, before[before != 0], W.shape)
    ref.assert_close(ns["dx"], gi, gis, W.shape[0], "README grad_input")
    ref.assert_close(ns["dW_values"], gv, gvs, x.shape[0], "README grad_values")
    # The update step changed the values, not the structure.
    np.testing.assert_array_equal(W.mask(), before != 0)


def test_readme_torch_example(tmp_path, monkeypatch):
    import pytest

    torch = pytest.importorskip("torch")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
    with open(path) as f:
        text = f.read()
    code = re.search(r"## PyTorch example\n.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    import sparsebp.torch as st

    model, model2 = ns["model"], ns["model2"]
    assert [type(m) for m in model2] == [st.SparseConv2d, torch.nn.ReLU, torch.nn.Flatten, st.SparseLinear]
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), model2(x))
    nnz = sum(m.nnz for m in model if hasattr(m, "nnz"))
    total = 32 * 9 + 32 * 28 * 28 * 10
    assert nnz == round(0.1 * total)


def test_readme_sparse_gradient_example(tmp_path, monkeypatch):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
    with open(path) as f:
        text = f.read()
    code = re.search(r"## Sparse gradients: meProp, MSBP, meSimp \(NumPy\)\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    g, W, ex, un = ns["g"], ns["W"], ns["ex"], ns["un"]
    order = np.argsort(-np.abs(g), axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(ns["idx"], np.sort(order, axis=1))
    gh = np.zeros(g.shape)
    np.put_along_axis(gh, order, np.take_along_axis(g, order, 1), 1)
    ref.assert_close(ex.input, gh @ W.astype(np.float64), np.abs(gh) @ np.abs(W.astype(np.float64)), 500, "dx")
    assert np.count_nonzero(np.abs(un.weight).sum(1)) == 20
    assert len(ns["history"]) == 1 and np.isfinite(ns["history"][0]["loss"])
    model, model2, X = ns["model"], ns["model2"], ns["X"][:64]
    assert repr(model2) == repr(model)
    model.eval(), model2.eval()
    assert np.array_equal(model2.forward(X), model.forward(X))


def test_readme_vrpge_example():
    from sparsebp.datasets import load_mnist

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
    with open(path) as f:
        text = f.read()
    code = re.search(r"## Learned masks: VR-PGE.*?```python\n(.*?)```", text, re.S).group(1)
    code = code.replace("vr.fit(X, y, epochs=5, batch=128)", "vr.fit(X, y, epochs=5, batch=128, progress=False)")
    X, y = load_mnist("train", limit=640)
    ns: dict = {"X": X, "y": y}
    exec(compile(code, "README.md", "exec"), ns)
    small, mask = ns["small"], ns["mask"]
    # the compact model computes what the masked one does, with only the kept units
    np.testing.assert_allclose(small.forward(X[:50]), ns["vr"].forward(X[:50], mask), rtol=1e-5, atol=1e-5)
    assert [m.out_features for m in small.layers[:-1:2]] == [int(m.sum()) for m in mask]
