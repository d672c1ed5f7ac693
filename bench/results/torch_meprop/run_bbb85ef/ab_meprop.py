"""MePropLinear (k = 20, per example and unified) against nn.Linear, one training step (zero_grad,
forward, backward) on the CPU, 1 thread, batch 32, 784 -> 500, the three interleaved rep by rep in
one process (dense/meProp: meProp's speed-up over dense in the same process); run once per code
version, alternated."""
import sys, time, numpy as np, torch, sparsebp
from sparsebp.torch import MePropLinear
torch.manual_seed(0); torch.set_num_threads(1); sparsebp.set_num_threads(1)
out = []
for i, o, b, k in [(784, 500, 32, 20), (64, 128, 8, 5)]:
    mods = {"dense": torch.nn.Linear(i, o), "example": MePropLinear(i, o, k=k), "unified": MePropLinear(i, o, k=k, mode="unified")}
    x = torch.randn(b, i, requires_grad=True); gy = torch.randn(b, o)
    def mk(m):
        def step(): m.zero_grad(set_to_none=True); x.grad = None; m(x).backward(gy)
        return step
    steps = {n: mk(m) for n, m in mods.items()}
    ts = {n: [] for n in steps}
    for s in steps.values():
        for _ in range(50): s()
    for rep in range(9):
        for n, s in steps.items():
            t0 = time.perf_counter()
            for _ in range(200): s()
            ts[n].append((time.perf_counter() - t0) / 200 * 1e6)
    med = {n: float(np.median(v)) for n, v in ts.items()}
    out.append(f"{i}x{o} b{b} k{k}: dense {med['dense']:.1f} example {med['example']:.1f} unified {med['unified']:.1f} "
               f"dense/example {med['dense'] / med['example']:.3f} dense/unified {med['dense'] / med['unified']:.3f}")
print(sys.argv[1], " | ".join(out), flush=True)
