"""Top-k on fresh rows, old and new kernels in alternate processes (the A/B behind commits 2f9aa8b
and 14bc85c).

    PYTHONPATH=<old install> python topk_ab.py old; python topk_ab.py new   # repeated, in turn

Each case runs in a process of its own (one line gathers them). It copies the next of a pool of
gradients (4,096 rows or more in all, as a training run sees fresh ones every step) into one
buffer, untimed, then times sparsebp's top-k on it; one thread; median microseconds per call. "mnist": the output gradients of the demo's per-example
meProp model's two hidden layers (32 x 500, k = 20), captured over steps 181-200 of its training.
"""
import sys
import time

import numpy as np

from sparsebp import _core, demo, nn
from sparsebp.datasets import load_mnist


def mnist_gradients() -> list:
    X, y = load_mnist("train")
    model = demo.build("meprop", 20, 0.9, 0.5, 0, 0.1)
    opt = nn.Adam(model.params(), lr=1e-3)
    caps = []
    for layer in model.layers:
        if getattr(layer, "policy", None) is not None:
            select = layer.policy.select
            layer.policy.select = lambda g, select=select: (caps.append(g.copy()), select(g))[1]
    order = np.random.default_rng(0).permutation(len(X))
    for s in range(200):
        idx = order[s * 32:(s + 1) * 32]
        _, g = nn.softmax_cross_entropy(model.forward(X[idx]), y[idx])
        model.backward(g)
        opt.step()
    return caps[-40:]


CASES = [(32, 500, 20, 3000, "mnist"), (32, 500, 20, 3000, "normal"), (256, 500, 20, 400, "normal"),
         (32, 4096, 41, 400, "normal"), (100, 4096, 164, 150, "normal"), (256, 4096, 164, 60, "normal")]

def run_case(i: int) -> float:
    b, n, k, reps, kind = CASES[i]
    _core.set_num_threads(1)
    rng = np.random.default_rng(i)
    pool = (mnist_gradients() if kind == "mnist" else
            [rng.standard_normal((b, n)).astype(np.float32) for _ in range(max(8, 4096 // b))])
    g = np.empty((b, n), np.float32)
    idx = np.empty((b, k), np.int32)
    ts = []
    for r in range(reps):
        np.copyto(g, pool[r % len(pool)])
        t0 = time.perf_counter()
        _core.topk_rows(g, k, idx)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


if __name__ == "__main__":
    if sys.argv[1] == "--case":
        print(run_case(int(sys.argv[2])))
    else:
        # Each case in a process of its own: run in one process, the cases left one another's heap
        # behind, and a 4096-wide case measured 0.93x where alone it measured 1.07x-1.09x.
        import subprocess

        out = [float(subprocess.run([sys.executable, __file__, "--case", str(i)], check=True, capture_output=True,
                                    text=True).stdout) for i in range(len(CASES))]
        print(f"{sys.argv[1]:4s}", " ".join(f"{t * 1e6:7.1f}" for t in out), flush=True)
