"""In one process, call by call alternated: SparseConv2d forward + backward (64 -> 64 3x3, 90%
sparse, batch 32 of 32x32, 2 threads) with zero padding (the kernels' own), and in reflect mode by
the new path (pad_input: padded batch-innermost by a gather) and by the path of 4bf4037 (F.pad,
then, for a batch-innermost input, a copy back to that layout), for NCHW and batch-innermost
inputs. Medians of 31 rounds; ratios to zero padding."""
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsebp.torch as st
from sparsebp.torch import _conv

torch.manual_seed(0)
torch.set_num_threads(2)
dz = nn.Conv2d(64, 64, 3, padding=1)
sz = st.SparseConv2d.from_dense(dz, sparsity=0.9)
sr = st.SparseConv2d(64, 64, 3, padding=1, padding_mode="reflect", mask=sz.mask())
with torch.no_grad():
    sr.values.copy_(sz.values)
    sr.bias.copy_(sz.bias)


def old_reflect(x):  # 4bf4037's SparseConv2d.forward for reflect
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    if _conv.is_batch_inner(x):
        p = st.batch_inner(p)
    return _conv.conv2d(p, sr.values, sr.bias, sr.indptr, sr.indices, 64, 64, (3, 3), 1, 0, 1, 1)


x0 = torch.randn(32, 64, 32, 32)
inputs = {"NCHW": x0, "batch-inner": st.batch_inner(x0)}
fns = {"zeros": sz, "reflect (new)": sr, "reflect (4bf4037)": old_reflect}
for lay, x in inputs.items():  # the two reflect paths agree
    a = x.detach().requires_grad_()
    b = x.detach().requires_grad_()
    ya, yb = sr(a), old_reflect(b)
    g = torch.randn(ya.shape)
    ya.backward(g)
    yb.backward(g)
    assert torch.allclose(ya, yb, atol=1e-5) and torch.allclose(a.grad, b.grad, atol=1e-5), lay


def run(f, x):
    x = x.detach().requires_grad_()
    y = f(x)
    y.backward(torch.ones_like(y))


times = {(lay, k): [] for lay in inputs for k in fns}
for (lay, k) in times:
    run(fns[k], inputs[lay])
for _ in range(31):
    for (lay, k) in times:
        t = time.perf_counter()
        run(fns[k], inputs[lay])
        times[(lay, k)].append(time.perf_counter() - t)
print("| input | zeros | reflect (new) | reflect (4bf4037) |")
print("|---|---|---|---|")
for lay in inputs:
    z = statistics.median(times[(lay, "zeros")])
    cells = [f"{statistics.median(times[(lay, k)]) * 1e3:.1f} ms ({statistics.median(times[(lay, k)]) / z:.2f}x)"
             for k in fns]
    print(f"| {lay} | " + " | ".join(cells) + " |")
