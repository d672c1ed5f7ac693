"""Index types: more than 2^24 stored entries (where float32 indices, as SparseProp uses, go wrong)."""
import numpy as np

import sparsebp
from sparsebp import ops


def test_beyond_2_pow_24_nonzeros(isa):
    cols = 2**24 + 1000
    # Row 0: every column (2^24 + 1000 entries); row 1: one entry at the last column.
    indptr = np.array([0, cols, cols + 1], np.int64)
    indices = np.concatenate([np.arange(cols, dtype=np.int32), np.array([cols - 1], np.int32)])
    values = np.zeros(cols + 1, np.float32)
    # Only entries past 2^24 carry weight, at distinct odd columns.
    tail = np.arange(2**24 + 1, cols, 97)
    values[tail] = 1.0
    values[-1] = 2.0
    W = sparsebp.CSR(indptr, indices, values, (2, cols))
    x = np.zeros((2, cols), np.float32)
    x[0, tail] = np.arange(len(tail), dtype=np.float32) + 1
    x[1, cols - 1] = 3.0
    y = ops.linear_forward(x, W)
    expect0 = float(np.sum(np.arange(len(tail)) + 1))
    np.testing.assert_array_equal(y, [[expect0, 0.0], [0.0, 6.0]])
    g = np.array([[1.0, 0.5], [2.0, 4.0]], np.float32)
    gr = ops.linear_backward(g, x, W)
    # grad_values[p] = sum_b g[b, row] x[b, col]; check the entries beyond 2^24 exactly.
    np.testing.assert_array_equal(gr.grad_values[tail], x[0, tail] * 1.0)
    assert gr.grad_values[-1] == 4.0 * 3.0
    assert gr.grad_values[cols - 1] == 2.0 * 3.0
    np.testing.assert_array_equal(gr.grad_input[1, tail], g[1, 0] * 1.0)
    assert gr.grad_input[1, cols - 1] == 4.0 * 2.0
