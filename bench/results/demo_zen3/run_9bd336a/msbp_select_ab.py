# The script that measured msbp_select_ab.txt (run from any folder with sparsebp installed): old_select is the
# NumPy MSBP.select of a19e5eb, written out here so that both run in one process on the same batches.
"""Old (NumPy) against new (one C++ pass) MSBP select, in situ: two demo MSBP models trained step by
step in turn on the same batches; the time of their selects, backwards and whole steps."""
import time, numpy as np
from sparsebp import demo, nn
from sparsebp.algorithms import Selection
from sparsebp.sparse_grad import topk_columns
from sparsebp.datasets import load_mnist

def old_select(self, g):
    k = self.k_for(g.shape[1])
    u = g if self.memory is None or self.memory.shape != g.shape else g + self.memory
    cols = topk_columns(u, k)
    rest = u.copy(); rest[:, cols] = 0.0; rest *= np.float32(self.alpha)
    self.memory = rest
    return Selection("unified", cols, u)

X, y = load_mnist("train")
models = {}
for name in ("old", "new"):
    m = demo.build("msbp", 20, 0.9, 0.5, 0, 0.1)
    opt = nn.Adam(m.params(), lr=1e-3)
    T = {"select": 0.0, "backward": 0.0, "step": 0.0}
    for l in m.layers:
        if getattr(l, "policy", None) is not None:
            f = (lambda g, p=l.policy: old_select(p, g)) if name == "old" else l.policy.select
            def timed(g, f=f, T=T):
                t = time.perf_counter(); r = f(g); T["select"] += time.perf_counter() - t; return r
            l.policy.select = timed
    models[name] = (m, opt, T)
rng = np.random.default_rng(0)
steps = 0
for ep in range(3):
    order = rng.permutation(len(X))
    for s in range(len(X) // 32):
        idx = order[s * 32:(s + 1) * 32]
        for name in (("old", "new") if s % 2 else ("new", "old")):
            m, opt, T = models[name]
            t0 = time.perf_counter()
            logits = m.forward(X[idx]); loss, g = nn.softmax_cross_entropy(logits, y[idx])
            t1 = time.perf_counter(); m.backward(g); t2 = time.perf_counter(); opt.step(); t3 = time.perf_counter()
            T["backward"] += t2 - t1; T["step"] += t3 - t0
        steps += 1
print(f"{steps} steps, 3 epochs, us per step (both hidden layers):")
for name, (m, opt, T) in models.items():
    print(name, {k: round(v / steps * 1e6, 1) for k, v in T.items()})
o, n = models["old"][2], models["new"][2]
print("ratio old/new:", {k: round(o[k] / n[k], 2) for k in o})
pa = [p.data for p in models["old"][0].params()]; pb = [p.data for p in models["new"][0].params()]
print("max |param diff| after training:", max(float(np.abs(a - b).max()) for a, b in zip(pa, pb)))
