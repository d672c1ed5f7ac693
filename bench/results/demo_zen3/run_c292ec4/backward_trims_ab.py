# The per-example backward of the demo's layers (32 x 20 selected; dense W and 90%-sparse CSR W), old code (51ab725) against new (c292ec4):
# PYTHONPATH=<a --target install of 51ab725> python backward_trims_ab.py old; python backward_trims_ab.py new  (alternated, 3 times each)
import numpy as np, time, sys, sparsebp
from sparsebp import ops, nn
from sparsebp.sparse_grad import selected_backward, csr_selected_backward
tag = sys.argv[1]
rng = np.random.default_rng(0)
B, k = 32, 20
out = []
cases = []
for out_f, in_f, need_x in [(500, 784, False), (500, 500, True)]:
    g = (rng.standard_normal((B, out_f)) * (rng.random((B, out_f)) < 0.5)).astype(np.float32)
    x = rng.random((B, in_f), dtype=np.float32); w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    W = nn.SparseLinear(in_f, out_f, 0.9, rng=rng).csr
    sel = ops.topk(g, k)
    cases.append((f"dense W {out_f}x{in_f}", lambda g=g, x=x, w=w, sel=sel, nx=need_x: selected_backward(g, x, w, sel, "example", input_grad=nx, compact=True)))
    cases.append((f"CSR W {out_f}x{in_f}", lambda g=g, x=x, W=W, sel=sel, nx=need_x: csr_selected_backward(g, x, W, sel, "example", input_grad=nx)))
T = {n: [] for n, _ in cases}
for r in range(400):
    for n, f in cases:
        t = time.perf_counter(); f(); T[n].append(time.perf_counter() - t)
print(tag, " | ".join(f"{n}: {np.median(v)*1e6:.1f}" for n, v in T.items()))
