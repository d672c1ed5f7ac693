"""The NumPy training path and the sparse-gradient policies, against float64 NumPy references."""
import numpy as np
import pytest

import sparsebp

from sparsebp import algorithms as alg
from sparsebp import nn

import reference as ref


def _mlp(policy=None, seed=0, widths=(12, 9, 7, 4)):
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(len(widths) - 1):
        last = i == len(widths) - 2
        layers.append(nn.Linear(widths[i], widths[i + 1], grad=None if last else policy, rng=rng))
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _forward64(model, x):
    """The model's function in float64, from its parameters (independent of nn.forward)."""
    h = x.astype(np.float64)
    for layer in model.layers:
        if isinstance(layer, nn.Linear):
            h = h @ layer.weight.data.astype(np.float64).T
            if layer.bias is not None:
                h = h + layer.bias.data
        else:
            h = np.maximum(h, 0)
    return h


@pytest.mark.parametrize("scale", [1.0, 60.0])
def test_softmax_cross_entropy_against_float64(scale):
    """Loss and gradient against float64 NumPy, also with logits spread so wide that most
    probabilities are far below float32's range (those entries come out exactly 0, never subnormal)."""
    rng = np.random.default_rng(5)
    z = (rng.standard_normal((33, 10)) * scale).astype(np.float32)
    y = rng.integers(0, 10, 33)
    loss, g = nn.softmax_cross_entropy(z, y)
    z64 = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    p = np.exp(z64) / np.exp(z64).sum(axis=1, keepdims=True)
    ref = float(np.mean(np.log(np.exp(z64).sum(axis=1)) - z64[np.arange(33), y]))
    assert abs(loss - ref) <= 1e-6 * max(1.0, abs(ref))
    gref = p.copy()
    gref[np.arange(33), y] -= 1
    np.testing.assert_allclose(g, gref / 33, rtol=1e-5, atol=1e-7)
    assert not np.any((g != 0) & (np.abs(g) < np.finfo(np.float32).tiny))  # no subnormals
    assert g.dtype == np.float32 and g.flags.c_contiguous
    with pytest.raises(ValueError, match="labels"):
        nn.softmax_cross_entropy(z, y[:5])


def test_dense_gradients_against_float64():
    model = _mlp()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 12)).astype(np.float32)
    y = rng.integers(0, 4, 5)
    logits = model.forward(x)
    np.testing.assert_allclose(logits, _forward64(model, x), rtol=1e-5, atol=1e-5)
    loss, g = nn.softmax_cross_entropy(logits, y)
    model.backward(g)
    # Finite differences in float64 on a few weights of each layer.
    for layer in [m for m in model.layers if isinstance(m, nn.Linear)]:
        w = layer.weight
        for (i, j) in [(0, 0), (w.data.shape[0] - 1, w.data.shape[1] - 1), (1, 2)]:
            def lossf(delta):
                old = w.data[i, j]
                w.data[i, j] = old + delta
                z = _forward64(model, x)
                w.data[i, j] = old
                z = z - z.max(1, keepdims=True)
                return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(5), y]))
            h = 1e-3
            fd = (lossf(h) - lossf(-h)) / (2 * h)
            assert abs(fd - w.grad[i, j]) < 2e-3 * max(1, abs(fd)), (i, j, fd, w.grad[i, j])


def test_meprop_layer_matches_masked_reference():
    """One hidden layer with per-example meProp: dW and dx equal the float64 products with the
    gradient masked to each row's top-k (selected by numpy's sort)."""
    rng = np.random.default_rng(2)
    layer = nn.Linear(30, 40, grad=alg.MeProp(k=5), rng=rng)
    x = rng.standard_normal((6, 30)).astype(np.float32)
    g = rng.standard_normal((6, 40)).astype(np.float32)
    layer.forward(x)
    dx = layer.backward(g)
    order = np.argsort(-np.abs(g), axis=1, kind="stable")[:, :5]
    gh = np.zeros_like(g, dtype=np.float64)
    np.put_along_axis(gh, order, np.take_along_axis(g, order, 1), 1)
    w64 = layer.weight.data.astype(np.float64)
    ref.assert_close(dx, gh @ w64, np.abs(gh) @ np.abs(w64), 40, "dx")
    ref.assert_close(layer.weight.dense_grad(), gh.T @ x, np.abs(gh).T @ np.abs(x), 6, "dW")
    ref.assert_close(layer.bias.grad, g.astype(np.float64).sum(0), np.abs(g).sum(0), 6, "db (full G)")
    np.testing.assert_array_equal(layer.weight.rows, np.unique(order))


def test_msbp_alpha_zero_is_unified_meprop_bit_for_bit():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((64, 12)).astype(np.float32)
    y = rng.integers(0, 4, 64)
    a = _mlp(alg.MSBP(k=3, alpha=0.0), seed=5)
    b = _mlp(alg.MeProp(k=3, mode="unified"), seed=5)
    for m in (a, b):
        nn.fit(m, nn.Adam(m.params(), lr=1e-2), X, y, epochs=3, batch=8, progress=False)
    for pa, pb in zip(a.params(), b.params()):
        np.testing.assert_array_equal(pa.data, pb.data)


def test_fit_epochs_in_turn_equals_fit_one_model_at_a_time():
    """Two models trained epoch by epoch in turn (fit_epochs, as the demo times them) end with the
    same parameters and losses as each trained alone with fit; bad arguments fail at the call."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((48, 12)).astype(np.float32)
    y = rng.integers(0, 4, 48)
    alone = [_mlp(None, seed=1), _mlp(alg.MeProp(k=3), seed=2)]
    turn = [_mlp(None, seed=1), _mlp(alg.MeProp(k=3), seed=2)]
    hist_alone = [nn.fit(m, nn.Adam(m.params(), lr=1e-2), X, y, epochs=3, batch=8, progress=False, seed=7)
                  for m in alone]
    its = [nn.fit_epochs(m, nn.Adam(m.params(), lr=1e-2), X, y, epochs=3, batch=8, progress=False, seed=7)
           for m in turn]
    hist_turn = [[], []]
    for _ in range(3):
        for i in (1, 0):
            hist_turn[i].append(next(its[i]))
    for a, b, ha, hb in zip(alone, turn, hist_alone, hist_turn):
        for pa, pb in zip(a.params(), b.params()):
            np.testing.assert_array_equal(pa.data, pb.data)
        assert [r["loss"] for r in ha] == [r["loss"] for r in hb]
    with pytest.raises(StopIteration):
        next(its[0])
    with pytest.raises(ValueError, match="batch"):
        nn.fit_epochs(alone[0], nn.SGD(alone[0].params()), X, y, batch=0)


def test_msbp_memory_is_the_dropped_part():
    pol = alg.MSBP(k=2, alpha=0.5)
    g1 = np.array([[3.0, -1.0, 0.5, 2.0], [1.0, 0.25, -4.0, 0.0]], np.float32)
    s1 = pol.select(g1)
    np.testing.assert_array_equal(s1.cols, [0, 2])  # column sums of |g|: 4, 1.25, 4.5, 2
    np.testing.assert_array_equal(pol.memory, 0.5 * np.array([[0, -1, 0, 2], [0, 0.25, 0, 0]], np.float32))
    g2 = np.zeros_like(g1)
    s2 = pol.select(g2)  # only the memory remains: its largest columns are selected now
    np.testing.assert_array_equal(s2.cols, [1, 3])
    np.testing.assert_array_equal(s2.grad, 0.5 * np.array([[0, -1, 0, 2], [0, 0.25, 0, 0]], np.float32))
    pol.select(np.ones((3, 4), np.float32))  # a new batch size restarts the memory
    assert pol.memory.shape == (3, 4)


def test_sparse_weights_with_meprop_against_masked_reference():
    rng = np.random.default_rng(4)
    for mode in ("example", "unified"):
        layer = nn.SparseLinear(20, 16, 0.75, grad=alg.MeProp(k=3, mode=mode), rng=rng)
        x = rng.standard_normal((5, 20)).astype(np.float32)
        g = rng.standard_normal((5, 16)).astype(np.float32)
        y = layer.forward(x)
        wd = layer.csr.to_dense().astype(np.float64)
        np.testing.assert_allclose(y, x @ wd.T + layer.bias.data, rtol=1e-5, atol=1e-5)
        dx = layer.backward(g)
        gh = np.zeros_like(g, dtype=np.float64)
        if mode == "example":
            order = np.argsort(-np.abs(g), axis=1, kind="stable")[:, :3]
            np.put_along_axis(gh, order, np.take_along_axis(g, order, 1), 1)
        else:
            cols = np.argsort(-np.abs(g).sum(0), kind="stable")[:3]
            gh[:, cols] = g[:, cols]
        ref.assert_close(dx, gh @ wd, np.abs(gh) @ np.abs(wd), 16, f"{mode} dx")
        dw = gh.T @ x
        rows = np.repeat(np.arange(16), np.diff(layer.csr.indptr))
        expect = dw[rows, layer.csr.indices]
        ref.assert_close(layer.values.grad, expect, (np.abs(gh).T @ np.abs(x))[rows, layer.csr.indices], 5,
                         f"{mode} dvalues")


def test_mesimp_shrunk_network_computes_the_masked_function():
    """After simplify(), the smaller network equals the original with the removed units masked
    to zero (their outgoing weights zeroed), on any input; the optimizer state follows."""
    rng = np.random.default_rng(6)
    model = _mlp(alg.MeSimp(k=2, p=0.1), seed=7, widths=(10, 16, 12, 3))
    X = rng.standard_normal((40, 10)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    opt = nn.Adam(model.params(), lr=1e-2)
    nn.fit(model, opt, X, y, epochs=1, batch=8, progress=False)
    hidden = [m for m in model.layers if isinstance(m, nn.Linear)][:2]
    keeps = [h.policy.hits >= np.floor(0.1 * h.policy.seen) for h in hidden]
    # The masked reference: zero the removed units' rows (and biases) in place of removing them.
    masked = [(m.weight.data.copy(), None if m.bias is None else m.bias.data.copy())
              for m in model.layers if isinstance(m, nn.Linear)]
    for (w, b), keep in zip(masked, keeps):
        w[~keep] = 0
        b[~keep] = 0
    widths = model.simplify(opt)
    assert widths == [int(k.sum()) for k in keeps] and widths[0] < 16
    xt = rng.standard_normal((9, 10)).astype(np.float32)
    h = xt.astype(np.float64)
    for i, (w, b) in enumerate(masked):
        h = h @ w.astype(np.float64).T + b
        if i < len(masked) - 1:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(model.forward(xt), h, rtol=1e-5, atol=1e-5)
    for m in [m for m in model.layers if isinstance(m, nn.Linear)]:
        st = opt.state[id(m.weight)]
        assert st["m"].shape == m.weight.data.shape
    nn.fit(model, opt, X, y, epochs=1, batch=8, progress=False)  # trains on after shrinking


def test_policy_settings_round_trip_through_json():
    """settings() -> JSON -> from_settings gives a fresh policy of the same type and settings (no
    state), for every built-in policy and both ways of giving k; anything else is an error."""
    import json

    pols = [alg.MeProp(k=7), alg.MeProp(ratio=0.3, mode="unified"), alg.MSBP(k=2, alpha=0.25),
            alg.MSBP(ratio=0.1, alpha=0.0), alg.MeSimp(k=4, p=0.2), alg.MeSimp(ratio=0.5)]
    for pol in pols:
        if isinstance(pol, alg.MSBP):
            pol.select(np.ones((2, 10), np.float32))  # some state, which is not carried over
        back = alg.from_settings(json.loads(json.dumps(pol.settings())))
        assert type(back) is type(pol) and repr(back) == repr(pol)
        assert (back.k, back.ratio, back.mode) == (pol.k, pol.ratio, pol.mode)
        assert back is not pol and getattr(back, "memory", None) is None
    good = alg.MeProp(k=3).settings()
    with pytest.raises(TypeError, match="settings must be a dict"):
        alg.from_settings([good])
    with pytest.raises(ValueError, match=r"settings\['type'\] must be one of"):
        alg.from_settings(dict(good, type="TopK"))
    with pytest.raises(ValueError, match="must have the keys"):
        alg.from_settings(dict(good, alpha=0.5))
    with pytest.raises(ValueError, match="must have the keys"):
        alg.from_settings({k: v for k, v in good.items() if k != "mode"})
    with pytest.raises(ValueError, match="k must be >= 0"):
        alg.from_settings(dict(good, k=-1))
    with pytest.raises(ValueError, match="alpha"):
        alg.from_settings(alg.MSBP(k=1).settings() | {"alpha": 2.0})

    class Mine(alg.SparseGrad):
        pass

    with pytest.raises(NotImplementedError, match="only the built-in"):
        Mine(k=1).settings()


def test_policy_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        alg.MeProp()
    with pytest.raises(ValueError, match="exactly one"):
        alg.MeProp(k=3, ratio=0.1)
    with pytest.raises(ValueError, match="ratio"):
        alg.MeProp(ratio=1.5)
    with pytest.raises(TypeError, match="k must be an int"):
        alg.MeProp(k=2.5)
    with pytest.raises(ValueError, match="mode"):
        alg.MeProp(k=2, mode="batch")
    with pytest.raises(ValueError, match="alpha"):
        alg.MSBP(k=2, alpha=-0.1)
    with pytest.raises(ValueError, match="p must"):
        alg.MeSimp(k=2, p=2)
    assert alg.MeProp(ratio=0.04).k_for(500) == 20
    with pytest.raises(TypeError, match="policy"):
        nn.Linear(3, 4, grad="meprop")
    with pytest.raises(ValueError, match="lr"):
        nn.Adam(nn.Linear(3, 4).params(), lr=0)
    with pytest.raises(ValueError, match="labels"):
        nn.softmax_cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 3]))
    with pytest.raises(TypeError, match="float32"):
        nn.Linear(3, 4).forward(np.zeros((2, 3)))


@pytest.mark.parametrize("k,mode", [(2, "unified"), (7, "unified"), (3, "example")])
def test_lazy_adam_touches_only_selected_rows(k, mode):
    """Few rows take the gather path, most rows the dense-then-restore path: same semantics."""
    rng = np.random.default_rng(8)
    layer = nn.Linear(6, 10, grad=alg.MeProp(k=k, mode=mode), rng=rng)
    before = layer.weight.data.copy()
    opt = nn.Adam(layer.params(), lr=0.1)
    layer.forward(rng.standard_normal((3, 6)).astype(np.float32))
    layer.backward(rng.standard_normal((3, 10)).astype(np.float32))
    opt.step()
    changed = np.flatnonzero(np.any(layer.weight.data != before, axis=1))
    np.testing.assert_array_equal(changed, layer.weight.rows)
    if mode == "unified":
        assert len(changed) == k


def test_adam_and_sgd_against_the_formulas():
    rng = np.random.default_rng(9)
    w0 = rng.standard_normal((4, 3)).astype(np.float32)
    grads = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(3)]
    p = nn.Param("w", w0.copy())
    opt = nn.Adam([p], lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    w, m, v = w0.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, 1):
        p.grad = g
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g.astype(np.float64) ** 2
        w = w - 0.01 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.99 ** t)) + 1e-6)
    np.testing.assert_allclose(p.data, w, rtol=1e-5, atol=1e-6)
    q = nn.Param("w", w0.copy())
    sgd = nn.SGD([q], lr=0.1, momentum=0.5)
    w, b = w0.astype(np.float64), 0.0
    for g in grads:
        q.grad = g
        sgd.step()
        b = 0.5 * b + g
        w = w - 0.1 * b
    np.testing.assert_allclose(q.data, w, rtol=1e-5, atol=1e-6)


def test_mesimp_schedule_shrinks_in_simplify_epochs_only():
    rng = np.random.default_rng(10)
    X = rng.standard_normal((96, 10)).astype(np.float32)
    y = rng.integers(0, 3, 96)
    model = _mlp(alg.MeSimp(k=2, p=0.2), seed=11, widths=(10, 24, 16, 3))
    opt = nn.Adam(model.params(), lr=1e-2)
    sched = alg.MeSimpSchedule(model, opt, chunks=4, cycle=1)
    assert [sched.simplifying(e) for e in range(4)] == [True, False, True, False]
    nn.fit(model, opt, X, y, epochs=2, batch=8, progress=False, on_chunk=sched, chunks=4)
    assert [(e, c) for e, c, _ in sched.widths] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    first = [m for m in model.layers if isinstance(m, nn.Linear)][0]
    assert first.out_features == sched.widths[-1][2][0] < 24  # the layer really shrank
    assert nn.evaluate(model, X, y) >= 0  # and still runs
    with pytest.raises(ValueError, match="chunks"):
        alg.MeSimpSchedule(model, opt, chunks=0)


def test_adam_kernel_rows_and_errors(isa):
    """The fused C++ step with a row list against the formula on those rows only."""
    from sparsebp import _core

    rng = np.random.default_rng(13)
    p = rng.standard_normal((6, 5)).astype(np.float32)
    g = rng.standard_normal((6, 5)).astype(np.float32)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    before = p.copy()
    rows = np.array([1, 4], np.int64)
    _core.adam_step(p, g, m, v, rows, 0.9, 0.999, 0.1, 1.0 / 0.001, 1e-8)
    expect = before.astype(np.float64).copy()
    mm = 0.1 * g[rows].astype(np.float64)
    vv = 0.001 * g[rows].astype(np.float64) ** 2
    expect[rows] -= 0.1 * mm / (np.sqrt(vv / 0.001) + 1e-8)
    np.testing.assert_allclose(p, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.flatnonzero(m.any(axis=1)), rows)
    with pytest.raises(ValueError, match="outside"):
        _core.adam_step(p, g, m, v, np.array([6]), 0.9, 0.999, 0.1, 1.0, 1e-8)
    with pytest.raises(ValueError, match="shape"):
        _core.adam_step(p, g[:3], m, v, None, 0.9, 0.999, 0.1, 1.0, 1e-8)
    with pytest.raises(TypeError, match="float32"):
        _core.adam_step(p.astype(np.float64), g, m, v, None, 0.9, 0.999, 0.1, 1.0, 1e-8)


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_optimizer_row_lists_are_checked(opt):
    """``Param.rows`` is strictly increasing integers: a repeated row would take two steps (and the
    threads splitting the list could write it at once), a float would be truncated; each is an
    error and leaves the parameter and the optimizer's state as they were."""
    for rows, err, match in (([1, 1], ValueError, r"strictly increasing; rows\[1\] = 1 follows 1"),
                             ([3, 1], ValueError, r"strictly increasing; rows\[1\] = 1 follows 3"),
                             ([1.5], TypeError, r"w.rows must hold integers.*float64"),
                             ([4], ValueError, r"rows\[0\] = 4 is outside")):
        p = nn.Param("w", np.ones((4, 3), np.float32))
        p.rows, p.grad = rows, np.ones((len(rows), 3), np.float32)
        o = nn.Adam([p], lr=0.1) if opt == "adam" else nn.SGD([p], lr=0.1, momentum=0.9)
        with pytest.raises(err, match=match):
            o.step()
        np.testing.assert_array_equal(p.data, np.ones((4, 3), np.float32))
        for st in o.state.values():
            for a in st.values():
                assert not a.any()
    # a 1-D parameter (a sparse layer's values) with a position list: runs of consecutive positions,
    # whose order is checked where a run breaks; a repeat inside a would-be run, or after the end
    for rows, match in (([2, 3, 4, 4, 5], r"rows\[3\] = 4 follows 4"), ([6, 7, 3], r"rows\[2\] = 3 follows 7"),
                        ([0, 1, 2, 9], r"rows\[3\] = 9 is outside"), ([-1, 0, 1], r"rows\[0\] = -1 is outside")):
        p = nn.Param("values", np.ones(9, np.float32))
        p.rows, p.grad = rows, np.ones(len(rows), np.float32)
        o = nn.Adam([p], lr=0.1) if opt == "adam" else nn.SGD([p], lr=0.1, momentum=0.9)
        with pytest.raises(ValueError, match=match):
            o.step()
        np.testing.assert_array_equal(p.data, np.ones(9, np.float32))
        for st in o.state.values():
            for a in st.values():
                assert not a.any()
    p = nn.Param("w", np.ones((4, 3), np.float32))
    p.rows, p.grad = np.array([0, 2], np.uint8), np.ones((2, 3), np.float32)  # any integer dtype
    (nn.Adam([p], lr=0.1) if opt == "adam" else nn.SGD([p], lr=0.1)).step()
    np.testing.assert_allclose(p.data[:, 0], [0.9, 1, 0.9, 1], rtol=1e-6)


@pytest.mark.parametrize("shape, rows", [((37,), None), ((37,), [0, 5, 36]), ((9, 53), None),
                                         ((9, 53), [0, 2, 8]), ((3, 16), None), ((1, 1), None)])
def test_adam_kernel_against_float64_every_isa(isa, shape, rows):
    """Several steps of the vectorised kernel (vector bodies and tails, 1-D and 2-D, row lists)
    against the formula in float64."""
    from sparsebp import _core

    rng = np.random.default_rng(hash(shape) % 1000)
    p = rng.standard_normal(shape).astype(np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    w, mm, vv = p.astype(np.float64), np.zeros(shape), np.zeros(shape)
    sel = slice(None) if rows is None else np.array(rows)
    for t in range(1, 5):
        g = rng.standard_normal(shape).astype(np.float32)
        c1, c2 = 1 - 0.9 ** t, 1 - 0.999 ** t
        _core.adam_step(p, g, m, v, None if rows is None else np.array(rows, np.int64), 0.9, 0.999, 0.01 / c1,
                        1.0 / c2, 1e-8)
        mm[sel] = 0.9 * mm[sel] + 0.1 * g[sel]
        vv[sel] = 0.999 * vv[sel] + 0.001 * g[sel].astype(np.float64) ** 2
        w[sel] -= 0.01 / c1 * mm[sel] / (np.sqrt(vv[sel] / c2) + 1e-8)
    np.testing.assert_allclose(p, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m, mm, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(v, vv, rtol=1e-5, atol=1e-9)


def _position_runs(rng, size: int, min_gap: int, lengths) -> np.ndarray:
    """Increasing positions below size: runs of lengths drawn from `lengths`, separated by gaps of
    min_gap..8 (int64)."""
    pos, at = [], 0
    while True:
        at += int(rng.integers(min_gap, 9))
        n = int(rng.choice(lengths))
        if at + n > size:
            break
        pos.extend(range(at, at + n))
        at += n
    return np.array(pos, np.int64)


@pytest.mark.parametrize("nthreads, size", [(1, 1000), (2, 1_300_000)])
@pytest.mark.parametrize("compact", [False, True])
def test_adam_kernel_position_runs_every_isa(isa, threads, nthreads, size, compact):
    """A 1-D parameter with a position list (a sparse layer's stored values at the touched rows):
    runs of consecutive positions of every length (1, vector tails, long ones) and gaps, over two
    steps, against the formula in float64; entries outside the list and their moments untouched.
    The larger size splits the runs between 2 threads."""
    from sparsebp import _core

    sparsebp.set_num_threads(nthreads)
    rng = np.random.default_rng(size + compact)
    # gaps of 0..8 (0: two runs back to back = one run)
    pos = _position_runs(rng, size, 0, [1, 2, 7, 8, 9, 15, 16, 17, 33, 100])
    p = rng.standard_normal(size).astype(np.float32)
    before = p.copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    w, mm, vv = p.astype(np.float64), np.zeros(size), np.zeros(size)
    for t in (1, 2):
        g = rng.standard_normal(size).astype(np.float32)
        c1, c2 = 1 - 0.9 ** t, 1 - 0.999 ** t
        _core.adam_step(p, np.ascontiguousarray(g[pos]) if compact else g, m, v, pos, 0.9, 0.999, 0.01 / c1,
                        1.0 / c2, 1e-8, compact)
        gs = g[pos].astype(np.float64)
        mm[pos] = 0.9 * mm[pos] + 0.1 * gs
        vv[pos] = 0.999 * vv[pos] + 0.001 * gs ** 2
        w[pos] -= 0.01 / c1 * mm[pos] / (np.sqrt(vv[pos] / c2) + 1e-8)
    np.testing.assert_allclose(p, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m, mm, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(v, vv, rtol=1e-5, atol=1e-9)
    outside = np.ones(size, bool)
    outside[pos] = False
    assert outside.any() and not m[outside].any() and not v[outside].any()
    np.testing.assert_array_equal(p[outside], before[outside])


@pytest.mark.parametrize("nthreads, size", [(1, 1000), (2, 300_000)])
def test_sgd_position_runs_every_isa(isa, threads, nthreads, size):
    """nn.SGD's step (momentum, weight decay) on a 1-D parameter with a position list (a sparse
    layer's values at the touched rows): runs of every length, over two steps, against PyTorch's
    rule in float64; entries outside the list and their momentum untouched."""
    sparsebp.set_num_threads(nthreads)
    rng = np.random.default_rng(size + 7)
    pos = _position_runs(rng, size, 1, [1, 2, 7, 8, 9, 17, 33, 100])
    p = nn.Param("values", rng.standard_normal(size).astype(np.float32))
    before = p.data.copy()
    opt = nn.SGD([p], lr=0.05, momentum=0.9, weight_decay=0.01)
    w, b = p.data.astype(np.float64), np.zeros(size)
    for _ in range(2):
        g = np.zeros(size, np.float32)
        g[pos] = rng.standard_normal(len(pos)).astype(np.float32)
        p.grad, p.rows = g, pos
        opt.step()
        b[pos] = 0.9 * b[pos] + g[pos] + 0.01 * w[pos]
        w[pos] -= 0.05 * b[pos]
    np.testing.assert_allclose(p.data, w, rtol=1e-5, atol=1e-6)
    outside = np.ones(size, bool)
    outside[pos] = False
    np.testing.assert_array_equal(p.data[outside], before[outside])
    assert not opt.state[id(p)]["buf"][outside].any()


def test_adam_kernel_compact_gradient_every_isa(isa):
    """compact=True: g holds only the listed rows; the result equals the full-shape call."""
    from sparsebp import _core

    rng = np.random.default_rng(21)
    p = rng.standard_normal((7, 19)).astype(np.float32)
    rows = np.array([0, 3, 6], np.int64)
    gc = rng.standard_normal((3, 19)).astype(np.float32)
    gfull = np.zeros_like(p)
    gfull[rows] = gc
    a, b = p.copy(), p.copy()
    ma, va, mb, vb = (np.zeros_like(p) for _ in range(4))
    _core.adam_step(a, gc, ma, va, rows, 0.9, 0.999, 0.01, 1000.0, 1e-8, True)
    _core.adam_step(b, gfull, mb, vb, rows, 0.9, 0.999, 0.01, 1000.0, 1e-8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    np.testing.assert_array_equal(np.delete(a, rows, 0), np.delete(p, rows, 0))
    m64, v64 = 0.1 * gc.astype(np.float64), 0.001 * gc.astype(np.float64) ** 2  # one step from zero moments
    np.testing.assert_allclose(a[rows], p[rows] - 0.01 * m64 / (np.sqrt(v64 * 1000.0) + 1e-8), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="row list"):
        _core.adam_step(a, gc, ma, va, None, 0.9, 0.999, 0.01, 1.0, 1e-8, True)
    with pytest.raises(ValueError, match="one row per listed row"):
        _core.adam_step(a, gc[:2], ma, va, rows, 0.9, 0.999, 0.01, 1.0, 1e-8, True)


def test_adam_kernel_flushes_subnormal_moments(isa):
    """Moments of gradients that stay zero decay into subnormals; the step flushes them to zero
    (arithmetic on subnormals is very slow) instead of carrying them on."""
    from sparsebp import _core

    p = np.ones((2, 3), np.float32)
    g = np.zeros((2, 3), np.float32)
    m = np.full((2, 3), 1e-38, np.float32)  # 0.9 * 1e-38 is subnormal
    v = np.full((2, 3), 1e-38, np.float32)
    _core.adam_step(p, g, m, v, None, 0.9, 0.999, 0.1, 1.0, 1e-8)
    assert not m.any() and not v.any()
    np.testing.assert_array_equal(p, 1.0)


def test_dropout_train_and_eval():
    """Training mode: every entry is either 0 or x / (1 - p); the backward applies the same factor;
    the drop rate matches p (binomial bounds). Evaluation mode and p = 0: the identity."""
    p = 0.3
    drop = nn.Dropout(p, rng=np.random.default_rng(7))
    x = (np.random.default_rng(1).standard_normal((64, 500)) + 5.0).astype(np.float32)  # no zeros in x
    x0 = x.copy()
    y = drop.forward(x)
    np.testing.assert_array_equal(x, x0)  # input left unmodified
    kept = y != 0
    np.testing.assert_allclose(y[kept], x.astype(np.float64)[kept] / (1 - p), rtol=1e-6)
    n = x.size
    assert abs((~kept).sum() - p * n) < 5 * np.sqrt(n * p * (1 - p))
    g = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    gi = drop.backward(g)
    np.testing.assert_allclose(gi, np.where(kept, g.astype(np.float64) / (1 - p), 0.0), rtol=1e-6)
    y2 = drop.forward(x)
    assert not np.array_equal(y2 != 0, kept)  # a fresh mask each step
    drop.training = False
    np.testing.assert_array_equal(drop.forward(x), x)
    np.testing.assert_array_equal(drop.backward(g), g)
    np.testing.assert_array_equal(nn.Dropout(0.0).forward(x), x)


def _dropout_ref(x, seed, p, scale):
    """The documented mask generator (kernel_table.h, DropoutArgs) in NumPy uint64 arithmetic."""
    i = np.arange(x.size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = ref.mix64(ref.mix64(np.uint64(seed)) + (i >> np.uint64(1)))
    bits = np.where(i % np.uint64(2) == 0, h >> np.uint64(40), (h >> np.uint64(8)) & np.uint64(0xFFFFFF))
    u = bits.astype(np.float32) * np.float32(2.0 ** -24)
    factor = np.where(u < np.float32(p), np.float32(0), np.float32(scale)).astype(np.float32)
    return (x.ravel() * factor).reshape(x.shape), factor.reshape(x.shape)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 255, 256, 257, 513, 1001, 300_001])
def test_dropout_kernel_matches_its_generator(isa, threads, n):
    """The C++ pass against the NumPy re-implementation of its generator, bit for bit, on every
    ISA; 300,001 entries split between two threads (whole cache lines, an odd tail) give the same
    bits as one; y may alias x."""
    from sparsebp import _core
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    x[::5] = -x[::5]
    p, scale, seed = 0.3, float(np.float32(1 / 0.7)), 2 ** 63 + 12345
    y_ref, f_ref = _dropout_ref(x, seed, p, scale)
    for nt in (1, 2):
        sparsebp.set_num_threads(nt)
        y, f = np.empty_like(x), np.empty_like(x)
        _core.dropout(x, y, f, seed, p, scale)
        np.testing.assert_array_equal(f, f_ref)
        np.testing.assert_array_equal(y, y_ref)
    xa = x.copy()
    _core.dropout(xa, xa, f, seed, p, scale)  # in place
    np.testing.assert_array_equal(xa, y_ref)
    if n == 300_001:
        dropped = (f == 0).mean()
        assert abs(dropped - p) < 5 * np.sqrt(p * (1 - p) / n)


def test_dropout_kernel_rejects_bad_arguments():
    from sparsebp import _core
    x = np.ones(64, np.float32)
    y, f = np.empty_like(x), np.empty_like(x)
    with pytest.raises(ValueError, match="factor must not share memory"):
        _core.dropout(x, y, x, 1, 0.5, 2.0)
    with pytest.raises(ValueError, match="factor must not share memory"):
        _core.dropout(x, y, y, 1, 0.5, 2.0)
    for p in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="p must be in"):
            _core.dropout(x, y, f, 1, p, 2.0)
    with pytest.raises(ValueError, match="out must have x's size"):
        _core.dropout(x, y[:10], f, 1, 0.5, 2.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.dropout(np.ones((8, 16), np.float32)[:, ::2].copy().T, y[:64], f[:64], 1, 0.5, 2.0)
    with pytest.raises(TypeError, match="float32"):
        _core.dropout(x.astype(np.float64), y, f, 1, 0.5, 2.0)
    np.testing.assert_array_equal(x, 1.0)  # inputs untouched by the refused calls


def test_dropout_in_a_model_and_evaluate_restores_mode():
    """Sequential.train()/eval() switch the dropout layers; evaluate() runs in evaluation mode
    (its result equals the float64 function of the weights) and restores the mode it found; the
    gradient of a model with dropout equals finite differences of the same masked function."""
    rng = np.random.default_rng(3)
    lin1, lin2 = nn.Linear(6, 8, rng=rng), nn.Linear(8, 3, rng=rng)
    drop = nn.Dropout(0.5, rng=np.random.default_rng(4))
    model = nn.Sequential(lin1, nn.ReLU(), drop, lin2)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    y = rng.integers(0, 3, 40)

    def f64(mask_scale=None):
        h = np.maximum(x.astype(np.float64) @ lin1.weight.data.T.astype(np.float64) + lin1.bias.data, 0)
        if mask_scale is not None:
            h = h * mask_scale
        return h @ lin2.weight.data.T.astype(np.float64) + lin2.bias.data

    assert model.training
    acc = nn.evaluate(model, x, y)
    assert model.training  # restored
    assert acc == float(np.mean(f64().argmax(1) == y))
    model.eval()
    assert not model.training and not drop.training
    np.testing.assert_allclose(model.forward(x), f64(), rtol=1e-5, atol=1e-5)
    nn.evaluate(model, x, y)
    assert not model.training
    model.train()
    logits = model.forward(x)
    scale = drop._scale.astype(np.float64)
    np.testing.assert_allclose(logits, f64(scale), rtol=1e-5, atol=1e-5)
    _, g = nn.softmax_cross_entropy(logits, y)
    model.backward(g)

    def loss(delta, i, j):
        old = lin1.weight.data[i, j]
        lin1.weight.data[i, j] = old + delta
        z = f64(scale)
        lin1.weight.data[i, j] = old
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))

    for (i, j) in [(0, 0), (3, 5), (7, 2)]:
        fd = (loss(1e-3, i, j) - loss(-1e-3, i, j)) / 2e-3
        assert abs(fd - lin1.weight.grad[i, j]) < 2e-3 * max(1, abs(fd)), (i, j, fd, lin1.weight.grad[i, j])


@pytest.mark.parametrize("p", [-0.1, 1.0, 1 - 1e-9, 1.5, True, "0.5", None])
def test_dropout_rejects_bad_p(p):
    with pytest.raises(ValueError, match="p must be"):
        nn.Dropout(p)


def test_dropout_rejects_bad_rng():
    with pytest.raises(TypeError, match="rng must be"):
        nn.Dropout(0.1, rng=3)


@pytest.mark.parametrize("make", [lambda r: nn.Linear(4, 3, rng=r), lambda r: nn.SparseLinear(4, 3, 0.5, rng=r),
                                  lambda r: nn.Dropout(0.1, rng=r)])
@pytest.mark.parametrize("rng", [3, np.random.RandomState(0), "seed"])
def test_layers_reject_bad_rng(make, rng):
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator or None; got"):
        make(rng)


@pytest.mark.parametrize("kw, what", [(dict(betas=(1.0, 0.999)), r"betas\[0\]"), (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
                                      (dict(betas=(0.9, float("nan"))), r"betas\[1\]"), (dict(betas=0.9), "betas must"),
                                      (dict(betas=(0.9,)), "betas must"), (dict(eps=-1e-8), "eps"),
                                      (dict(eps=float("nan")), "eps"), (dict(eps="1e-8"), "eps")])
def test_adam_rejects_bad_hyper_parameters(kw, what):
    with pytest.raises(ValueError, match=what):
        nn.Adam(nn.Linear(3, 2).params(), **kw)


def test_sequential_rejects_non_layers():
    with pytest.raises(TypeError, match="layer 1 must have forward, backward and params"):
        nn.Sequential(nn.Linear(3, 2), lambda x: x)


def test_loop_and_evaluate_edge_cases():
    """A batch larger than the data would train nothing: a ValueError, not an epoch of no steps with
    a NaN loss. An empty evaluation set is a ValueError, not an accuracy of 0. An empty batch's
    cross-entropy is NaN (torch's mean over no examples), with an empty gradient."""
    rng = np.random.default_rng(0)
    X, y = rng.random((10, 4), dtype=np.float32), rng.integers(0, 3, 10)
    model = nn.Sequential(nn.Linear(4, 3, rng=rng))
    opt = nn.SGD(model.params(), lr=0.1)
    with pytest.raises(ValueError, match=r"batch \(32\) is larger than the data \(10 examples\)"):
        nn.fit(model, opt, X, y, progress=False)
    assert nn.fit(model, opt, X, y, epochs=0, progress=False) == []  # nothing asked, nothing done
    recs = nn.fit(model, opt, X, y, batch=10, progress=False)
    assert np.isfinite(recs[0]["loss"])
    with pytest.raises(ValueError, match="chunks must be a positive int"):
        nn.fit(model, opt, X, y, batch=5, chunks=0, progress=False)
    with pytest.raises(TypeError, match="on_chunk must be callable"):
        nn.fit(model, opt, X, y, batch=5, on_chunk=3, progress=False)
    with pytest.raises(ValueError, match="X is empty"):
        nn.evaluate(model, X[:0], y[:0])
    with pytest.raises(ValueError, match="batch must be a positive int"):
        nn.evaluate(model, X, y, batch=0)
    with pytest.raises(ValueError, match="differ in length"):
        nn.evaluate(model, X, y[:5])
    loss, g = nn.softmax_cross_entropy(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    assert np.isnan(loss) and g.shape == (0, 3)


@pytest.mark.parametrize("opt", [nn.SGD, nn.Adam])
@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0, -1e-3])
def test_optimizers_reject_non_finite_or_non_positive_lr(opt, lr):
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        opt(nn.Linear(3, 2).params(), lr=lr)


def test_remove_units_and_inputs_take_boolean_masks_only():
    """An integer array would index rows (a 0/1 "mask" duplicating units), a short one fail inside
    NumPy: both are ValueErrors naming keep; a right mask removes exactly the False entries."""
    lin = nn.Linear(4, 5, rng=np.random.default_rng(0))
    w = lin.weight.data.copy()
    for bad in (np.array([1, 0, 1, 1, 0]), np.array([True, False]), [True] * 6):
        with pytest.raises(ValueError, match="keep must be a boolean array"):
            lin.remove_units(bad)
        with pytest.raises(ValueError, match="keep must be a boolean array"):
            lin.remove_inputs(bad)
    np.testing.assert_array_equal(lin.weight.data, w)  # unchanged by the refused calls
    lin.remove_units(np.array([True, False, True, True, False]))
    lin.remove_inputs(np.array([False, True, True, True]))
    np.testing.assert_array_equal(lin.weight.data, w[[0, 2, 3]][:, 1:])


def test_simplify_checks_before_it_changes_anything():
    """A foreign optimizer is a TypeError before any counter is reset or unit removed (the counters
    used to be reset, then an AttributeError raised)."""
    rng = np.random.default_rng(0)
    m = nn.Sequential(nn.Linear(4, 5, grad=alg.MeSimp(k=1, p=0.9), rng=rng), nn.ReLU(), nn.Linear(5, 3, rng=rng))
    opt = nn.Adam(m.params())
    X, y = rng.random((64, 4), dtype=np.float32), rng.integers(0, 3, 64)
    nn.fit(m, opt, X, y, batch=16, progress=False)
    hits = m.layers[0].policy.hits.copy()
    with pytest.raises(TypeError, match="optimizer must be a sparsebp.nn optimizer"):
        m.simplify(optimizer=object())
    np.testing.assert_array_equal(m.layers[0].policy.hits, hits)
    assert m.layers[0].weight.data.shape == (5, 4)
    widths = m.simplify(opt)  # and the real call still works
    assert widths == [m.layers[0].weight.data.shape[0]] and m.layers[2].weight.data.shape[1] == widths[0]


def _saveable(seed=0):
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.SparseLinear(12, 16, 0.75, grad=alg.MSBP(k=3, alpha=0.5), rng=rng), nn.ReLU(),
                         nn.Dropout(0.25, rng=np.random.default_rng(1)),
                         nn.Linear(16, 9, grad=alg.MeSimp(ratio=0.3, p=0.05), rng=rng), nn.ReLU(),
                         nn.SparseLinear(9, 4, 0.5, bias=False, grad=alg.MeProp(k=2, mode="unified"), rng=rng))


def _train_np(model, steps=4, seed=3):
    rng = np.random.default_rng(seed)
    opt = nn.Adam(model.params(), lr=1e-2)
    for _ in range(steps):
        x, y = rng.standard_normal((8, 12)).astype(np.float32), rng.integers(0, 4, 8)
        _, g = nn.softmax_cross_entropy(model.forward(x), y)
        model.backward(g)
        opt.step()
    return np.concatenate([p.data.ravel() for p in model.params()])


def test_save_load_round_trip(tmp_path):
    """A trained model saved and loaded computes the same function (against a float64 reference of
    the loaded arrays too), keeps its layers, policies and mode, and trains on exactly as the
    original does once the state that is not saved (MSBP's memory, meSimp's counters, Dropout's
    generator) is started afresh in both."""
    m = _saveable()
    _train_np(m)
    path = tmp_path / "model.safetensors"
    nn.save(m, path)
    b = nn.load(path)
    assert repr(b) == repr(m) and b.training
    x = np.random.default_rng(9).standard_normal((5, 12)).astype(np.float32)
    m.eval(), b.eval()
    assert np.array_equal(b.forward(x), m.forward(x))
    h = x.astype(np.float64)
    for layer in b.layers:
        if isinstance(layer, (nn.Linear, nn.SparseLinear)):
            w = layer.weight.data if isinstance(layer, nn.Linear) else layer.csr.to_dense()
            h = h @ w.astype(np.float64).T + (0 if layer.bias is None else layer.bias.data)
        elif isinstance(layer, nn.ReLU):
            h = np.maximum(h, 0)
    np.testing.assert_allclose(b.forward(x), h, rtol=1e-5, atol=1e-5)
    m.train(), b.train()
    for model in (m, b):
        model.layers[0].policy.reset()
        model.layers[3].policy.hits, model.layers[3].policy.seen = None, 0
        model.layers[2].rng = np.random.default_rng(4)
    assert np.array_equal(_train_np(b), _train_np(m))
    m.eval()
    nn.save(m, path)
    assert not nn.load(path).training


def test_save_load_after_mesimp_shrinks(tmp_path):
    model = _mlp(alg.MeSimp(k=2, p=0.3), seed=7, widths=(10, 16, 12, 3))
    rng = np.random.default_rng(6)
    opt = nn.Adam(model.params(), lr=1e-2)
    nn.fit(model, opt, rng.standard_normal((40, 10)).astype(np.float32), rng.integers(0, 3, 40), epochs=1, batch=8,
           progress=False)
    widths = model.simplify(opt)
    assert widths[0] < 16
    nn.save(model, tmp_path / "small.safetensors")
    back = nn.load(tmp_path / "small.safetensors")
    assert [m.out_features for m in back.layers if isinstance(m, nn.Linear)][:2] == widths
    x = rng.standard_normal((4, 10)).astype(np.float32)
    assert np.array_equal(back.forward(x), model.forward(x))


def test_sparse_linear_from_csr_against_float64():
    rng = np.random.default_rng(2)
    d = rng.standard_normal((6, 11)).astype(np.float32)
    d[rng.random(d.shape) < 0.7] = 0
    w, bias = sparsebp.CSR.from_dense(d), rng.standard_normal(6).astype(np.float32)
    layer = nn.SparseLinear.from_csr(w, bias, grad=alg.MeProp(k=2))
    w.values[:] = 0  # copied: the caller's arrays are not the layer's
    bias[:] = 0
    x = rng.standard_normal((3, 11)).astype(np.float32)
    want = x.astype(np.float64) @ d.astype(np.float64).T + layer.bias.data
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-5, atol=1e-6)
    assert layer.bias.data.any() and repr(layer.policy) == "MeProp(k=2, mode='example')"
    with pytest.raises(TypeError, match="weight must be a sparsebp.CSR"):
        nn.SparseLinear.from_csr(d)
    with pytest.raises(TypeError, match="bias must be a float32"):
        nn.SparseLinear.from_csr(w, np.zeros(6))
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        nn.SparseLinear.from_csr(w, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="at least one row"):
        nn.SparseLinear.from_csr(sparsebp.CSR.from_dense(np.zeros((0, 3), np.float32)))


def test_save_refuses_what_it_cannot_write(tmp_path):
    class Mine(alg.MeProp):
        pass

    class Square:
        def forward(self, x):
            return x * x

        def backward(self, g, input_grad=True):
            return g

        def params(self):
            return []

    with pytest.raises(TypeError, match="model must be a sparsebp.nn.Sequential"):
        nn.save([nn.ReLU()], tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        nn.save(_mlp(), tmp_path / "m.pt")
    with pytest.raises(TypeError, match="layer 1 is a Square"):
        nn.save(nn.Sequential(nn.Linear(3, 4), Square()), tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="layer 0 has a policy of its own type"):
        nn.save(nn.Sequential(nn.Linear(3, 4, grad=Mine(k=1))), tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_load_bad_files(tmp_path):
    """Every way a file can be wrong is a ValueError naming the file and the entry (never a model
    with garbage in it); a missing file is a FileNotFoundError."""
    import json

    from safetensors.numpy import load_file, save_file

    m = _saveable()
    good = tmp_path / "good.safetensors"
    nn.save(m, good)
    arrays = load_file(str(good))
    from safetensors import safe_open

    with safe_open(str(good), framework="np") as f:
        meta = json.loads(f.metadata()["sparsebp"])

    def write(name, arrays=arrays, meta=meta, raw=None):
        path = tmp_path / name
        if raw is not None:
            path.write_bytes(raw)
        else:
            save_file(arrays, str(path), metadata=None if meta is None else {"sparsebp": json.dumps(meta)
                                                                            if not isinstance(meta, str) else meta})
        return path

    def layer(i, **kw):
        out = json.loads(json.dumps(meta))
        out["layers"][i].update(kw)
        return out

    def arr(**kw):
        return {**arrays, **kw}

    bad_indices = arrays["0.indices"].copy()
    bad_indices[0] = 12
    nan_values = arrays["5.values"].copy()
    nan_values[1] = np.nan
    cases = [
        (write("trunc.safetensors", raw=good.read_bytes()[:100]), "not a readable safetensors file"),
        (write("nometa.safetensors", meta=None), "not written by sparsebp.nn.save"),
        (write("badjson.safetensors", meta="{"), "not valid JSON"),
        (write("torchfmt.safetensors", meta=dict(meta, format="sparsebp.torch")), "not written by sparsebp.nn.save"),
        (write("version.safetensors", meta=dict(meta, version=2)), "format version 2"),
        (write("nolayers.safetensors", meta=dict(meta, layers=[])), "non-empty list"),
        (write("kind.safetensors", meta=layer(1, type="GELU")), "layer 1: unknown layer description"),
        (write("keys.safetensors", meta=layer(1, p=0.5)), "layer 1: a ReLU must be described by the keys"),
        (write("width.safetensors", meta=layer(3, in_features=0)), "layer 3: in_features must be a positive int"),
        (write("biasflag.safetensors", meta=layer(3, bias=1)), "layer 3: bias must be true or false"),
        (write("drop.safetensors", meta=layer(2, p=1.5)), "layer 2: p must be a number"),
        (write("policy.safetensors", meta=layer(0, grad={"type": "MSBP", "k": 3, "ratio": None, "alpha": 7})),
         "layer 0: the grad policy: alpha must lie in"),
        (write("shape.safetensors", meta=layer(3, out_features=8)), r"'3.bias' must be float32 with shape \(8,\)"),
        (write("missing.safetensors", arrays={k: v for k, v in arrays.items() if k != "3.bias"}), "'3.bias' is missing"),
        (write("extra.safetensors", arrays=arr(**{"9.weight": np.zeros(2, np.float32)})),
         r"entries \['9.weight'\] belong to no layer"),
        (write("dtype.safetensors", arrays=arr(**{"3.weight": arrays["3.weight"].astype(np.float64)})),
         "'3.weight' must be float32"),
        (write("structure.safetensors", arrays=arr(**{"0.indices": bad_indices})), "layer 0: the CSR structure is invalid"),
        (write("nan.safetensors", arrays=arr(**{"5.values": nan_values})), "'5.values' holds NaN"),
        (write("chain.safetensors", meta=layer(5, in_features=10),
               arrays=arr(**{"5.indices": np.minimum(arrays["5.indices"], 9)})), "layer 3 has 9 outputs but layer 5"),
        (write("mode.safetensors", meta=dict(meta, training="yes")), "training must be true or false"),
    ]
    for path, match in cases:
        with pytest.raises(ValueError, match=match):
            nn.load(path)
    with pytest.raises(FileNotFoundError):
        nn.load(tmp_path / "none.safetensors")


def test_clone_keeps_a_subclass_and_clears_state():
    """A policy subclass given to a layer stays that subclass (clone used to return the built-in
    base, silently dropping an overridden select), with its own settings and no state; the
    original keeps its state."""

    class FirstColumns(alg.MeProp):
        """Always the first k columns (per example), whatever the gradient."""

        def select(self, g):
            k = self.k_for(g.shape[1])
            return alg.Selection("example", np.tile(np.arange(k, dtype=np.int32), (g.shape[0], 1)), g)

    pol = FirstColumns(k=2)
    layer = nn.Linear(5, 6, grad=pol, rng=np.random.default_rng(0))
    assert type(layer.policy) is FirstColumns and layer.policy is not pol
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    g = np.random.default_rng(2).standard_normal((3, 6)).astype(np.float32)
    layer.forward(x)
    dx = layer.backward(g)
    g_kept = np.zeros_like(g, dtype=np.float64)
    g_kept[:, :2] = g[:, :2]
    np.testing.assert_allclose(dx, g_kept @ layer.weight.data.astype(np.float64), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.weight.dense_grad(), g_kept.T @ x.astype(np.float64), rtol=1e-5, atol=1e-6)
    m = alg.MSBP(k=2, alpha=0.5)
    m.select(np.ones((3, 6), np.float32))
    c = m.clone()
    assert type(c) is alg.MSBP and c.memory is None and m.memory is not None and (c.k, c.alpha) == (2, 0.5)
    s = alg.MeSimp(k=1, p=0.2)
    s.select(np.ones((3, 6), np.float32))
    c = s.clone()
    assert c.hits is None and c.seen == 0 and s.seen == 3 and c.p == 0.2


def _policy_strategy():
    from hypothesis import strategies as hs

    k_or_ratio = hs.one_of(hs.builds(lambda k: dict(k=k), hs.integers(0, 6)),
                           hs.builds(lambda r: dict(ratio=r), hs.floats(0.01, 1.0)))
    return hs.one_of(
        hs.none(),
        hs.builds(lambda kr, mode: alg.MeProp(mode=mode, **kr), k_or_ratio, hs.sampled_from(["example", "unified"])),
        hs.builds(lambda kr, a: alg.MSBP(alpha=a, **kr), k_or_ratio, hs.floats(0.0, 1.0)),
        hs.builds(lambda kr, p: alg.MeSimp(p=p, **kr), k_or_ratio, hs.floats(0.0, 1.0)))


def test_hypothesis_save_load_round_trip(tmp_path_factory):
    """Random stacks (widths, dense or sparse layers at any sparsity, bias or not, any policy and
    settings, ReLU / Dropout between) load back with the same layers and the same function."""
    from hypothesis import given, settings, strategies as hs

    layer_spec = hs.tuples(hs.integers(1, 9), hs.booleans(), hs.floats(0.0, 0.95), hs.booleans(),
                           _policy_strategy(), hs.sampled_from(["relu", "dropout", "none"]))

    @settings(max_examples=40, deadline=None)
    @given(hs.integers(1, 9), hs.lists(layer_spec, min_size=1, max_size=4), hs.integers(0, 2 ** 31))
    def check(n_in, specs, seed):
        rng = np.random.default_rng(seed)
        layers, width = [], n_in
        for out, sparse, s, bias, pol, act in specs:
            if sparse:
                layers.append(nn.SparseLinear(width, out, s, bias, grad=pol, rng=rng))
            else:
                layers.append(nn.Linear(width, out, bias, grad=pol, rng=rng))
            if act == "relu":
                layers.append(nn.ReLU())
            elif act == "dropout":
                layers.append(nn.Dropout(s))
            width = out
        model = nn.Sequential(*layers).train(bool(seed % 2))
        path = tmp_path_factory.mktemp("h") / "m.safetensors"
        nn.save(model, path)
        back = nn.load(path)
        assert repr(back) == repr(model) and back.training == model.training
        for a, b in zip(model.layers, back.layers):
            assert [p.data.tolist() for p in a.params()] == [p.data.tolist() for p in b.params()]
            if isinstance(a, nn.SparseLinear):
                assert np.array_equal(a.csr.to_dense(), b.csr.to_dense())
            if isinstance(a, (nn.Linear, nn.SparseLinear)) and a.policy is not None:
                assert a.policy.settings() == b.policy.settings()
        x = rng.standard_normal((3, n_in)).astype(np.float32)
        model.eval(), back.eval()
        assert np.array_equal(back.forward(x), model.forward(x))

    check()
