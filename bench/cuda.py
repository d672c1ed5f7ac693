"""GPU benchmark (`sparsebp bench --what cuda`): forward + full backward of a sparse linear layer on
the GPU, sparsebp's CUDA kernels against dense `torch.nn.Linear` and `torch.sparse` CSR (cuSPARSE),
on the engine-core shapes, interleaved, CUDA-event medians. Needs a build with SPARSEBP_CUDA=ON and
a GPU; elsewhere it says why and writes nothing.

Three timings of the same step (``layer(x).sum().backward()``):
- eager: each call launched from Python and waited for, so the host's cost of launching counts
  (for small layers it is most of the time: nn.Linear's path is C++, sparsebp's glue is Python);
- pipelined: 20 calls launched back to back and waited for once, wall time per call, as a training
  loop that does not wait on every step runs it (the host queues the next step while the device
  runs this one: a step costs the larger of the two);
- graph: the step captured once in a CUDA graph and replayed (``torch.cuda.CUDAGraph``), the
  device's time alone, as a training loop captured in a graph runs it.

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


def _pipelined(fns, reps, n=20):
    """Wall time per call of n calls queued back to back, one wait at the end; medians over reps,
    the contenders alternating."""
    import time

    import torch

    times = {k: [] for k in fns}
    for r in range(reps + 2):
        for k, fn in fns.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            if r >= 2:
                times[k].append((time.perf_counter() - t) / n)
    return {k: statistics.median(v) for k, v in times.items()}


def _capture(fn, params):
    """fn captured in a CUDA graph (after warm-up on a side stream), or None if capture fails."""
    import torch

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        for p in params:
            p.grad = None
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        return g
    except Exception as e:  # noqa: BLE001 - a contender that cannot be captured is reported as such
        print(f"  (CUDA graph capture failed: {type(e).__name__}: {str(e)[:120]})")
        torch.cuda.synchronize()
        return None


def _write_md(path: str, intro: str, cols, rows) -> None:
    """A markdown table after an intro line; cols: (header, key, format) per column."""
    with open(path, "w") as f:
        f.write(intro + "\n\n| " + " | ".join(h for h, _, _ in cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in rows:
            f.write("| " + " | ".join(fmt.format(r[k]) for _, k, fmt in cols) + " |\n")


CONV_LAYERS = [(64, 56, 32), (256, 14, 64)]  # channels, image side, batch (the CPU conv benchmark's)
CONV_SPARSITIES = [0.8, 0.9, 0.95, 0.98]


def _conv_rows(reps: int, quick: bool) -> list:
    """SparseConv2d on the GPU against nn.Conv2d (cuDNN), the CPU benchmark's layers."""
    import torch

    import sparsebp.torch as st

    rows = []
    for c, side, batch in (CONV_LAYERS[-1:] if quick else CONV_LAYERS):
        for s in CONV_SPARSITIES:
            torch.manual_seed(0)
            dense = torch.nn.Conv2d(c, c, 3, padding=1).cuda()
            sp = st.SparseConv2d.from_dense(dense, mask=torch.rand(dense.weight.shape, device="cuda") >= s)
            x = torch.randn(batch, c, side, side, device="cuda", requires_grad=True)

            def f_dense():
                dense(x).sum().backward()

            def f_ours():
                sp(x).sum().backward()

            fns = {"dense": f_dense, "sparsebp": f_ours}
            t = _time(fns, reps)
            params = {"dense": [x, dense.weight, dense.bias], "sparsebp": [x, sp.values, sp.bias]}
            graphs = {k: _capture(fn, params[k]) for k, fn in fns.items()}
            tg = _time({k: g.replay for k, g in graphs.items() if g is not None}, reps)
            tg = {k: tg.get(k, float("nan")) for k in fns}
            rows.append(dict(layer=f"3x3 {c}->{c} {side}x{side}", batch=batch, sparsity=s, dense_ms=1e3 * t["dense"],
                             sparsebp_ms=1e3 * t["sparsebp"], vs_dense=t["dense"] / t["sparsebp"],
                             graph_dense_ms=1e3 * tg["dense"], graph_sparsebp_ms=1e3 * tg["sparsebp"],
                             graph_vs_dense=tg["dense"] / tg["sparsebp"]))
            print(rows[-1], flush=True)
            del graphs
    return rows


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

                fns = {"dense": f_dense, "torch.sparse": f_sparse_torch, "sparsebp": f_ours}
                t = _time(fns, reps)
                tp = _pipelined({k: fns[k] for k in ("dense", "sparsebp")}, reps)
                params = {"dense": [x, dense.weight, dense.bias], "torch.sparse": [x, wcsr, dense.bias],
                          "sparsebp": [x, sp.values, sp.bias]}
                graphs = {k: _capture(fn, params[k]) for k, fn in fns.items()}
                tg = _time({k: g.replay for k, g in graphs.items() if g is not None}, reps)
                tg = {k: tg.get(k, float("nan")) for k in fns}
                flops = 6.0 * batch * int(mask.sum())
                rows.append(dict(layer=f"{fin}x{fout}", batch=batch, sparsity=s, dense_ms=1e3 * t["dense"],
                                 torch_sparse_ms=1e3 * t["torch.sparse"], sparsebp_ms=1e3 * t["sparsebp"],
                                 vs_dense=t["dense"] / t["sparsebp"], vs_torch_sparse=t["torch.sparse"] / t["sparsebp"],
                                 pipe_dense_ms=1e3 * tp["dense"], pipe_sparsebp_ms=1e3 * tp["sparsebp"],
                                 pipe_vs_dense=tp["dense"] / tp["sparsebp"],
                                 graph_dense_ms=1e3 * tg["dense"], graph_torch_sparse_ms=1e3 * tg["torch.sparse"],
                                 graph_sparsebp_ms=1e3 * tg["sparsebp"], graph_vs_dense=tg["dense"] / tg["sparsebp"],
                                 graph_vs_torch_sparse=tg["torch.sparse"] / tg["sparsebp"],
                                 gflops=flops / t["sparsebp"] / 1e9, graph_gflops=flops / tg["sparsebp"] / 1e9))
                print(rows[-1], flush=True)
                del graphs
    conv_rows = _conv_rows(reps, quick)
    os.makedirs(out_dir, exist_ok=True)
    from sparsebp.bench.harness import write_csv

    ms, x = "{:.3f}", "{:.2f}x"
    write_csv(os.path.join(out_dir, "cuda_conv.csv"), conv_rows)
    _write_md(os.path.join(out_dir, "cuda_conv.md"),
              f"GPU: {torch.cuda.get_device_name()}. SparseConv2d (im2col + sparsebp's CUDA kernels) against dense "
              "nn.Conv2d (cuDNN), forward + full backward of one 3x3 convolution (padding 1), NCHW float32, medians "
              "(ms); eager and CUDA-graph replay as for the linear layers.",
              [("layer", "layer", "{}"), ("batch", "batch", "{}"), ("s", "sparsity", "{}"),
               ("eager: dense", "dense_ms", ms), ("sparsebp", "sparsebp_ms", ms), ("vs dense", "vs_dense", x),
               ("graph: dense", "graph_dense_ms", ms), ("sparsebp", "graph_sparsebp_ms", ms),
               ("vs dense", "graph_vs_dense", x)], conv_rows)
    write_csv(os.path.join(out_dir, "cuda.csv"), rows)
    _write_md(os.path.join(out_dir, "cuda.md"),
              f"GPU: {torch.cuda.get_device_name()}. Forward + full backward of one layer, medians (ms) and "
              "speed-ups of sparsebp; eager: launched and waited for per call; pipelined: 20 calls queued back "
              "to back, one wait, wall time per call; graph: the step replayed from a CUDA graph (device time).",
              [("layer", "layer", "{}"), ("batch", "batch", "{}"), ("s", "sparsity", "{}"),
               ("eager: dense", "dense_ms", ms), ("torch.sparse", "torch_sparse_ms", ms),
               ("sparsebp", "sparsebp_ms", ms), ("vs dense", "vs_dense", x),
               ("vs torch.sparse", "vs_torch_sparse", x), ("pipelined: dense", "pipe_dense_ms", ms),
               ("sparsebp", "pipe_sparsebp_ms", ms), ("vs dense", "pipe_vs_dense", x),
               ("graph: dense", "graph_dense_ms", ms),
               ("torch.sparse", "graph_torch_sparse_ms", ms), ("sparsebp", "graph_sparsebp_ms", ms),
               ("vs dense", "graph_vs_dense", x), ("vs torch.sparse", "graph_vs_torch_sparse", x)], rows)
