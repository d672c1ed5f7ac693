"""Sparse linear kernels (forward, input gradient, weight gradient at the stored entries, bias
gradient) against float64 NumPy, on every available ISA."""
import gzip
import os

import numpy as np
import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

import sparsebp
from sparsebp import _core, ops

import reference as ref

BATCHES = [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 257]


def make(rng, rows, cols, density, empty_rows=()):
    indptr, indices, values = ref.random_csr(rng, rows, cols, density, empty_rows)
    return sparsebp.CSR(indptr, indices, values, (rows, cols))


def check_all(W, x, g, bias=None, input_grad=True, bias_grad=True):
    """Runs forward + backward and compares every output with the float64 reference."""
    rows, cols = W.shape
    B = x.shape[0]
    y = ops.linear_forward(x, W, bias)
    yr, ys = ref.linear_forward(x, W.indptr, W.indices, W.values, W.shape, bias)
    ref.assert_close(y, yr, ys, cols, "forward")
    gr = ops.linear_backward(g, x, W, input_grad=input_grad, bias_grad=bias_grad)
    (gi, gis), (gv, gvs), (gb, gbs) = ref.linear_backward(g, x, W.indptr, W.indices, W.values, W.shape)
    if input_grad:
        ref.assert_close(gr.grad_input, gi, gis, rows, "grad_input")
    else:
        assert gr.grad_input is None
    ref.assert_close(gr.grad_values, gv, gvs, B, "grad_values")
    if bias_grad:
        ref.assert_close(gr.grad_bias, gb, gbs, B, "grad_bias")
    else:
        assert gr.grad_bias is None
    return y, gr


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("order", ["C", "F"])
def test_random_shapes_every_batch(isa, batch, order):
    rng = np.random.default_rng(batch)
    W = make(rng, 37, 53, 0.3, empty_rows=(3, 20))
    x = np.asarray(rng.standard_normal((batch, 53)), dtype=np.float32, order=order)
    g = np.asarray(rng.standard_normal((batch, 37)), dtype=np.float32, order=order)
    b = rng.standard_normal(37).astype(np.float32)
    y, gr = check_all(W, x, g, b)
    # Output order follows the input's: Fortran in, Fortran out (batch innermost, no transposes).
    if batch > 1:
        for a in (y, gr.grad_input):
            assert (a.strides[0] == 4) == (order == "F")
            assert a.ctypes.data % 64 == 0


@pytest.mark.parametrize("batch", [1, 16, 33, 257])
def test_larger_layer_panels_and_chunks(isa, batch):
    # Wide enough that the kernels split the columns into several cache panels.
    rng = np.random.default_rng(7)
    W = make(rng, 96, 3000, 0.05, empty_rows=(0, 95))
    x = np.asfortranarray(rng.standard_normal((batch, 3000)).astype(np.float32))
    g = np.asfortranarray(rng.standard_normal((batch, 96)).astype(np.float32))
    check_all(W, x, g, rng.standard_normal(96).astype(np.float32))


def test_nnz_zero(isa):
    W = sparsebp.CSR(np.zeros(6, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), (5, 4))
    x = np.ones((3, 4), np.float32)
    b = np.arange(5, dtype=np.float32)
    y = ops.linear_forward(x, W, b)
    np.testing.assert_array_equal(y, np.broadcast_to(b, (3, 5)))
    gr = ops.linear_backward(np.ones((3, 5), np.float32), x, W)
    np.testing.assert_array_equal(gr.grad_input, 0)
    assert gr.grad_values.shape == (0,)
    np.testing.assert_array_equal(gr.grad_bias, 3)


def test_one_by_one(isa):
    W = sparsebp.CSR([0, 1], [0], np.array([2.5], np.float32), (1, 1))
    x = np.array([[2.0], [-1.0]], np.float32)
    y = ops.linear_forward(x, W, np.array([1.0], np.float32))
    np.testing.assert_array_equal(y, [[6.0], [-1.5]])
    gr = ops.linear_backward(np.array([[1.0], [3.0]], np.float32), x, W)
    np.testing.assert_array_equal(gr.grad_input, [[2.5], [7.5]])
    np.testing.assert_array_equal(gr.grad_values, [2.0 - 3.0])
    np.testing.assert_array_equal(gr.grad_bias, [4.0])


@pytest.mark.parametrize("batch", [1, 17, 64])
def test_density_one(isa, batch):
    rng = np.random.default_rng(3)
    W = make(rng, 19, 23, 1.1)
    assert W.density == 1.0
    x = rng.standard_normal((batch, 23)).astype(np.float32)
    g = rng.standard_normal((batch, 19)).astype(np.float32)
    check_all(W, x, g)


def test_empty_batch(isa):
    rng = np.random.default_rng(4)
    W = make(rng, 6, 5, 0.5)
    x = np.zeros((0, 5), np.float32)
    y = ops.linear_forward(x, W)
    assert y.shape == (0, 6)
    gr = ops.linear_backward(np.zeros((0, 6), np.float32), x, W)
    assert gr.grad_input.shape == (0, 5)
    np.testing.assert_array_equal(gr.grad_values, 0)
    np.testing.assert_array_equal(gr.grad_bias, 0)


def test_stored_zero_gets_a_gradient(isa):
    # The gradient is taken at the pattern, not where values != 0.
    W = sparsebp.CSR([0, 2, 3], [0, 2, 1], np.array([0.0, 1.0, 0.0], np.float32), (2, 3))
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    g = np.array([[10.0, 100.0]], np.float32)
    gr = ops.linear_backward(g, x, W)
    np.testing.assert_array_equal(gr.grad_values, [10.0, 30.0, 200.0])


@pytest.mark.parametrize("input_grad,bias_grad", [(False, True), (True, False), (False, False)])
def test_skipping_outputs(isa, input_grad, bias_grad):
    rng = np.random.default_rng(5)
    W = make(rng, 30, 40, 0.2)
    x = rng.standard_normal((33, 40)).astype(np.float32)
    g = rng.standard_normal((33, 30)).astype(np.float32)
    check_all(W, x, g, input_grad=input_grad, bias_grad=bias_grad)


@pytest.mark.parametrize("layout", ["sliced_cols", "sliced_rows", "transposed_view", "both_strided"])
def test_non_contiguous_inputs(isa, layout):
    rng = np.random.default_rng(6)
    W = make(rng, 12, 10, 0.4)
    if layout == "sliced_cols":
        x = rng.standard_normal((9, 20)).astype(np.float32)[:, ::2]
        g = rng.standard_normal((9, 24)).astype(np.float32)[:, 1::2]
    elif layout == "sliced_rows":
        x = rng.standard_normal((18, 10)).astype(np.float32)[::2]
        g = rng.standard_normal((27, 12)).astype(np.float32)[::3]
    elif layout == "transposed_view":
        x = rng.standard_normal((10, 9)).astype(np.float32).T
        g = rng.standard_normal((12, 9)).astype(np.float32).T
    else:
        x = rng.standard_normal((18, 20)).astype(np.float32)[::2, ::2]
        g = np.asfortranarray(rng.standard_normal((18, 24)).astype(np.float32))[::2, ::2]
    check_all(W, x, g, rng.standard_normal(12).astype(np.float32))


def test_empty_layout():
    a = ops.empty((256, 3))
    assert a.shape == (256, 3) and a.strides == (4, 4 * ops.padded_ld(256)) and ops.padded_ld(256) == 272
    assert a.ctypes.data % 64 == 0
    b = ops.empty((7, 3))
    assert b.flags.f_contiguous and b.ctypes.data % 64 == 0
    c = ops.empty((5, 6), order="C")
    assert c.flags.c_contiguous and c.ctypes.data % 64 == 0
    with pytest.raises(ValueError, match="order must be"):
        ops.empty((2, 2), order="K")


def test_padded_leading_dimension(isa):
    # Fortran-like views into a taller buffer go to the kernels without a copy.
    rng = np.random.default_rng(8)
    W = make(rng, 14, 11, 0.5)
    x = np.asfortranarray(rng.standard_normal((40, 11)).astype(np.float32))[:33]
    g = np.asfortranarray(rng.standard_normal((40, 14)).astype(np.float32))[:33]
    check_all(W, x, g)


@pytest.mark.parametrize("batch", [65, 300, 513])
@pytest.mark.parametrize("order", ["C", "F"])
def test_padded_views_over_several_batch_tiles(isa, batch, order):
    # Batches wider than one register tile are repacked tile by tile (64 columns on AVX2 and the
    # scalar table, 256 on AVX-512): from strided views, with a narrow last tile.
    rng = np.random.default_rng(batch)
    W = make(rng, 70, 90, 0.2, empty_rows=(4,))
    if order == "F":
        x = np.asfortranarray(rng.standard_normal((batch + 11, 90)).astype(np.float32))[3 : 3 + batch]
        g = np.asfortranarray(rng.standard_normal((batch + 5, 70)).astype(np.float32))[:batch]
    else:
        x = rng.standard_normal((batch, 100)).astype(np.float32)[:, 5:95]
        g = rng.standard_normal((batch, 77)).astype(np.float32)[:, :70]
    check_all(W, x, g, rng.standard_normal(70).astype(np.float32))


@pytest.mark.parametrize("threads", [1, 2])
def test_tile_packing_same_sums(isa, monkeypatch, threads):
    """SPARSEBP_TILE_PACK=0 (no repacking into batch tiles) adds in the same order on the SIMD
    tables: identical bits; the scalar table's weight gradient sums by tile when packed, so there
    both are only checked against float64."""
    rng = np.random.default_rng(11)
    W = make(rng, 150, 200, 0.1, empty_rows=(0, 7))
    b = rng.standard_normal(150).astype(np.float32)
    before = sparsebp.get_num_threads()
    sparsebp.set_num_threads(threads)
    try:
        for batch in (130, 257, 520):
            for order in "CF":
                x = np.asarray(rng.standard_normal((batch, 200)), np.float32, order=order)
                g = np.asarray(rng.standard_normal((batch, 150)), np.float32, order=order)
                monkeypatch.setenv("SPARSEBP_TILE_PACK", "1")
                y1, r1 = check_all(W, x, g, b)
                monkeypatch.setenv("SPARSEBP_TILE_PACK", "0")
                y0, r0 = check_all(W, x, g, b)
                if sparsebp.active_isa() != "scalar":
                    np.testing.assert_array_equal(y1, y0)
                    for a1, a0 in zip(r1, r0):
                        np.testing.assert_array_equal(a1, a0)
    finally:
        sparsebp.set_num_threads(before)


def test_inputs_left_unmodified(isa):
    rng = np.random.default_rng(9)
    W = make(rng, 21, 17, 0.3)
    x = rng.standard_normal((19, 17)).astype(np.float32)
    g = rng.standard_normal((19, 21)).astype(np.float32)
    b = rng.standard_normal(21).astype(np.float32)
    saved = [a.copy() for a in (x, g, b, W.values, W.indptr, W.indices)]
    ops.linear_forward(x, W, b)
    ops.linear_backward(g, x, W)
    for before, after in zip(saved, (x, g, b, W.values, W.indptr, W.indices)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("order", ["C", "F"])
def test_out_arguments(isa, order):
    rng = np.random.default_rng(10)
    W = make(rng, 13, 9, 0.4)
    x = np.asarray(rng.standard_normal((11, 9)), np.float32, order=order)
    g = np.asarray(rng.standard_normal((11, 13)), np.float32, order=order)
    y = np.full((11, 13), np.nan, np.float32, order="F" if order == "C" else "C")
    r = ops.linear_forward(x, W, out=y)
    assert r is y
    yr, ys = ref.linear_forward(x, W.indptr, W.indices, W.values, W.shape)
    ref.assert_close(y, yr, ys, 9, "forward into out")
    gi = np.full((11, 9), np.nan, np.float32)
    gv = np.full(W.nnz, np.nan, np.float32)
    gb = np.full(13, np.nan, np.float32)
    res = ops.linear_backward(g, x, W, grad_input=gi, grad_values=gv, grad_bias=gb)
    assert res.grad_input is gi and res.grad_values is gv and res.grad_bias is gb
    (gir, gis), (gvr, gvs), (gbr, gbs) = ref.linear_backward(g, x, W.indptr, W.indices, W.values, W.shape)
    ref.assert_close(gi, gir, gis, 13, "grad_input")
    ref.assert_close(gv, gvr, gvs, 11, "grad_values")
    ref.assert_close(gb, gbr, gbs, 11, "grad_bias")


def test_values_override(isa):
    rng = np.random.default_rng(11)
    W = make(rng, 8, 6, 0.5)
    v2 = rng.standard_normal(W.nnz).astype(np.float32)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    y = ops.linear_forward(x, W, values=v2)
    yr, ys = ref.linear_forward(x, W.indptr, W.indices, v2, W.shape)
    ref.assert_close(y, yr, ys, 6, "forward with values=")


@st.composite
def layer_case(draw):
    rows = draw(st.integers(1, 40))
    cols = draw(st.integers(1, 40))
    batch = draw(st.integers(1, 70))
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    order = draw(st.sampled_from(["C", "F"]))
    return rows, cols, batch, density, seed, order


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=layer_case())
def test_hypothesis_random_structure(isa, case):
    rows, cols, batch, density, seed, order = case
    rng = np.random.default_rng(seed)
    W = make(rng, rows, cols, density, empty_rows=rng.integers(0, rows, size=rows // 4))
    x = np.asarray(rng.standard_normal((batch, cols)), np.float32, order=order)
    g = np.asarray(rng.standard_normal((batch, rows)), np.float32, order=order)
    check_all(W, x, g, rng.standard_normal(rows).astype(np.float32))


# ---- real pruned matrices (DLMC) ---------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
# Three DLMC matrices travel with the repository (bench/data/dlmc, used by the benchmark): they run
# everywhere; the full set in ../shared/data/dlmc (or SPARSEBP_DLMC) adds the others where present.
BUNDLED_DLMC = os.path.join(HERE, "..", "bench", "data", "dlmc")


def dlmc_root():
    for cand in (os.environ.get("SPARSEBP_DLMC"), os.path.join(HERE, "..", "..", "shared", "data", "dlmc")):
        if cand and os.path.isdir(cand):
            return cand
    return None


DLMC_FILES = [
    "rn50/magnitude_pruning/0.9/bottleneck_1_block_group1_1_1.smtx.gz",
    "rn50/magnitude_pruning/0.98/bottleneck_3_block_group2_2_1.smtx.gz",
    "rn50/random_pruning/0.9/bottleneck_projection_block_group_projection_block_group2.smtx.gz",
    "transformer/magnitude_pruning/0.9/body_decoder_layer_0_ffn_conv2_fully_connected.smtx.gz",
]


def load_smtx(path):
    with gzip.open(path, "rt") as f:
        rows, cols, nnz = (int(t) for t in f.readline().replace(",", " ").split())
        indptr = np.array(f.readline().split(), dtype=np.int64)
        indices = np.array(f.readline().split(), dtype=np.int64) if nnz else np.zeros(0, np.int64)
    return rows, cols, indptr, indices


def check_dlmc(path):
    rows, cols, indptr, indices = load_smtx(path)
    rng = np.random.default_rng(12)
    values = rng.standard_normal(len(indices)).astype(np.float32)
    W = sparsebp.CSR(indptr, indices, values, (rows, cols))
    x = np.asfortranarray(rng.standard_normal((33, cols)).astype(np.float32))
    g = np.asfortranarray(rng.standard_normal((33, rows)).astype(np.float32))
    check_all(W, x, g, rng.standard_normal(rows).astype(np.float32))


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(BUNDLED_DLMC) if f.endswith(".smtx.gz")))
def test_dlmc_bundled_matrices(isa, name):
    check_dlmc(os.path.join(BUNDLED_DLMC, name))


def test_dlmc_bundled_matrices_present():
    assert len([f for f in os.listdir(BUNDLED_DLMC) if f.endswith(".smtx.gz")]) == 3


@pytest.mark.parametrize("name", DLMC_FILES)
def test_dlmc_matrices(isa, name):
    root = dlmc_root()
    if root is None:
        pytest.skip("the full DLMC set is not here (../shared/data/dlmc or SPARSEBP_DLMC); the bundled three ran")
    check_dlmc(os.path.join(root, name))


@pytest.mark.parametrize("batch", [1, 17, 64, 257, 530])
@pytest.mark.parametrize("bias_grad", [True, False])
def test_weight_grad_skipped(isa, batch, bias_grad):
    """weight_grad=False (frozen weights): no grad_values, the other gradients unchanged."""
    rng = np.random.default_rng(7 + batch)
    W = make(rng, 29, 41, 0.25, empty_rows=(5,))
    x = rng.standard_normal((batch, 41)).astype(np.float32)
    g = rng.standard_normal((batch, 29)).astype(np.float32)
    gr = ops.linear_backward(g, x, W, weight_grad=False, bias_grad=bias_grad)
    (gi, gis), _, (gb, gbs) = ref.linear_backward(g, x, W.indptr, W.indices, W.values, W.shape)
    assert gr.grad_values is None
    ref.assert_close(gr.grad_input, gi, gis, 29, "grad_input")
    if bias_grad:
        ref.assert_close(gr.grad_bias, gb, gbs, batch, "grad_bias")
    else:
        assert gr.grad_bias is None


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 9), (9, 1), (8, 8), (7, 33), (64, 25088 // 32), (33, 70), (130, 5)])
def test_transpose_kernel(isa, rows, cols):
    """_core.transpose (layout changes of activations) against NumPy, with padded row strides."""
    rng = np.random.default_rng(rows * 1000 + cols)
    src = rng.standard_normal((rows, cols + 3)).astype(np.float32)[:, :cols]
    out = np.full((cols, rows + 5), np.nan, np.float32)
    before = src.copy()
    _core.transpose(src, out[:, :rows])
    assert np.array_equal(out[:, :rows], src.T)
    assert np.isnan(out[:, rows:]).all()  # nothing written outside
    assert np.array_equal(src, before)


def test_transpose_kernel_errors():
    a = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="out must have shape"):
        _core.transpose(a, np.zeros((3, 4), np.float32))
    with pytest.raises(TypeError):
        _core.transpose(a.astype(np.float64), np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.transpose(np.zeros((8, 4), np.float32)[:, ::2], np.zeros((2, 8), np.float32))
    buf = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        _core.transpose(buf[:32].reshape(4, 8), buf[16:48].reshape(8, 4))
