"""Old against new code, alternate processes: a training step (zero_grad, forward, backward) of one
SparseLinear on the CPU, 1 thread, plain and with grad_topk (per example, unified); and the
per-example backward kernel itself (_core.csr_example_backward, dW only and dx + dW).

Run as: for r in 1 2 3; do PYTHONPATH=OLD python steps_ab.py old; python steps_ab.py new; done
with OLD a copy of the installed package built from the old commit (72a7eb3)."""
import sys
import time

import numpy as np
import torch

import sparsebp
from sparsebp import _core
from sparsebp import algorithms as alg
from sparsebp.csr import CSR
from sparsebp.torch import SparseLinear

torch.manual_seed(0)
torch.set_num_threads(1)
sparsebp.set_num_threads(1)


def median_us(f, n, reps=7):
    for _ in range(max(n // 5, 2)):
        f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        ts.append((time.perf_counter() - t0) / n * 1e6)
    return float(np.median(ts))


out = []
for i, o, b, k in [(64, 128, 8, 5), (784, 500, 32, 20), (500, 500, 32, 20), (4096, 4096, 32, 164)]:
    big = i > 1000
    for kw in ({}, dict(grad_topk=k), dict(grad_topk=k, grad_mode="unified")):
        sp = SparseLinear(i, o, sparsity=0.9, **kw)
        x = torch.randn(b, i, requires_grad=True)
        gy = torch.randn(b, o)

        def step():
            sp.zero_grad(set_to_none=True)
            x.grad = None
            sp(x).backward(gy)

        name = "plain" if not kw else ("per example" if len(kw) == 1 else "unified")
        out.append(f"step {i}x{o} b{b} {name}: {median_us(step, 20 if big else 300):.1f}")
for i, o, b, k, n in [(784, 500, 32, 20, 300), (500, 500, 32, 20, 300), (4096, 4096, 256, 164, 3)]:
    rng = np.random.default_rng(0)
    m = rng.random((o, i)) < 0.1
    w = CSR.from_dense(rng.standard_normal((o, i)).astype(np.float32) * m, mask=m)
    x = rng.standard_normal((b, i)).astype(np.float32)
    g = rng.standard_normal((b, o)).astype(np.float32)
    dx = np.empty((b, i), np.float32)
    dv = np.empty(w.nnz, np.float32)
    sel = alg.MeProp(k=k).select(g).cols.astype(np.int32)
    t_dw = median_us(lambda: _core.csr_example_backward(w.structure, None, w.values, i, sel, g, x, None, dv), n)
    t_both = median_us(lambda: _core.csr_example_backward(w.structure, None, w.values, i, sel, g, x, dx, dv), n)
    out.append(f"kernel {i}x{o} b{b} k{k}: dW {t_dw:.1f} dx+dW {t_both:.1f}")
print(sys.argv[1] if len(sys.argv) > 1 else "", " | ".join(out), flush=True)
