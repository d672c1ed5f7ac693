"""Sparse-gradient (meProp) benchmark: the backward of one linear layer whose output gradient is
k-sparse, per-example and unified, against the dense backward (torch when installed, else NumPy),
and top-k selection against torch.topk; interleaved in one process, medians.

Contenders (one backward = input gradient + weight gradient + bias gradient)
  dense            torch: G @ W, G.T @ X, G.sum(0) (NumPy's matmul without torch).
  meprop-example   sparsebp.ops.meprop_backward(..., mode="example", compact=True) (selection included;
                   the weight gradient as the rows it touches).
  meprop-unified   sparsebp.ops.meprop_backward(..., mode="unified", compact=True) (selection included).
  example-nocache  meprop-example with sparsebp's buffer cache off for the call (limit 0): outputs of
                   32 MB or more (the weight gradient at 4096^2) then come in fresh pages, as the
                   dense backward's do (torch and NumPy keep no such cache). With it on (the
                   default, meprop-example), a repeated call reuses the memory of a result that is
                   gone: this row shows what that is worth.
Top-k: sparsebp.ops.topk(G, k) against torch.topk(G.abs(), k, dim=1, sorted=False).

Every call gets fresh values of G, as every training step does: before each call (untimed) the
next of a pool of gradients drawn up front (FRESH_ROWS rows in all, at least 8 arrays) is copied
into the one G buffer all contenders read. Called on one G over and over (as this benchmark did
before), or on a few, the branch predictor learns those rows: top-k of 32 x 500 took 17 us on 8
arrays in turn against 25 us on fresh rows (Zen 3, one core; the kernel of 76c636c), which
flattered the selection.
"""
from __future__ import annotations

import sys
from typing import List

LAYERS = [500, 4096]
BATCHES = [32, 100, 256]
RATIOS = [0.01, 0.02, 0.04, 0.08]
FRESH_ROWS = 4096  # rows of distinct output gradients per case, used in turn
BAR = {"meprop-unified": 10.0, "meprop-example": 6.0, "topk": 2.0}  # at 4096^2, batch 256, k/out = 4%, 1 thread


def run_case(n: int, batch: int, ratio: float, reps: int, have_torch: bool) -> List[dict]:
    import numpy as np

    import sparsebp
    from sparsebp import ops
    from sparsebp.bench.harness import interleaved_medians

    rng = np.random.default_rng(0)
    pool = [rng.standard_normal((batch, n)).astype(np.float32) for _ in range(max(8, -(-FRESH_ROWS // batch)))]
    g = pool[0].copy()  # the buffer every contender reads; refilled before each call
    turn = [0]

    def fresh_g() -> None:
        turn[0] = (turn[0] + 1) % len(pool)
        np.copyto(g, pool[turn[0]])

    x = rng.standard_normal((batch, n)).astype(np.float32)
    w = rng.standard_normal((n, n)).astype(np.float32)
    k = max(1, int(round(ratio * n)))
    contenders = {}
    if have_torch:
        import torch

        tg, tx, tw = torch.from_numpy(g), torch.from_numpy(x), torch.from_numpy(w)
        contenders["dense"] = lambda: (torch.mm(tg, tw), torch.mm(tg.t(), tx), tg.sum(0))
        contenders["torch.topk"] = lambda: torch.topk(tg.abs(), k, dim=1, sorted=False)
    else:
        contenders["dense"] = lambda: (g @ w, g.T @ x, g.sum(0))
    # compact=True: the weight gradient as the touched rows (what a row-wise optimizer update
    # takes), not a full (out, in) array of mostly zeros.
    def example_nocache():
        limit = sparsebp.buffer_cache_info()["limit_bytes"]
        sparsebp.set_buffer_cache_limit(0)
        try:
            return ops.meprop_backward(g, x, w, k, "example", compact=True)
        finally:  # (restored before the result is dropped: its memory is then cached for the next round)
            sparsebp.set_buffer_cache_limit(limit)

    contenders["meprop-example"] = lambda: ops.meprop_backward(g, x, w, k, "example", compact=True)
    contenders["meprop-unified"] = lambda: ops.meprop_backward(g, x, w, k, "unified", compact=True)
    contenders["topk"] = lambda: ops.topk(g, k)
    # Last in each round, so that meprop-example keeps its place after torch's calls (a contender
    # right after an identical one finds its operands warm in cache: ~5% at 500^2, batch 32).
    contenders["example-nocache"] = example_nocache
    med = interleaved_medians(contenders, reps=reps, warmup=1, setup=fresh_g)
    rows = []
    for name, t in med.items():
        base = med["torch.topk"] if name in ("topk", "torch.topk") and have_torch else med["dense"]
        if name == "topk" and not have_torch:
            base = float("nan")
        rows.append(dict(layer=f"{n}x{n}", batch=batch, k=k, ratio=ratio, threads=sparsebp.get_num_threads(),
                         contender=name, time_ms=t * 1e3, speedup=base / t, isa=sparsebp.active_isa()))
    return rows


def worker(threads: int, quick: bool, reps: int) -> None:
    from tqdm import tqdm

    from sparsebp.bench.harness import emit, worker_setup

    have = worker_setup(threads)
    todo = ([(4096, 256, 0.04)] if quick else
            [(n, b, r) for n in LAYERS for b in BATCHES for r in RATIOS])
    for n, b, r in tqdm(todo, desc=f"sparse gradients, {threads} thread(s)", file=sys.stderr):
        emit(run_case(n, b, r, reps, have["torch"]))


def report(rows: List[dict]) -> str:
    from sparsebp.bench.harness import machine_header

    lines = ["# Sparse gradients (meProp): linear-layer backward, speed-up over the dense backward", ""]
    lines += [f"- {h}" for h in machine_header()] + [""]
    lines.append("Backward columns: speed-up over dense backward (dX, dW, db). (no buffer cache): "
                 "meprop-example with sparsebp's cache of large outputs off, so that its 32 MB-or-larger "
                 "outputs come in fresh pages as the dense backward's do. topk: speed-up over "
                 "torch.topk(|G|) (blank without torch).")
    lines.append("")
    lines.append("| layer | batch | k (k/out) | threads | dense ms | meprop-example | (no buffer cache) | meprop-unified | topk "
                 "| bar |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["layer"], r["batch"], r["k"], r["ratio"], r["threads"]) for r in rows},
                  key=lambda t: (int(t[0].split("x")[0]), t[4], t[1], t[3]))
    for key in keys:
        sel = {r["contender"]: r for r in rows if (r["layer"], r["batch"], r["k"], r["ratio"], r["threads"]) == key}
        cells = [f"{sel[c]['speedup']:.2f}x" if c in sel and sel[c]["speedup"] == sel[c]["speedup"] else "-"
                 for c in ("meprop-example", "example-nocache", "meprop-unified", "topk")]
        verdict = "-"
        if key[0] == "4096x4096" and key[1] == 256 and key[3] == 0.04 and key[4] == 1:
            parts = []
            for c, need in BAR.items():
                if c in sel and sel[c]["speedup"] == sel[c]["speedup"]:
                    parts.append(f"{c} {need:g}x {'met' if sel[c]['speedup'] >= need else 'MISSED'}")
            verdict = "; ".join(parts)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} ({key[3]:.0%}) | {key[4]} | {sel['dense']['time_ms']:.2f} | "
                     + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines) + "\n"


def run(out_dir: str, quick: bool = False, threads: List[int] | None = None, reps: int | None = None) -> List[dict]:
    from sparsebp.bench.harness import run_and_write

    return run_and_write("sparsebp.bench.sparse_grad", "sparse_grad", report, out_dir, quick, threads, reps,
                         default_reps=9)


def main(argv=None) -> None:
    from sparsebp.bench.harness import bench_main

    bench_main("python -m sparsebp.bench.sparse_grad", worker, run, argv)


if __name__ == "__main__":
    main()
