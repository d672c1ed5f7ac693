"""A SparseLinear training step (zero_grad, forward, backward; CPU, 1 thread) plain and with
grad_topk (unified), the two interleaved rep by rep in one process; run once per code version."""
import sys, time, numpy as np, torch, sparsebp
from sparsebp.torch import SparseLinear
torch.manual_seed(0); torch.set_num_threads(1); sparsebp.set_num_threads(1)
out = []
for i, o, b, k in [(64, 128, 8, 5), (500, 500, 32, 20), (784, 500, 32, 20), (4096, 4096, 32, 164)]:
    steps = []
    for kw in ({}, dict(grad_topk=k, grad_mode="unified")):
        sp = SparseLinear(i, o, sparsity=0.9, **kw)
        xt = torch.randn(b, i, requires_grad=True); gy = torch.randn(b, o)
        def step(sp=sp, xt=xt, gy=gy):
            sp.zero_grad(set_to_none=True); xt.grad = None; sp(xt).backward(gy)
        steps.append(step)
    n = 10 if i > 1000 else 200
    ts = [[], []]
    for s in steps:
        for _ in range(n // 4): s()
    for rep in range(9):
        for j, s in enumerate(steps):
            t0 = time.perf_counter()
            for _ in range(n): s()
            ts[j].append((time.perf_counter() - t0) / n * 1e6)
    p, u = np.median(ts[0]), np.median(ts[1])
    out.append(f"{i}x{o} b{b} k{k}: plain {p:.1f} unified {u:.1f} plain/unified {p / u:.3f}")
print(sys.argv[1], " | ".join(out), flush=True)
