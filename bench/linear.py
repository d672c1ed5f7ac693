"""Sparse linear layer, forward + full backward: sparsebp vs dense torch, torch.sparse and SparseProp.

Without torch installed, the dense baseline is NumPy's matmul (its BLAS) for the same products,
and the torch-based contenders are left out (the report says which baseline was used).

Run through `sparsebp bench` (or `python -m sparsebp.bench.linear`). Each thread count runs in its
own worker process (SparseProp reads OMP_NUM_THREADS once, at load), every case is checked against
dense torch before it is timed, contenders are interleaved and medians reported.

Contenders (all: forward, then backward giving the input, weight and bias gradients):
  dense        torch.nn.Linear (the baseline every ratio is taken against)
  torch.sparse torch.sparse.mm with a CSR weight that requires grad
  sparseprop   sparseprop.modules.SparseLinear (when installed), C-ordered tensors in and out
  sparsebp     sparsebp.ops with Fortran-ordered activations as sparsebp allocates them (ops.empty):
               the layout it keeps between layers, so no transposes or copies (see sparsebp.ops)
  sparsebp-C   sparsebp.ops with C-ordered activations, transposes included
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from typing import List

import numpy as np

LAYERS = [(768, 3072), (3072, 768), (4096, 4096)]  # (in_features, out_features)
BATCHES = [64, 256]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]
THREADS = [1, 2]
# Real pruned weights (DLMC: Gale, Zaharia, Elsen, SC 2020), bundled in bench/data/dlmc, batch 256.
DLMC = [
    "rn50_mag0.9_bottleneck_2_block_group3_4_1",
    "rn50_mag0.98_bottleneck_2_block_group3_4_1",
    "transformer_mag0.9_decoder_layer_0_ffn_conv1",
]
DLMC_BATCH = 256
# The bar (issue #2): minimum speed-up over dense at 1 thread, forward + full backward.
BAR = {0.7: 1.0, 0.9: 2.5, 0.95: 5.0, 0.98: 10.0, 0.99: 16.0}
CONTENDERS = ["dense", "torch.sparse", "sparseprop", "sparsebp", "sparsebp-C"]


def dlmc_path(name: str) -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "dlmc", name + ".smtx.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"bundled DLMC matrix missing: {path} (a broken install?)")
    return path


def read_smtx(path: str):
    """DLMC .smtx(.gz): 'rows, cols, nnz', then indptr, then column indices (no values)."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows, cols, nnz = (int(t) for t in f.readline().replace(",", " ").split())
        indptr = np.array(f.readline().split(), dtype=np.int64)
        indices = np.array(f.readline().split(), dtype=np.int64) if nnz else np.zeros(0, np.int64)
    if len(indptr) != rows + 1 or len(indices) != nnz:
        raise ValueError(f"{path}: malformed smtx file")
    return rows, cols, indptr, indices


def random_mask(out_f: int, in_f: int, sparsity: float, rng) -> tuple:
    """Uniformly random positions, exactly round((1 - s) * out * in) of them, as (indptr, indices)."""
    total = out_f * in_f
    nnz = int(round((1.0 - sparsity) * total))
    flat = np.sort(rng.choice(total, size=nnz, replace=False))
    rows, cols = np.divmod(flat, in_f)
    indptr = np.zeros(out_f + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=out_f), out=indptr[1:])
    return indptr, cols.astype(np.int32)


def cases(quick: bool) -> List[dict]:
    if quick:
        return [dict(kind="random", in_f=4096, out_f=4096, batch=256, sparsity=s) for s in (0.9, 0.99)] + [
            dict(kind="random", in_f=768, out_f=3072, batch=64, sparsity=0.95),
            dict(kind="dlmc", path=dlmc_path(DLMC[0]), label=f"dlmc {DLMC[0]}", batch=DLMC_BATCH)]
    out = [dict(kind="random", in_f=i, out_f=o, batch=b, sparsity=s)
           for (i, o) in LAYERS for b in BATCHES for s in SPARSITIES]
    for name in DLMC:
        out.append(dict(kind="dlmc", path=dlmc_path(name), label=f"dlmc {name}", batch=DLMC_BATCH))
    return out


def run_case(case: dict, reps: int, have_sparseprop: bool, have_torch: bool = True) -> List[dict]:
    import sparsebp
    from sparsebp import ops
    from sparsebp.bench.harness import interleaved_medians

    rng = np.random.default_rng(0)
    if case["kind"] == "dlmc":
        out_f, in_f, indptr, indices = read_smtx(case["path"])
        label = case["label"]
    else:
        in_f, out_f = case["in_f"], case["out_f"]
        indptr, indices = random_mask(out_f, in_f, case["sparsity"], rng)
        label = f"{in_f}->{out_f}"
    B = case["batch"]
    nnz = int(indptr[-1])
    values = (rng.standard_normal(nnz) / np.sqrt(max(in_f * (nnz / (in_f * out_f)), 1))).astype(np.float32)
    W = sparsebp.CSR(indptr, indices, values, (out_f, in_f))
    sparsity = 1.0 - W.density
    bias = rng.standard_normal(out_f).astype(np.float32)
    x = rng.standard_normal((B, in_f)).astype(np.float32)
    g = rng.standard_normal((B, out_f)).astype(np.float32)
    dense_np = W.to_dense()
    rows_of = W.row_indices()

    # ---- the reference every sparsebp result is checked against before timing: float64 NumPy ----
    w64, x64, g64 = dense_np.astype(np.float64), x.astype(np.float64), g.astype(np.float64)
    ref = dict(y=x64 @ w64.T + bias, gi=g64 @ w64, gv=(g64.T @ x64)[rows_of, W.indices], gb=g64.sum(0))
    res = {}
    for name, order in (("sparsebp", "F"), ("sparsebp-C", "C")):
        # The activations a layer receives in a network: the previous layer's output (x) and the
        # next layer's input gradient (g), both as sparsebp allocates them (ops.empty).
        xo, go = ops.empty((B, in_f), order), ops.empty((B, out_f), order)
        xo[...] = x
        go[...] = g
        y = ops.linear_forward(xo, W, bias)
        gr = ops.linear_backward(go, xo, W)
        err = max(float(np.abs(got - ref[k]).max() / (np.abs(ref[k]).max() + 1.0)) if np.size(got) else 0.0
                  for k, got in (("y", y), ("gi", gr.grad_input), ("gv", gr.grad_values), ("gb", gr.grad_bias)))
        if not err < 1e-3:
            raise AssertionError(f"{name} disagrees with float64 NumPy on {label} B={B}: relative error {err:.2e}")
        res[name] = (xo, go, ops.empty((B, out_f), order), ops.empty((B, in_f), order),
                     np.empty(nnz, np.float32), np.empty(out_f, np.float32))

    contenders = {}
    setup = None
    if have_torch:
        import torch

        dense_w = torch.from_numpy(dense_np)
        lin = torch.nn.Linear(in_f, out_f)
        with torch.no_grad():
            lin.weight.copy_(dense_w)
            lin.bias.copy_(torch.from_numpy(bias))
        xt = torch.from_numpy(x.copy()).requires_grad_()
        gt = torch.from_numpy(g.copy())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
            ts = dense_w.to_sparse_csr().requires_grad_()
        tb = lin.bias.detach().clone().requires_grad_()
        sp_mod = None
        if have_sparseprop:
            from sparseprop.modules import SparseLinear as SPLinear

            sp_mod = SPLinear.from_dense(lin)

        def setup():
            for p in (lin.weight, lin.bias, xt, ts, tb):
                p.grad = None
            if sp_mod is not None:
                for p in sp_mod.parameters():
                    p.grad = None

        def dense():
            yv = lin(xt)
            yv.backward(gt)

        def torch_sparse():
            yv = torch.sparse.mm(ts, xt.t()).t() + tb
            yv.backward(gt)

        contenders["dense"] = dense
        contenders["torch.sparse"] = torch_sparse
        if sp_mod is not None:
            def sparseprop_run():
                yv = sp_mod(xt)
                yv.backward(gt)

            contenders["sparseprop"] = sparseprop_run
    else:
        # No torch: dense NumPy (its BLAS) for the same four products.
        xc, gc, wc = np.ascontiguousarray(x), np.ascontiguousarray(g), np.ascontiguousarray(dense_np)

        def dense():
            _ = xc @ wc.T + bias
            _ = gc @ wc
            _ = gc.T @ xc
            _ = gc.sum(0)

        contenders["dense"] = dense

    for name in ("sparsebp", "sparsebp-C"):
        xo, go, yb, gib, gvb, gbb = res[name]

        def run(xo=xo, go=go, yb=yb, gib=gib, gvb=gvb, gbb=gbb):
            ops.linear_forward(xo, W, bias, out=yb)
            ops.linear_backward(go, xo, W, grad_input=gib, grad_values=gvb, grad_bias=gbb)

        contenders[name] = run

    med = interleaved_medians(contenders, reps=reps, warmup=1, setup=setup)
    dense_t = med["dense"]
    dense_rate = 3 * 2 * out_f * in_f * B / dense_t
    rows = []
    for name, t in med.items():
        useful = 3 * 2 * nnz * B  # forward, input gradient, weight gradient
        rows.append(dict(case=label, in_features=in_f, out_features=out_f, batch=B, sparsity=round(sparsity, 4),
                         threads=sparsebp.get_num_threads(), contender=name, time_ms=t * 1e3,
                         speedup=dense_t / t, efficiency=(useful / t) / dense_rate if name != "dense" else 1.0,
                         isa=sparsebp.active_isa(), dense_baseline="torch" if have_torch else "numpy"))
    return rows


SCALING_SPARSITIES = [0.8, 0.9, 0.95, 0.98, 0.99]


def scaling_worker(reps: int, quick: bool) -> None:
    """sparsebp alone, 4096->4096 at batch 256: 1 and 2 threads interleaved in one process (its
    thread count can change between calls), so machine drift cancels out of the ratio."""
    import sparsebp
    from sparsebp import ops
    from sparsebp.bench.harness import interleaved_medians

    rng = np.random.default_rng(0)
    B, n = 256, 4096
    for s in ([0.9] if quick else SCALING_SPARSITIES):
        indptr, indices = random_mask(n, n, s, rng)
        W = sparsebp.CSR(indptr, indices, rng.standard_normal(len(indices)).astype(np.float32), (n, n))
        x, g = ops.empty((B, n)), ops.empty((B, n))
        x[...] = rng.standard_normal((B, n))
        g[...] = rng.standard_normal((B, n))
        bias = np.zeros(n, np.float32)
        y, gi = ops.empty((B, n)), ops.empty((B, n))
        gv, gb = np.empty(W.nnz, np.float32), np.empty(n, np.float32)

        def step(threads):
            def run():
                sparsebp.set_num_threads(threads)
                ops.linear_forward(x, W, bias, out=y)
                ops.linear_backward(g, x, W, grad_input=gi, grad_values=gv, grad_bias=gb)
            return run

        med = interleaved_medians({"1": step(1), "2": step(2)}, reps=reps, warmup=1)
        print("SCALING " + json.dumps(dict(sparsity=s, t1_ms=med["1"] * 1e3, t2_ms=med["2"] * 1e3)), flush=True)


def worker(threads: int, quick: bool, reps: int) -> None:
    from tqdm import tqdm

    from sparsebp.bench.harness import emit, worker_setup

    have = worker_setup(threads)
    have_torch, have_sp = have["torch"], have["sparseprop"]
    todo = cases(quick)
    if threads > 1 and not quick:
        # The 2-thread bar concerns 4096^2 at batch 256; the other layers show scaling.
        todo = [c for c in todo if c["kind"] == "random" and c["sparsity"] >= 0.8]
    for case in tqdm(todo, desc=f"linear, {threads} thread(s)", file=sys.stderr):
        emit(run_case(case, reps, have_sp, have_torch))


def run(out_dir: str, quick: bool = False, threads: List[int] | None = None, reps: int | None = None) -> List[dict]:
    """Runs the linear benchmark (each thread count in a worker process) and writes
    linear.csv, linear.md and linear.png into out_dir. Returns the result rows."""
    threads = threads or ([1] if quick else THREADS)
    reps = reps or (3 if quick else 7)
    from sparsebp.bench.harness import machine_header, run_workers, write_csv

    rows = run_workers("sparsebp.bench.linear", threads, reps, quick)
    os.makedirs(out_dir, exist_ok=True)

    # Write what the workers measured first: a failure below must not lose it.
    write_csv(os.path.join(out_dir, "linear.csv"), rows)
    scaling: List[dict] = []
    if 2 in threads:
        cmd = [sys.executable, "-m", "sparsebp.bench.linear", "--scaling-worker", "--reps", str(max(reps, 9))]
        if quick:
            cmd.append("--quick")
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
        scaling = [json.loads(line[8:]) for line in out.splitlines() if line.startswith("SCALING ")]
        write_csv(os.path.join(out_dir, "linear_scaling.csv"), scaling)
    md = report(rows, machine_header(), scaling)
    with open(os.path.join(out_dir, "linear.md"), "w") as f:
        f.write(md)
    print(md)
    plot(rows, os.path.join(out_dir, "linear.png"))
    return rows


def _by(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def report(rows: List[dict], header: List[str], scaling: List[dict] | None = None) -> str:
    baseline = "torch" if not rows or rows[0].get("dense_baseline", "torch") == "torch" else "numpy"
    lines = ["# Sparse linear layer: forward + full backward", ""] + [f"- {h}" for h in header] + [
        f"- dense baseline: {'torch.nn.Linear' if baseline == 'torch' else 'NumPy matmul (torch not installed; the bar, defined against dense torch, is not judged)'}",
        "",
        "Speed-up = dense time / contender time (medians, interleaved, one run). "
        "Efficiency = useful flops/s (3 x 2 x nnz x batch) / the dense baseline's flops/s in the same case. "
        "sparsebp = Fortran-ordered activations (no transposes); sparsebp-C = C-ordered, transposes included. "
        "vs SP = sparsebp speed-up / SparseProp speed-up.", ""]
    keys = []
    for r in rows:
        k = (r["case"], r["batch"], r["threads"])
        if k not in keys:
            keys.append(k)
    lines.append("| layer | batch | threads | sparsity | dense ms | sparsebp ms | sparsebp | sparsebp-C | SparseProp "
                 "| torch.sparse | efficiency | vs SP | bar | meets bar |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case, batch, th in keys:
        sub = _by(rows, case=case, batch=batch, threads=th)
        for s in sorted({r["sparsity"] for r in sub}):
            c = {r["contender"]: r for r in _by(sub, sparsity=s)}
            if "dense" not in c or "sparsebp" not in c:
                continue
            sb = c["sparsebp"]
            sp = c.get("sparseprop")
            # The bar is defined against dense torch; against NumPy it would mean nothing.
            bar = BAR.get(round(s, 2)) if th == 1 and not case.startswith("dlmc") and baseline == "torch" else None
            vs = sb["speedup"] / sp["speedup"] if sp else None
            ok = []
            if bar is not None:
                ok.append(sb["speedup"] >= bar)
            if vs is not None and s >= 0.8 - 1e-9:
                ok.append(vs >= 1.3)

            def f(name):
                return f"{c[name]['speedup']:.2f}x" if name in c else "-"

            lines.append(
                f"| {case} | {batch} | {th} | {s:.2f} | {c['dense']['time_ms']:.2f} | {sb['time_ms']:.2f} "
                f"| {f('sparsebp')} | {f('sparsebp-C')} | {f('sparseprop')} | {f('torch.sparse')} "
                f"| {sb['efficiency']:.2f} | {f'{vs:.2f}x' if vs else '-'} | {f'{bar}x' if bar else '-'} "
                f"| {('yes' if all(ok) else 'NO') if ok else '-'} |")
    # Thread scaling: 4096^2, batch 256.
    scal = []
    for s in sorted({r["sparsity"] for r in _by(rows, case="4096->4096", batch=256, threads=2)}):
        one = _by(rows, case="4096->4096", batch=256, threads=1, sparsity=s, contender="sparsebp")
        two = _by(rows, case="4096->4096", batch=256, threads=2, sparsity=s, contender="sparsebp")
        if one and two:
            ratio = one[0]["time_ms"] / two[0]["time_ms"]
            ok = "-" if s > 0.95 + 1e-9 else ("yes" if ratio >= 1.7 else "NO")
            scal.append(f"| {s:.2f} | {one[0]['time_ms']:.2f} | {two[0]['time_ms']:.2f} | {ratio:.2f}x | {ok} |")
    if scal:
        lines += ["", "## 2 threads vs 1, 4096->4096, batch 256 (bar: >= 1.7x for s <= 0.95)", "",
                  "From the two workers above (separate processes, run minutes apart):", "",
                  "| sparsity | 1 thread ms | 2 threads ms | throughput ratio | meets bar |", "|---|---|---|---|---|"] + scal
    if scaling:
        lines += ["", "Interleaved in one process (sparsebp alone, 1 and 2 threads alternating, medians):", "",
                  "| sparsity | 1 thread ms | 2 threads ms | throughput ratio | meets bar |", "|---|---|---|---|---|"]
        for r in scaling:
            ratio = r["t1_ms"] / r["t2_ms"]
            ok = "-" if r["sparsity"] > 0.95 + 1e-9 else ("yes" if ratio >= 1.7 else "NO")
            lines.append(f"| {r['sparsity']:.2f} | {r['t1_ms']:.2f} | {r['t2_ms']:.2f} | {ratio:.2f}x | {ok} |")
    return "\n".join(lines) + "\n"


def plot(rows: List[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: {path} not written (pip install sparsebp[bench])")
        return
    panels = []
    for r in rows:
        k = (r["case"], r["batch"])
        if r["threads"] == 1 and not r["case"].startswith("dlmc") and k not in panels:
            panels.append(k)
    if not panels:
        return
    ncol = min(3, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.8 * nrow), squeeze=False)
    for ax, (case, batch) in zip(axes.flat, panels):
        sub = _by(rows, case=case, batch=batch, threads=1)
        for name in CONTENDERS[1:]:
            pts = sorted((r["sparsity"], r["speedup"]) for r in sub if r["contender"] == name)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        bs = sorted(BAR.items())
        ax.plot([b[0] for b in bs], [b[1] for b in bs], "k--", label="bar", linewidth=1)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{case}, batch {batch}, 1 thread")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("speed-up over dense torch")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Sparse linear layer, forward + full backward")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    from sparsebp._argtypes import positive_int

    p = argparse.ArgumentParser(prog="python -m sparsebp.bench.linear")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scaling-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=positive_int, nargs="*", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=positive_int, default=None)
    p.add_argument("--out", default="bench-results")
    a = p.parse_args(argv)
    if a.scaling_worker:
        scaling_worker(a.reps or 3, a.quick)
    elif a.worker:
        worker(a.threads[0], a.quick, a.reps or 3)
    else:
        run(a.out, quick=a.quick, threads=a.threads, reps=a.reps)


if __name__ == "__main__":
    main()
