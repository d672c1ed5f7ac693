"""Per-example meProp's GPU backward, kernel by kernel (GPU machine): sparsebp.ops.meprop_backward
on CUDA tensors (top-k, dx, dW) against the dense backward's two cuBLAS GEMMs, device times from
torch.profiler, medians of CUDA-event timings of the whole call. k = 4% of the outputs.
Run on a GPU machine: python bench/gpu/meprop_kernels.py"""
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from sparsebp import ops


def event_ms(fn, reps=30):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


print(f"GPU: {torch.cuda.get_device_name()}")
for batch, out_f, in_f in [(64, 3072, 768), (256, 4096, 4096)]:
    k = round(0.04 * out_f)
    torch.manual_seed(0)
    g = torch.randn(batch, out_f, device="cuda")
    x = torch.randn(batch, in_f, device="cuda")
    w = torch.randn(out_f, in_f, device="cuda")
    fns = {"meprop example": lambda: ops.meprop_backward(g, x, w, k, "example"),
           "meprop unified": lambda: ops.meprop_backward(g, x, w, k, "unified"),
           "dense (g @ w, g.T @ x, g.sum(0))": lambda: (g @ w, g.t() @ x, g.sum(0))}
    print(f"\nbatch {batch}, out {out_f}, in {in_f}, k = {k}: whole call, CUDA events, median ms")
    for name, fn in fns.items():
        print(f"  {name:34s} {event_ms(fn):.3f}")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fns["meprop example"]()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=60))
