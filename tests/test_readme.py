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
