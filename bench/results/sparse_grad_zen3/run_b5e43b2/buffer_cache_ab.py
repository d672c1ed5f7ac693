# Order-neutral A/B of the buffer cache (see buffer_cache_ab.txt). Run: python buffer_cache_ab.py ROUNDS BATCH WIDTH
import numpy as np, time, sys, torch, sparsebp
from sparsebp import ops
sparsebp.set_num_threads(1); torch.set_num_threads(1)
rng = np.random.default_rng(0)
B, n = int(sys.argv[2]), int(sys.argv[3]); k = int(round(0.04 * n))
g = rng.standard_normal((B, n)).astype(np.float32); x = rng.standard_normal((B, n)).astype(np.float32)
w = rng.standard_normal((n, n)).astype(np.float32)
tg, tx, tw = map(torch.from_numpy, (g, x, w))
dense = lambda: (torch.mm(tg, tw), torch.mm(tg.t(), tx), tg.sum(0))
def off():
    sparsebp.set_buffer_cache_limit(0)
    try: return ops.meprop_backward(g, x, w, k, "example", compact=True)
    finally: sparsebp.set_buffer_cache_limit(256 << 20)
on = lambda: ops.meprop_backward(g, x, w, k, "example", compact=True)
T = {"dense": [], "off": [], "on": []}
def tm(name, f):
    t = time.perf_counter(); r = f(); T[name].append(time.perf_counter() - t); del r
off(); dense()
for rep in range(int(sys.argv[1])):
    order = ["off", "on"] if rep % 2 == 0 else ["on", "off"]
    for nm in order:
        tm("dense", dense); tm(nm, {"off": off, "on": on}[nm])
m = {k_: np.median(v) for k_, v in T.items()}
print(B, n, k, " ".join("%s %.2f ms (%.2fx)" % (k_, v * 1e3, m["dense"] / v) for k_, v in m.items()), "on/off speedup %.3f" % (m["off"] / m["on"]))
