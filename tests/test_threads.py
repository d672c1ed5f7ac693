"""Threading: set_num_threads really changes how many threads the kernels use, results are
bit-identical whatever the thread count, and concurrent callers from Python threads are safe."""
import os
import threading

import numpy as np
import pytest

import sparsebp
from sparsebp import _core, nn, ops

import reference as ref


def big_case(rng, batch):
    indptr, indices, values = ref.random_csr(rng, 300, 400, 0.4, empty_rows=(5, 6, 7))
    W = sparsebp.CSR(indptr, indices, values, (300, 400))
    return W


def run_all(W, x, g, b):
    y = ops.linear_forward(x, W, b)
    gr = ops.linear_backward(g, x, W)
    return [y, gr.grad_input, gr.grad_values, gr.grad_bias]


@pytest.mark.parametrize("batch", [7, 64, 100, 257])
@pytest.mark.parametrize("order", ["C", "F"])
def test_bit_identical_across_thread_counts(isa, threads, batch, order):
    rng = np.random.default_rng(batch)
    W = big_case(rng, batch)
    x = np.asarray(rng.standard_normal((batch, 400)), np.float32, order=order)
    g = np.asarray(rng.standard_normal((batch, 300)), np.float32, order=order)
    b = rng.standard_normal(300).astype(np.float32)
    results = {}
    for n in (1, 2, 3, 5):
        sparsebp.set_num_threads(n)
        results[n] = run_all(W, x, g, b)
    for n in (2, 3, 5):
        for a, c in zip(results[1], results[n]):
            assert np.array_equal(a.view(np.uint32), c.view(np.uint32)), f"{n} threads differ from 1 thread"


def test_input_grad_values_copy_split_across_threads(isa, threads):
    # The input gradient first copies W's values into CSC order (a reused work buffer), split across
    # threads from 1 MB of traffic per thread (16 bytes per entry): 420k entries make ~6.7 MB, so
    # 2-5 threads all split it. Fresh values on every call, so a part left uncopied would show.
    rng = np.random.default_rng(11)
    indptr, indices, _ = ref.random_csr(rng, 700, 1200, 0.5)
    W = sparsebp.CSR(indptr, indices, np.zeros(len(indices), np.float32), (700, 1200))
    assert W.nnz * 16 > 5 * (1 << 20)
    g = rng.standard_normal((3, 700)).astype(np.float32)
    x = np.zeros((3, 1200), np.float32)
    dense = np.zeros((700, 1200))
    rows = np.repeat(np.arange(700), np.diff(indptr))
    for n in (2, 5, 1):
        v = rng.standard_normal(W.nnz).astype(np.float32)
        dense[rows, indices] = v
        sparsebp.set_num_threads(n)
        got = ops.linear_backward(g, x, W, values=v, weight_grad=False, bias_grad=False).grad_input
        np.testing.assert_allclose(got, g.astype(np.float64) @ dense, rtol=1e-4, atol=1e-4)
        sparsebp.set_num_threads(1)
        one = ops.linear_backward(g, x, W, values=v, weight_grad=False, bias_grad=False).grad_input
        assert np.array_equal(one.view(np.uint32), got.view(np.uint32)), f"{n} threads differ from 1 thread"


def test_set_num_threads_changes_what_kernels_use(threads):
    rng = np.random.default_rng(0)
    W = big_case(rng, 256)
    x = np.asfortranarray(rng.standard_normal((256, 400)).astype(np.float32))
    g = np.asfortranarray(rng.standard_normal((256, 300)).astype(np.float32))
    for n in (1, 2, 3):
        sparsebp.set_num_threads(n)
        assert sparsebp.get_num_threads() == n
        _core.max_job_threads(reset=True)
        ops.linear_forward(x, W)
        assert _core.max_job_threads(reset=True) == n, "forward"
        ops.linear_backward(g, x, W, bias_grad=False)
        assert _core.max_job_threads(reset=True) == n, "backward"  # 256 columns: 4 chunks


def test_tiny_problems_stay_on_one_thread(threads):
    sparsebp.set_num_threads(2)
    W = sparsebp.CSR.from_dense(np.eye(4, dtype=np.float32))
    _core.max_job_threads(reset=True)
    ops.linear_forward(np.ones((2, 4), np.float32), W)
    assert _core.max_job_threads(reset=True) == 1


def test_default_split_threshold(threads, monkeypatch):
    """By default a job splits from 2^19 multiply-adds per thread: the demo MLP's per-example
    meProp products (32 examples x 20 units x 500 inputs) stay on one thread, a 4x larger one splits."""
    monkeypatch.delenv("SPARSEBP_MIN_WORK", raising=False)
    sparsebp.set_num_threads(2)
    rng = np.random.default_rng(3)
    for batch, split in ((32, False), (128, True)):
        sel = np.sort(np.argsort(rng.random((batch, 500)), axis=1)[:, :20], axis=1).astype(np.int32)
        g = rng.standard_normal((batch, 500)).astype(np.float32)
        vals = np.take_along_axis(g, sel, axis=1).reshape(-1)
        W = rng.standard_normal((500, 500)).astype(np.float32)
        out = np.empty((batch, 500), np.float32)
        _core.max_job_threads(reset=True)
        _core.spmm_rows(np.arange(batch + 1, dtype=np.int64) * 20, sel.reshape(-1), vals, W, out)
        assert _core.max_job_threads(reset=True) == (2 if split else 1), batch
        dense = np.zeros((batch, 500))
        np.put_along_axis(dense, sel.astype(np.int64), np.take_along_axis(g, sel, axis=1).astype(np.float64), axis=1)
        np.testing.assert_allclose(out, dense @ W.astype(np.float64), rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("SPARSEBP_MIN_WORK", "1")
    _core.max_job_threads(reset=True)
    W4 = sparsebp.CSR.from_dense(np.eye(4, dtype=np.float32))
    ops.linear_forward(np.ones((64, 4), np.float32), W4)
    assert _core.max_job_threads(reset=True) == 2
    for bad in ("0", "-5", "lots", "12x"):
        monkeypatch.setenv("SPARSEBP_MIN_WORK", bad)
        with pytest.raises(ValueError, match="SPARSEBP_MIN_WORK must be a positive integer"):
            ops.linear_forward(np.ones((64, 4), np.float32), W4)


@pytest.mark.parametrize("n_rows, split", [(64, False), (700, True)])
def test_block_kernels_split_only_large_blocks_and_agree(isa, threads, n_rows, split):
    """The memory-bound block kernels (gather, scatter-add, lazy SGD, ReLU) stay on one thread below
    ~1 MB of traffic per thread (beside BLAS a second thread costs more than it gives) and split
    above it, with the same bits either way."""
    rng = np.random.default_rng(n_rows)
    R, C = 2 * n_rows, 300
    src = rng.standard_normal((R, C)).astype(np.float32)
    rows = np.sort(rng.choice(R, n_rows, replace=False))
    g = rng.standard_normal((n_rows, C)).astype(np.float32)
    out, used = {}, {}
    for n in (1, 2):
        sparsebp.set_num_threads(n)
        _core.max_job_threads(reset=True)
        got = ops.gather_block(src, rows)
        dst = src.copy()
        ops.scatter_add_block(dst, g, rows, alpha=0.5)
        p = nn.Param("w", src.copy())
        opt = ops.LazySGD([p], lr=0.1, momentum=0.9, weight_decay=1e-3, whole_rows=[p])
        opt.step_block(p, g, rows)
        opt.advance()
        r = ops.relu(src - 0.1)
        out[n], used[n] = [got, dst, p.data.copy(), r], _core.max_job_threads(reset=True)
    assert used[1] == 1 and used[2] == (2 if split else 1), used
    for a, b in zip(out[1], out[2]):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    np.testing.assert_array_equal(out[1][0], src[rows])


def test_concurrent_python_threads(threads):
    # The GIL is released inside kernels; each Python thread has its own scratch space.
    sparsebp.set_num_threads(2)
    rng = np.random.default_rng(1)
    W = big_case(rng, 64)
    inputs = [rng.standard_normal((64, 400)).astype(np.float32) for _ in range(4)]
    expected = [ops.linear_forward(x, W) for x in inputs]
    errors = []

    def work(i):
        try:
            for _ in range(20):
                y = ops.linear_forward(inputs[i], W)
                if not np.array_equal(y, expected[i]):
                    errors.append(i)
        except Exception as e:  # pragma: no cover
            errors.append(repr(e))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


def test_set_num_threads_errors(threads):
    with pytest.raises(ValueError, match="n must be an int >= 1; got 0"):
        sparsebp.set_num_threads(0)
    with pytest.raises(TypeError, match="n must be an int"):
        sparsebp.set_num_threads("2")
    with pytest.raises(TypeError):
        sparsebp.set_num_threads(2.0)
    # A bound (1024 here, or the CPU count if larger): a million threads used to be accepted and the
    # next kernel call spent minutes creating them.
    most = max(1024, os.cpu_count() or 1)
    for n in (most + 1, 10 ** 6, 2 ** 40):
        with pytest.raises(ValueError, match="at most"):
            sparsebp.set_num_threads(n)
    assert sparsebp.get_num_threads() != n


def test_forked_child_runs_kernels(threads):
    """A child forked after the kernels ran threaded (on OpenMP or the own pool) must not hang and
    must give the parent's result (it switches to the engine's own pool)."""
    import os
    import signal

    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    sparsebp.set_num_threads(2)
    rng = np.random.default_rng(3)
    d = rng.standard_normal((512, 512)).astype(np.float32)
    d[rng.random(d.shape) < 0.9] = 0
    W = sparsebp.CSR.from_dense(d)
    x = np.asfortranarray(rng.standard_normal((64, 512), dtype=np.float32))
    y0 = ops.linear_forward(x, W, None)
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            signal.alarm(20)
            y1 = ops.linear_forward(x, W, None)
            os._exit(0 if np.array_equal(y0, y1) and _core.max_job_threads(True) >= 1 else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
    expect, scale = ref.linear_forward(x, W.indptr, W.indices, W.values, W.shape)
    ref.assert_close(y0, expect, scale, 512)


@pytest.mark.parametrize("backend", ["pool", "openmp"])
def test_thread_backends_give_identical_results(threads, backend):
    if backend == "openmp" and not _core.openmp_available():
        pytest.skip("built without OpenMP")
    before = sparsebp.thread_backend()
    rng = np.random.default_rng(5)
    d = rng.standard_normal((700, 300)).astype(np.float32)
    d[rng.random(d.shape) < 0.8] = 0
    W = sparsebp.CSR.from_dense(d)
    x = np.asfortranarray(rng.standard_normal((96, 300), dtype=np.float32))
    try:
        sparsebp.set_num_threads(1)
        y1 = ops.linear_forward(x, W, None)
        sparsebp.set_thread_backend(backend)
        assert sparsebp.thread_backend() == backend
        sparsebp.set_num_threads(2)
        _core.max_job_threads(True)
        y2 = ops.linear_forward(x, W, None)
        assert _core.max_job_threads(True) == 2
        np.testing.assert_array_equal(y1, y2)
    finally:
        sparsebp.set_thread_backend(before)


def test_thread_backend_errors():
    with pytest.raises(ValueError, match="'pool' or 'openmp'"):
        sparsebp.set_thread_backend("tbb")
    with pytest.raises(TypeError):
        sparsebp.set_thread_backend(2)


def test_pool_without_spinning_loses_no_wake_up():
    """SPARSEBP_SPIN_US=0: workers sleep right after every job, so each job must wake them; many
    small threaded jobs in a row give the results of one thread."""
    import subprocess
    import sys

    code = (
        "import numpy as np, sparsebp\n"
        "from sparsebp import ops\n"
        "sparsebp.set_thread_backend('pool'); sparsebp.set_num_threads(2)\n"
        "rng = np.random.default_rng(0)\n"
        "w = sparsebp.CSR.from_dense((rng.random((512, 512)) < 0.1).astype(np.float32))\n"
        "x = rng.standard_normal((64, 512)).astype(np.float32)\n"
        "ys = [ops.linear_forward(x, w) for _ in range(300)]\n"
        "sparsebp.set_num_threads(1)\n"
        "ref = ops.linear_forward(x, w)\n"
        "assert all(np.array_equal(y, ref) for y in ys)\n"
        "print('ok')\n")
    env = dict(__import__("os").environ, SPARSEBP_SPIN_US="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_num_threads_from_the_environment():
    """SPARSEBP_NUM_THREADS sets the default (also after sparsebp.torch picks its thread back end);
    a value that is not a positive integer makes the import fail, naming the variable."""
    import subprocess
    import sys

    code = "import sparsebp; print(sparsebp.get_num_threads())"
    env = dict(os.environ, SPARSEBP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    env["SPARSEBP_NUM_THREADS"] = "3"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"
    for bad in ("0", "two", "-1"):
        env["SPARSEBP_NUM_THREADS"] = bad
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert res.returncode != 0 and "SPARSEBP_NUM_THREADS must be a positive integer" in res.stderr
