"""Run as: for r in 1 2 3; do PYTHONPATH=OLD python ab_unified.py old; python ab_unified.py new; done
(OLD: the package built from the old commit). csr_selected_backward(mode="unified") and a SparseLinear(grad_topk, grad_mode="unified") training
step (zero_grad, forward, backward) on the CPU, 1 thread: run once per code version, alternated."""
import sys, time, numpy as np, torch, sparsebp
from sparsebp.csr import CSR
from sparsebp.sparse_grad import csr_selected_backward
from sparsebp.torch import SparseLinear
torch.manual_seed(0); torch.set_num_threads(1); sparsebp.set_num_threads(1)
def med(f, n, reps=7):
    for _ in range(max(n // 5, 2)): f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n): f()
        ts.append((time.perf_counter() - t0) / n * 1e6)
    return float(np.median(ts))
out = []
rng = np.random.default_rng(0)
for i, o, b, k, n in [(64, 128, 8, 5, 500), (500, 500, 32, 20, 300), (784, 500, 32, 20, 300), (784, 500, 128, 20, 100),
                      (1024, 1024, 64, 40, 100), (4096, 4096, 32, 164, 10), (4096, 4096, 256, 164, 3)]:
    m = rng.random((o, i)) < 0.1
    w = CSR.from_dense(rng.standard_normal((o, i)).astype(np.float32) * m, mask=m)
    x = rng.standard_normal((b, i)).astype(np.float32); g = rng.standard_normal((b, o)).astype(np.float32)
    sel = np.sort(rng.choice(o, k, replace=False)).astype(np.int32)
    out.append(f"call {i}x{o} b{b} k{k}: {med(lambda: csr_selected_backward(g, x, w, sel, 'unified'), n):.1f}")
for i, o, b, k in [(64, 128, 8, 5), (784, 500, 32, 20), (500, 500, 32, 20), (4096, 4096, 32, 164)]:
    for kw in ({}, dict(grad_topk=k, grad_mode="unified")):
        sp = SparseLinear(i, o, sparsity=0.9, **kw)
        xt = torch.randn(b, i, requires_grad=True); gy = torch.randn(b, o)
        def step():
            sp.zero_grad(set_to_none=True); xt.grad = None; sp(xt).backward(gy)
        out.append(f"step {i}x{o} b{b} {'unified' if kw else 'plain'}: {med(step, 20 if i > 1000 else 300):.1f}")
print(sys.argv[1], sparsebp.__file__, " | ".join(out), flush=True)
