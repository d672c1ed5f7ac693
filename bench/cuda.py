"""GPU benchmark (`sparsebp bench --what cuda`): forward + full backward of a sparse linear layer on
the GPU, sparsebp's CUDA kernels against dense `torch.nn.Linear` and `torch.sparse` CSR (cuSPARSE),
on the engine-core shapes, interleaved, CUDA-event medians. Needs a build with SPARSEBP_CUDA=ON and
a GPU; elsewhere it says why and writes nothing.

Bar (issue 6): faster than torch.sparse CSR at every sparsity >= 0.9, faster than dense at >= 0.95.
"""
from __future__ import annotations

import os
import statistics

LAYERS = [(768, 3072), (3072, 768), (4096, 4096)]
BATCHES = [64, 256]
SPARSITIES = [0.9, 0.95, 0.98, 0.99]


def _why_not() -> str:
    import sparsebp

    info = sparsebp.build_info()
    if not info["cuda"]:
        return "this build has no CUDA kernels (SPARSEBP_CUDA=OFF)"
    if not info["cuda_devices"]:
        return "no CUDA GPU is visible"
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    return ""


def _time(fns, reps):
    import torch

    times = {k: [] for k in fns}
    for r in range(reps + 2):
        for k, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            if r >= 2:
                times[k].append(start.elapsed_time(end) / 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def run(out_dir: str, quick: bool = False, threads=None, reps=None):
    why = _why_not()
    if why:
        print(f"cuda benchmark skipped: {why}")
        return False
    import torch

    import sparsebp.torch as st

    reps = reps or (5 if quick else 20)
    layers = LAYERS[-1:] if quick else LAYERS
    rows = []
    for (fin, fout) in layers:
        for batch in (BATCHES[-1:] if quick else BATCHES):
            for s in SPARSITIES:
                torch.manual_seed(0)
                dense = torch.nn.Linear(fin, fout).cuda()
                mask = torch.rand(fout, fin, device="cuda") >= s
                sp = st.SparseLinear.from_dense(dense, mask=mask)
                wcsr = (dense.weight.detach() * mask).to_sparse_csr().requires_grad_(True)
                x = torch.randn(batch, fin, device="cuda", requires_grad=True)

                def f_dense():
                    dense(x).sum().backward()

                def f_sparse_torch():
                    (torch.sparse.mm(wcsr, x.t()).t() + dense.bias).sum().backward()

                def f_ours():
                    sp(x).sum().backward()

                t = _time({"dense": f_dense, "torch.sparse": f_sparse_torch, "sparsebp": f_ours}, reps)
                flops = 6.0 * batch * int(mask.sum())
                rows.append(dict(layer=f"{fin}x{fout}", batch=batch, sparsity=s, dense_ms=1e3 * t["dense"],
                                 torch_sparse_ms=1e3 * t["torch.sparse"], sparsebp_ms=1e3 * t["sparsebp"],
                                 vs_dense=t["dense"] / t["sparsebp"], vs_torch_sparse=t["torch.sparse"] / t["sparsebp"],
                                 gflops=flops / t["sparsebp"] / 1e9))
                print(rows[-1], flush=True)
    os.makedirs(out_dir, exist_ok=True)
    from sparsebp.bench.harness import write_csv

    write_csv(os.path.join(out_dir, "cuda.csv"), rows)
    with open(os.path.join(out_dir, "cuda.md"), "w") as f:
        f.write(f"GPU: {torch.cuda.get_device_name()}\n\n| layer | batch | s | dense ms | torch.sparse ms | sparsebp ms | "
                "speed-up vs dense | vs torch.sparse |\n|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['layer']} | {r['batch']} | {r['sparsity']} | {r['dense_ms']:.3f} | {r['torch_sparse_ms']:.3f} "
                    f"| {r['sparsebp_ms']:.3f} | {r['vs_dense']:.2f}x | {r['vs_torch_sparse']:.2f}x |\n")
