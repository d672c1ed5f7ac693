"""CUDA: the CPU/GPU dispatch logic (runs everywhere, with fake GPU arrays) and the GPU kernels
against float64 references and against the CPU kernels (run only where a GPU is present; elsewhere
they are skipped with the reason shown)."""
import numpy as np
import pytest

import sparsebp
from sparsebp import _cuda, ops

import reference as ref

COMPILED = _cuda.compiled()
GPUS = _cuda.device_count()


class FakeCudaArray:
    """Looks like a GPU array to the dispatcher (never dereferenced: every path errors first)."""

    def __init__(self, shape=(4, 3), device=0):
        self.shape = shape
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f4", "data": (0, False), "version": 3}
        self.device = type("D", (), {"id": device})()


class FakeDLPack:
    def __init__(self, kind, idx):
        self._dev = (kind, idx)

    def __dlpack_device__(self):
        return self._dev


def test_build_info_reports_cuda():
    info = sparsebp.build_info()
    assert info["cuda"] is COMPILED
    assert isinstance(info["cuda_devices"], list) and len(info["cuda_devices"]) == GPUS
    if not COMPILED:
        assert GPUS == 0


def test_device_classification():
    assert _cuda.device_of(np.zeros(3, np.float32)) == "cpu"
    assert _cuda.device_of(None) is None
    assert _cuda.device_of(FakeCudaArray(device=1)) == "cuda:1"
    assert _cuda.device_of(FakeDLPack(2, 3)) == "cuda:3"
    assert _cuda.device_of(FakeDLPack(1, 0)) == "cpu"
    assert _cuda.device_of(FakeDLPack(3, 0)) == "cpu"  # kDLCUDAHost: pinned host memory
    assert _cuda.device_of(FakeDLPack(13, 2)) == "cuda:2"  # managed memory
    torch = pytest.importorskip("torch")
    assert _cuda.device_of(torch.zeros(2)) == "cpu"
    assert _cuda.device_of(torch.zeros(2, device="meta")) == "meta"


def test_route_cpu_and_mismatches():
    a = np.zeros((2, 2), np.float32)
    assert _cuda.route(x=a, values=a, bias=None) is None
    with pytest.raises(ValueError, match=r"x on cuda:0.*values on cpu"):
        _cuda.route(x=FakeCudaArray(), values=a)
    with pytest.raises(ValueError, match="different devices"):
        _cuda.route(x=FakeCudaArray(device=0), values=FakeCudaArray(device=1))


def test_gpu_input_without_a_usable_gpu_is_a_clear_error():
    if GPUS:
        pytest.skip("a GPU is present: the GPU tests below cover this path")
    w = sparsebp.CSR.from_dense(np.eye(3, dtype=np.float32))
    msg = "SPARSEBP_CUDA=OFF" if not COMPILED else "sees 0 device"
    for call in (lambda: ops.linear_forward(FakeCudaArray((4, 3)), w),
                 lambda: ops.linear_backward(FakeCudaArray((4, 3)), FakeCudaArray((4, 3)), w),
                 lambda: ops.topk(FakeCudaArray(), 2),
                 lambda: ops.topk_columns(FakeCudaArray(), 2),
                 lambda: ops.meprop_backward(FakeCudaArray(), FakeCudaArray(), FakeCudaArray(), 2)):
        with pytest.raises(ValueError, match=msg):
            call()
    # a mismatch is reported as such before anything else
    with pytest.raises(ValueError, match="different devices"):
        ops.linear_forward(FakeCudaArray((4, 3)), w, values=w.values)


def test_host_only_functions_name_the_gpu_arrays():
    """The functions with no GPU kernels say so (and which arguments are on a GPU), with or without
    a GPU build, instead of "must be a numpy.ndarray; got ndarray" for a CuPy array."""
    from sparsebp.sparse_grad import csr_selected_backward

    w = sparsebp.CSR.from_dense(np.eye(3, dtype=np.float32))
    g = np.zeros((4, 3), np.float32)
    sel = np.zeros((4, 1), np.int32)
    with pytest.raises(ValueError, match=r"selected_backward runs on the CPU only.*grad_output on cuda:0.*"
                                         r"meprop_backward"):
        ops.selected_backward(FakeCudaArray((4, 3)), g, np.eye(3, dtype=np.float32), sel, "example")
    with pytest.raises(ValueError, match=r"x on cuda:1, selected on cuda:1"):
        ops.selected_backward(g, FakeCudaArray((4, 3), 1), np.eye(3, dtype=np.float32), FakeCudaArray((4, 1), 1),
                              "example")
    with pytest.raises(ValueError, match=r"csr_selected_backward runs on the CPU only.*x on cuda:0"):
        csr_selected_backward(g, FakeCudaArray((4, 3)), w, sel, "example")
    # the host-only helpers: the qualified type, its device, what to do
    gpu_msg = r"must be a numpy.ndarray; got test_cuda.FakeCudaArray on cuda:0 \(this function runs on the CPU only"
    for call in (lambda: ops.relu(FakeCudaArray()), lambda: ops.relu_backward(FakeCudaArray(), g),
                 lambda: ops.gather_block(FakeCudaArray()), lambda: ops.scatter_add_block(g, FakeCudaArray()),
                 lambda: ops.bernoulli_csr(FakeCudaArray(), 1)):
        with pytest.raises(TypeError, match=gpu_msg):
            call()
    with pytest.raises(TypeError, match=r"must be a numpy.ndarray; got list$"):
        ops.relu([1.0])
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"must be a numpy.ndarray; got torch.Tensor$"):
        ops.relu(torch.zeros(2, 2))


def test_torch_device_mismatch_is_a_clear_error():
    torch = pytest.importorskip("torch")
    import sparsebp.torch as st

    x = torch.zeros(2, 5)
    v = torch.zeros(3, device="meta")
    ip = torch.tensor([0, 1, 2, 3, 3])
    ix = torch.tensor([0, 1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="different devices"):
        st.ops.linear(x, v, None, ip, ix, 5, 4)


def test_torch_values_length_is_checked():
    torch = pytest.importorskip("torch")
    import sparsebp.torch as st

    ip = torch.tensor([0, 1, 2, 3, 3])
    ix = torch.tensor([0, 1, 2], dtype=torch.int32)
    for v in (torch.zeros(2), torch.zeros(4), torch.zeros(3, 1)):
        with pytest.raises(ValueError, match="values must have shape \\(3,\\)"):
            st.ops.linear(torch.zeros(2, 5), v, None, ip, ix, 5, 4)


def test_device_structure_cache_survives_in_place_writes():
    """The GPU path's structure cache (device-agnostic logic, run here on CPU tensors): reused while
    the index tensors are untouched; kept after an in-place write of the same contents (DDP
    broadcasts buffers into place on every forward); rebuilt from the new contents after a real
    change; a change to an invalid structure is a clear error; the cache holds copies."""
    torch = pytest.importorskip("torch")
    from sparsebp.torch import _ops

    ip = torch.tensor([0, 2, 3])
    ix = torch.tensor([0, 2, 1], dtype=torch.int32)
    e1 = _ops._cuda_structure_entry(ip, ix, 2, 3)
    assert _ops._cuda_structure_entry(ip, ix, 2, 3) is e1
    v = ix._version
    ix.copy_(ix.clone())
    assert ix._version > v and _ops._cuda_structure_entry(ip, ix, 2, 3) is e1
    ix.copy_(torch.tensor([1, 2, 0], dtype=torch.int32))
    e2 = _ops._cuda_structure_entry(ip, ix, 2, 3)
    assert e2 is not e1
    indptr2, indices2, colptr, rowidx, perm = e2[0]
    assert indices2.tolist() == [1, 2, 0] and e1[0][1].tolist() == [0, 2, 1]  # copies, not views
    assert colptr.tolist() == [0, 1, 2, 3] and rowidx.tolist() == [1, 0, 0] and perm.tolist() == [2, 0, 1]
    ix[0] = 7
    with pytest.raises(ValueError, match="outside"):
        _ops._cuda_structure_entry(ip, ix, 2, 3)


# ---- on a GPU ----------------------------------------------------------------------------------------
_reason = (f"no CUDA GPU here (CUDA kernels compiled in: {'yes' if COMPILED else 'no'}; GPUs seen: {GPUS}): "
           "the GPU tests have not run")
gpu = pytest.mark.skipif(not (COMPILED and GPUS > 0), reason=_reason)


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch


@gpu
@pytest.mark.parametrize("rows,cols,density,batch", [(1, 1, 1.0, 1), (33, 17, 0.3, 7), (300, 512, 0.1, 64),
                                                     (128, 64, 0.0, 9), (64, 700, 0.05, 257), (70, 90, 0.2, 32),
                                                     (40, 100, 0.3, 96), (17, 300, 0.1, 256), (50, 60, 0.4, 520),
                                                     # long batches over few rows: the SDDMM split in parts
                                                     (8, 40, 0.5, 5000), (64, 30, 0.3, 12288)])
def test_gpu_linear_against_float64(rows, cols, density, batch):
    torch = _torch_cuda()
    rng = np.random.default_rng(rows + cols)
    ip, ix, vals = ref.random_csr(rng, rows, cols, density)
    w = sparsebp.CSR(ip, ix, vals, (rows, cols))
    x = rng.standard_normal((batch, cols)).astype(np.float32)
    b = rng.standard_normal(rows).astype(np.float32)
    g = rng.standard_normal((batch, rows)).astype(np.float32)
    d = lambda a: torch.from_numpy(a).cuda()  # noqa: E731
    y = ops.linear_forward(d(x), w, d(b), values=d(vals)).cpu().numpy()
    yr, ys = ref.linear_forward(x, ip, ix, vals, (rows, cols), b)
    ref.assert_close(y, yr, ys, cols, "gpu forward")
    r = ops.linear_backward(d(g), d(x), w, values=d(vals))
    (gi, gis), (gv, gvs), gb = ref.linear_backward(g, x, ip, ix, vals, (rows, cols))
    ref.assert_close(r.grad_input.cpu().numpy(), gi, gis, rows, "gpu grad_input")
    ref.assert_close(r.grad_values.cpu().numpy(), gv, gvs, batch, "gpu grad_values")
    np.testing.assert_allclose(r.grad_bias.cpu().numpy(), g.astype(np.float64).sum(0), rtol=1e-4, atol=1e-4)
    cpu = ops.linear_forward(x, w, b)
    np.testing.assert_allclose(y, cpu, rtol=1e-5, atol=1e-5)


def _topk_ref(g, k):
    g = np.asarray(g, dtype=np.float64)
    cols = np.arange(g.shape[1])
    return np.array([np.sort(np.lexsort((cols, -np.abs(row)))[:k]) for row in g]).reshape(len(g), min(k, g.shape[1]))


@gpu
@pytest.mark.parametrize("n", [1, 7, 255, 256, 257, 4096, 10000])
def test_gpu_topk_ties_and_edges(n):
    torch = _torch_cuda()
    rng = np.random.default_rng(n)
    g = rng.integers(-3, 4, size=(9, n)).astype(np.float32)
    g[1] = -0.0
    for k in sorted({0, 1, max(1, n // 3), n - 1, n, n + 5}):
        got = ops.topk(torch.from_numpy(g).cuda(), k).cpu().numpy()
        np.testing.assert_array_equal(got, _topk_ref(g, k), err_msg=f"k={k}")
    cont = rng.standard_normal((5, n)).astype(np.float32)
    k = max(1, n // 10)
    np.testing.assert_array_equal(ops.topk(torch.from_numpy(cont).cuda(), k).cpu().numpy(), ops.topk(cont, k))
    np.testing.assert_array_equal(ops.topk_columns(torch.from_numpy(cont).cuda(), k).cpu().numpy(),
                                  ops.topk_columns(cont, k))
    if n > 1:
        bad = cont.copy()
        bad[2, 0] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            ops.topk(torch.from_numpy(bad).cuda(), 1)


@gpu
@pytest.mark.parametrize("mode", ["example", "unified"])
def test_gpu_meprop_against_float64(mode):
    torch = _torch_cuda()
    rng = np.random.default_rng(4)
    B, out_f, in_f, k = 32, 300, 200, 12
    g = rng.standard_normal((B, out_f)).astype(np.float32)
    x = rng.standard_normal((B, in_f)).astype(np.float32)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    d = lambda a: torch.from_numpy(a).cuda()  # noqa: E731
    r = ops.meprop_backward(d(g), d(x), d(w), k, mode)
    sel = r.selected.cpu().numpy()
    gh = np.zeros((B, out_f))
    if mode == "example":
        np.testing.assert_array_equal(sel, _topk_ref(g, k))
        np.put_along_axis(gh, sel.astype(np.int64), np.take_along_axis(g, sel.astype(np.int64), 1), 1)
    else:
        np.testing.assert_array_equal(sel, ops.topk_columns(g, k))
        gh[:, sel] = g[:, sel]
    np.testing.assert_allclose(r.input.cpu().numpy(), gh @ w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r.weight.cpu().numpy(), gh.T @ x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r.bias.cpu().numpy(), g.astype(np.float64).sum(0), rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.parametrize("batch,out_f,in_f,k", [(1, 50, 37, 5), (7, 40, 33, 0), (9, 30, 20, 30), (300, 64, 129, 7),
                                                (1500, 300, 70, 12), (2100, 16, 5, 3)])
def test_gpu_meprop_example_shapes_against_float64(batch, out_f, in_f, k):
    """Per-example meProp's GPU products at the edges: one example, k = 0, k = out, batches over the
    weight-gradient kernel's window of 1024 examples (searched in passes), widths off every vector
    size; against float64, and the same bits on a second run (no atomics)."""
    torch = _torch_cuda()
    rng = np.random.default_rng(batch + k)
    g = rng.standard_normal((batch, out_f)).astype(np.float32)
    x = rng.standard_normal((batch, in_f)).astype(np.float32)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    d = lambda a: torch.from_numpy(a).cuda()  # noqa: E731
    r = ops.meprop_backward(d(g), d(x), d(w), k, "example")
    sel = r.selected.cpu().numpy()
    np.testing.assert_array_equal(sel, _topk_ref(g, k))
    gh = np.zeros((batch, out_f))
    np.put_along_axis(gh, sel.astype(np.int64), np.take_along_axis(g, sel.astype(np.int64), 1), 1)
    ref.assert_close(r.input.cpu(), gh @ w, np.abs(gh) @ np.abs(w), out_f, "dx")
    ref.assert_close(r.weight.cpu(), gh.T @ x, np.abs(gh).T @ np.abs(x), batch, "dW")
    again = ops.meprop_backward(d(g), d(x), d(w), k, "example")
    assert torch.equal(again.weight, r.weight) and torch.equal(again.input, r.input)


@gpu
def test_gpu_magnitude_pruning_of_a_gpu_layer():
    """from_dense(sparsity=) and sparsify on a layer already on the GPU: the same mask as on the CPU
    (the ranking runs on the CPU, where the mask is made)."""
    torch = _torch_cuda()
    import sparsebp.torch as st

    torch.manual_seed(3)
    dense = torch.nn.Linear(40, 24)
    on_cpu = st.SparseLinear.from_dense(dense, sparsity=0.8)
    on_gpu = st.SparseLinear.from_dense(dense.cuda(), sparsity=0.8)
    assert torch.equal(on_gpu.mask().cpu(), on_cpu.mask())
    assert torch.equal(st.magnitude_mask(dense.weight, 0.8), on_cpu.mask())
    model = torch.nn.Sequential(torch.nn.Linear(40, 24)).cuda()
    st.sparsify(model, 0.8)
    assert isinstance(model[0], st.SparseLinear) and model[0].nnz == round(0.2 * 40 * 24)


@gpu
def test_gpu_torch_modules_against_dense():
    torch = _torch_cuda()
    import sparsebp.torch as st

    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 48)
    sparse = st.SparseLinear.from_dense(dense, mask=torch.rand(48, 64) < 0.2).cuda()
    w = sparse.weight.detach()  # the dense view of the sparse weight
    x = torch.randn(17, 64, device="cuda", requires_grad=True)
    y = sparse(x)
    xr = x.detach().clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    yd = xr @ wr.t() + sparse.bias.detach()
    torch.testing.assert_close(y, yd, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    yd.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)
    mask = sparse.mask().to(torch.bool)
    torch.testing.assert_close(sparse.values.grad, wr.grad[mask], rtol=1e-4, atol=1e-4)
    m = st.MePropLinear(64, 48, k=48).cuda()  # k = out: exactly dense
    x2 = torch.randn(9, 64, device="cuda", requires_grad=True)
    m(x2).sum().backward()
    torch.testing.assert_close(x2.grad, m.weight.detach().sum(0).expand(9, -1), rtol=1e-4, atol=1e-4)


def _layer_csr(lin):
    """A sparse layer's raw CSR arrays and shape, as the reference module takes them."""
    return (lin.indptr.cpu().numpy(), lin.indices.cpu().numpy(), lin.values.detach().cpu().numpy(),
            (lin.out_features, lin.in_features))


@gpu
@pytest.mark.parametrize("mode", ["example", "unified"])
@pytest.mark.parametrize("batch", [7, 40, 300])
def test_gpu_sparse_linear_with_grad_topk_against_float64(mode, batch):
    """Sparse weights and sparse gradients together on the GPU: the top-k selected there, the
    selected gradient through the CSR kernels; against float64 and against the CPU layer."""
    torch = _torch_cuda()
    import copy

    import sparsebp.torch as st

    torch.manual_seed(batch)
    lin = st.SparseLinear(300, 200, sparsity=0.9, grad_topk=12, grad_mode=mode)
    cpu = copy.deepcopy(lin)
    lin = lin.cuda()
    x = torch.randn(batch, 300, device="cuda", requires_grad=True)
    g = torch.randn(batch, 200, device="cuda")
    y = lin(x)
    y_ref, _ = ref.linear_forward(x.detach().cpu().numpy(), *_layer_csr(lin), bias=lin.bias.detach().cpu().numpy())
    torch.testing.assert_close(y.cpu().double(), torch.from_numpy(y_ref), rtol=1e-4, atol=1e-4)
    y.backward(g)
    g2, x2 = g.double().cpu().numpy(), x.detach().double().cpu().numpy()
    gh = ref.topk_masked(g2, 12, mode)
    (dx, dx_scale), (dv, dv_scale), _ = ref.linear_backward(gh, x2, *_layer_csr(lin))
    ref.assert_close(x.grad.cpu(), dx, dx_scale, 200, "dx")
    ref.assert_close(lin.values.grad.cpu(), dv, dv_scale, batch, "dvalues")
    ref.assert_close(lin.bias.grad.cpu(), g2.sum(0), np.abs(g2).sum(0), batch, "db (the full gradient)")
    xc = x.detach().cpu().requires_grad_(True)  # the CPU kernels, the same selection
    cpu(xc).backward(g.cpu())
    torch.testing.assert_close(x.grad.cpu(), xc.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lin.values.grad.cpu(), cpu.values.grad, rtol=1e-4, atol=1e-5)


@gpu
def test_gpu_msbp_memory_over_steps_against_float64():
    """MSBP on a SparseLinear on the GPU (its memory on the host), three steps: against a float64
    re-implementation of the memory (u = G + memory; top-k columns of |u|; memory = alpha * the
    rest of u) and the CSR gradient of the selected u."""
    torch = _torch_cuda()
    import sparsebp.torch as st
    from sparsebp import algorithms as alg

    torch.manual_seed(7)
    k, alpha = 6, 0.5
    lin = st.SparseLinear(64, 48, sparsity=0.7, grad_policy=alg.MSBP(k=k, alpha=alpha)).cuda()
    memory = size = np.zeros((16, 48))  # size: the sum of |terms| behind each memory entry
    for step in range(3):
        x = torch.randn(16, 64, device="cuda", requires_grad=True)
        g = torch.randn(16, 48, device="cuda")
        lin.values.grad = None
        lin(x).backward(g)
        g2 = g.double().cpu().numpy()
        u, u_size = g2 + memory, np.abs(g2) + size
        cols = np.argsort(-np.abs(u).sum(0), kind="stable")[:k]
        gh = np.zeros_like(u)
        gh[:, cols] = u[:, cols]
        memory, size = alpha * (u - gh), alpha * np.where(gh != 0, 0.0, u_size)
        x2 = x.detach().double().cpu().numpy()
        (dx, _), (dv, _), _ = ref.linear_backward(gh, x2, *_layer_csr(lin))
        # the scale: u's entries carry float32 rounding of |g| + |memory| (which may cancel), not of |u|
        gs = np.where(gh != 0, u_size, 0.0)
        (_, dx_scale), (_, dv_scale), _ = ref.linear_backward(gs, x2, *_layer_csr(lin))
        ref.assert_close(x.grad.cpu(), dx, dx_scale, 48 * (step + 1), f"dx, step {step}")
        ref.assert_close(lin.values.grad.cpu(), dv, dv_scale, 16 * (step + 1), f"dvalues, step {step}")
        np.testing.assert_allclose(lin.grad_policy.memory, memory, rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.parametrize("which", ["sparse-mesimp", "dense-msbp", "dense-mesimp", "dense-meprop-float64"])
def test_gpu_policies_match_the_cpu_layer(which):
    """The stateful policies (and float64) on the GPU: the same gradients and the same policy
    state as the same layer on the CPU, step after step."""
    torch = _torch_cuda()
    import copy

    import sparsebp.torch as st
    from sparsebp import algorithms as alg

    torch.manual_seed(8)
    make = {"sparse-mesimp": lambda: st.SparseLinear(64, 48, sparsity=0.7, grad_policy=alg.MeSimp(k=6, p=0.2)),
            "dense-msbp": lambda: st.MePropLinear(64, 48, policy=alg.MSBP(k=6, alpha=0.5)),
            "dense-mesimp": lambda: st.MePropLinear(64, 48, policy=alg.MeSimp(k=6, p=0.2)),
            "dense-meprop-float64": lambda: st.MePropLinear(64, 48, k=6).double()}[which]
    cpu = make()
    gpu_mod = copy.deepcopy(cpu).cuda()
    dtype = next(cpu.parameters()).dtype
    for step in range(3):
        x = torch.randn(16, 64, dtype=dtype)
        g = torch.randn(16, 48, dtype=dtype)
        xc, xg = x.clone().requires_grad_(True), x.cuda().requires_grad_(True)
        cpu(xc).backward(g)
        gpu_mod(xg).backward(g.cuda())
        torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step}: {m}")
        for (name, pc), pg in zip(cpu.named_parameters(), gpu_mod.parameters()):
            torch.testing.assert_close(pg.grad.cpu(), pc.grad, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name: f"{name}, step {step}: {m}")
    pc, pg = (m.grad_policy if hasattr(m, "grad_policy") else m.policy for m in (cpu, gpu_mod))
    if isinstance(pc, alg.MeSimp):
        np.testing.assert_array_equal(pg.hits, pc.hits)
        assert pg.seen == pc.seen == 48
    elif isinstance(pc, alg.MSBP):
        np.testing.assert_allclose(pg.memory, pc.memory, rtol=1e-5, atol=1e-6)


@gpu
def test_gpu_sparse_linear_with_grad_topk_gradcheck():
    torch = _torch_cuda()
    import sparsebp.torch as st

    torch.manual_seed(9)
    for mode in ("example", "unified"):
        sp = st.SparseLinear(6, 8, sparsity=0.5, grad_topk=2, grad_mode=mode).double().cuda()
        x = torch.randn(3, 6, dtype=torch.float64, device="cuda", requires_grad=True)
        assert torch.autograd.gradcheck(lambda a: sp(a), (x,))


def _layout(t, kind):
    """The same values as t (batch, n) in another memory layout: row-major, feature-major (the batch
    innermost), or feature-major with a padded, misaligned leading dimension (no vector loads)."""
    if kind == "row":
        return t.contiguous()
    if kind == "feature":
        return t.t().contiguous().t()
    base = t.new_zeros((t.shape[1], t.shape[0] + 3))
    base[:, 1:1 + t.shape[0]] = t.t()
    return base[:, 1:1 + t.shape[0]].t()


@gpu
@pytest.mark.parametrize("batch", [1, 5, 31, 32, 33, 64, 96, 130, 256, 520])
@pytest.mark.parametrize("x_layout,g_layout", [("row", "row"), ("feature", "feature"), ("row", "feature"),
                                               ("feature", "row"), ("padded", "padded"), ("row", "expanded")])
def test_gpu_sparse_linear_layouts_against_float64(batch, x_layout, g_layout):
    """Every GPU kernel variant (small-batch batch-major kernels; feature-major kernels with 1-, 2-
    and 4-wide vectors, batch-major or feature-major outputs; the vectorized SDDMM with one or more
    batch chunks and its scalar fallback) through SparseLinear, against dense float64 on the CPU."""
    torch = _torch_cuda()
    import sparsebp.torch as st

    gen = torch.Generator().manual_seed(batch)
    rows, cols = 70, 150
    dense = torch.nn.Linear(cols, rows)
    mask = torch.rand(rows, cols, generator=gen) < 0.15
    mask[3] = False  # an empty row
    layer = st.SparseLinear.from_dense(dense, mask=mask).cuda()
    x0 = torch.randn(batch, cols, generator=gen)
    g0 = torch.randn(batch, rows, generator=gen)
    x = _layout(x0.cuda(), x_layout).requires_grad_(True)
    y = layer(x)
    if x_layout == "row" or batch == 1:  # the output follows the input's layout
        assert y.is_contiguous()
    else:
        assert y.stride(0) == 1
    if g_layout == "expanded":  # as .sum().backward() gives: stride 0 along the batch
        g1 = torch.randn(1, rows, generator=gen)
        g, g0 = g1.cuda().expand(batch, rows), g1.expand(batch, rows)
    else:
        g = _layout(g0.cuda(), g_layout)
    y.backward(g)
    w = (dense.weight.detach() * mask).double()
    yr = x0.double() @ w.t() + dense.bias.detach().double()
    gd = g0.double()
    torch.testing.assert_close(y.cpu().double(), yr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.cpu().double(), gd @ w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.values.grad.cpu().double(), (gd.t() @ x0.double())[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.bias.grad.cpu().double(), gd.sum(0), rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.parametrize("batch", [4, 200])
def test_gpu_sparse_linear_partial_gradients(batch):
    """Only some gradients asked for (the backward skips the others), two layers deep."""
    torch = _torch_cuda()
    import sparsebp.torch as st

    torch.manual_seed(batch)
    d1, d2 = torch.nn.Linear(40, 64), torch.nn.Linear(64, 24)
    m1, m2 = torch.rand(64, 40) < 0.3, torch.rand(24, 64) < 0.3
    l1 = st.SparseLinear.from_dense(d1, mask=m1).cuda()
    l2 = st.SparseLinear.from_dense(d2, mask=m2).cuda()
    l1.values.requires_grad_(False)  # layer 1: only the bias; layer 2: only its values
    l2.bias.requires_grad_(False)
    x = torch.randn(batch, 40)
    l2(torch.relu(l1(x.cuda()))).square().sum().backward()
    w1, w2 = (d1.weight.detach() * m1).double().requires_grad_(True), (d2.weight.detach() * m2).double()
    b1 = d1.bias.detach().double().requires_grad_(True)
    w2.requires_grad_(True)
    (torch.relu(x.double() @ w1.t() + b1) @ w2.t() + d2.bias.detach().double()).square().sum().backward()
    assert l1.values.grad is None and l2.bias.grad is None
    torch.testing.assert_close(l1.bias.grad.cpu().double(), b1.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(l2.values.grad.cpu().double(), w2.grad[m2], rtol=1e-4, atol=1e-4)


@gpu
def test_gpu_bad_structure_is_a_clear_error():
    """The functional API with a bad CSR on the GPU: a ValueError before any kernel runs."""
    torch = _torch_cuda()
    import sparsebp.torch as st

    x = torch.randn(40, 5, device="cuda")
    v = torch.ones(3, device="cuda")
    ip = torch.tensor([0, 1, 2, 3, 3], device="cuda")
    for ix, what in (([0, 9, 2], "outside"), ([0, 1, 2], None)):
        t = torch.tensor(ix, dtype=torch.int32, device="cuda")
        if what is None:
            st.ops.linear(x, v, None, ip, t, 5, 4)  # the good one runs
        else:
            with pytest.raises(ValueError, match=what):
                st.ops.linear(x, v, None, ip, t, 5, 4)


def _graph_of(warm_up, body):
    """body captured in a CUDA graph, after three calls of warm_up on a side stream (which cache
    the device structures and the allocator's blocks, as capture requires)."""
    torch = _torch_cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            warm_up()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


@gpu
def test_gpu_sparse_linear_in_a_cuda_graph():
    """A training step through SparseLinear captured in a CUDA graph (the kernels run on PyTorch's
    current stream, memory from its allocator): replays with new inputs give the float64 gradients."""
    torch = _torch_cuda()
    import sparsebp.torch as st

    torch.manual_seed(3)
    dense = torch.nn.Linear(96, 80)
    mask = torch.rand(80, 96) < 0.1
    layer = st.SparseLinear.from_dense(dense, mask=mask).cuda()
    static_x = torch.randn(64, 96, device="cuda")

    def step():
        layer.values.grad = None
        layer.bias.grad = None
        layer(static_x).square().sum().backward()

    graph = _graph_of(step, lambda: layer(static_x).square().sum().backward())
    w = (dense.weight.detach() * mask).double().requires_grad_(True)
    b = dense.bias.detach().double().requires_grad_(True)
    for trial in range(3):
        x = torch.randn(64, 96)
        static_x.copy_(x.cuda())
        layer.values.grad.zero_()
        layer.bias.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        w.grad = b.grad = None
        (x.double() @ w.t() + b).square().sum().backward()
        torch.testing.assert_close(layer.values.grad.cpu().double(), w.grad[mask], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(layer.bias.grad.cpu().double(), b.grad, rtol=1e-4, atol=1e-3)


@gpu
@pytest.mark.parametrize("which", ["sparse-example", "sparse-unified", "meprop-example", "meprop-unified"])
def test_gpu_sparse_gradients_in_a_cuda_graph(which):
    """A step through a sparse-gradient layer (the top-k chosen on the GPU) captured in a CUDA
    graph: replays with new inputs give the gradients of the top-k-masked output gradient, float64."""
    torch = _torch_cuda()
    import sparsebp.torch as st
    from sparsebp import algorithms as alg

    torch.manual_seed(4)
    kind, mode = which.split("-")
    dense = torch.nn.Linear(96, 80)
    mask = torch.rand(80, 96) < 0.2 if kind == "sparse" else torch.ones(80, 96, dtype=torch.bool)
    if kind == "sparse":
        layer = st.SparseLinear.from_dense(dense, mask=mask)
        layer.grad_policy = alg.MeProp(k=7, mode=mode)
    else:
        layer = st.MePropLinear.from_linear(dense, k=7, mode=mode)
    layer = layer.cuda()
    params = [p for p in layer.parameters()]
    static_x = torch.randn(64, 96, device="cuda", requires_grad=True)
    static_g = torch.randn(64, 80, device="cuda")

    def step():
        for p in params + [static_x]:
            p.grad = None
        layer(static_x).backward(static_g)

    graph = _graph_of(step, lambda: layer(static_x).backward(static_g))
    w = (dense.weight.detach() * mask).double()
    for trial in range(3):
        x, g = torch.randn(64, 96), torch.randn(64, 80)
        with torch.no_grad():
            static_x.copy_(x.cuda())
            static_g.copy_(g.cuda())
        for p in params + [static_x]:
            p.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        gh = torch.from_numpy(ref.topk_masked(g.double().numpy(), 7, mode))
        torch.testing.assert_close(static_x.grad.cpu().double(), gh @ w, rtol=1e-4, atol=1e-4)
        gw = gh.t() @ x.double()
        got_w = params[0].grad.cpu().double()
        torch.testing.assert_close(got_w, gw[mask] if kind == "sparse" else gw, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(params[1].grad.cpu().double(), g.double().sum(0), rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.parametrize("kind", ["sparse", "meprop"])
def test_gpu_sparse_gradient_backward_propagates_a_nan(kind):
    """On the GPU the modules' top-k does not wait for the device to look for NaN: a NaN in the
    output gradient is selected (it ranks above every number) and propagates into its example's
    input gradient, as in dense backprop, while the other examples' gradients stay finite and right.
    (sparsebp.ops.topk on a GPU array still raises, as on the CPU.)"""
    torch = _torch_cuda()
    import sparsebp.torch as st
    from sparsebp import algorithms as alg

    torch.manual_seed(5)
    if kind == "sparse":
        layer = st.SparseLinear(40, 30, sparsity=0.5)
        layer.grad_policy = alg.MeProp(k=4)
    else:
        layer = st.MePropLinear(40, 30, k=4)
    layer = layer.cuda()
    x = torch.randn(6, 40, device="cuda", requires_grad=True)
    g = torch.randn(6, 30)
    g[2, 7] = float("nan")
    layer(x).backward(g.cuda())
    assert torch.isnan(x.grad[2]).any()
    keep = [0, 1, 3, 4, 5]
    g2 = g[keep].double().numpy()
    w = ref.dense_from_csr(*_layer_csr(layer)) if kind == "sparse" else layer.weight.detach().double().cpu().numpy()
    gh = ref.topk_masked(g2, 4, "example")
    ref.assert_close(x.grad[keep].cpu(), gh @ w, np.abs(gh) @ np.abs(w), 30, "dx of the other examples")
    with pytest.raises(ValueError, match="NaN"):
        ops.topk(g.cuda(), 4)


class _InterfaceOnly:
    """A GPU array known to sparsebp only by ``__cuda_array_interface__`` (as Numba's or another
    library's would be)."""

    def __init__(self, a):
        self.__cuda_array_interface__ = a.__cuda_array_interface__
        self._keep = a


@gpu
@pytest.mark.parametrize("batch", [6, 96])
def test_gpu_ops_take_cupy_and_interface_arrays(batch):
    """sparsebp.ops on CuPy arrays (CuPy in, CuPy out) and on an object exposing only
    __cuda_array_interface__, against float64 NumPy; a CuPy input with a CPU bias is a clear error."""
    cupy = pytest.importorskip("cupy")
    _torch_cuda()
    rng = np.random.default_rng(batch)
    rows, cols = 40, 70
    ip, ix, vals = ref.random_csr(rng, rows, cols, 0.2)
    w = sparsebp.CSR(ip, ix, vals, (rows, cols))
    x = rng.standard_normal((batch, cols)).astype(np.float32)
    b = rng.standard_normal(rows).astype(np.float32)
    g = rng.standard_normal((batch, rows)).astype(np.float32)
    yr, ys = ref.linear_forward(x, ip, ix, vals, (rows, cols), b)
    y = ops.linear_forward(cupy.asarray(x), w, cupy.asarray(b), values=cupy.asarray(vals))
    assert isinstance(y, cupy.ndarray)
    ref.assert_close(cupy.asnumpy(y), yr, ys, cols, "cupy forward")
    y2 = ops.linear_forward(_InterfaceOnly(cupy.asarray(x)), w, _InterfaceOnly(cupy.asarray(b)),
                            values=_InterfaceOnly(cupy.asarray(vals)))
    ref.assert_close(np.asarray(y2.cpu()), yr, ys, cols, "interface-only forward")
    r = ops.linear_backward(cupy.asarray(g), cupy.asarray(x), w, values=cupy.asarray(vals))
    (gi, gis), (gv, gvs), _ = ref.linear_backward(g, x, ip, ix, vals, (rows, cols))
    assert isinstance(r.grad_input, cupy.ndarray)
    ref.assert_close(cupy.asnumpy(r.grad_input), gi, gis, rows, "cupy grad_input")
    ref.assert_close(cupy.asnumpy(r.grad_values), gv, gvs, batch, "cupy grad_values")
    np.testing.assert_allclose(cupy.asnumpy(r.grad_bias), g.astype(np.float64).sum(0), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="different devices"):
        ops.linear_forward(cupy.asarray(x), w, b, values=cupy.asarray(vals))


# ---- SparseConv2d on the GPU: im2col + the linear kernels ----------------------------------------------
def _csr_of(w):
    """(indptr int64, indices int32, values) of a dense (cout, ...) weight's nonzeros, row-major."""
    import torch

    flat = w.reshape(w.shape[0], -1)
    mask = flat != 0
    indptr = torch.zeros(w.shape[0] + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(mask.sum(1), 0)
    return indptr, mask.nonzero()[:, 1].to(torch.int32), flat[mask]


@pytest.mark.parametrize("groups,stride,padding,dilation", [(1, (1, 1), (1, 1), (1, 1)), (2, (2, 1), (0, 2), (1, 2)),
                                                            (4, (1, 2), (1, 0), (2, 1))])
def test_conv_patch_formulation_against_conv2d(groups, stride, padding, dilation):
    """The GPU convolution's formulation, checked on the CPU (no GPU needed): W with its columns
    mapped to the patch rows of each group (``_patch_indices``), times the patches (``_patches``),
    is F.conv2d, in float64."""
    torch = pytest.importorskip("torch")
    from sparsebp.torch import _conv, _ops

    g = torch.Generator().manual_seed(groups)
    cin, cout, kh, kw, n, h, w = 8, 12, 3, 2, 3, 7, 9
    wd = torch.randn(cout, cin // groups, kh, kw, dtype=torch.float64, generator=g)
    wd *= torch.rand(wd.shape, generator=g, dtype=torch.float64) < 0.4
    indptr, indices, values = _csr_of(wd)
    ix = _conv._patch_indices(indptr, indices, cout, cin, kh, kw, groups)
    assert _conv._patch_indices(indptr, indices, cout, cin, kh, kw, groups) is ix  # cached
    big = torch.zeros(cout, cin * kh * kw, dtype=torch.float64)
    big[_ops._rows_of(indptr, cout), ix.to(torch.int64)] = values
    x = torch.randn(n, cin, h, w, dtype=torch.float64, generator=g)
    u = _conv._patches(x, kh, kw, stride, padding, dilation)
    oh, ow = _conv._out_size(h, w, kh, kw, stride, padding, dilation)
    assert u.shape == (cin * kh * kw, n * oh * ow) and u.is_contiguous()
    y = (big @ u).reshape(cout, n, oh, ow).transpose(0, 1)
    ref = torch.nn.functional.conv2d(x, wd, None, stride, padding, dilation, groups)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_conv_patch_indices_refuse_a_bad_structure():
    torch = pytest.importorskip("torch")
    from sparsebp.torch import _conv

    indptr = torch.tensor([0, 1, 2], dtype=torch.int64)
    with pytest.raises(ValueError, match="outside|range"):  # column 18 of a group with 2 * 3 * 3 = 18 columns
        _conv._patch_indices(indptr, torch.tensor([3, 18], dtype=torch.int32), 2, 4, 3, 3, 2)
    with pytest.raises(ValueError, match="too small"):
        _conv._out_size(2, 2, 5, 5, (1, 1), (0, 0), (1, 1))


@gpu
@pytest.mark.parametrize("batch,cin,cout,k,stride,padding,dilation,groups,layout", [
    (4, 6, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, "nchw"),
    (1, 4, 6, (3, 3), (2, 2), (1, 1), (1, 1), 1, "nchw"),
    (5, 8, 12, (3, 2), (2, 1), (0, 2), (1, 2), 4, "nchw"),
    (8, 6, 6, (1, 1), (2, 2), (0, 0), (1, 1), 1, "inner"),
    (16, 16, 32, (3, 3), (1, 1), (1, 1), (1, 1), 2, "inner"),
    (3, 3, 5, (5, 5), (1, 1), (4, 4), (2, 2), 1, "channels_last"),
    (33, 32, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1, "nchw"),
])
def test_gpu_sparse_conv2d_against_float64(batch, cin, cout, k, stride, padding, dilation, groups, layout):
    """SparseConv2d on CUDA tensors: output, input gradient, value and bias gradients against
    F.conv2d in float64 on the CPU; the output and input gradient in the input's layout."""
    torch = _torch_cuda()
    import sparsebp.torch as st
    from sparsebp.torch import _conv

    torch.manual_seed(batch)
    dense = torch.nn.Conv2d(cin, cout, k, stride, padding, dilation, groups)
    mask = torch.rand(dense.weight.shape) < 0.3
    sp = st.SparseConv2d.from_dense(dense, mask=mask).cuda()
    x0 = torch.randn(batch, cin, 11, 10)
    x = x0.cuda()
    if layout == "inner":
        x = st.batch_inner(x)
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = sp(x)
    r = torch.randn(y.shape)
    (y * r.cuda()).sum().backward()

    xr = x0.double().requires_grad_(True)
    wr = (dense.weight.detach() * mask).double().requires_grad_(True)
    br = dense.bias.detach().double().requires_grad_(True)
    yr = torch.nn.functional.conv2d(xr, wr, br, stride, padding, dilation, groups)
    (yr * r.double()).sum().backward()
    torch.testing.assert_close(y.double().cpu(), yr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sp.values.grad.double().cpu(), wr.grad.reshape(cout, -1)[mask.reshape(cout, -1)],
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sp.bias.grad.double().cpu(), br.grad, rtol=1e-4, atol=1e-4)
    if layout == "inner":
        assert _conv.is_batch_inner(y) and _conv.is_batch_inner(x.grad)


@gpu
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("k,padding,mode,layout", [(3, 1, "reflect", "nchw"), (4, "same", "zeros", "inner"),
                                                   ((2, 3), "same", "circular", "inner"),
                                                   (3, (2, 1), "replicate", "nchw")])
def test_gpu_sparse_conv2d_padding_modes(k, padding, mode, layout):
    """Padding modes and a one-sided 'same' on CUDA tensors (the input padded on the device first):
    output and gradients against a float64 nn.Conv2d with the same options on the CPU."""
    torch = _torch_cuda()
    import sparsebp.torch as st
    from sparsebp.torch import _conv

    torch.manual_seed(3)
    dense = torch.nn.Conv2d(4, 6, k, padding=padding, padding_mode=mode)
    mask = torch.rand(dense.weight.shape) < 0.4
    sp = st.SparseConv2d.from_dense(dense, mask=mask).cuda()
    x0 = torch.randn(6, 4, 9, 8)
    x = st.batch_inner(x0.cuda()) if layout == "inner" else x0.cuda()
    x.requires_grad_(True)
    y = sp(x)
    r = torch.randn(y.shape)
    (y * r.cuda()).sum().backward()
    ref = torch.nn.Conv2d(4, 6, k, padding=padding, padding_mode=mode, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(dense.weight * mask)
        ref.bias.copy_(dense.bias)
    xr = x0.double().requires_grad_(True)
    yr = ref(xr)
    (yr * r.double()).sum().backward()
    torch.testing.assert_close(y.double().cpu(), yr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sp.values.grad.double().cpu(), ref.weight.grad[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sp.bias.grad.double().cpu(), ref.bias.grad, rtol=1e-4, atol=1e-4)
    assert _conv.is_batch_inner(y) == (layout == "inner")


@gpu
def test_gpu_sparse_conv2d_partial_gradients_and_float64():
    torch = _torch_cuda()
    import sparsebp.torch as st

    torch.manual_seed(1)
    dense = torch.nn.Conv2d(6, 10, 3, padding=1, groups=2)
    mask = torch.rand(dense.weight.shape) < 0.4
    x0 = torch.randn(7, 6, 9, 9)
    yr = torch.nn.functional.conv2d(x0, dense.weight.detach() * mask, dense.bias.detach(), 1, 1, 1, 2)
    # the input gradient alone (frozen weights and bias)
    sp = st.SparseConv2d.from_dense(dense, mask=mask).cuda().requires_grad_(False)
    x = x0.cuda().requires_grad_(True)
    sp(x).sum().backward()
    xr = x0.clone().requires_grad_(True)
    torch.nn.functional.conv2d(xr, dense.weight.detach() * mask, None, 1, 1, 1, 2).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), xr.grad, rtol=1e-4, atol=1e-4)
    # the weight gradient alone (an input that needs none), and no bias
    sp = st.SparseConv2d.from_dense(dense, mask=mask).cuda()
    sp.bias = None
    y = sp(x0.cuda())
    torch.testing.assert_close(y.cpu(), yr - dense.bias.detach()[None, :, None, None], rtol=1e-4, atol=1e-4)
    y.sum().backward()
    wr = (dense.weight.detach() * mask).requires_grad_(True)
    torch.nn.functional.conv2d(x0, wr, None, 1, 1, 1, 2).sum().backward()
    torch.testing.assert_close(sp.values.grad.cpu(), wr.grad[mask], rtol=1e-4, atol=1e-4)
    # float64 on the GPU: the dense reference path, on the device
    sp64 = st.SparseConv2d.from_dense(dense.double(), mask=mask).cuda()
    y64 = sp64(x0.double().cuda())
    assert y64.is_cuda and y64.dtype == torch.float64
    yr64 = torch.nn.functional.conv2d(x0.double(), (dense.weight.detach() * mask).double(),
                                      dense.bias.detach().double(), 1, 1, 1, 2)
    torch.testing.assert_close(y64.cpu(), yr64, rtol=1e-10, atol=1e-10)
