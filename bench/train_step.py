"""End-to-end training step of the example CNN (sparsebp.torch.models.SmallResNet on 1x28x28
digits, batch 64): zero_grad, forward, cross-entropy, backward, SGD-with-momentum step, for the
dense model in torch and for the same model with its residual-block convolutions pruned to each
sparsity, run by sparsebp and by SparseProp (when installed), interleaved in one process, medians.

Contenders
  dense           the torch model, input (N, 1, 28, 28) contiguous.
  sparsebp        sparsebp.torch.sparsify(..., layers=SmallResNet.prunable) and model.layout =
                  BatchInner() (activations batch-innermost after the dense stem).
  sparseprop      sparseprop.utils.swap_modules_with_sparse on the pruned dense model (it keeps a
                  layer dense where its own timing says dense is faster).
"""
from __future__ import annotations

import copy
import sys
import warnings
from typing import List

SPARSITIES = [0.9, 0.95]
BATCH = 64
BAR = {0.95: 2.0}


def run_case(sparsity: float, reps: int, have_sp: bool) -> List[dict]:
    import torch

    import sparsebp
    import sparsebp.torch as st
    from sparsebp.bench.harness import interleaved_medians
    from sparsebp.torch.models import SmallResNet

    torch.manual_seed(0)
    dense = SmallResNet()
    sparse = copy.deepcopy(dense)
    st.sparsify(sparse, sparsity, layers=SmallResNet.prunable)
    sparse.layout = st.BatchInner()
    with torch.no_grad():  # the dense contender runs the same pruned weights
        for name, mod in sparse.named_modules():
            if isinstance(mod, st.SparseConv2d):
                dense.get_submodule(name).weight.copy_(mod.weight)
    x = torch.randn(BATCH, 1, 28, 28)
    y = torch.randint(0, 10, (BATCH,))
    with torch.no_grad():
        ref = dense(x)
        err = float((sparse(x) - ref).abs().max() / (ref.abs().max() + 1))
    if not err < 1e-4:
        raise AssertionError(f"sparse model disagrees with the dense one: {err:.2e}")

    models = {"dense": dense, "sparsebp": sparse}
    if have_sp:
        from sparseprop.utils import swap_modules_with_sparse

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models["sparseprop"] = swap_modules_with_sparse(copy.deepcopy(dense), (BATCH, 1, 28, 28), inplace=False)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}

    def step(k):
        m, o = models[k], opts[k]
        o.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    med = interleaved_medians({k: (lambda k=k: step(k)) for k in models}, reps=reps, warmup=2)
    dense_t = med["dense"]
    return [dict(case=f"SmallResNet step, batch {BATCH}", batch=BATCH, sparsity=sparsity,
                 threads=sparsebp.get_num_threads(), contender=name, time_ms=t * 1e3, speedup=dense_t / t,
                 isa=sparsebp.active_isa()) for name, t in med.items()]


def worker(threads: int, quick: bool, reps: int) -> None:
    from tqdm import tqdm

    from sparsebp.bench.harness import emit, worker_setup

    have = worker_setup(threads)
    for s in tqdm([0.95] if quick else SPARSITIES, desc=f"training step, {threads} thread(s)", file=sys.stderr):
        emit(run_case(s, reps, have["sparseprop"]))


def report(rows: List[dict]) -> str:
    from sparsebp.bench.harness import machine_header

    lines = ["# End-to-end training step of the example CNN: speed-up over dense torch", ""]
    lines += [f"- {h}" for h in machine_header()] + [""]
    names = [c for c in ("sparsebp", "sparseprop") if any(r["contender"] == c for r in rows)]
    lines.append("| model | threads | sparsity | dense ms | " + " | ".join(f"{c} ms" for c in names) + " | "
                 + " | ".join(names) + " | bar |")
    lines.append("|---|---|---|---|" + "---|" * (2 * len(names)) + "---|")
    keys = sorted({(r["case"], r["threads"], r["sparsity"]) for r in rows})
    for k in keys:
        sel = {r["contender"]: r for r in rows if (r["case"], r["threads"], r["sparsity"]) == k}
        bar = BAR.get(k[2])
        ms = [f"{sel[c]['time_ms']:.1f}" if c in sel else "-" for c in names]
        sp = [f"{sel[c]['speedup']:.2f}x" if c in sel else "-" for c in names]
        verdict = "-" if bar is None else (f"{bar}x {'met' if sel['sparsebp']['speedup'] >= bar else 'MISSED'}")
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {sel['dense']['time_ms']:.1f} | " + " | ".join(ms) + " | "
                     + " | ".join(sp) + f" | {verdict} |")
    return "\n".join(lines) + "\n"


def run(out_dir: str, quick: bool = False, threads: List[int] | None = None, reps: int | None = None) -> List[dict]:
    from sparsebp.bench.harness import run_and_write

    return run_and_write("sparsebp.bench.train_step", "train_step", report, out_dir, quick, threads, reps,
                         default_reps=9)


def main(argv=None) -> None:
    from sparsebp.bench.harness import bench_main

    bench_main("python -m sparsebp.bench.train_step", worker, run, argv)


if __name__ == "__main__":
    main()
