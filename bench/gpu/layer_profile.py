"""Where the time of one SparseLinear forward + backward goes on the GPU, next to nn.Linear's: the
host (Python, launches) and the device (each kernel), from torch.profiler; plus the host-only cost
per step (no device sync inside the loop) and the device-only cost (a CUDA graph of the step).
Run on a GPU machine: python bench/gpu/layer_profile.py"""
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sparsebp.bench.cuda import _capture

from gpu_timing import layer_case

CASES = [(768, 3072, 64, 0.95), (4096, 4096, 256, 0.95), (4096, 4096, 256, 0.9)]


def steps(fn, n=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n  # the host's time to queue one step
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n
    return host, wall


def graph_time(fn, params):
    g = _capture(fn, params)
    if g is None:
        return float("nan")
    ts = []
    for _ in range(30):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts) / 1e3


for fin, fout, batch, s in CASES:
    dense, sp, x, gy = layer_case(fin, fout, batch, s)

    def f_dense():
        dense(x).backward(gy)

    def f_ours():
        sp(x).backward(gy)

    print(f"\n=== {fin}x{fout} batch {batch} sparsity {s}")
    for name, fn, params in (("dense", f_dense, [x, dense.weight, dense.bias]), ("sparsebp", f_ours, [x, sp.values, sp.bias])):
        host, wall = steps(fn)
        dev = graph_time(fn, params)
        print(f"{name:9s} host {host * 1e3:.3f} ms/step, wall {wall * 1e3:.3f} ms/step, device (graph) {dev * 1e3:.3f} ms")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))
