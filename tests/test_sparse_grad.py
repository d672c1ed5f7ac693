"""Sparse gradients (meProp): top-k selection and the backward products, on every ISA, against
independent references (numpy sorting with the tie rule spelled out; float64 products)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsebp import _core, ops
from sparsebp.sparse_grad import csr_selected_backward

import reference as ref


def topk_ref(g, k):
    """Per row: order by (-|g|, column) with numpy's lexsort, keep k, sort the columns."""
    g = np.asarray(g, dtype=np.float64)
    n = g.shape[1]
    cols = np.arange(n)
    out = []
    for row in g:
        order = np.lexsort((cols, -np.abs(row)))  # last key primary: larger |g|, then lower index
        out.append(np.sort(order[:min(k, n)]))
    return np.array(out, dtype=np.int64).reshape(g.shape[0], min(k, n))


SIZES = [1, 7, 33, 517, 1000, 4096]


@pytest.mark.parametrize("n", SIZES)
def test_topk_heavy_ties(isa, n):
    rng = np.random.default_rng(n)
    g = rng.integers(-3, 4, size=(9, n)).astype(np.float32)  # |g| in {0..3}: ties everywhere, +-0
    g[0] = 0.0
    g[1] = -0.0
    for k in sorted({0, 1, 2, n // 8, n // 2, n - 1, n, n + 5}):
        np.testing.assert_array_equal(ops.topk(g, k), topk_ref(g, k), err_msg=f"n={n} k={k}")


@pytest.mark.parametrize("n", SIZES)
def test_topk_continuous_values_and_strided_input(isa, n):
    rng = np.random.default_rng(100 + n)
    big = rng.standard_normal((12, n + 3)).astype(np.float32)
    g = big[:, 2:2 + n]  # not contiguous: copied by the wrapper, never modified
    before = g.copy()
    for k in sorted({1, max(1, n // 50), max(1, n // 4), n - 1}):
        np.testing.assert_array_equal(ops.topk(g, k), topk_ref(g, k), err_msg=f"n={n} k={k}")
    np.testing.assert_array_equal(g, before)


def test_topk_adversarial_sample(isa):
    """The threshold estimate comes from a strided sample: rows whose sampled entries are all
    huge (or all tiny) must still give the exact answer."""
    n = 4096
    g = np.zeros((3, n), np.float32)
    g[0, ::16] = 100.0   # every sampled position large, the true top-k among them and beyond
    g[0, 5] = 1000.0
    g[1, 1::16] = 5.0    # the large entries sit between sample points
    g[2] = np.linspace(-1, 1, n, dtype=np.float32)
    for k in (1, 10, 200, 300, 1000):
        np.testing.assert_array_equal(ops.topk(g, k), topk_ref(g, k), err_msg=f"k={k}")


def _quickselect_adversary(n, k):
    """|values| of a row (4k > n: every entry is a candidate, in column order) on which the SIMD
    sets' k-th-value search, a quickselect pivoting on the median of the entries at m/4, m/2 and
    m - 1 - m/4 and keeping the side of rank k in order, sheds only ~2 entries per round: its
    pivots are frozen, lazily, as the smallest values yet, and every other entry ends above them
    (McIlroy's trick). Returns the row and the number of rounds the search would take unbounded."""
    frozen = {}

    def value(i, freeze=False):
        if freeze and i not in frozen:
            frozen[i] = float(len(frozen) + 1)
        return frozen.get(i, np.inf)

    live, rank, rounds = list(range(n)), k, 0
    while len(live) > 16:
        rounds += 1
        m = len(live)
        a, b, c = (value(live[q], freeze=True) for q in (m // 4, m // 2, m - 1 - m // 4))
        p = max(min(a, b), min(max(a, b), c))
        above = [i for i in live if value(i) > p]
        if rank > len(above):
            break  # (never here: the pivots stay below rank k)
        live = above
    row = np.empty(n, np.float32)
    rest = [i for i in range(n) if i not in frozen]
    row[rest] = 1e6 + np.arange(len(rest))  # distinct, exact in float32, above every pivot
    for i, v in frozen.items():
        row[i] = v
    return row, rounds


@pytest.mark.parametrize("n", [400, 2000])
def test_topk_quickselect_adversary(isa, n):
    """Past a round limit the k-th-value search hands over to std::nth_element: an input built to
    need hundreds of rounds still gives the exact answer (signs flipped: top-k is by magnitude)."""
    k = n // 4 + 1
    row, rounds = _quickselect_adversary(n, k)
    assert rounds > 100  # the input defeats the pivot rule, so the limit is reached
    signs = np.where(np.arange(n) % 3 == 0, -1.0, 1.0).astype(np.float32)
    g = np.stack([row, row * signs, row[::-1].copy()])
    np.testing.assert_array_equal(ops.topk(g, k), topk_ref(g, k))


def test_topk_nan_and_bad_arguments(isa):
    g = np.ones((2, 600), np.float32)
    g[1, 300] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ops.topk(g, 3)
    with pytest.raises(ValueError, match="NaN"):
        ops.topk(g, 20)
    with pytest.raises(ValueError, match="NaN"):
        ops.topk_columns(g, 20)
    # k = 0 or k >= n: the answer does not depend on the values (documented)
    assert ops.topk(g, 0).shape == (2, 0)
    np.testing.assert_array_equal(ops.topk(g, 600), np.tile(np.arange(600), (2, 1)))
    np.testing.assert_array_equal(ops.topk_columns(g, 700), np.arange(600))
    with pytest.raises(TypeError, match="k must be an int"):
        ops.topk(np.ones((2, 5), np.float32), 2.0)
    with pytest.raises(TypeError, match="k must be an int"):
        ops.topk(np.ones((2, 5), np.float32), True)
    with pytest.raises(ValueError, match="k must be >= 0"):
        ops.topk(np.ones((2, 5), np.float32), -1)
    with pytest.raises(TypeError, match="float32"):
        ops.topk(np.ones((2, 5)), 2)
    with pytest.raises(ValueError, match="2-D"):
        ops.topk(np.ones(5, np.float32), 2)


@pytest.mark.parametrize("n", [5, 64, 517, 4096])
def test_topk_columns(isa, n):
    rng = np.random.default_rng(7 + n)
    g = rng.integers(-4, 5, size=(33, n)).astype(np.float32)  # integer sums: exact in float32
    scores = np.abs(g.astype(np.float64)).sum(axis=0, keepdims=True)
    for k in sorted({0, 1, 3, n // 3, n - 1, n, n + 1}):
        np.testing.assert_array_equal(ops.topk_columns(g, k), topk_ref(scores, k)[0], err_msg=f"k={k}")


@st.composite
def _selection_case(draw):
    """A gradient of any small shape, its values from a few levels (ties, +-0) or continuous, any
    k from 0 to past the width; the array may be a strided view."""
    rows, n = draw(st.integers(1, 40)), draw(st.integers(1, 700))
    seed, k = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, n + 2))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        g = rng.integers(-draw(st.integers(0, 4)), 5, size=(rows, n + 2)).astype(np.float32)
    else:
        g = rng.standard_normal((rows, n + 2)).astype(np.float32)
    return (g[:, 1:1 + n] if draw(st.booleans()) else np.ascontiguousarray(g[:, :n])), k


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_selection_case())
def test_hypothesis_topk_and_topk_columns(isa, case):
    """Per-row top-k and unified column selection on random shapes, values and k, against numpy
    sorting with the tie rule; the input is left as it was."""
    g, k = case
    before = g.copy()
    np.testing.assert_array_equal(ops.topk(g, k), topk_ref(g, k))
    gi = np.round(g)  # integer sums are exact in float32, so the scores' order is not a rounding matter
    scores = np.abs(gi.astype(np.float64)).sum(axis=0, keepdims=True)
    np.testing.assert_array_equal(ops.topk_columns(gi, k), topk_ref(scores, k)[0])
    np.testing.assert_array_equal(g, before)


def _problem(rng, batch, out_f, in_f):
    g = rng.standard_normal((batch, out_f)).astype(np.float32)
    x = rng.standard_normal((batch, in_f)).astype(np.float32)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    return g, x, w


def _masked_ref(g, x, w, mask):
    gh = np.where(mask, g.astype(np.float64), 0.0)
    dx = gh @ w.astype(np.float64)
    dw = gh.T @ x.astype(np.float64)
    sdx = np.abs(gh) @ np.abs(w.astype(np.float64))
    sdw = np.abs(gh).T @ np.abs(x.astype(np.float64))
    return dx, dw, sdx, sdw


@pytest.mark.parametrize("batch,out_f,in_f", [(1, 10, 3), (17, 100, 37), (64, 500, 784), (5, 3, 300)])
@pytest.mark.parametrize("mode", ["example", "unified"])
def test_meprop_backward_against_float64(isa, batch, out_f, in_f, mode):
    rng = np.random.default_rng(batch * 1000 + out_f)
    g, x, w = _problem(rng, batch, out_f, in_f)
    for k in sorted({0, 1, max(1, out_f // 25), out_f - 1}):
        res = ops.meprop_backward(g, x, w, k, mode)
        mask = np.zeros(g.shape, bool)
        if mode == "example":
            sel = topk_ref(g, k)
            np.testing.assert_array_equal(res.selected, sel)
            np.put_along_axis(mask, sel, True, axis=1)
        else:
            sel = topk_ref(np.abs(g.astype(np.float64)).sum(0, keepdims=True), k)[0]
            np.testing.assert_array_equal(res.selected, sel)
            mask[:, sel] = True
        dx, dw, sdx, sdw = _masked_ref(g, x, w, mask)
        ref.assert_close(res.input, dx, sdx, out_f, f"{mode} k={k} dx")
        ref.assert_close(res.weight, dw, sdw, batch, f"{mode} k={k} dW")
        ref.assert_close(res.bias, g.astype(np.float64).sum(0), np.abs(g.astype(np.float64)).sum(0), batch, "db")
        touched = np.flatnonzero(np.abs(res.weight).sum(1))
        assert set(touched) <= set(np.unique(res.selected)), "dW has rows no example selected"
        if mode == "unified" and k < out_f:
            assert len(touched) == k, "unified mode must give exactly k nonzero rows of dW"


@st.composite
def _backward_case(draw):
    batch, out_f, in_f = draw(st.integers(1, 40)), draw(st.integers(1, 300)), draw(st.integers(1, 300))
    return batch, out_f, in_f, draw(st.integers(0, out_f + 1)), draw(st.sampled_from(["example", "unified"])), \
        draw(st.integers(0, 2**32 - 1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_backward_case())
def test_hypothesis_meprop_backward(isa, case):
    """Both modes on random shapes and k, full and compact weight gradients, against float64 NumPy
    on the mask the reference selection gives. G is integer-valued so that the selection (and the
    unified scores) are exact and the reference can pick the same entries."""
    batch, out_f, in_f, k, mode, seed = case
    rng = np.random.default_rng(seed)
    g = rng.integers(-6, 7, size=(batch, out_f)).astype(np.float32)
    x = rng.standard_normal((batch, in_f)).astype(np.float32)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    mask = np.zeros(g.shape, bool)
    if mode == "example":
        np.put_along_axis(mask, topk_ref(g, k), True, axis=1)
    else:
        mask[:, topk_ref(np.abs(g.astype(np.float64)).sum(0, keepdims=True), k)[0]] = True
    dx, dw, sdx, sdw = _masked_ref(g, x, w, mask)
    full = ops.meprop_backward(g, x, w, k, mode)
    ref.assert_close(full.input, dx, sdx, out_f, f"{mode} k={k} dx")
    ref.assert_close(full.weight, dw, sdw, batch, f"{mode} k={k} dW")
    ref.assert_close(full.bias, g.astype(np.float64).sum(0), np.abs(g.astype(np.float64)).sum(0), batch, "db")
    compact = ops.meprop_backward(g, x, w, k, mode, input_grad=False, bias_grad=False, compact=True)
    rows = np.asarray(compact.weight_rows)
    assert np.all(np.diff(rows) > 0) and set(np.flatnonzero(mask.any(0))) <= set(rows)
    ref.assert_close(compact.weight, dw[rows], sdw[rows], batch, f"{mode} k={k} compact dW")


@pytest.mark.parametrize("form", ["scatter", "gather"])
def test_example_input_gradient_both_forms(isa, monkeypatch, form):
    """Per example, dx is formed by scattering Ĝ[b, j] W[j] by unit or by gathering W's rows by
    example (chosen by the L2 size; SPARSEBP_MEPROP_DX forces one): each against float64, and the
    same bits as each other, including a W large enough for the gather's row blocks, duplicate
    selections and k = 0."""
    rng = np.random.default_rng(41)
    for batch, out_f, in_f, k in ((7, 50, 33, 4), (33, 300, 130, 12), (9, 2200, 1000, 90), (4, 20, 9, 0)):
        g, x, w = _problem(rng, batch, out_f, in_f)
        sel = topk_ref(g, k).astype(np.int32)
        if k > 1:
            sel[0, 1] = sel[0, 0]  # a repeated selection counts twice, in either form
        monkeypatch.setenv("SPARSEBP_MEPROP_DX", "gather" if form == "scatter" else "scatter")
        other = ops.selected_backward(g, x, w, sel, "example", weight_grad=False).input
        monkeypatch.setenv("SPARSEBP_MEPROP_DX", form)
        res = ops.selected_backward(g, x, w, sel, "example", weight_grad=False)
        gh = np.zeros((batch, out_f))
        for b in range(batch):
            for j in sel[b]:
                gh[b, j] += g[b, j]
        ref.assert_close(res.input, gh @ w.astype(np.float64), np.abs(gh) @ np.abs(w.astype(np.float64)), max(k, 1),
                         f"{form} {batch}x{out_f}x{in_f} k={k}")
        np.testing.assert_array_equal(res.input, other)
    monkeypatch.setenv("SPARSEBP_MEPROP_DX", "rows")
    with pytest.raises(ValueError, match="SPARSEBP_MEPROP_DX"):
        ops.selected_backward(g, x, w, sel, "example")


@pytest.mark.parametrize("mode", ["example", "unified"])
def test_meprop_k_at_least_out_is_dense(isa, mode):
    rng = np.random.default_rng(5)
    g, x, w = _problem(rng, 19, 40, 23)
    for k in (40, 41, 1000):
        res = ops.meprop_backward(g, x, w, k, mode)
        dx, dw, sdx, sdw = _masked_ref(g, x, w, np.ones(g.shape, bool))
        ref.assert_close(res.input, dx, sdx, 40, "dx")
        ref.assert_close(res.weight, dw, sdw, 19, "dW")
        np.testing.assert_array_equal(res.input, g @ w)  # exactly dense backprop
        np.testing.assert_array_equal(res.weight, g.T @ x)
        np.testing.assert_array_equal(res.bias, g.sum(0))


def test_meprop_flags_and_bad_arguments():
    rng = np.random.default_rng(1)
    g, x, w = _problem(rng, 4, 6, 5)
    res = ops.meprop_backward(g, x, w, 2, input_grad=False, weight_grad=False, bias_grad=False)
    assert res.input is None and res.weight is None and res.bias is None
    with pytest.raises(ValueError, match="mode"):
        ops.meprop_backward(g, x, w, 2, "rows")
    with pytest.raises(ValueError, match="grad_output must have 6 columns"):
        ops.meprop_backward(g[:, :5], x, w, 2)
    with pytest.raises(ValueError, match="x must have 4 rows"):
        ops.meprop_backward(g, x[:3], w, 2)
    with pytest.raises(TypeError, match="weight must be float32"):
        ops.meprop_backward(g, x, w.astype(np.float64), 2)
    with pytest.raises(TypeError, match="k must be an int"):
        ops.meprop_backward(g, x, w, 0.5)


def _multiset_ref(g, x, w, sel, mode):
    """Ĝ summed entry by entry over the listed selection (a repeat per example counts each time),
    then the float64 products."""
    gh = np.zeros(g.shape)
    for b in range(g.shape[0]):
        for j in (sel[b] if mode == "example" else sel):
            gh[b, j] += g[b, j]
    return gh @ w.astype(np.float64), gh.T @ x.astype(np.float64), np.abs(gh) @ np.abs(w.astype(np.float64)), \
        np.abs(gh).T @ np.abs(x.astype(np.float64))


@pytest.mark.parametrize("compact", [False, True])
def test_selected_backward_given_selections(isa, compact):
    """Selections a caller builds: any integer dtype (the same bits as int32), unsorted sets, a
    per-example row of out entries that is not every column (repeats count each time: never
    the dense shortcut), every column in reverse order; each against float64."""
    rng = np.random.default_rng(8)
    g, x, w = _problem(rng, 5, 9, 7)
    by_row = np.array([[4, 4, 4, 0, 1, 2, 3, 5, 6]] * 5)  # out entries, 7 and 8 never chosen
    cases = [("example", np.array([[0, 3]] * 5, dtype)) for dtype in (np.int8, np.uint16, np.int64, np.uint64)]
    cases += [("example", by_row.astype(np.int32)), ("example", np.array([list(range(8, -1, -1))] * 5, np.int32)),
              ("unified", np.array([6, 1, 3], np.int32)), ("unified", np.arange(8, -1, -1, dtype=np.int64))]
    for mode, sel in cases:
        res = ops.selected_backward(g, x, w, sel, mode, compact=compact)
        dx, dw, sdx, sdw = _multiset_ref(g, x, w, sel, mode)
        if compact:
            assert set(res.weight_rows.tolist()) >= set(np.flatnonzero(np.abs(dw).sum(1)).tolist())
            full = np.zeros(w.shape, np.float32)
            full[res.weight_rows] = res.weight
        else:
            full = res.weight
        ref.assert_close(res.input, dx, sdx, 9, f"{mode} {sel.dtype} {sel.tolist()} dx")
        ref.assert_close(full, dw, sdw, 5, f"{mode} {sel.dtype} {sel.tolist()} dW")
        if sel.dtype != np.int32:
            same = ops.selected_backward(g, x, w, sel.astype(np.int32), mode, compact=compact)
            np.testing.assert_array_equal(res.input, same.input)
            np.testing.assert_array_equal(res.weight, same.weight)


def test_selected_backward_bad_selections():
    """A cast would hide these (a float truncated, 2**32 + 3 wrapped to 3), a repeat in a unified
    set would count twice in dx and once in dW, a wrong bias_from would sum the wrong thing:
    each is an error naming the argument."""
    rng = np.random.default_rng(9)
    g, x, w = _problem(rng, 4, 10, 6)
    W, _ = _csr_case(rng, 10, 6, 0.5)
    sel = np.array([[1, 2, 3]] * 4, np.int32)
    for f in (lambda s, m: ops.selected_backward(g, x, w, s, m), lambda s, m: csr_selected_backward(g, x, W, s, m)):
        with pytest.raises(TypeError, match="selected must be an integer array.*float32"):
            f(sel.astype(np.float32) + 0.7, "example")
        with pytest.raises(TypeError, match="selected must be an integer array.*bool"):
            f(np.ones(10, bool), "unified")
        with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
            f(sel.astype(np.int64) + 2**32, "example")
        with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
            f(np.array([3, 2**32 + 5], np.int64), "unified")
        for bad in ([1, 10], [10, 1], [-1, 3], [3, -1]):  # int32, sorted or not: its ends or its extremes
            with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
                f(np.array(bad, np.int32), "unified")
        with pytest.raises(ValueError, match="repeats column 2.*set of columns"):
            f(np.array([5, 2, 7, 2], np.int32), "unified")
        with pytest.raises(ValueError, match="repeats column 1"):  # out entries, not every column
            f(np.array([1] * 10, np.int32), "unified")
        with pytest.raises(ValueError, match="1-D"):
            f(sel, "unified")
        with pytest.raises(ValueError, match="mode"):
            f(sel, "rows")
    with pytest.raises(ValueError, match="bias_from must have 10 columns"):
        ops.selected_backward(g, x, w, sel, "example", bias_from=g[:, :3])
    with pytest.raises(ValueError, match="bias_from must have 4 rows"):
        ops.selected_backward(g, x, w, sel, "example", bias_from=g[:3])
    with pytest.raises(TypeError, match="bias_from must be a numpy.ndarray"):
        ops.selected_backward(g, x, w, sel, "example", bias_from=g.tolist())
    other = rng.standard_normal(g.shape).astype(np.float32)
    np.testing.assert_allclose(ops.selected_backward(g, x, w, sel, "example", bias_from=other).bias,
                               other.astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)
    assert ops.selected_backward(g, x, w, sel, "example", bias_grad=False, bias_from=g[:, :3]).bias is None
    with pytest.raises(TypeError, match="weight must be a sparsebp.CSR"):
        csr_selected_backward(g, x, w, sel, "example")


def test_first_not_increasing():
    """The sortedness check of a unified selection, against a NumPy walk."""
    rng = np.random.default_rng(4)
    cases = [[], [3], [1, 2, 9], [1, 1], [4, 2], [0, 5, 5, 7], [-3, -1, 0]]
    cases += [np.sort(rng.choice(1000, 50, replace=False)).tolist() for _ in range(5)]
    cases += [rng.integers(0, 20, 30).tolist() for _ in range(5)]
    for c in cases:
        a = np.array(c, np.int32)
        bad = np.flatnonzero(np.diff(a.astype(np.int64)) <= 0)
        assert _core.first_not_increasing(a) == (int(bad[0]) + 1 if bad.size else -1), c
    for wrong in (np.arange(3, dtype=np.int64), np.zeros((2, 2), np.int32), np.arange(6, dtype=np.int32)[::2]):
        with pytest.raises(ValueError, match="C-contiguous 1-D int32"):
            _core.first_not_increasing(wrong)


def test_selection_dense_matches_the_products():
    """``Selection.dense()`` (Ĝ spelled out): a policy's selection against the top-k reference, and a
    hand-made one with a repeat, whose Ĝ W is selected_backward's dx (each against float64)."""
    from sparsebp.algorithms import MeProp, Selection

    rng = np.random.default_rng(12)
    g, x, w = _problem(rng, 6, 11, 5)
    for mode in ("example", "unified"):
        sel = MeProp(k=3, mode=mode).select(g)
        want = np.zeros(g.shape, np.float32)
        if mode == "example":
            cols = topk_ref(g, 3)
            for b in range(6):
                want[b, cols[b]] = g[b, cols[b]]
        else:
            cols = np.sort(np.lexsort((np.arange(11), -np.abs(g.astype(np.float64)).sum(0)))[:3])
            want[:, cols] = g[:, cols]
        np.testing.assert_array_equal(sel.dense(), want)
    cols = np.array([[2, 2, 7]] * 6, np.int32)
    dense = Selection("example", cols, g).dense()
    dx, _, sdx, _ = _multiset_ref(g, x, w, cols, "example")
    np.testing.assert_array_equal(dense[:, 2], 2 * g[:, 2])
    ref.assert_close(dense.astype(np.float64) @ w.astype(np.float64), dx, sdx, 11, "dense() W")
    ref.assert_close(ops.selected_backward(g, x, w, cols, "example").input, dx, sdx, 11, "dx")


def test_spmm_rows_checks_indices():
    d = np.ones((3, 4), np.float32)
    out = np.empty((1, 4), np.float32)
    with pytest.raises(ValueError, match="outside"):
        _core.spmm_rows(np.array([0, 1], np.int64), np.array([3], np.int32), np.ones(1, np.float32), d, out)
    with pytest.raises(ValueError, match="indptr"):
        _core.spmm_rows(np.array([0, 2], np.int64), np.array([0], np.int32), np.ones(1, np.float32), d, out)


def _spmm_rows_expect(indptr, indices, values, d):
    expect = np.zeros((len(indptr) - 1, d.shape[1]))
    scale = np.zeros_like(expect)
    for r in range(len(indptr) - 1):
        for p in range(indptr[r], indptr[r + 1]):
            expect[r] += values[p] * d[indices[p]].astype(np.float64)
            scale[r] += abs(values[p] * d[indices[p]].astype(np.float64))
    return expect, scale


@pytest.mark.parametrize("dblock", ["0", "1", "3", "8", "1000"])
@pytest.mark.parametrize("panel", ["1", "7", "64", "4096"])
def test_spmm_rows_blocked_against_float64(isa, monkeypatch, dblock, panel):
    """The gathered product with d split into row blocks (forced through the kernel's tuning
    variables): sorted rows with repeats, empty rows and rows whose entries all fall in a late
    block, odd widths; every element written, and the same bits whatever the blocking (the same
    sums in the same order). Unsorted rows fall back to no blocks and stay correct."""
    rng = np.random.default_rng(31)
    for rows, cols, d_rows in ((9, 5, 4), (30, 131, 23), (5, 300, 40)):
        counts = rng.integers(0, 7, rows)
        counts[0] = 0
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        indices = np.concatenate([np.sort(rng.integers(0, d_rows, c)) for c in counts]).astype(np.int32)
        if counts[1]:
            indices[indptr[1]:indptr[2]] = d_rows - 1  # all in the last block, repeated
        values = rng.standard_normal(indptr[-1]).astype(np.float32)
        d = rng.standard_normal((d_rows, cols)).astype(np.float32)
        expect, scale = _spmm_rows_expect(indptr, indices, values, d)
        monkeypatch.setenv("SPARSEBP_SPMM_DBLOCK", "0")
        monkeypatch.setenv("SPARSEBP_SPMM_PANEL", "4096")
        plain = np.empty((rows, cols), np.float32)
        _core.spmm_rows(indptr, indices, values, d, plain)
        monkeypatch.setenv("SPARSEBP_SPMM_DBLOCK", dblock)
        monkeypatch.setenv("SPARSEBP_SPMM_PANEL", panel)
        out = np.full((rows, cols), np.nan, np.float32)
        _core.spmm_rows(indptr, indices, values, d, out)
        ref.assert_close(out, expect, scale, d_rows, f"{rows}x{d_rows}->{cols} block {dblock} panel {panel}")
        np.testing.assert_array_equal(out, plain)
        shuffled = indices.copy()  # unsorted rows: no blocks, still the right sums
        for r in range(rows):
            rng.shuffle(shuffled[indptr[r]:indptr[r + 1]])
        out2 = np.full((rows, cols), np.nan, np.float32)
        _core.spmm_rows(indptr, shuffled, values, d, out2)
        e2, s2 = _spmm_rows_expect(indptr, shuffled, values, d)
        ref.assert_close(out2, e2, s2, d_rows, f"unsorted block {dblock} panel {panel}")


@pytest.mark.parametrize("d_rows, d_cols", [(1100, 2000), (600, 1000)])
def test_spmm_rows_blocks_a_large_operand(isa, monkeypatch, d_rows, d_cols):
    """Past 2^21 floats of d (or 2^19 in 512 rows or more) the kernel blocks on its own, in tiles
    as wide as the last-level cache allows: the same bits as the unblocked product."""
    monkeypatch.delenv("SPARSEBP_SPMM_DBLOCK", raising=False)
    monkeypatch.delenv("SPARSEBP_SPMM_PANEL", raising=False)
    rng = np.random.default_rng(32)
    d = rng.standard_normal((d_rows, d_cols), dtype=np.float32)
    rows, k = 6, 40
    indices = np.sort(np.stack([rng.choice(d_rows, k, replace=False) for _ in range(rows)]), axis=1).astype(np.int32)
    indptr = np.arange(0, rows * k + 1, k, dtype=np.int64)
    values = rng.standard_normal(rows * k).astype(np.float32)
    out = np.full((rows, d_cols), np.nan, np.float32)
    _core.spmm_rows(indptr, indices.reshape(-1), values, d, out)
    expect, scale = _spmm_rows_expect(indptr, indices.reshape(-1), values, d)
    ref.assert_close(out, expect, scale, k, f"large d {d_rows} x {d_cols}")
    monkeypatch.setenv("SPARSEBP_SPMM_DBLOCK", "0")
    plain = np.empty_like(out)
    _core.spmm_rows(indptr, indices.reshape(-1), values, d, plain)
    np.testing.assert_array_equal(out, plain)


def test_spmm_scatter_against_float64(isa):
    """The scattered transposed product on its own: odd widths (tails), empty rows, repeated targets."""
    rng = np.random.default_rng(12)
    for rows, cols, out_rows in ((7, 5, 3), (40, 131, 9), (3, 1000, 17)):
        counts = rng.integers(0, 5, rows)
        counts[0] = 0
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        indices = rng.integers(0, out_rows, indptr[-1]).astype(np.int32)
        values = rng.standard_normal(indptr[-1]).astype(np.float32)
        d = rng.standard_normal((rows, cols)).astype(np.float32)
        out = np.full((out_rows, cols), np.nan, np.float32)  # every element must be written
        _core.spmm_scatter(indptr, indices, values, d, out)
        expect = np.zeros((out_rows, cols))
        scale = np.zeros((out_rows, cols))
        for r in range(rows):
            for p in range(indptr[r], indptr[r + 1]):
                expect[indices[p]] += values[p] * d[r].astype(np.float64)
                scale[indices[p]] += abs(values[p] * d[r].astype(np.float64))
        ref.assert_close(out, expect, scale, rows, f"{rows}x{cols}->{out_rows}")
    with pytest.raises(ValueError, match="outside"):
        _core.spmm_scatter(np.array([0, 1], np.int64), np.array([5], np.int32), np.ones(1, np.float32),
                           np.ones((1, 4), np.float32), np.empty((2, 4), np.float32))


@pytest.mark.parametrize("mode", ["example", "unified"])
def test_compact_weight_gradient_holds_the_touched_rows(isa, mode):
    rng = np.random.default_rng(21)
    g, x, w = _problem(rng, 9, 60, 13)
    for k in (0, 3, 59, 60):
        full = ops.meprop_backward(g, x, w, k, mode)
        comp = ops.meprop_backward(g, x, w, k, mode, compact=True)
        np.testing.assert_array_equal(comp.input, full.input)
        expect_rows = np.unique(full.selected) if k < 60 else np.arange(60)
        np.testing.assert_array_equal(comp.weight_rows, expect_rows)
        np.testing.assert_array_equal(comp.weight, full.weight[expect_rows])
        rest = np.setdiff1d(np.arange(60), expect_rows)
        assert not full.weight[rest].any()
        assert full.weight_rows is None


def test_selection_by_column_against_numpy():
    """The per-example selection regrouped by column (the CSR both per-example products run on):
    against a stable NumPy sort; columns outside the gradient and bad shapes are ValueErrors."""
    from sparsebp import _core

    rng = np.random.default_rng(31)
    g = rng.standard_normal((9, 13)).astype(np.float32)
    sel = np.sort(np.argsort(rng.random((9, 13)), axis=1)[:, :4], axis=1).astype(np.int32)
    sel[4] = [0, 0, 5, 12]  # a repeated column
    padded = np.full((9, 20), np.nan, np.float32)[:, :13]  # rows 20 floats apart
    padded[...] = g
    flat = sel.reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=13)
    for gg in (g, padded):
        indptr, row_of, vals, touched, tindptr, by_example = _core.selection_by_column(sel, gg)
        np.testing.assert_array_equal(indptr, np.concatenate([[0], np.cumsum(counts)]))
        np.testing.assert_array_equal(row_of, order // 4)
        np.testing.assert_array_equal(vals, g[order // 4, flat[order]])
        np.testing.assert_array_equal(touched, np.unique(flat))
        np.testing.assert_array_equal(tindptr, np.concatenate([[0], np.cumsum(counts[np.unique(flat)])]))
        np.testing.assert_array_equal(by_example, np.take_along_axis(g, sel, axis=1).reshape(-1))
    empty = _core.selection_by_column(np.zeros((9, 0), np.int32), g)
    assert empty[0].tolist() == [0] * 14 and len(empty[3]) == 0 and empty[4].tolist() == [0] and len(empty[5]) == 0
    bad = sel.copy()
    bad[2, 1] = 13
    with pytest.raises(ValueError, match=r"selected\[2, 1\] = 13 is outside \[0, 13\)"):
        _core.selection_by_column(bad, g)
    with pytest.raises(ValueError, match="shape"):
        _core.selection_by_column(sel[:3], g)


@pytest.mark.parametrize("one_pass", [None, "0", "16"])
@pytest.mark.parametrize("n", [25, 30, 517, 2100])
def test_topk_small_k_one_pass(isa, n, one_pass, monkeypatch):
    """Small k: the one-pass path with a running threshold (the scalar set's for k <= 6, the SIMD
    sets' for k <= 2 on narrow rows) and the sampled path, each set's own rule and either path
    forced (SPARSEBP_TOPK_ONE_PASS): heavy ties and signed zeros, continuous values, ascending and
    descending rows, NaN anywhere."""
    if one_pass is None:  # each set's own rule, even where the caller's environment forces one
        monkeypatch.delenv("SPARSEBP_TOPK_ONE_PASS", raising=False)
    else:
        monkeypatch.setenv("SPARSEBP_TOPK_ONE_PASS", one_pass)
    rng = np.random.default_rng(11 + n)
    rows = [rng.integers(-2, 3, size=n), rng.standard_normal(n), np.arange(n), -np.arange(n)[::-1],
            np.zeros(n), np.full(n, -0.0), np.r_[np.ones(n - 3), [5, 5, 5]]]
    g = np.array(rows, np.float32)
    for k in (1, 2, 3, 5, 8, 9, 16):
        if k <= n:
            np.testing.assert_array_equal(ops.topk(g, k), topk_ref(g, k), err_msg=f"n={n} k={k}")
    for at in (0, 2, n - 1):
        for k in (1, 2, 5):
            h = g.copy()
            h[3, at] = np.nan
            with pytest.raises(ValueError, match="NaN"):
                ops.topk(h, k)


def _csr_case(rng, rows, cols, density, empty_rows=()):
    dense = (rng.standard_normal((rows, cols)) * (rng.random((rows, cols)) < density)).astype(np.float32)
    dense[list(empty_rows)] = 0.0
    import sparsebp

    return sparsebp.CSR.from_dense(dense), dense


@pytest.mark.parametrize("threads", [1, 2])
def test_csr_example_backward_against_float64(isa, threads):
    """Sparse weights with per-example sparse gradients: dx = Ĝ W and the weight gradient at the
    stored entries (zero in rows no example selected) against float64 with an explicit Ĝ, including
    empty rows, a repeated selection (counted twice, as in the dense per-example path) and k = 0;
    identical bits on 1 and 2 threads."""
    import sparsebp

    before = sparsebp.get_num_threads()
    rng = np.random.default_rng(77)
    try:
        for batch, rows, cols, density, k in ((5, 12, 9, 0.5, 3), (64, 400, 600, 0.2, 30), (3, 7, 4, 1.0, 0),
                                              (33, 50, 70, 0.05, 7)):
            W, dense = _csr_case(rng, rows, cols, density, empty_rows=(0, rows - 1))
            g = rng.standard_normal((batch, rows)).astype(np.float32)
            x = rng.standard_normal((batch, cols)).astype(np.float32)
            sel = topk_ref(g, k).astype(np.int32)
            if k > 1:
                sel[0, 1] = sel[0, 0]
            gh = np.zeros((batch, rows))
            for b in range(batch):
                for j in sel[b]:
                    gh[b, j] += g[b, j]
            got = {}
            for n in (1, 2):
                sparsebp.set_num_threads(n)
                got[n] = csr_selected_backward(g, x, W, sel, "example")
            dx, dv, pos = got[2]
            ref.assert_close(dx, gh @ dense.astype(np.float64), np.abs(gh) @ np.abs(dense.astype(np.float64)),
                             max(k, 1), f"dx {batch}x{rows}x{cols} k={k}")
            full = gh.T @ x.astype(np.float64)
            rr = np.repeat(np.arange(rows), np.diff(W.indptr))
            want = full[rr, W.indices]
            scale = (np.abs(gh).T @ np.abs(x.astype(np.float64)))[rr, W.indices]
            ref.assert_close(dv, want, scale, batch, f"dvalues {batch}x{rows}x{cols} k={k}")
            touched = np.unique(sel) if k else np.zeros(0, np.int64)
            np.testing.assert_array_equal(np.sort(pos), np.flatnonzero(np.isin(rr, touched)))
            assert np.all(dv[np.setdiff1d(np.arange(W.nnz), pos)] == 0)
            for a1, a2 in zip(got[1][:2], got[2][:2]):
                np.testing.assert_array_equal(a1, a2)
            dx0, dv0, _ = csr_selected_backward(g, x, W, sel, "example", input_grad=False)
            assert dx0 is None
            np.testing.assert_array_equal(dv0, dv)
            # The raw arrays (their indices checked per call) give what the structure does.
            dxa, dva = np.empty_like(dx), np.empty_like(dv)
            ta, pa = _core.csr_example_backward(W.indptr, W.indices, W.values, cols, sel, g, x, dxa, dva)
            np.testing.assert_array_equal(ta, touched)
            np.testing.assert_array_equal(pa, pos)
            np.testing.assert_array_equal(dxa, dx)
            np.testing.assert_array_equal(dva, dv)
    finally:
        sparsebp.set_num_threads(before)


def test_csr_example_backward_bad_input():
    rng = np.random.default_rng(3)
    W, _ = _csr_case(rng, 6, 5, 0.6)
    g = rng.standard_normal((4, 6)).astype(np.float32)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    sel = np.array([[0, 2], [1, 5], [3, 4], [0, 1]], np.int32)
    with pytest.raises(ValueError, match="outside"):
        csr_selected_backward(g, x, W, np.array([[0, 6]] * 4, np.int32), "example")
    with pytest.raises(ValueError, match="selected must have shape"):
        csr_selected_backward(g, x, W, sel[:3], "example")
    with pytest.raises(ValueError, match="x"):
        csr_selected_backward(g, x[:, :4], W, sel, "example")
    dv = np.empty(W.nnz, np.float32)
    bad_idx = W.indices.copy()
    bad_idx[W.indptr[1]] = 99  # an entry of row 1, which sel[1] touches
    with pytest.raises(ValueError, match="is outside"):
        _core.csr_example_backward(W.indptr, bad_idx, W.values, 5, sel, g, x, None, dv)
    with pytest.raises(ValueError, match="indices must be None"):
        _core.csr_example_backward(W.structure, W.indices, W.values, 5, sel, g, x, None, dv)
    with pytest.raises(ValueError, match="cols must be the structure's 5"):
        _core.csr_example_backward(W.structure, None, W.values, 4, sel, g, x, None, dv)
    with pytest.raises(ValueError, match="values must have nnz"):
        _core.csr_example_backward(W.structure, None, W.values[:-1], 5, sel, g, x, None, dv)
    with pytest.raises(ValueError, match="outside"):  # the selection is still checked
        _core.csr_example_backward(W.structure, None, W.values, 5, np.array([[0, 6]] * 4, np.int32), g, x, None, dv)
    with pytest.raises(ValueError, match="dvalues needs x"):
        _core.csr_example_backward(W.indptr, W.indices, W.values, 5, sel, g, None, None, dv)
    with pytest.raises(ValueError, match="nnz"):
        _core.csr_example_backward(W.indptr, W.indices, W.values, 5, sel, g, x, None, dv[:-1])


@pytest.mark.parametrize("threads", [1, 2])
def test_csr_unified_backward_against_float64(isa, threads):
    """Sparse weights with a unified sparse gradient (one set of rows for the batch): dx = G[:, T] W[T]
    and the weight gradient at the stored entries of the rows in T (zero elsewhere) against float64,
    with batches below and above the kernels' batch tile, one example and none, empty rows selected
    (and only empty rows: no entries to copy at all), k = 0, every row, a set given out of order, and
    x in Fortran order; the same bits on 1 and 2 threads, out of order or sorted, and with or without
    dx; inputs left as they were."""
    import sparsebp

    before = sparsebp.get_num_threads()
    rng = np.random.default_rng(78)
    try:
        for batch, rows, cols, density, k in ((5, 12, 9, 0.5, 3), (200, 150, 300, 0.2, 30), (1, 40, 17, 0.3, 6),
                                              (0, 10, 8, 0.5, 4), (7, 20, 11, 0.4, 0), (9, 16, 13, 0.6, 16),
                                              (64, 500, 784, 0.1, 20), (6, 10, 8, 0.5, 2)):
            W, dense = _csr_case(rng, rows, cols, density, empty_rows=(0, rows - 1))
            g = rng.standard_normal((batch, rows)).astype(np.float32)
            x = rng.standard_normal((batch, cols)).astype(np.float32)
            # out of order, with the two empty rows first when k >= 2
            sel = np.concatenate([[rows - 1, 0], 1 + rng.permutation(rows - 2)])[:k].astype(np.int32)
            copies = [a.copy() for a in (g, x, sel, W.values)]
            got = {}
            for n in (1, 2):
                sparsebp.set_num_threads(n)
                got[n] = csr_selected_backward(g, x, W, sel, "unified")
            for a, c in zip((g, x, sel, W.values), copies):
                np.testing.assert_array_equal(a, c)
            dx, dv, pos = got[2]
            gh = np.zeros((batch, rows))
            gh[:, sel] = g[:, sel]
            what = f"{batch}x{rows}x{cols} k={k}"
            assert dx.shape == (batch, cols) and dv.shape == (W.nnz,)
            ref.assert_close(dx, gh @ dense.astype(np.float64), np.abs(gh) @ np.abs(dense.astype(np.float64)),
                             max(k, 1), f"dx {what}")
            rr = np.repeat(np.arange(rows), np.diff(W.indptr))
            want = (gh.T @ x.astype(np.float64))[rr, W.indices]
            scale = (np.abs(gh).T @ np.abs(x.astype(np.float64)))[rr, W.indices]
            ref.assert_close(dv, want, scale, max(batch, 1), f"dvalues {what}")
            np.testing.assert_array_equal(pos, np.flatnonzero(np.isin(rr, sel)))  # increasing
            assert np.all(dv[~np.isin(rr, sel)] == 0)
            for a1, a2 in zip(got[1][:2], got[2][:2]):
                np.testing.assert_array_equal(a1, a2)
            for other in (csr_selected_backward(g, x, W, np.sort(sel), "unified"),
                          csr_selected_backward(g, np.asfortranarray(x), W, sel, "unified")):
                for a1, a2 in zip(other, got[2]):
                    np.testing.assert_array_equal(a1, a2)
            dx0, dv0, pos0 = csr_selected_backward(g, x, W, sel, "unified", input_grad=False)
            assert dx0 is None
            np.testing.assert_array_equal(dv0, dv)
            np.testing.assert_array_equal(pos0, pos)
    finally:
        sparsebp.set_num_threads(before)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(0, 80), rows=st.integers(1, 60), cols=st.integers(1, 70),
       density=st.sampled_from([0.0, 0.05, 0.3, 1.0]), frac=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_hypothesis_csr_unified_backward(isa, batch, rows, cols, density, frac, seed):
    """Sparse weights with a unified sparse gradient on random shapes, densities (empty and full
    matrices included) and sets of rows given in any order, against float64."""
    rng = np.random.default_rng(seed)
    W, dense = _csr_case(rng, rows, cols, density)
    g = rng.standard_normal((batch, rows)).astype(np.float32)
    x = rng.standard_normal((batch, cols)).astype(np.float32)
    sel = rng.permutation(rows)[:round(frac * rows)].astype(np.int32)
    dx, dv, pos = csr_selected_backward(g, x, W, sel, "unified")
    gh = np.zeros((batch, rows))
    gh[:, sel] = g[:, sel]
    d64 = dense.astype(np.float64)
    ref.assert_close(dx, gh @ d64, np.abs(gh) @ np.abs(d64), max(len(sel), 1), "dx")
    rr = np.repeat(np.arange(rows), np.diff(W.indptr))
    ref.assert_close(dv, (gh.T @ x.astype(np.float64))[rr, W.indices],
                     (np.abs(gh).T @ np.abs(x.astype(np.float64)))[rr, W.indices], max(batch, 1), "dvalues")
    np.testing.assert_array_equal(pos, np.flatnonzero(np.isin(rr, sel)))


def test_csr_rows_backward_bad_input():
    """The engine call under the unified path refuses, before writing anything, a selection that is
    not strictly increasing or leaves the rows, wrong lengths and outputs that share memory with an
    input or each other."""
    rng = np.random.default_rng(4)
    W, _ = _csr_case(rng, 6, 5, 0.6)
    g = rng.standard_normal((4, 6)).astype(np.float32)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    dx, dv = np.full((4, 5), 7, np.float32), np.full(W.nnz, 7, np.float32)
    sel = np.array([1, 3], np.int32)
    for bad, msg in (([3, 1], "strictly increasing; selected.1. = 1 follows 3"), ([1, 1], "strictly increasing"),
                     ([1, 6], r"outside \[0, 6\)"), ([-1, 2], "outside")):
        with pytest.raises(ValueError, match=msg):
            _core.csr_rows_backward(W.structure, W.values, np.array(bad, np.int32), g, x, dx, dv)
    assert np.all(dx == 7) and np.all(dv == 7)
    with pytest.raises(ValueError, match="int32"):
        _core.csr_rows_backward(W.structure, W.values, sel.astype(np.int64), g, x, dx, dv)
    with pytest.raises(ValueError, match="values must have nnz"):
        _core.csr_rows_backward(W.structure, W.values[:-1], sel, g, x, dx, dv)
    with pytest.raises(ValueError, match="dvalues must have nnz"):
        _core.csr_rows_backward(W.structure, W.values, sel, g, x, dx, dv[:-1])
    with pytest.raises(ValueError, match="grad_output must have shape"):
        _core.csr_rows_backward(W.structure, W.values, sel, g[:, :5], x, dx, dv)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, in_features\) = \(4, 5\); got \(4, 4\)"):
        _core.csr_rows_backward(W.structure, W.values, sel, g, x[:, :4], dx, dv)
    with pytest.raises(ValueError, match=r"grad_output must have shape .* = \(3, 6\); got \(4, 6\)"):
        _core.csr_rows_backward(W.structure, W.values, sel, g, x[:3], dx, dv)
    with pytest.raises(ValueError, match="dvalues must not share memory with values"):
        _core.csr_rows_backward(W.structure, W.values, sel, g, x, dx, W.values)
    with pytest.raises(ValueError, match="grad_input must not share memory with grad_output"):
        _core.csr_rows_backward(W.structure, W.values, sel, g, x, g[:, :5], dv)
    with pytest.raises(ValueError, match="grad_input must not share memory with x"):
        _core.csr_rows_backward(W.structure, W.values, sel, g, x, x, dv)
    assert np.all(dx == 7) and np.all(dv == 7)


def _msbp_reference(g, memory, alpha, k):
    """One MSBP step from the definition (ALGORITHMS.md section 3), in float64 where it is exact:
    a sum or product of two float32 numbers is exact in float64, so rounding it once to float32
    gives float32 arithmetic's result. Column scores in float64, ranked by (-score, column).
    Returns u, the columns, the next memory with subnormals flushed, and that memory unflushed."""
    g64 = g.astype(np.float64)
    u = g if memory is None else (g64 + memory.astype(np.float64)).astype(np.float32)
    scores = np.abs(u.astype(np.float64)).sum(axis=0)
    n = g.shape[1]
    cols = np.sort(np.lexsort((np.arange(n), -scores))[:min(k, n)])
    raw = (np.float64(np.float32(alpha)) * u.astype(np.float64)).astype(np.float32)
    raw[:, cols] = 0.0
    flushed = np.where(np.abs(raw) < np.finfo(np.float32).tiny, np.float32(0), raw)
    return u, cols, flushed, raw


def test_msbp_steps_against_reference(isa):
    """MSBP.select over a run of steps (one C++ pass each) against the definition: u, the columns
    and the memory bit for bit, subnormal memory flushed to 0. The gradients have units that stop
    firing (exact zeros), so the memory of those units decays through the subnormal range."""
    from sparsebp import algorithms as alg

    rng = np.random.default_rng(11)
    batch, n, k, alpha = 6, 40, 5, 0.5
    pol = alg.MSBP(k=k, alpha=alpha)
    memory, saw_subnormal = None, False
    for step in range(150):
        g = (rng.standard_normal((batch, n)) * 1e-30).astype(np.float32)  # small: a few halvings reach 1e-38
        g[:, step % 7::7] = 0.0  # units that are silent this step
        if step > 20:
            g[:, :10] = 0.0  # units silent for good: their memory decays
        u_ref, cols_ref, mem_ref, raw = _msbp_reference(g, memory, alpha, k)
        scores = np.sort(np.abs(u_ref.astype(np.float64)).sum(axis=0))[::-1]
        if 0 < k < n and scores[k - 1] == scores[k]:
            continue  # an exact tie of float64 sums may order differently in float32: not this test's subject
        sel = pol.select(g)
        np.testing.assert_array_equal(sel.cols, cols_ref, err_msg=f"step {step}")
        np.testing.assert_array_equal(sel.grad, u_ref, err_msg=f"step {step}")
        np.testing.assert_array_equal(pol.memory, mem_ref, err_msg=f"step {step}")
        assert not np.any((pol.memory != 0) & (np.abs(pol.memory) < np.finfo(np.float32).tiny))
        saw_subnormal |= bool(np.any((raw != 0) & (np.abs(raw) < np.finfo(np.float32).tiny)))
        memory = mem_ref
    assert saw_subnormal  # the run did reach memory the flush had to clear


@pytest.mark.parametrize("k", [0, 1, 39, 40, 45])
def test_msbp_k_edges_padded_rows_and_nan(isa, k):
    """k = 0 keeps everything in memory, k >= n nothing; rows with padding (a view) work; a NaN
    in g is a ValueError (0 < k < n) that leaves the memory as it was."""
    from sparsebp import algorithms as alg

    rng = np.random.default_rng(k)
    big = rng.standard_normal((4, 48)).astype(np.float32)
    g1, g2 = big[:, :40], (rng.standard_normal((4, 40)) * 3).astype(np.float32)
    pol = alg.MSBP(k=k, alpha=0.75)
    pol.select(g1)
    before = pol.memory.copy()
    u_ref, cols_ref, mem_ref, _ = _msbp_reference(g2, before, 0.75, k)
    sel = pol.select(g2)
    np.testing.assert_array_equal(sel.cols, cols_ref)
    np.testing.assert_array_equal(sel.grad, u_ref)
    np.testing.assert_array_equal(pol.memory, mem_ref)
    if k >= 40:
        assert not pol.memory.any()
    bad = g2.copy()
    bad[2, 3] = np.nan
    kept = pol.memory.copy()
    if 0 < k < 40:
        with pytest.raises(ValueError, match="NaN"):
            pol.select(bad)
        np.testing.assert_array_equal(pol.memory, kept)
    with pytest.raises(TypeError, match="float32"):
        pol.select(g2.astype(np.float64))
