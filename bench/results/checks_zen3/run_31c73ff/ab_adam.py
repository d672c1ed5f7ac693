import sys, time, numpy as np
if sys.argv[1] == "old": sys.path.insert(0, "/tmp/old_pkg")
import sparsebp
from sparsebp import _core
assert ("old_pkg" in sparsebp.__file__) == (sys.argv[1] == "old")
sparsebp.set_num_threads(int(sys.argv[2]))
rng = np.random.default_rng(0)
# the demo's sparse + meProp first layer: 500 x 784 at 10% (39,200 values), ~75% of rows touched
indptr = np.concatenate([[0], np.cumsum(np.full(500, 78))])
rows = np.sort(rng.choice(500, 375, replace=False))
pos = np.concatenate([np.arange(indptr[r], indptr[r + 1]) for r in rows]).astype(np.int64)
p = rng.standard_normal(39000).astype(np.float32); m = np.zeros_like(p); v = np.zeros_like(p)
g = rng.standard_normal(len(pos)).astype(np.float32)
W = rng.standard_normal((500, 784)).astype(np.float32); mW = np.zeros_like(W); vW = np.zeros_like(W)
gW = rng.standard_normal((375, 784)).astype(np.float32); r64 = rows.astype(np.int64)
cases = {"positions": lambda: _core.adam_step(p, g, m, v, pos, 0.9, 0.999, 1e-3, 1.0, 1e-8, True),
         "rows": lambda: _core.adam_step(W, gW, mW, vW, r64, 0.9, 0.999, 1e-3, 1.0, 1e-8, True)}
def bench(f, n=500):
    for _ in range(50): f()
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(n): f()
        ts.append((time.perf_counter() - t) / n * 1e6)
    return min(ts)
print(sys.argv[1], " ".join("%s=%.2f" % (k, bench(f)) for k, f in cases.items()))
