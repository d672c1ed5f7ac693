import sys, time, numpy as np
if sys.argv[1] == "old": sys.path.insert(0, "/tmp/old_pkg")
import sparsebp
from sparsebp import nn
assert ("old_pkg" in sparsebp.__file__) == (sys.argv[1] == "old")
sparsebp.set_num_threads(1)
rng = np.random.default_rng(0)
indptr = np.concatenate([[0], np.cumsum(np.full(500, 78))])
rows = np.sort(rng.choice(500, 375, replace=False))
pos = np.concatenate([np.arange(indptr[r], indptr[r + 1]) for r in rows]).astype(np.int64)
p = nn.Param("values", rng.standard_normal(39000).astype(np.float32))
p.rows, p.grad = pos, rng.standard_normal(len(pos)).astype(np.float32)
opt = nn.SGD([p], lr=1e-3, momentum=0.9)
def bench(f, n=500):
    for _ in range(50): f()
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(n): f()
        ts.append((time.perf_counter() - t) / n * 1e6)
    return min(ts)
print(sys.argv[1], "sgd_positions=%.2f" % bench(opt.step))
