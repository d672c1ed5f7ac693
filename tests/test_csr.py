"""The CSR container: construction, conversion, validation-once, pickling."""
import pickle

import numpy as np
import pytest
import scipy.sparse as sp

import sparsebp

import reference as ref


def test_from_dense_nonzeros():
    d = np.array([[0, 1.5, 0], [0, 0, 0], [2, 0, -3]], dtype=np.float64)
    W = sparsebp.CSR.from_dense(d)
    assert W.shape == (3, 3) and W.nnz == 3
    np.testing.assert_array_equal(W.indptr, [0, 1, 1, 3])
    np.testing.assert_array_equal(W.indices, [1, 0, 2])
    np.testing.assert_array_equal(W.values, np.array([1.5, 2, -3], np.float32))
    assert W.values.dtype == np.float32 and W.indptr.dtype == np.int64 and W.indices.dtype == np.int32
    np.testing.assert_array_equal(W.to_dense(), d.astype(np.float32))
    assert W.density == pytest.approx(3 / 9)


def test_from_dense_with_mask_keeps_stored_zeros():
    d = np.array([[0.0, 1.0], [2.0, 0.0]], np.float32)
    mask = np.array([[True, True], [False, False]])
    W = sparsebp.CSR.from_dense(d, mask=mask)
    assert W.nnz == 2
    np.testing.assert_array_equal(W.values, [0.0, 1.0])
    np.testing.assert_array_equal(W.mask(), mask)


def test_from_dense_errors():
    with pytest.raises(ValueError, match="dense must be 2-D"):
        sparsebp.CSR.from_dense(np.ones(3))
    with pytest.raises(ValueError, match="mask must have the shape"):
        sparsebp.CSR.from_dense(np.ones((2, 2)), mask=np.ones((2, 3), bool))
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        sparsebp.CSR.from_dense(np.ones((2, 2)), mask=np.ones((2, 2)))
    with pytest.raises(TypeError, match="real numeric"):
        sparsebp.CSR.from_dense(np.ones((2, 2), complex))


def test_scipy_round_trip():
    rng = np.random.default_rng(0)
    m = sp.random(30, 40, density=0.2, format="coo", random_state=1, dtype=np.float64)
    W = sparsebp.CSR.from_scipy(m)
    np.testing.assert_allclose(W.to_dense(), m.toarray().astype(np.float32))
    back = W.to_scipy()
    assert isinstance(back, sp.csr_matrix)
    np.testing.assert_array_equal(back.toarray(), W.to_dense())
    # Unsorted input with duplicates: summed and sorted.
    dup = sp.csr_matrix((np.array([1.0, 2.0, 3.0]), np.array([2, 0, 2]), np.array([0, 3])), shape=(1, 3))
    W2 = sparsebp.CSR.from_scipy(dup)
    np.testing.assert_array_equal(W2.indices, [0, 2])
    np.testing.assert_array_equal(W2.values, [2.0, 4.0])
    with pytest.raises(TypeError, match="SciPy sparse matrix"):
        sparsebp.CSR.from_scipy(np.ones((2, 2)))
    del rng


def test_matches_reference_densify():
    rng = np.random.default_rng(2)
    indptr, indices, values = ref.random_csr(rng, 17, 9, 0.4, empty_rows=(0, 16))
    W = sparsebp.CSR(indptr, indices, values, (17, 9))
    np.testing.assert_array_equal(W.to_dense(np.float64), ref.dense_from_csr(indptr, indices, values, (17, 9)))


def test_index_dtypes_accepted():
    for ip, ix in [(np.int32, np.int32), (np.int64, np.int64), (np.int32, np.int64), (np.uint16, np.uint8)]:
        W = sparsebp.CSR(np.array([0, 1, 2], ip), np.array([1, 0], ix), np.ones(2, np.float32), (2, 2))
        np.testing.assert_array_equal(W.indices, [1, 0])


def test_values_are_kept_by_reference_and_copy_is_deep():
    v = np.ones(2, np.float32)
    W = sparsebp.CSR([0, 1, 2], [1, 0], v, (2, 2))
    v[0] = 5
    assert W.values[0] == 5
    W2 = W.copy()
    W2.values[0] = 7
    assert W.values[0] == 5
    assert W2.structure is W.structure and W2.same_structure(W)


def test_pickle_round_trip():
    rng = np.random.default_rng(3)
    indptr, indices, values = ref.random_csr(rng, 12, 8, 0.3)
    W = sparsebp.CSR(indptr, indices, values, (12, 8))
    W2 = pickle.loads(pickle.dumps(W))
    assert W2.shape == W.shape
    np.testing.assert_array_equal(W2.indptr, W.indptr)
    np.testing.assert_array_equal(W2.indices, W.indices)
    np.testing.assert_array_equal(W2.values, W.values)
    s2 = pickle.loads(pickle.dumps(W.structure))
    np.testing.assert_array_equal(s2.indices, W.indices)


def test_repr():
    W = sparsebp.CSR.from_dense(np.eye(3, dtype=np.float32))
    assert "shape=(3, 3)" in repr(W) and "nnz=3" in repr(W)
