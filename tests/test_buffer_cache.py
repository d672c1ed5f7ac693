"""The cache of large output buffers (sparsebp.buffer_cache_info): reuse, lifetime, limits, errors,
and the per-example backward into reused (dirty) memory against float64 NumPy on every ISA."""
import os
import subprocess
import sys

import numpy as np
import pytest

import sparsebp
from sparsebp import _core, ops
from sparsebp.sparse_grad import _empty_rows

import reference as ref
from test_sparse_grad import _masked_ref, topk_ref

MIN = sparsebp.buffer_cache_info()["min_bytes"]
BIG = (MIN // 4 // 1024, 1024)  # a (rows, cols) float32 array of exactly min_bytes


@pytest.fixture(autouse=True)
def default_limit():
    before = sparsebp.buffer_cache_info()["limit_bytes"]
    sparsebp.clear_buffer_cache()
    yield
    sparsebp.set_buffer_cache_limit(before)
    sparsebp.clear_buffer_cache()


def test_arrays_are_plain_writable_float32():
    a = _empty_rows(*BIG)
    assert a.shape == BIG and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
    b = _empty_rows(BIG[0], 1000, 1024)
    assert b.shape == (BIG[0], 1000) and b.strides == (4096, 4) and b.flags.writeable
    a[...] = 1.0
    b[...] = 2.0
    assert np.all(a == 1.0) and np.all(b == 2.0), "two live arrays share memory"
    small = _empty_rows(3, 5)
    assert small.shape == (3, 5) and small.dtype == np.float32  # below min_bytes: NumPy's own
    z = _core.empty_f32(0, 7)
    assert z.shape == (0, 7)


def test_freed_memory_is_reused_and_counted():
    a = _empty_rows(*BIG)
    p = a.ctypes.data
    info = sparsebp.buffer_cache_info()
    assert info["cached_bytes"] == 0
    del a
    info = sparsebp.buffer_cache_info()
    assert info["cached_blocks"] == 1 and info["cached_bytes"] >= MIN
    hits = info["hits"]
    b = _empty_rows(*BIG)
    assert b.ctypes.data == p and sparsebp.buffer_cache_info()["hits"] == hits + 1
    # Not handed out for a request much smaller than itself (at most twice the request).
    del b
    c = _core.empty_f32(BIG[0] // 4, BIG[1] * 2)  # half the size: fits, and is not wasteful
    assert c.ctypes.data == p
    del c
    e = _core.empty_f32(BIG[0] // 3, BIG[1])  # a third: a new block
    assert e.ctypes.data != p


def test_a_view_keeps_its_memory_out_of_the_cache():
    a = _empty_rows(*BIG)
    v = a[5:]
    v[...] = 3.0
    p = a.ctypes.data
    del a
    assert sparsebp.buffer_cache_info()["cached_blocks"] == 0, "a block still viewed was cached"
    b = _empty_rows(*BIG)
    b[...] = -1.0
    assert b.ctypes.data != p and np.all(v == 3.0)
    del v
    assert sparsebp.buffer_cache_info()["cached_blocks"] == 1


def test_limit():
    sparsebp.set_buffer_cache_limit(0)
    a = _empty_rows(*BIG)
    del a
    assert sparsebp.buffer_cache_info()["cached_bytes"] == 0
    sparsebp.set_buffer_cache_limit(3 * MIN)
    arrays = [_empty_rows(*BIG) for _ in range(5)]
    del arrays
    info = sparsebp.buffer_cache_info()
    assert info["cached_bytes"] <= 3 * MIN and info["cached_blocks"] == 3
    sparsebp.set_buffer_cache_limit(MIN)
    assert sparsebp.buffer_cache_info()["cached_blocks"] == 1
    sparsebp.clear_buffer_cache()
    assert sparsebp.buffer_cache_info()["cached_bytes"] == 0


def test_bad_input():
    for bad in (1.5, "1", None, True):
        with pytest.raises(TypeError, match="nbytes must be an int"):
            sparsebp.set_buffer_cache_limit(bad)
    with pytest.raises(ValueError, match="nbytes must be an int >= 0; got -1"):
        sparsebp.set_buffer_cache_limit(-1)
    with pytest.raises(ValueError, match="ld >= cols"):
        _core.empty_f32(2, 5, 4)
    with pytest.raises(ValueError, match="rows >= 0"):
        _core.empty_f32(-1, 5)
    with pytest.raises(ValueError, match="too large"):
        _core.empty_f32(1 << 40, 1 << 30)
    env = dict(os.environ, SPARSEBP_BUFFER_CACHE_MB="lots")
    r = subprocess.run([sys.executable, "-c", "import sparsebp"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "SPARSEBP_BUFFER_CACHE_MB must be an integer >= 0; got 'lots'" in r.stderr
    env["SPARSEBP_BUFFER_CACHE_MB"] = "7"
    r = subprocess.run([sys.executable, "-c", "import sparsebp; print(sparsebp.buffer_cache_info()['limit_bytes'])"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0 and int(r.stdout) == 7 << 20


def _partitioned_case(rng, batch, k, in_f):
    """Example b's top k are units [k b, k b + k) (each unit chosen by one example, every row of dW
    touched), with the float64 products written out per example."""
    out_f = batch * k
    g = (rng.standard_normal((batch, out_f)) * 0.01).astype(np.float32)
    for b in range(batch):
        g[b, k * b:k * (b + 1)] = rng.choice([-1.0, 1.0], k) * rng.uniform(1.0, 2.0, k)
    x = rng.standard_normal((batch, in_f)).astype(np.float32)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    g64, x64, w64 = g.astype(np.float64), x.astype(np.float64), w.astype(np.float64)
    dx = np.empty((batch, in_f))
    sdx = np.empty((batch, in_f))
    dw = np.empty((out_f, in_f))
    sdw = np.empty((out_f, in_f))
    for b in range(batch):
        s = slice(k * b, k * (b + 1))
        dx[b], sdx[b] = g64[b, s] @ w64[s], np.abs(g64[b, s]) @ np.abs(w64[s])
        dw[s], sdw[s] = np.outer(g64[b, s], x64[b]), np.outer(np.abs(g64[b, s]), np.abs(x64[b]))
    return g, x, w, dx, sdx, dw, sdw


@pytest.mark.parametrize("compact", [True, False])
def test_example_backward_into_dirty_reused_memory(isa, compact):
    """Per-example meProp whose dW is min_bytes (every row touched, so compact or not), the cache
    first filled with NaN blocks of that size: every entry must still be written and equal float64
    NumPy; twice, the second call reusing the first's memory. Then a dx of min_bytes or more (a
    large batch), the same way."""
    rng = np.random.default_rng(7)
    batch, k = 128, 32
    in_f = MIN // 4 // (batch * k)
    g, x, w, dx, sdx, dw, sdw = _partitioned_case(rng, batch, k, in_f)
    out_f = batch * k
    for rep in range(2):
        dirty = _empty_rows(out_f, in_f)
        dirty[...] = np.nan
        del dirty
        hits = sparsebp.buffer_cache_info()["hits"]
        res = ops.meprop_backward(g, x, w, k, "example", compact=compact)
        assert sparsebp.buffer_cache_info()["hits"] == hits + 1, "dW did not come from the cache"
        if compact:
            np.testing.assert_array_equal(res.weight_rows, np.arange(out_f))
        assert res.weight.shape == (out_f, in_f)
        ref.assert_close(res.weight, dw, sdw, 1, f"rep {rep} dW")
        ref.assert_close(res.input, dx, sdx, k, f"rep {rep} dx")
        del res
    batch, out_f, in_f, k = MIN // 4 // 512, 8, 512, 3
    g = rng.standard_normal((batch, out_f)).astype(np.float32)
    x = rng.standard_normal((batch, in_f)).astype(np.float32)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    mask = np.zeros(g.shape, bool)
    np.put_along_axis(mask, topk_ref(g, k), True, axis=1)
    dx, dw, sdx, sdw = _masked_ref(g, x, w, mask)
    for rep in range(2):
        dirty = _empty_rows(batch, in_f, in_f + 16)  # dx's padded rows (in_f is a multiple of 128)
        dirty[...] = np.nan
        del dirty
        hits = sparsebp.buffer_cache_info()["hits"]
        res = ops.meprop_backward(g, x, w, k, "example", compact=compact)
        assert sparsebp.buffer_cache_info()["hits"] > hits, "dx did not come from the cache"
        ref.assert_close(res.input, dx, sdx, k, f"rep {rep} large-batch dx")
        rows = res.weight_rows if compact else np.arange(out_f)
        ref.assert_close(res.weight, dw[rows], sdw[rows], batch, f"rep {rep} large-batch dW")
        del res
