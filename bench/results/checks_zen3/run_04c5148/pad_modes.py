"""Forward + backward of one 3x3 convolution (64 -> 64 channels, batch 32 of 32x32, padding 1) in
each padding mode: dense torch nn.Conv2d (NCHW input) and sparsebp's SparseConv2d at 90% sparsity
(NCHW input, and batch-innermost input). Medians of 15 interleaved runs, 2 threads. Prints a
table of milliseconds and the ratio of each mode to 'zeros'. Usage: python pad_modes.py [label]"""
import statistics
import sys
import time

import torch
import torch.nn as nn

import sparsebp.torch as st

torch.manual_seed(0)
torch.set_num_threads(2)
MODES = ("zeros", "reflect", "replicate", "circular")
x0 = torch.randn(32, 64, 32, 32)
xi = st.batch_inner(x0)
cases = {}
for mode in MODES:
    d = nn.Conv2d(64, 64, 3, padding=1, padding_mode=mode)
    try:
        s = st.SparseConv2d.from_dense(d, sparsity=0.9)
    except ValueError:  # a version that refuses the mode
        s = None
    cases[("dense torch", mode)] = (d, x0)
    if s is not None:
        cases[("sparse, NCHW input", mode)] = (s, x0)
        cases[("sparse, batch-inner input", mode)] = (s, xi)


def run(m, x):
    x = x.detach().requires_grad_()
    y = m(x)
    y.backward(torch.ones_like(y))


times = {k: [] for k in cases}
for k, (m, x) in cases.items():
    run(m, x)
for _ in range(15):
    for k, (m, x) in cases.items():
        t = time.perf_counter()
        run(m, x)
        times[k].append(time.perf_counter() - t)
med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
label = sys.argv[1] if len(sys.argv) > 1 else ""
print(f"## {label} sparsebp from {st.__file__}")
print("| contender | " + " | ".join(MODES) + " |")
print("|---|" + "---|" * len(MODES))
for kind in ("dense torch", "sparse, NCHW input", "sparse, batch-inner input"):
    cells = []
    for mode in MODES:
        if (kind, mode) not in med:
            cells.append("refused")
            continue
        cells.append(f"{med[(kind, mode)]:.1f} ms ({med[(kind, mode)] / med[(kind, 'zeros')]:.2f}x)")
    print(f"| {kind} | " + " | ".join(cells) + " |")
