"""Where a SparseLinear step's host time goes beyond its pieces (GPU machine): the step
``layer(x).backward(gy)`` in variants that each switch one suspect off, a test for a hidden wait
on the device (the step queued behind a long kernel: a wait shows as host time), the host's time
split into our forward, our backward and the rest, and a torch.profiler trace of a few steps
(to $OUT when set). Run on a GPU machine: python bench/gpu/step_gaps.py"""
import gc
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sparsebp.torch import _ops

from gpu_timing import host_us, layer_case


fin, fout, batch = 768, 3072, 64
dense, sp, x, gy = layer_case(fin, fout, batch, 0.95)
xd = x.detach()


def no_gc(fn):
    def run():
        gc.disable()
        try:
            fn()
        finally:
            gc.enable()
    return run


variants = {
    "dense step": lambda: dense(x).backward(gy),
    "sparsebp step": lambda: sp(x).backward(gy),
    "dense step, x without grad": lambda: dense(xd).backward(gy),
    "sparsebp step, x without grad": lambda: sp(xd).backward(gy),
    "dense step, autograd.grad (no .grad accumulation)": lambda: torch.autograd.grad(
        dense(x), [x, dense.weight, dense.bias], gy),
    "sparsebp step, autograd.grad (no .grad accumulation)": lambda: torch.autograd.grad(
        sp(x), [x, sp.values, sp.bias], gy),
    "dense forward only": lambda: dense(x),
    "sparsebp forward only": lambda: sp(x),
}
for name, fn in variants.items():
    print(f"{host_us(fn):8.1f} us  {name}")
for name in ("dense step", "sparsebp step"):
    print(f"{host_us(variants[name], n=100):8.1f} us  {name} (100 calls)")
    gc.disable()
    print(f"{host_us(variants[name], n=100):8.1f} us  {name} (100 calls, gc disabled)")
    gc.enable()

# A hidden wait: 50 steps queued behind a long kernel (50 million cycles, tens of ms); without a
# wait the host time is the same as above, with one it is the kernel's time / 50 or more.
for name in ("dense step", "sparsebp step"):
    us = host_us(variants[name], n=50, before=lambda: torch.cuda._sleep(50_000_000))
    print(f"{us:8.1f} us  {name}, queued behind a long kernel")

# The host's time split: our forward, our backward, the rest (autograd engine, accumulation).
acc = {"forward": 0.0, "backward": 0.0}
f0 = _ops._LinearEager.forward
b0 = _ops._LinearEager.backward


def f1(ctx, *a):
    t = time.perf_counter()
    r = f0(ctx, *a)
    acc["forward"] += time.perf_counter() - t
    return r


def b1(ctx, *g):
    t = time.perf_counter()
    r = b0(ctx, *g)
    acc["backward"] += time.perf_counter() - t
    return r


_ops._LinearEager.forward = staticmethod(f1)
_ops._LinearEager.backward = staticmethod(b1)
n = 300
for _ in range(20):
    sp(x).backward(gy)
torch.cuda.synchronize()
acc.update(forward=0.0, backward=0.0)
t = time.perf_counter()
for _ in range(n):
    sp(x).backward(gy)
total = time.perf_counter() - t
torch.cuda.synchronize()
print(f"split of a sparsebp step: total {total / n * 1e6:.1f} us; in Function.forward {acc['forward'] / n * 1e6:.1f}, "
      f"in Function.backward {acc['backward'] / n * 1e6:.1f}, elsewhere "
      f"{(total - acc['forward'] - acc['backward']) / n * 1e6:.1f}")
_ops._LinearEager.forward = staticmethod(f0)
_ops._LinearEager.backward = staticmethod(b0)

out = os.environ.get("OUT")
for name in ("dense step", "sparsebp step"):
    fn = variants[name]
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    if out:
        prof.export_chrome_trace(os.path.join(out, name.replace(" ", "_") + "_trace.json"))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=45))
