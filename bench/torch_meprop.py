"""A training step of the meProp paper's MLP (784-500-500-10, batch 32, Adam lr 1e-3) in PyTorch:
dense ``nn.Linear`` against ``sparsebp.torch.MePropLinear`` (k = 20 on both hidden layers). Each
step is zero_grad, forward, cross-entropy, backward and the optimizer step; the contenders run
interleaved in one process, medians.

Contenders
  dense               nn.Linear layers, torch.optim.Adam (its default implementation).
  dense, fused Adam   the same with Adam(fused=True), where this torch has it on the CPU; the
                      meProp contenders use it too.
  unified             MePropLinear(k=20, mode="unified") hidden layers.
  per example         MePropLinear(k=20, mode="example") hidden layers.

    python -m sparsebp.bench.torch_meprop --out DIR [--threads 1 2] [--reps 9] [--quick]
"""
from __future__ import annotations

import math
import sys
from typing import List

BATCH, K, STEPS = 32, 20, 20


def _mlp(kind: str, seed: int = 0):
    import torch

    import sparsebp.torch as st

    torch.manual_seed(seed)
    if kind.startswith("dense"):
        def hidden(i, o):
            return torch.nn.Linear(i, o)
    else:
        def hidden(i, o):
            return st.MePropLinear(i, o, k=K, mode="unified" if kind == "unified" else "example")
    return torch.nn.Sequential(hidden(784, 500), torch.nn.ReLU(), hidden(500, 500), torch.nn.ReLU(),
                               torch.nn.Linear(500, 10))


def _fused_adam_on_cpu() -> bool:
    """Whether this torch has Adam(fused=True) for CPU tensors."""
    import torch

    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    try:
        torch.optim.Adam([p], fused=True).step()
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def _optimizers(kind: str, model, fused: bool) -> list:
    """Adam; fused where this torch has it, except for the plain "dense" contender."""
    import torch

    return [torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused and kind != "dense")]


def run_case(reps: int) -> List[dict]:
    import torch

    import sparsebp
    from sparsebp.bench.harness import interleaved_medians

    fused = _fused_adam_on_cpu()
    kinds = ["dense", "dense, fused Adam", "unified", "per example"]
    if not fused:
        kinds.remove("dense, fused Adam")
    models = {k: _mlp(k) for k in kinds}
    opts = {k: _optimizers(k, m, fused) for k, m in models.items()}
    g = torch.Generator().manual_seed(1)
    X = torch.randn(STEPS * BATCH, 784, generator=g)
    y = torch.randint(0, 10, (STEPS * BATCH,), generator=g)

    def steps(k):
        m, os_ = models[k], opts[k]
        for i in range(STEPS):
            for o in os_:
                o.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(X[i * BATCH:(i + 1) * BATCH]), y[i * BATCH:(i + 1) * BATCH]).backward()
            for o in os_:
                o.step()

    med = interleaved_medians({k: (lambda k=k: steps(k)) for k in kinds}, reps=reps, warmup=1)
    base = med["dense"]
    fused = med.get("dense, fused Adam")
    return [dict(case=f"MLP 784-500-500-10, batch {BATCH}, k={K}", threads=sparsebp.get_num_threads(),
                 contender=k, step_ms=1e3 * t / STEPS, speedup=base / t,
                 speedup_vs_fused=(fused / t) if fused else float("nan")) for k, t in med.items()]


def worker(threads: int, quick: bool, reps: int) -> None:
    from sparsebp.bench.harness import emit, worker_setup

    have = worker_setup(threads)
    if not have["torch"]:
        print("torch is not installed: nothing to run", file=sys.stderr)
        return
    emit(run_case(reps))


def report(rows: List[dict]) -> str:
    from sparsebp.bench.harness import machine_header

    lines = ["# meProp MLP training step in PyTorch: speed-up over dense nn.Linear + Adam", ""]
    lines += [f"- {h}" for h in machine_header()] + [""]
    lines += ["| threads | contender | ms per step | speed-up over dense (Adam) | over dense (fused Adam) |",
              "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["threads"]):
        vf = r["speedup_vs_fused"]
        lines.append(f"| {r['threads']} | {r['contender']} | {r['step_ms']:.2f} | {r['speedup']:.2f}x | "
                     f"{'-' if math.isnan(vf) else f'{vf:.2f}x'} |")
    return "\n".join(lines) + "\n"


def run(out_dir: str, quick: bool = False, threads: List[int] | None = None, reps: int | None = None) -> List[dict]:
    from sparsebp.bench.harness import run_and_write

    return run_and_write("sparsebp.bench.torch_meprop", "torch_meprop", report, out_dir, quick, threads, reps,
                         default_reps=9)


def main(argv=None) -> None:
    from sparsebp.bench.harness import bench_main

    bench_main("python -m sparsebp.bench.torch_meprop", worker, run, argv)


if __name__ == "__main__":
    main()
