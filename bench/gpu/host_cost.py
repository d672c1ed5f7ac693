"""Where the host's time of one SparseLinear forward + backward goes (the eager CUDA path), piece by
piece, next to nn.Linear's: each piece called in a loop without waiting for the device (the host's
cost to queue it), then cProfile over whole steps. Run on a GPU machine: python bench/gpu/host_cost.py"""
import cProfile
import pstats

import torch

from sparsebp import _core, _cuda
from sparsebp.torch import _ops

from gpu_timing import host_us, layer_case


fin, fout, batch = 768, 3072, 64
dense, sp, x, gy = layer_case(fin, fout, batch, 0.95)
xd = x.detach()
entry = _ops._cuda_structure_entry(sp.indptr, sp.indices, fout, fin)
dev = 0
stream = _cuda._stream(dev)
xt = torch.empty((fin, batch), device="cuda")
y = torch.empty((batch, fout), device="cuda")
v = sp.values.detach()
yy = dense(x)

pieces = {
    "dense step (forward + backward(gy))": lambda: dense(x).backward(gy),
    "sparsebp step": lambda: sp(x).backward(gy),
    "dense forward, grad on": lambda: dense(x),
    "sparsebp forward, grad on": lambda: sp(x),
    "dense forward, no_grad": lambda: dense(xd),
    "torch.empty (64, 3072)": lambda: torch.empty((batch, fout), device="cuda"),
    "torch.empty_like(values)": lambda: torch.empty_like(v),
    "_stream(0)": lambda: _cuda._stream(0),
    "x.data_ptr()": lambda: xd.data_ptr(),
    "_cuda_structure_entry (hit)": lambda: _ops._cuda_structure_entry(sp.indptr, sp.indices, fout, fin),
    "_core.cuda_csr_fm raw (transpose + product)": lambda: _core.cuda_csr_fm(
        dev, stream, batch, fout, entry[1][0], entry[1][1], v.data_ptr(), 0, 0, xt.data_ptr(), batch,
        y.data_ptr(), fout, True, xd.data_ptr(), fin, fin),
    "_cuda.csr_product": lambda: _cuda.csr_product(dev, stream, xd, fout, entry[1][0], entry[1][1], v.data_ptr()),
    "_cuda_forward": lambda: _ops._cuda_forward(xd, v, sp.bias.detach(), sp.indptr, sp.indices, fout),
    "_ops.linear no_grad": lambda: _ops.linear(xd, v, sp.bias.detach(), sp.indptr, sp.indices, fin, fout),
    "yy.backward(gy, retain_graph) dense": lambda: yy.backward(gy, retain_graph=True),
}
for name, fn in pieces.items():
    print(f"{host_us(fn):8.1f} us  {name}")

ys = sp(x)
print(f"{host_us(lambda: ys.backward(gy, retain_graph=True)):8.1f} us  sparsebp backward alone (retain_graph)")

pr = cProfile.Profile()
pr.enable()
for _ in range(500):
    sp(x).backward(gy)
torch.cuda.synchronize()
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
