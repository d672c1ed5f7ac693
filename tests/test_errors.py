"""Bad input: a clear TypeError / ValueError naming the argument, never a crash or a wrong answer."""
import numpy as np
import pytest

import sparsebp
from sparsebp import ops


@pytest.fixture
def W():
    return sparsebp.CSR([0, 2, 3], [0, 2, 1], np.array([1.0, 2.0, 3.0], np.float32), (2, 3))


def test_wrong_dtypes(W):
    x = np.ones((4, 3), np.float64)
    with pytest.raises(TypeError, match=r"x must be float32 with shape \(batch, 3\); got float64 \(4, 3\)"):
        ops.linear_forward(x, W)
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        ops.linear_forward([[1.0, 2.0, 3.0]], W)
    with pytest.raises(TypeError, match="weight must be a sparsebp.CSR"):
        ops.linear_forward(np.ones((4, 3), np.float32), np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match="bias must be a float32"):
        ops.linear_forward(np.ones((4, 3), np.float32), W, np.ones(2))
    with pytest.raises(TypeError, match="grad_output must be float32"):
        ops.linear_backward(np.ones((4, 2), np.float16), np.ones((4, 3), np.float32), W)
    with pytest.raises(TypeError, match="values must be float32"):
        ops.linear_forward(np.ones((4, 3), np.float32), W, values=np.ones(3))
    with pytest.raises(TypeError, match="out must be float32"):
        ops.linear_forward(np.ones((4, 3), np.float32), W, out=np.ones((4, 2)))


def test_wrong_shapes(W):
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3\); got \(4, 5\)"):
        ops.linear_forward(np.ones((4, 5), np.float32), W)
    with pytest.raises(ValueError, match=r"x must have shape"):
        ops.linear_forward(np.ones(3, np.float32), W)
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\); got \(3,\)"):
        ops.linear_forward(np.ones((4, 3), np.float32), W, np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"grad_output must have shape \(4, 2\); got \(5, 2\)"):
        ops.linear_backward(np.ones((5, 2), np.float32), np.ones((4, 3), np.float32), W)
    with pytest.raises(ValueError, match=r"out must have shape \(4, 2\); got \(4, 3\)"):
        ops.linear_forward(np.ones((4, 3), np.float32), W, out=np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"values must have shape \(3,\)"):
        ops.linear_forward(np.ones((4, 3), np.float32), W, values=np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"grad_values must have shape \(3,\)"):
        ops.linear_backward(np.ones((4, 2), np.float32), np.ones((4, 3), np.float32), W,
                            grad_values=np.ones(2, np.float32))


def test_outputs_must_be_writeable_and_separate(W):
    x = np.ones((4, 3), np.float32)
    ro = np.zeros((4, 2), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        ops.linear_forward(x, W, out=ro)
    buf = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match="out must not share memory with x"):
        ops.linear_forward(buf[:, :3], W, out=buf[:, 3:])
    g = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match="grad_input must not share memory with x"):
        ops.linear_backward(g, x, W, grad_input=x)
    with pytest.raises(ValueError, match="grad_values must not share memory with values"):
        ops.linear_backward(g, x, W, grad_values=W.values)


@pytest.mark.parametrize("indptr,indices,shape,match", [
    ([0, 2, 1], [0, 1], (2, 3), r"indptr must be non-decreasing; indptr\[2\] = 1 < indptr\[1\] = 2"),
    ([1, 2, 3], [0, 1, 2], (2, 3), r"indptr\[0\] must be 0; got 1"),
    ([0, 1, 2, 3], [0, 1, 2], (2, 3), r"indptr must have shape\[0\] \+ 1 = 3 entries; got 4"),
    ([0, 1, 3], [0, 1], (2, 3), r"indptr\[-1\] must equal len\(indices\) = 2; got 3"),
    ([0, 1, 2], [0, 3], (2, 3), r"indices\[1\] = 3 \(row 1\) is outside \[0, 3\)"),
    ([0, 1, 2], [0, -1], (2, 3), r"indices\[1\] = -1 \(row 1\) is outside"),
    ([0, 2, 2], [1, 0], (2, 3), r"strictly increasing within each row.*row 0 has 0 after 1"),
    ([0, 2, 2], [1, 1], (2, 3), r"strictly increasing within each row.*row 0 has 1 after 1"),
    ([0, 0], [], (1, 2**31), r"shape\[1\] = 2147483648 exceeds the int32 column index range"),
    ([0, 0], [], (-1, 2), r"shape must be non-negative"),
])
def test_invalid_csr(indptr, indices, shape, match):
    n = len(indices)
    with pytest.raises(ValueError, match=match):
        sparsebp.CSR(np.array(indptr), np.array(indices, dtype=np.int64), np.zeros(n, np.float32), shape)


def test_invalid_csr_types():
    with pytest.raises(TypeError, match="indices must be an integer array"):
        sparsebp.CSR([0, 1], np.array([0.5]), np.zeros(1, np.float32), (1, 2))
    with pytest.raises(TypeError, match="indptr must be an integer array"):
        sparsebp.CSR(np.array([0.0, 1.0]), [0], np.zeros(1, np.float32), (1, 2))
    with pytest.raises(TypeError, match="values must be float32"):
        sparsebp.CSR([0, 1], [0], np.zeros(1), (1, 2))
    for shape in (5, (1.0, 2), (1, 2.5), (True, 2), (1, 2, 3), "12"):  # floats were truncated to ints
        with pytest.raises(TypeError, match="shape must be a pair of ints"):
            sparsebp.CSR([0, 1], [0], np.zeros(1, np.float32), shape)
    assert sparsebp.CSR([0, 1], [0], np.zeros(1, np.float32), (np.int64(1), np.int32(2))).shape == (1, 2)
    with pytest.raises(ValueError, match=r"values must have shape \(1,\)"):
        sparsebp.CSR([0, 1], [0], np.zeros(2, np.float32), (1, 2))


def test_structure_is_read_only(W):
    with pytest.raises(ValueError):
        W.indices[0] = 2
    with pytest.raises(ValueError):
        W.indptr[1] = 0
    with pytest.raises(AttributeError):
        W.indices = np.array([0, 1, 2])
    with pytest.raises(TypeError, match="values must be float32"):
        W.values = np.zeros(3)
    with pytest.raises(ValueError, match=r"values must have shape \(3,\)"):
        W.values = np.zeros(4, np.float32)


def test_native_layer_rejects_bad_arrays(W):
    # The safety net below the Python layer: the binding checks on its own too.
    from sparsebp import _core

    with pytest.raises(TypeError, match="x must be a float32 array"):
        _core.linear_forward(W.structure, W.values, np.ones((2, 3)), None, np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="x must have shape"):
        _core.linear_forward(W.structure, W.values, np.ones((2, 4), np.float32), None, np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="values must have nnz = 3"):
        _core.linear_forward(W.structure, np.ones(2, np.float32), np.ones((2, 3), np.float32), None,
                             np.zeros((2, 2), np.float32))
    ro = np.zeros((2, 2), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        _core.linear_forward(W.structure, W.values, np.ones((2, 3), np.float32), None, ro)
    x = np.ones((2, 5), np.float32)
    with pytest.raises(ValueError, match="out must not share memory with x"):
        _core.linear_forward(W.structure, W.values, x[:, :3], None, x[:, 3:])


def test_layout_helpers_reject_bad_arguments():
    """padded_ld / empty: a bad batch or shape is a TypeError / ValueError (empty((3, -4)) used to
    give a (3, 0) array, padded_ld(-1) a stride of 16, empty((3, 4, 5)) a 3-D array)."""
    for batch, err in ((-1, ValueError), ("3", TypeError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(err, match="batch must be"):
            ops.padded_ld(batch)
    assert ops.padded_ld(0) >= 0 and ops.padded_ld(np.int64(100)) >= 100
    for shape, err in (((3, -4), ValueError), ((3, 4, 5), TypeError), ((3,), TypeError), ((3.0, 4), TypeError),
                       (7, TypeError)):
        with pytest.raises(err, match="shape must be"):
            ops.empty(shape)
    a = ops.empty((40, 3))
    assert a.shape == (40, 3) and a.dtype == np.float32 and a.ctypes.data % 64 == 0


def test_mask_adam_rejects_bad_arguments():
    from sparsebp.algorithms.vrpge import MaskAdam

    s = [np.full(4, 0.5)]
    for kw, err, what in ((dict(lr=-1.0), ValueError, "lr"), (dict(lr=0.1, budget=-1), ValueError, "budget"),
                          (dict(lr=0.1, betas=(1.0, 0.9)), ValueError, r"betas\[0\]"),
                          (dict(lr=0.1, eps=-1.0), ValueError, "eps")):
        kw.setdefault("budget", 2.0)
        with pytest.raises(err, match=what):
            MaskAdam(s, **kw)
    with pytest.raises(TypeError, match="s must be a list"):
        MaskAdam(np.full(4, 0.5), lr=0.1, budget=2.0)
