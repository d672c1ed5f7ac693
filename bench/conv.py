"""Sparse Conv2d benchmark: forward + full backward of one layer, dense torch vs SparseProp's
conv (when installed) vs sparsebp, interleaved in one process, medians. Needs torch.

Contenders
  dense       torch.nn.Conv2d, input (N, C, H, W) contiguous.
  sparseprop  sparseprop.modules.SparseConv2d.from_dense, both of its kernels
              (vectorizing_over_on False/True), the faster one reported.
  sparsebp    sparsebp.torch.SparseConv2d with the input stored batch-innermost (batch_inner),
              the layout its outputs have, so a network of such layers pays no conversions.
  sparsebp-nchw  the same layer given an ordinary contiguous input (converted in and out).
"""
from __future__ import annotations

import sys
import warnings
from typing import List

CASES = [dict(cin=64, cout=64, hw=56, batch=32), dict(cin=256, cout=256, hw=14, batch=64)]
SPARSITIES = [0.8, 0.9, 0.95, 0.98]
BAR = {0.9: 2.5, 0.95: 5.0}


def run_case(case: dict, sparsity: float, reps: int, have_sp: bool) -> List[dict]:
    import torch

    import sparsebp
    import sparsebp.torch as st
    from sparsebp.bench.harness import interleaved_medians

    torch.manual_seed(0)
    cin, cout, hw, n = case["cin"], case["cout"], case["hw"], case["batch"]
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
    sp = st.SparseConv2d.from_dense(conv, sparsity=sparsity)
    with torch.no_grad():
        conv.weight.copy_(sp.weight)  # dense holds the same (pruned) weights
    x = torch.randn(n, cin, hw, hw)
    xd = x.clone().requires_grad_()
    xb = st.batch_inner(x).requires_grad_()
    xn = x.clone().requires_grad_()
    gy = torch.randn(n, cout, hw, hw)
    gyb = st.batch_inner(gy)
    # Check against dense before timing.
    with torch.no_grad():
        ref = conv(x)
        err = float((sp(xb) - ref).abs().max() / (ref.abs().max() + 1))
    if not err < 1e-4:
        raise AssertionError(f"sparsebp conv disagrees with dense torch: {err:.2e}")

    def zero():
        for t in (xd, xb, xn):
            t.grad = None
        for p in list(conv.parameters()) + list(sp.parameters()):
            p.grad = None

    contenders = {
        "dense": lambda: conv(xd).backward(gy),
        "sparsebp": lambda: sp(xb).backward(gyb),
        "sparsebp-nchw": lambda: sp(xn).backward(gy),
    }
    if have_sp:
        from sparseprop.modules import SparseConv2d as SPConv

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sps = {v: SPConv.from_dense(conv, vectorizing_over_on=v) for v in (False, True)}
        for v, mod in sps.items():
            contenders[f"sparseprop-v{int(v)}"] = (lambda mod=mod: mod(xd).backward(gy))
    med = interleaved_medians(contenders, reps=reps, warmup=1, setup=zero)
    if have_sp:
        best = min(("sparseprop-v0", "sparseprop-v1"), key=lambda k: med[k])
        med["sparseprop"] = med[best]
        for k in ("sparseprop-v0", "sparseprop-v1"):
            med.pop(k)
    dense_t = med["dense"]
    rows = []
    for name, t in med.items():
        rows.append(dict(case=f"3x3 {cin}->{cout} {hw}x{hw}", batch=n, sparsity=sparsity,
                         threads=sparsebp.get_num_threads(), contender=name, time_ms=t * 1e3, speedup=dense_t / t,
                         isa=sparsebp.active_isa()))
    return rows


def worker(threads: int, quick: bool, reps: int) -> None:
    from tqdm import tqdm

    from sparsebp.bench.harness import emit, worker_setup

    have = worker_setup(threads)
    todo = [(c, s) for c in (CASES[:1] if quick else CASES) for s in ([0.9] if quick else SPARSITIES)]
    for case, s in tqdm(todo, desc=f"conv, {threads} thread(s)", file=sys.stderr):
        emit(run_case(case, s, reps, have["sparseprop"]))


def report(rows: List[dict]) -> str:
    from sparsebp.bench.harness import machine_header

    lines = ["# Sparse Conv2d, forward + backward: speed-up over dense torch", ""]
    lines += [f"- {h}" for h in machine_header()] + [""]
    names = [c for c in ("sparsebp", "sparsebp-nchw", "sparseprop") if any(r["contender"] == c for r in rows)]
    lines.append("| case | batch | threads | sparsity | dense ms | " + " | ".join(names) + " | bar |")
    lines.append("|---|---|---|---|---|" + "---|" * len(names) + "---|")
    keys = sorted({(r["case"], r["batch"], r["threads"], r["sparsity"]) for r in rows})
    for k in keys:
        sel = {r["contender"]: r for r in rows if (r["case"], r["batch"], r["threads"], r["sparsity"]) == k}
        bar = BAR.get(k[3]) if k[2] == 1 else None
        cells = [f"{sel[c]['speedup']:.2f}x" if c in sel else "-" for c in names]
        verdict = "-" if bar is None else (f"{bar}x {'met' if sel['sparsebp']['speedup'] >= bar else 'MISSED'}")
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {sel['dense']['time_ms']:.1f} | " + " | ".join(cells)
                     + f" | {verdict} |")
    return "\n".join(lines) + "\n"


def run(out_dir: str, quick: bool = False, threads: List[int] | None = None, reps: int | None = None) -> List[dict]:
    from sparsebp.bench.harness import run_and_write

    return run_and_write("sparsebp.bench.conv", "conv", report, out_dir, quick, threads, reps,
                         default_reps=5)


def main(argv=None) -> None:
    from sparsebp.bench.harness import bench_main

    bench_main("python -m sparsebp.bench.conv", worker, run, argv)


if __name__ == "__main__":
    main()
