"""Sparse gradients on the GPU (GPU machine): forward + full backward of one layer with each
sparse-gradient option against dense nn.Linear and plain SparseLinear, eager (launched and waited
for) and CUDA-graph (device) medians, interleaved. k is 4% of the outputs (issue 4's bar case).
A policy whose state lives on the host (MSBP) waits for the device in every backward, so it
cannot be captured in a graph (not tried; reported as nan). Run on a GPU machine:
python bench/gpu/grad_policies.py"""
import torch

import sparsebp.torch as st
from sparsebp import algorithms as alg
from sparsebp.bench.cuda import _capture, _time

REPS = 15
print(f"GPU: {torch.cuda.get_device_name()}; medians of {REPS}, ms; step = layer(x).sum().backward()")
for fin, fout, batch, s in [(768, 3072, 64, 0.95), (4096, 4096, 256, 0.9), (4096, 4096, 256, 0.95)]:
    torch.manual_seed(0)
    k = max(1, round(0.04 * fout))
    dense = torch.nn.Linear(fin, fout).cuda()
    mask = (torch.rand(fout, fin) >= s).cuda()  # (CPU draws: a failed capture cannot upset them)
    mods = {
        "dense nn.Linear": dense,
        "SparseLinear": st.SparseLinear.from_dense(dense, mask=mask),
        "SparseLinear grad_topk example": st.SparseLinear.from_dense(dense, mask=mask),
        "SparseLinear grad_topk unified": st.SparseLinear.from_dense(dense, mask=mask),
        "MePropLinear example": st.MePropLinear.from_linear(dense, k=k),
        "MePropLinear unified": st.MePropLinear.from_linear(dense, k=k, mode="unified"),
        "MePropLinear MSBP (host state)": st.MePropLinear.from_linear(dense, policy=alg.MSBP(k=k, alpha=0.5)),
    }
    mods["SparseLinear grad_topk example"].grad_policy = alg.MeProp(k=k, mode="example")
    mods["SparseLinear grad_topk unified"].grad_policy = alg.MeProp(k=k, mode="unified")
    x = torch.randn(batch, fin).cuda().requires_grad_(True)
    fns = {name: (lambda m=m: m(x).sum().backward()) for name, m in mods.items()}
    t = _time(fns, REPS)
    graphs = {name: _capture(fn, [x] + list(mods[name].parameters())) for name, fn in fns.items()
              if "host state" not in name}  # (a wait inside a capture breaks it: not tried)
    tg = _time({k2: g.replay for k2, g in graphs.items() if g is not None}, REPS)
    print(f"\n{fin}x{fout}, batch {batch}, s = {s}, k = {k}")
    print("| layer | eager ms | vs dense | graph ms | vs dense |\n|---|---|---|---|---|")
    for name in fns:
        g = tg.get(name, float("nan"))
        print(f"| {name} | {1e3 * t[name]:.3f} | {t['dense nn.Linear'] / t[name]:.2f}x | {1e3 * g:.3f} | "
              f"{tg['dense nn.Linear'] / g:.2f}x |", flush=True)
    del graphs
