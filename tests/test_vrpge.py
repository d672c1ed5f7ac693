"""VR-PGE (design/ALGORITHMS.md section 5): the estimator by exact enumeration over all masks, the
budget projection against an exact rational-arithmetic solver, the block kernels (every ISA)
against NumPy, lazy SGD against float64 dense SGD, and the trainer's gradients against a float64
NumPy masked network."""
import itertools
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

import reference

import sparsebp
from sparsebp import _core, nn, ops
from sparsebp.algorithms import vrpge
from sparsebp.algorithms.vrpge import VRPGE, MaskAdam, estimator, plain_estimator, project_budget, score


# ---- estimator: exact enumeration ----------------------------------------------------------------
def _masks(n):
    return [np.array(b, dtype=float) for b in itertools.product([0, 1], repeat=n)]


def _prob(m, s):
    return float(np.prod(np.where(m == 1, s, 1 - s)))


def _enumerate(loss, s, est, kind):
    """Exact mean and total variance of est(f1, f2, m1, m2, s) over independent m1, m2 ~ Bern(s)."""
    ms = _masks(len(s))
    mean = np.zeros(len(s))
    second = 0.0
    for m1 in ms:
        for m2 in ms:
            p = _prob(m1, s) * _prob(m2, s)
            g = est(loss(m1), loss(m2), m1, m2, s, kind)
            mean += p * g
            second += p * float(g @ g)
    return mean, second - float(mean @ mean)


def _exact_grad(loss, s):
    """d/ds_i E[L(m)] = sum_m L(m) dp(m)/ds_i, by enumeration."""
    g = np.zeros(len(s))
    for m in _masks(len(s)):
        for i in range(len(s)):
            others = np.prod([s[j] if m[j] else 1 - s[j] for j in range(len(s)) if j != i])
            g[i] += loss(m) * (1.0 if m[i] else -1.0) * others
    return g


def _loss_table(n, seed, offset):
    rng = np.random.default_rng(seed)
    table = {tuple(m): offset + 0.3 * rng.standard_normal() for m in _masks(n)}
    return lambda m: table[tuple(m)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimator_unbiased_both_scores(seed):
    n = 4
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.1, 0.9, n)
    loss = _loss_table(n, seed, 2.3)
    exact = _exact_grad(loss, s)
    mean_t, _ = _enumerate(loss, s, estimator, "textbook")
    np.testing.assert_allclose(mean_t, exact, rtol=1e-10, atol=1e-12)
    # the authors' score estimates sqrt(s(1-s)) * gradient
    mean_a, _ = _enumerate(loss, s, estimator, "authors")
    np.testing.assert_allclose(mean_a, np.sqrt(s * (1 - s)) * exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["textbook", "authors"])
def test_estimator_variance_far_below_plain_policy_gradient(kind):
    n = 4
    s = np.array([0.2, 0.5, 0.7, 0.35])
    loss = _loss_table(n, 7, 2.3)  # a loss around 2.3 (cross-entropy of 10 classes), varying by ~0.3
    m_vr, v_vr = _enumerate(loss, s, estimator, kind)
    m_pg, v_pg = _enumerate(loss, s, plain_estimator, kind)
    np.testing.assert_allclose(m_vr, m_pg, rtol=1e-10, atol=1e-12)  # both unbiased for the same target
    assert v_pg / v_vr >= 10.0, (v_pg, v_vr)


def test_estimator_invariant_to_constant_shift():
    n = 3
    s = np.array([0.3, 0.6, 0.45])
    loss = _loss_table(n, 3, 1.0)
    shifted = lambda m: loss(m) + 123.0  # noqa: E731
    for kind in ("authors", "textbook"):
        a = _enumerate(loss, s, estimator, kind)
        b = _enumerate(shifted, s, estimator, kind)
        np.testing.assert_allclose(a[0], b[0], atol=1e-9)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-6)
    ms = _masks(n)
    for m1, m2 in itertools.product(ms, ms):  # per sample too (f1 - f2 is all it sees)
        np.testing.assert_allclose(estimator(loss(m1), loss(m2), m1, m2, s),
                                   estimator(shifted(m1), shifted(m2), m1, m2, s), atol=1e-9)


def test_score_values_and_edges():
    s = np.array([0.25, 0.5, 0.0, 1.0])
    m = np.array([1, 0, 0, 1])
    np.testing.assert_allclose(score(m, s, "textbook"), [0.75 / 0.1875, -0.5 / 0.25, 0, 0])
    np.testing.assert_allclose(score(m, s, "authors"), [0.75 / np.sqrt(0.1875), -0.5 / 0.5, 0, 0])
    with pytest.raises(ValueError, match="score"):
        score(m, s, "nope")


# ---- projection ----------------------------------------------------------------------------------
def _project_exact(s, k):
    """Independent reference in exact rational arithmetic: try every segment between breakpoints."""
    s = [Fraction(x) for x in s]
    k = Fraction(k)
    clip = lambda x: min(max(x, Fraction(0)), Fraction(1))  # noqa: E731
    if sum(clip(x) for x in s) <= k:
        return [clip(x) for x in s]
    bps = sorted({Fraction(0)} | {x - 1 for x in s if x - 1 > 0} | {x for x in s if x > 0})
    for lo, hi in zip(bps, bps[1:]):
        flo = sum(clip(x - lo) for x in s)
        fhi = sum(clip(x - hi) for x in s)
        if flo >= k >= fhi:
            v = hi if flo == fhi else lo + (flo - k) * (hi - lo) / (flo - fhi)
            return [clip(x - v) for x in s]
    raise AssertionError("no segment")


@pytest.mark.parametrize("seed", range(30))
def test_projection_exact_feasible_idempotent(seed, isa):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    s = rng.uniform(-0.5, 1.8, n)
    s[rng.random(n) < 0.2] = 0.5  # repeated values
    if seed % 3 == 0:  # breakpoints exactly at 0 and 1, and coinciding ones (s_i - 1 = s_j)
        s[rng.random(n) < 0.3] = rng.choice([0.0, 1.0, 1.5, 2.0, 0.0 - 0.0])
    k = float(rng.uniform(0, n))
    ref = np.array([float(x) for x in _project_exact(s, k)])
    for method in ("sort", "select", "bisect"):
        p = project_budget(s, k, method)
        np.testing.assert_allclose(p, ref, atol=1e-12)
        assert p.min() >= 0 and p.max() <= 1 and p.sum() <= k + 1e-9
        np.testing.assert_allclose(project_budget(p, k, method), p, atol=1e-12)
    # optimality (variational inequality): (s - p) . (z - p) <= 0 for feasible z
    p = project_budget(s, k)
    for _ in range(20):
        z = project_budget(rng.uniform(0, 1, n), k)
        assert float((s - p) @ (z - p)) <= 1e-9


@pytest.mark.parametrize("s, k", [([1.0, 1.0, 0.0], 1.0), ([1.0, 2.0, 0.5], 0.0), ([0.3, 0.3, 0.3], 0.9),
                                  ([2.0, 1.0], 1.5), ([5.0], 0.25), ([], 0.0)])
def test_projection_edge_cases_against_exact(s, k, isa):
    ref = [float(x) for x in _project_exact(s, k)] if s else []
    for method in ("sort", "select"):
        np.testing.assert_allclose(project_budget(np.array(s, dtype=np.float64), k, method), ref, atol=1e-12)


@pytest.mark.parametrize("case", ["uniform", "constant", "polarised", "ties"])
def test_projection_select_matches_sort_at_scale(case, isa):
    # Training-sized vectors (the per-weight MLP has ~650k entries), against the sort-based solver
    # (itself checked against exact rational arithmetic above): the shapes s takes in training.
    rng = np.random.default_rng(11)
    n = 200_000
    s = {"uniform": lambda: rng.uniform(-0.3, 1.3, n),
         "constant": lambda: np.full(n, 0.1) + 1e-3,  # the start, moved by one step: one breakpoint
         "polarised": lambda: np.where(rng.random(n) < 0.1, rng.uniform(0.95, 1.02, n), rng.uniform(-0.05, 0.03, n)),
         "ties": lambda: rng.choice([0.2, 0.7, 1.0, 1.2, 1.7], n)}[case]()
    for k in (0.05 * n, 0.1 * n, 0.5 * n):
        a, b = project_budget(s, k, "select"), project_budget(s, k, "sort")
        np.testing.assert_allclose(a, b, atol=1e-12)
        assert a.sum() <= k * (1 + 1e-10)  # sums of 200k doubles: ~1e-12 relative rounding


def test_projection_bad_input():
    with pytest.raises(ValueError, match="budget"):
        project_budget([0.5], -1)
    with pytest.raises(ValueError, match="finite"):
        project_budget([np.nan], 1)
    with pytest.raises(ValueError, match="method"):
        project_budget([0.5], 1, "x")


def test_projection_finds_a_non_finite_entry_anywhere(isa):
    # The C++ check (below project_budget's own) runs in the vectorised pass: every position of the
    # unrolled body and of the tail.
    for n in range(1, 10):
        for pos in range(n):
            for bad in (np.nan, np.inf, -np.inf):
                s = np.full(n, 0.5)
                s[pos] = bad
                for select in (False, True):
                    with pytest.raises(ValueError, match=rf"s\[{pos}\] = .* is not finite"):
                        _core.project_budget(s, 1.0, select)


# ---- block kernels, every ISA --------------------------------------------------------------------
def _sorted_subset(rng, n, k):
    return np.sort(rng.choice(n, k, replace=False)).astype(np.int64)


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (64, 130), (300, 17)])
def test_gather_scatter_blocks(isa, shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.standard_normal(shape).astype(np.float32)
    keep = a.copy()
    for kr, kc in [(shape[0], shape[1]), (max(1, shape[0] // 3), max(1, shape[1] // 2)), (0, 1)]:
        r = _sorted_subset(rng, shape[0], kr)
        c = _sorted_subset(rng, shape[1], kc)
        np.testing.assert_array_equal(ops.gather_block(a, r, c), a[np.ix_(r, c)])
        np.testing.assert_array_equal(ops.gather_block(a, r), a[r])
        np.testing.assert_array_equal(ops.gather_block(a, None, c), a[:, c])
        d = rng.standard_normal(shape).astype(np.float32)
        exp = d.astype(np.float64)
        src = rng.standard_normal((len(r), len(c))).astype(np.float32)
        exp[np.ix_(r, c)] += 0.5 * src
        ops.scatter_add_block(d, src, r, c, alpha=0.5)
        np.testing.assert_allclose(d, exp, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(a, keep)  # input untouched
    b = rng.standard_normal(shape[0]).astype(np.float32)
    r = _sorted_subset(rng, shape[0], max(1, shape[0] // 2))
    np.testing.assert_array_equal(ops.gather_block(b, r), b[r])


def test_block_bad_input():
    a = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match="strictly increasing"):
        ops.gather_block(a, [2, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        ops.gather_block(a, [1, 1])
    with pytest.raises(ValueError, match="lie in"):
        ops.gather_block(a, None, [0, 5])
    with pytest.raises(TypeError, match="float32"):
        ops.gather_block(a.astype(np.float64), [0])
    with pytest.raises(TypeError, match="integers"):
        ops.gather_block(a, [0.5])
    with pytest.raises(ValueError, match="shape"):
        ops.scatter_add_block(a, np.zeros((2, 2), np.float32), [0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.scatter_add_block(np.asfortranarray(a), np.zeros((1, 1), np.float32), [0], [0])
    # the C++ layer checks on its own too
    with pytest.raises(ValueError, match="strictly increasing"):
        _core.gather_block(a, np.array([3, 0]), None, np.zeros((2, 5), np.float32))


@pytest.mark.parametrize("peek", [False, True])
@pytest.mark.parametrize("rowwise, sparse_g", [(False, False), (True, False), (False, True), (True, True)])
def test_lazy_sgd_matches_dense_sgd(isa, rowwise, sparse_g, peek):
    """Random blocks each step; the untouched entries catch up later; against float64 dense SGD
    (PyTorch's rule) where every entry steps every time (g = 0 outside the block). sparse_g: whole
    rows step with the gradient given at a column subset only (``g_cols``)."""
    rng = np.random.default_rng(5)
    R, C = 23, 41
    p = nn.Param("w", rng.standard_normal((R, C)).astype(np.float32))
    b = nn.Param("b", rng.standard_normal(R).astype(np.float32))
    lr, mu, wd = 0.05, 0.9, 0.01
    opt = ops.LazySGD([p, b], lr=lr, momentum=mu, weight_decay=wd, max_lag=6,
                      whole_rows=[p, b] if rowwise else ())
    w64, bw64 = p.data.astype(np.float64), np.zeros((R, C))
    b64, bb64 = b.data.astype(np.float64), np.zeros(R)
    for t in range(40):
        rows = _sorted_subset(rng, R, int(rng.integers(1, R)))
        cols = None if rowwise or sparse_g else _sorted_subset(rng, C, int(rng.integers(1, C)))
        # g_cols: a column subset, sometimes empty (the rows then step with g = 0 alone)
        g_cols = _sorted_subset(rng, C, int(rng.integers(0, C))) if sparse_g else None
        before = (p.data.copy(), opt.state[id(p)]["stamp"].copy())
        # a peek (read-only) may select columns even with row stamps
        gcols = _sorted_subset(rng, C, int(rng.integers(1, C))) if peek else cols
        got = opt.gather(p, rows, gcols, peek=peek)
        np.testing.assert_allclose(got, w64[rows][:, slice(None) if gcols is None else gcols], rtol=2e-5, atol=2e-5)
        if peek:  # nothing written
            np.testing.assert_array_equal(p.data, before[0])
            np.testing.assert_array_equal(opt.state[id(p)]["stamp"], before[1])
        gc = g_cols if g_cols is not None else cols
        g = rng.standard_normal((len(rows), C if gc is None else len(gc))).astype(np.float32)
        gb = rng.standard_normal(len(rows)).astype(np.float32)
        opt.step_block(p, g, rows, cols, g_cols=g_cols)
        opt.step_block(b, gb, rows)
        G = np.zeros((R, C))
        G[np.ix_(rows, np.arange(C) if gc is None else gc)] = g
        Gb = np.zeros(R)
        Gb[rows] = gb
        for (w, buf, grad) in ((w64, bw64, G), (b64, bb64, Gb)):
            buf *= mu
            buf += grad + wd * w
            w -= lr * buf
        opt.advance()
        if t == 25:
            opt.set_lr(lr)  # flushes; same rate
    opt.flush()
    np.testing.assert_allclose(p.data, w64, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b.data, b64, rtol=1e-4, atol=1e-4)


def test_lazy_sgd_guards():
    p = nn.Param("w", np.zeros((3, 4), np.float32))
    opt = ops.LazySGD([p], lr=0.1, momentum=0.5, max_lag=4, whole_rows=[p])
    with pytest.raises(ValueError, match="whole_rows"):
        opt.gather(p, [0], [1])  # a gather that catches up in place must span whole rows
    np.testing.assert_array_equal(opt.gather(p, [0], [1], peek=True), [[0.0]])  # a peek may select columns
    g = np.zeros((1, 4), np.float32)
    opt.step_block(p, g, [0])
    with pytest.raises(ValueError, match="ahead|behind"):
        opt.step_block(p, g, [0])  # twice in one step: the bookkeeping would break
    q = nn.Param("q", np.zeros((3, 4), np.float32))
    opt_q = ops.LazySGD([q], lr=0.1, momentum=0.5, max_lag=4, whole_rows=[q])
    with pytest.raises(ValueError, match="g_cols needs"):
        opt_q.step_block(q, np.zeros((1, 1), np.float32), [0], [1], g_cols=[1])
    with pytest.raises(ValueError, match=r"shape \(1, 2\)"):
        opt_q.step_block(q, np.zeros((1, 4), np.float32), [0], g_cols=[0, 2])
    with pytest.raises(ValueError, match="strictly increasing"):
        opt_q.step_block(q, np.zeros((1, 2), np.float32), [0], g_cols=[2, 0])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        opt_q.step_block(q, np.zeros((1, 1), np.float32), [0], g_cols=[4])
    with pytest.raises(ValueError, match="g_cols needs g"):  # the C++ layer checks on its own too
        _core.lazy_sgd(q.data, opt_q.state[id(q)]["buf"], None, None, None, None, 0, None, None, 0.1, 0.5, 0.0,
                       False, np.array([0]))
    np.testing.assert_array_equal(q.data, 0)  # nothing written by the refused calls
    with pytest.raises(ValueError, match="momentum"):
        ops.LazySGD([p], momentum=1.0)
    with pytest.raises(ValueError, match="not a parameter"):
        opt.gather(nn.Param("x", np.zeros(2, np.float32)))


def test_sgd_weight_decay_matches_reference():
    rng = np.random.default_rng(0)
    p = nn.Param("w", rng.standard_normal((5, 6)).astype(np.float32))
    w, buf = p.data.astype(np.float64), np.zeros((5, 6))
    opt = nn.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(5):
        g = rng.standard_normal((5, 6)).astype(np.float32)
        p.grad = g
        opt.step()
        buf = 0.9 * buf + g + 0.01 * w
        w = w - 0.1 * buf
    np.testing.assert_allclose(p.data, w, rtol=1e-5, atol=1e-6)


# ---- Bernoulli mask -> CSR -----------------------------------------------------------------------
def _bernoulli_ref(s, seed):
    """The documented generator, re-implemented in NumPy uint64 arithmetic."""
    with np.errstate(over="ignore"):
        key = reference.mix64(np.uint64(seed))
        e = np.arange(s.size, dtype=np.uint64)
        u = (reference.mix64(key + e) >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)
    return (u < s.ravel()).reshape(s.shape)


def test_bernoulli_csr(isa, threads):
    rng = np.random.default_rng(1)
    s = rng.uniform(0, 1, (37, 101)).astype(np.float32)
    s[3] = 0.0
    s[4] = 1.0
    masks = []
    for nt in (1, 2):
        sparsebp.set_num_threads(nt)
        indptr, indices = ops.bernoulli_csr(s, 12345)
        m = sparsebp.CSR(indptr, indices, np.ones(len(indices), np.float32), s.shape).to_dense() > 0
        masks.append(m)
    np.testing.assert_array_equal(masks[0], masks[1])
    np.testing.assert_array_equal(masks[0], _bernoulli_ref(s, 12345))
    assert not masks[0][3].any() and masks[0][4].all()
    big = np.full((200, 500), 0.3, np.float32)
    dens = ops.bernoulli_csr(big, 7)[0][-1] / big.size
    assert abs(dens - 0.3) < 4 * np.sqrt(0.3 * 0.7 / big.size)
    with pytest.raises(ValueError, match="seed"):
        ops.bernoulli_csr(s, -1)


@pytest.mark.parametrize("bad", [1.0000001, -1e-30, np.nan, np.inf, -np.inf])
def test_bernoulli_csr_rejects_values_outside_the_unit_interval(isa, threads, bad):
    """A probability outside [0, 1] (NaN included) is a ValueError naming the entry, on every ISA and
    thread count, wherever it sits (first row, last entry of the last row of a second row block);
    it used to act as clipped (NaN: never kept). 0 and 1 themselves are fine (above)."""
    s = np.full((1200, 1000), 0.5, np.float32)  # two row blocks of the kernel
    for r, c in ((0, 0), (1199, 999), (600, 17)):
        s2 = s.copy()
        s2[r, c] = bad
        for nt in (1, 2):
            sparsebp.set_num_threads(nt)
            with pytest.raises(ValueError, match=rf"s must hold probabilities in \[0, 1\]; s\[{r}, {c}\] = "):
                ops.bernoulli_csr(s2, 3)


def test_bernoulli_csr_large_blocks_and_strides(isa, threads):
    # Over 2^20 entries (drawn in more than one row block, each split between threads), from a
    # strided view (row stride > cols), and a single row wider than a block.
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 1, (1100, 1010)).astype(np.float32)
    base[::7] = np.where(base[::7] < 0.5, 0.0, 1.0)  # polarised rows, as after training
    s = base[:, :1000]
    wide = rng.uniform(0, 1, (1, (1 << 20) + 5)).astype(np.float32)
    for nt in (1, 2):
        sparsebp.set_num_threads(nt)
        for arr, seed in ((s, 99), (wide, 5)):
            indptr, indices = ops.bernoulli_csr(arr, seed)
            ref = _bernoulli_ref(np.ascontiguousarray(arr), seed)
            np.testing.assert_array_equal(indptr, np.concatenate([[0], np.cumsum(ref.sum(axis=1))]))
            np.testing.assert_array_equal(indices, np.nonzero(ref)[1])


# ---- the trainer ---------------------------------------------------------------------------------
def _mlp(seed, sizes=(12, 9, 7, 4)):
    r = np.random.default_rng(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], rng=r))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _masked_grads64(model, x, y, masks):
    """Float64 NumPy: loss and dense weight/bias gradients of the network with unit masks applied
    after each hidden activation."""
    lin = model.layers[::2]
    a, acts, zs = x.astype(np.float64), [], []
    for l, m in enumerate(lin):
        acts.append(a)
        z = a @ m.weight.data.astype(np.float64).T + m.bias.data
        zs.append(z)
        a = np.maximum(z, 0) * masks[l] if l < len(lin) - 1 else z
    z = a - a.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(np.mean(-np.log(p[np.arange(n), y])))
    g = p.copy()
    g[np.arange(n), y] -= 1
    g /= n
    gw, gb = [None] * len(lin), [None] * len(lin)
    for l in range(len(lin) - 1, -1, -1):
        gw[l], gb[l] = g.T @ acts[l], g.sum(axis=0)
        if l > 0:
            g = (g @ lin[l].weight.data.astype(np.float64)) * masks[l - 1] * (zs[l - 1] > 0)
    return loss, gw, gb


def test_unit_gradients_against_float64_masked_network(isa):
    model = _mlp(0)
    vr = VRPGE(model, 0.5, seed=3)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 12)).astype(np.float32)
    y = rng.integers(0, 4, 16)
    flat = (vr._sample_flat(), vr._sample_flat())
    flat[0][:vr.s[0].size] = True  # one sample keeps every unit of the first layer (the "all of union" path)
    masks = (vr._split(flat[0]), vr._split(flat[1]))
    fs, blocks = vr._unit_grads(x, y, flat)
    lin = model.layers[::2]
    ref = [_masked_grads64(model, x, y, [m.astype(float) for m in mk]) for mk in masks]
    for j in range(2):
        assert abs(fs[j] - ref[j][0]) < 1e-5
    for p, rows, cols, g in blocks:
        l = next(i for i, m in enumerate(lin) if p is m.weight or p is m.bias)
        which = 1 if p is lin[l].weight else 2
        dense = 0.5 * (ref[0][which][l] + ref[1][which][l])
        r = np.arange(dense.shape[0]) if rows is None else rows
        c = None if cols is None else cols
        block = dense[r] if c is None else dense[np.ix_(r, c)]
        np.testing.assert_allclose(g, block, rtol=1e-4, atol=1e-6)
        outside = np.ones(dense.shape, bool)
        if c is None:
            outside[r] = False
        else:
            outside[np.ix_(r, c)] = False
        assert np.all(dense[outside] == 0)  # nothing outside the union block


def test_step_keeps_budget_and_compact_is_same_function():
    model = _mlp(1, (20, 16, 16, 3))
    vr = VRPGE(model, 0.25, lr=0.05, lr_s=0.05, seed=0)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 20)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    for _ in range(30):
        vr.step(x, y)
        total = sum(s.sum() for s in vr.s)
        assert total <= vr.budget + 1e-9
        assert all(s.min() >= 0 and s.max() <= 1 for s in vr.s)
    mask = vr.sample()
    small = vr.compact(mask)
    assert [m.out_features for m in small.layers[:-1:2]] == [int(m.sum()) for m in mask]
    np.testing.assert_allclose(small.forward(x), vr.forward(x, mask), rtol=1e-5, atol=1e-5)


def test_weight_granularity_runs_on_csr_and_compacts():
    model = _mlp(2, (20, 16, 3))
    vr = VRPGE(model, 0.3, granularity="weight", seed=1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 20)).astype(np.float32)
    y = rng.integers(0, 3, 32)
    m = vr.sample()
    fs, blocks = vr._weight_grads(x, y, (m, m))
    dense_mask = vr._dense(m[0], 0).astype(float)
    masked = _mlp(2, (20, 16, 3))
    masked.layers[0].weight.data = (model.layers[0].weight.data * dense_mask).astype(np.float32)
    masked.layers[2].weight.data = model.layers[2].weight.data
    loss, gw, gb = _masked_grads64(masked, x, y, [np.ones(16)])
    assert abs(fs[0] - loss) < 1e-5
    np.testing.assert_allclose(blocks[0][3], gw[0] * dense_mask, rtol=1e-4, atol=1e-6)
    for _ in range(5):
        vr.step(x, y)
    assert sum(s.sum() for s in vr.s) <= vr.budget + 1e-6
    small = vr.compact(m)
    np.testing.assert_allclose(small.forward(x), vr.forward(x, m), rtol=1e-4, atol=1e-5)


def test_mnist_mask_search_tracks_budget_and_polarises():
    from sparsebp.datasets import load_mnist

    X, y = load_mnist("train", limit=3000)
    r = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(784, 64, rng=r), nn.ReLU(), nn.Linear(64, 64, rng=r), nn.ReLU(),
                          nn.Linear(64, 10, rng=r))
    vr = VRPGE(model, 0.25, lr=0.05, lr_s=0.1, seed=0)
    hist = vr.fit(X, y, epochs=6, batch=64, progress=False)
    for h in hist:  # the budget binds (sum s <= K, and s does not drift far below it)
        assert 0.2 <= h["density"] <= 0.25 + 1e-9, h
        realised = np.average(h["kept"], weights=[64, 64])  # what the sampled masks really kept
        assert abs(realised - h["density"]) < 0.05, (realised, h)
    assert vr.polarised(0.01) > 0.8, vr.polarised(0.01)
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_relu_kernels(isa):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 129)).astype(np.float32)
    x[0, :3] = [np.nan, -0.0, np.inf]
    y = ops.relu(x)
    ref64 = np.maximum(x.astype(np.float64), 0)  # NaN propagates, as in the kernel
    np.testing.assert_array_equal(y, ref64.astype(np.float32))
    g = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_array_equal(ops.relu_backward(g, y), np.where(y > 0, g, 0).astype(np.float32))
    z = x.copy()
    ops.relu(z, out=z)  # in place
    np.testing.assert_array_equal(z, y)
    with pytest.raises(TypeError, match="float32"):
        ops.relu(x.astype(np.float64))
    with pytest.raises(ValueError, match="shape"):
        ops.relu_backward(g, y[:, :5])
    with pytest.raises(ValueError, match="out must be"):
        ops.relu(x, out=np.empty((2, 2), np.float32))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_relu_mask_against_float64(isa, shared, with_bias):
    """The masked activation of the trainer's batched samples: row i of out is
    relu(z[i or i % rpg] + bias) * keep[i // rpg], NaN kept as relu does; in place when shapes allow."""
    rng = np.random.default_rng(7)
    rpg, n, groups = 9, 37, 2
    z = rng.standard_normal((rpg if shared else groups * rpg, n)).astype(np.float32)
    z[0, 0] = np.nan
    keep = (rng.random((groups, n)) < 0.5).astype(np.float32)
    keep[:, 0] = 1.0
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    out = np.empty((groups * rpg, n), np.float32)
    z_before = z.copy()
    _core.bias_relu_mask(z, bias, keep, out)
    np.testing.assert_array_equal(z, z_before)  # the input is left alone
    z64 = z.astype(np.float64) + (0.0 if bias is None else bias.astype(np.float64))
    rows = np.arange(groups * rpg)
    ref64 = np.maximum(z64[rows % rpg if shared else rows], 0) * keep[rows // rpg].astype(np.float64)
    np.testing.assert_allclose(out, ref64, rtol=1e-6, atol=1e-7)  # NaN positions must match too
    if not shared:
        _core.bias_relu_mask(z, bias, keep, z)  # in place
        np.testing.assert_array_equal(z, out)
    with pytest.raises(ValueError, match="rows"):
        _core.bias_relu_mask(z[:4], bias, keep, out)
    with pytest.raises(ValueError, match="columns"):
        _core.bias_relu_mask(z, bias, np.ascontiguousarray(keep[:, :5]), out)
    with pytest.raises(ValueError, match="bias"):
        _core.bias_relu_mask(z, np.zeros(n + 1, np.float32), keep, out)
    big = np.zeros((groups * rpg + 1, n), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        _core.bias_relu_mask(big[1:1 + z.shape[0]], bias, keep, big[:groups * rpg])
    with pytest.raises(TypeError, match="float32"):
        _core.bias_relu_mask(z.astype(np.float64), bias, keep, out)


@pytest.mark.parametrize("kind", ["authors", "textbook"])
def test_fused_estimator_and_mask_adam_against_numpy(kind, isa):
    """The trainer's C++ estimator equals estimator() (float64 NumPy); MaskAdam's C++ step equals
    Adam in float64 NumPy followed by the bisection projection."""
    rng = np.random.default_rng(11)
    n = 300
    s = rng.random(n)
    s[:5] = [0.0, 1.0, 0.5, 1e-150, 1 - 1e-16]
    m1, m2 = rng.random(n) < s, rng.random(n) < 0.5
    g = np.empty(n)
    sq = _core.mask_estimator(s, m1, m2, 0.7 - 1.9, kind == "textbook", g)
    want = estimator(0.7, 1.9, m1, m2, s, kind)
    np.testing.assert_allclose(g, want, rtol=1e-15, atol=0)
    assert sq == pytest.approx(float(np.dot(want, want)), rel=1e-12)

    layers = [np.full(120, 0.3), np.full((9, 20), 0.3)]
    budget = 0.25 * 300
    adam = MaskAdam(layers, lr=0.05, budget=budget)
    assert np.shares_memory(layers[1], adam.flat)  # the caller's list now holds views of the flat array
    s64, m64, v64 = adam.flat.copy(), np.zeros(n), np.zeros(n)
    for t in range(1, 6):
        grad = rng.standard_normal(n)
        scale = 0.5 if t % 2 else 1.0
        adam.step([grad[:120], grad[120:].reshape(9, 20)], scale)
        gt = scale * grad
        m64 = 0.9 * m64 + 0.1 * gt
        v64 = 0.999 * v64 + 0.001 * gt * gt
        s64 = s64 - (0.05 / (1 - 0.9 ** t)) * m64 / (np.sqrt(v64 / (1 - 0.999 ** t)) + 1e-8)
        s64 = project_budget(s64, budget, method="bisect")
        np.testing.assert_allclose(adam.flat, s64, rtol=0, atol=1e-12)
        assert adam.flat.sum() <= budget + 1e-9
    np.testing.assert_array_equal(layers[1].ravel(), adam.flat[120:])
    with pytest.raises(ValueError, match="entries"):
        adam.step(np.zeros(n + 1))
    with pytest.raises(ValueError, match="bool"):
        _core.mask_estimator(s, m1.astype(np.uint8), m2, 1.0, False, g)
    with pytest.raises(ValueError, match="float64"):
        _core.mask_estimator(s, m1, m2, 1.0, False, g[:-1])


@pytest.mark.parametrize("seed", [0, 1])
def test_mask_union_against_numpy(seed):
    rng = np.random.default_rng(seed)
    sizes = [7, 0, 130, 1, 64]
    m1, m2 = rng.random(sum(sizes)) < 0.3, rng.random(sum(sizes)) < 0.3
    m1[:7] = True  # a segment all kept by one mask
    out = _core.mask_union(m1, m2, sizes)
    assert len(out) == len(sizes)
    off = 0
    for (idx, keep), n in zip(out, sizes):
        a, b = m1[off:off + n], m2[off:off + n]
        want = np.flatnonzero(a | b)
        assert idx.dtype == np.int64 and keep.dtype == np.float32 and keep.shape == (2, len(want))
        np.testing.assert_array_equal(idx, want)
        np.testing.assert_array_equal(keep, np.stack((a[want], b[want])).astype(np.float32))
        off += n
    with pytest.raises(ValueError, match="add up"):
        _core.mask_union(m1, m2, [3])
    with pytest.raises(ValueError, match="bool"):
        _core.mask_union(m1.astype(np.uint8), m2, sizes)
    with pytest.raises(ValueError, match="m2"):
        _core.mask_union(m1, m2[:5], sizes)
    with pytest.raises(ValueError, match=">= 0"):
        _core.mask_union(m1, m2, [-1, sum(sizes) + 1])


def test_compact_refuses_an_empty_layer():
    vr = VRPGE(_mlp(0), 0.5)
    mask = vr.sample()
    mask[1][:] = False
    with pytest.raises(ValueError, match="no unit of hidden layer 1"):
        vr.compact(mask)


def test_trainer_bad_arguments():
    with pytest.raises(TypeError, match="Sequential"):
        VRPGE([1], 0.5)
    with pytest.raises(ValueError, match="keep_ratio"):
        VRPGE(_mlp(0), 0.0)
    with pytest.raises(ValueError, match="granularity"):
        VRPGE(_mlp(0), 0.5, granularity="x")
    with pytest.raises(ValueError, match="score"):
        VRPGE(_mlp(0), 0.5, score="x")
    with pytest.raises(ValueError, match="form"):
        VRPGE(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), 0.5)
    for seed in (-1, 1.5, "1"):  # NumPy's own message did not name the argument
        with pytest.raises(ValueError, match="seed must be an int >= 0"):
            VRPGE(_mlp(0), 0.5, seed=seed)


def test_fit_reference_sees_the_same_batches_once_each():
    """fit(reference=f): f runs once on every minibatch the steps see (in blocks, either order),
    and its time per call is recorded; the training itself is unchanged by it."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((21 * 8, 12)).astype(np.float32)  # 21 batches: blocks of 8, 8 and 5
    y = rng.integers(0, 4, len(X))
    seen_ref, seen_step = [], []
    vr = VRPGE(_mlp(0), 0.5, seed=1)
    step = vr.step
    vr.step = lambda xb, yb: (seen_step.append(xb.copy()), step(xb, yb))[1]
    hist = vr.fit(X, y, epochs=2, batch=8, progress=False, reference=lambda xb, yb: seen_ref.append(xb.copy()))
    assert len(seen_ref) == len(seen_step) == 42
    key = lambda a: a.tobytes()
    assert sorted(map(key, seen_ref)) == sorted(map(key, seen_step))
    assert all(h["reference_step_s"] >= 0 for h in hist)
    plain = VRPGE(_mlp(0), 0.5, seed=1)
    hist2 = plain.fit(X, y, epochs=2, batch=8, progress=False)
    assert "reference_step_s" not in hist2[0]
    np.testing.assert_array_equal(plain.adam.flat, vr.adam.flat)  # same steps, same s
    with pytest.raises(TypeError, match="reference"):
        plain.fit(X, y, epochs=1, batch=8, progress=False, reference=3)


def test_cli_smoke(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sparsebp.cli", "vrpge", "--limit", "1500", "--search", "1",
                        "--finetune", "1", "--seeds", "1", "--keep", "0.5", "--no-progress", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "vrpge.md").read_text()
    assert "| vr-pge | 0.5 |" in table and "| random | 0.5 |" in table and "| dense |" in table


def test_cli_weight_granularity_smoke(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sparsebp.cli", "vrpge", "--granularity", "weight", "--limit", "600",
                        "--search", "1", "--finetune", "1", "--seeds", "1", "--keep", "0.25", "--no-progress", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "| vr-pge | 0.25 |" in (tmp_path / "vrpge.md").read_text()


def test_summary_pairs_learned_and_random_by_seed():
    from sparsebp.vrpge_demo import paired_differences, summary

    def row(method, keep, seed, acc):
        return dict(method=method, keep=keep, seed=seed, test_acc=acc, density=keep, polarised=float("nan"),
                    step_ms=1.0, step_vs_dense=0.5, dense_step_ms=2.0)

    rows = [row("dense", 1.0, 0, 0.9600),
            row("vr-pge", 0.5, 0, 0.9500), row("random", 0.5, 0, 0.9550),
            row("vr-pge", 0.1, 0, 0.9400), row("random", 0.1, 0, 0.9300),
            row("vr-pge", 0.1, 1, 0.9200), row("random", 0.1, 1, 0.9250),
            row("vr-pge", 0.1, 2, 0.9350), row("random", 0.1, 2, 0.9350),
            row("vr-pge", 0.1, 3, 0.9450)]  # no random run for seed 3: not paired
    d = paired_differences(rows)
    assert sorted(d) == [0.1, 0.5]
    np.testing.assert_allclose(d[0.1], [1.0, -0.5, 0.0], atol=1e-9)
    np.testing.assert_allclose(d[0.5], [-0.5], atol=1e-9)
    text = summary(rows, 5, 5, 128)
    se = np.std([1.0, -0.5, 0.0], ddof=1) / np.sqrt(3)  # 0.44
    assert f"| 0.1 | 3 | +0.17 | {se:.2f} | 1 | 1 | 1 |" in text
    assert "| 0.5 | 1 | -0.50 | - | 0 | 0 | 1 |" in text
    assert "Learned minus random" not in summary(rows[:1], 5, 5, 128)


def _csr_of(mask):
    indptr = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int64)
    return indptr, np.nonzero(mask)[1].astype(np.int32)


@pytest.mark.parametrize("kind", ["authors", "textbook"])
def test_mask_estimator_csr_matches_the_dense_estimator(kind):
    from sparsebp import _core

    rng = np.random.default_rng(3)
    for rows, cols in [(7, 13), (1, 1), (5, 64), (3, 0), (0, 4)]:
        s = rng.uniform(0, 1, (rows, cols))
        if s.size:
            s.flat[:: 5] = 0.0  # den = 0 where s is 0 or 1: g is 0 there
            s.flat[1:: 7] = 1.0
        m1 = rng.random((rows, cols)) < 0.5
        m2 = rng.random((rows, cols)) < 0.5
        if rows > 2:
            m1[1] = m2[1] = False  # an empty row in both
            m2[2] = m1[2]          # the same row in both: no difference
        for a, b in [(m1, m2), (m1, m1), (m1, ~m1)]:
            ref = estimator(0.7, -0.2, a, b, s, kind)
            g = np.full((rows, cols), np.nan)
            sq = _core.mask_estimator_csr(s, *_csr_of(a), *_csr_of(b), 0.9, kind == "textbook", g)
            np.testing.assert_allclose(g, ref, rtol=1e-14, atol=0)
            assert sq == pytest.approx(float(np.sum(ref ** 2)), rel=1e-12)


def test_mask_estimator_csr_rejects_bad_structures():
    from sparsebp import _core

    s = np.full((2, 4), 0.5)
    g = np.zeros((2, 4))
    ok = (np.array([0, 1, 2], np.int64), np.array([1, 3], np.int32))
    _core.mask_estimator_csr(s, *ok, *ok, 1.0, False, g)
    bad = {
        "strictly increasing": (np.array([0, 2, 2], np.int64), np.array([3, 1], np.int32)),
        "within": (np.array([0, 1, 2], np.int64), np.array([1, 4], np.int32)),
        "non-decreasing": (np.array([0, 3, 2], np.int64), np.array([1, 2], np.int32)),
        "end at nnz": (np.array([0, 1, 3], np.int64), np.array([1, 2], np.int32)),
    }
    for msg, (ip, ix) in bad.items():
        with pytest.raises(ValueError, match=msg):
            _core.mask_estimator_csr(s, *ok, ip, ix, 1.0, False, g)
    with pytest.raises(ValueError, match="indptr1 must be a contiguous int64 array of length 3"):
        _core.mask_estimator_csr(s, np.array([0, 2], np.int64), ok[1], *ok, 1.0, False, g)
    with pytest.raises(ValueError, match="indices2 must be a contiguous 1-D int32 array"):
        _core.mask_estimator_csr(s, *ok, ok[0], ok[1].astype(np.int64), 1.0, False, g)
    with pytest.raises(ValueError, match=r"g must be a writeable C-contiguous float64 array of shape \(2, 4\)"):
        _core.mask_estimator_csr(s, *ok, *ok, 1.0, False, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="s must be a C-contiguous 2-D float64 array"):
        _core.mask_estimator_csr(s.astype(np.float32), *ok, *ok, 1.0, False, g)
    with pytest.raises(ValueError, match="overlap"):
        _core.mask_estimator_csr(s, *ok, *ok, 1.0, False, s)
    np.testing.assert_array_equal(s, 0.5)  # untouched


def test_mask_adam_at_scale_every_thread_count(isa, threads):
    # Large enough to split between threads (and an odd length: a tail), against float64 NumPy
    # Adam and the sort projection; the same bits for 1 and 2 threads. Moments that decay below
    # DBL_MIN (a zero gradient) are flushed to zero.
    rng = np.random.default_rng(5)
    n, budget = 200_003, 0.3 * 200_003
    start = rng.uniform(-0.2, 1.1, n)
    grads = [rng.standard_normal(n) * (rng.random(n) < 0.9) for _ in range(3)]
    runs = []
    for nt in (1, 2):
        sparsebp.set_num_threads(nt)
        adam = MaskAdam([start.copy()], lr=0.05, budget=budget)
        adam.m[:8] = 1e-310  # subnormal, with a zero gradient below
        s64, m64, v64 = adam.flat.copy(), adam.m.copy(), np.zeros(n)
        for t, grad in enumerate(grads, start=1):
            grad[:8] = 0.0
            adam.step([grad])
            m64 = 0.9 * m64 + 0.1 * grad
            v64 = 0.999 * v64 + 0.001 * grad * grad
            s64 = s64 - (0.05 / (1 - 0.9 ** t)) * m64 / (np.sqrt(v64 / (1 - 0.999 ** t)) + 1e-8)
            s64 = project_budget(s64, budget, method="sort")
            np.testing.assert_allclose(adam.flat, s64, rtol=0, atol=1e-12)
        assert np.all(adam.m[:8] == 0.0)
        runs.append(adam.flat.copy())
    np.testing.assert_array_equal(runs[0], runs[1])


def test_mask_adam_rejects_a_non_finite_gradient_and_leaves_its_state():
    s = [np.array([0.2, 0.4, 0.9])]
    adam = MaskAdam(s, lr=0.05, budget=1.0)
    adam.step([np.array([1.0, -2.0, 0.5])])
    before = (adam.flat.copy(), adam.m.copy(), adam.v.copy())
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="not finite at entry 1"):
            adam.step([np.array([1.0, bad, 0.5])])
        assert adam.t == 1
        for now, then in zip((adam.flat, adam.m, adam.v), before):
            np.testing.assert_array_equal(now, then)
