"""Choosing ``sparsebp vrpge``'s learning rate of the mask probabilities s on held-out training data
(never on the test split).

The runs are those of ``sparsebp vrpge`` (MLP 784-500-500-10, batch 128, SGD on the weights at lr
0.05, Adam on s; ``search`` epochs of mask learning, the best of 10 sampled masks, ``finetune``
epochs with the mask frozen; a random fixed mask of the same size trained ``search + finetune``
epochs from the same initialisation), but they fit on the first 11,000 of the 13,000 training
digits and are scored on the last 2,000 (the validation split). Each run uses one thread for
sparsebp and NumPy's BLAS; ``--jobs`` runs share the machine, so the step times in the table are
only comparable with each other.

    python -m sparsebp.bench.vrpge_lr --out DIR [--keeps 0.5 0.25 0.1] [--lrs 0.02 0.05 0.1 0.2 0.5]
                                      [--seeds 0 1 2 3 4] [--granularity unit|weight] [--jobs 2]

Writes DIR/vrpge_lr.csv (one row per run) and DIR/vrpge_lr.md (the table).
"""
from __future__ import annotations

import argparse
from typing import List

N_FIT = 11000  # training digits used for fitting; the rest of the training split validates


def _run(job) -> dict:
    method, keep, lr_s, seed, search, finetune, granularity = job
    import numpy as np

    from sparsebp import nn
    from sparsebp.datasets import load_mnist
    from sparsebp.vrpge_demo import learn_mask, random_baseline, train_plain

    X, y = load_mnist("train")
    Xv, yv = X[N_FIT:], y[N_FIT:]
    X, y = X[:N_FIT], y[:N_FIT]
    row = dict(method=method, granularity=granularity, keep=keep, lr_s=lr_s, seed=seed)
    if method == "random":  # sparsebp vrpge's random baseline
        base, mask = random_baseline(keep, seed, granularity)
        model = base.compact(mask)
        t = train_plain(model, X, y, search + finetune, 128, 0.05, seed, "random", False)
        return dict(row, val_acc=float(nn.evaluate(model, Xv, yv)), polarised=float("nan"), step_ms=1e3 * t)
    vr, _, model, hist = learn_mask(X, y, keep, seed, search=search, finetune=finetune, batch=128, lr=0.05,
                                    lr_s=lr_s, granularity=granularity)
    step = float(np.median([h["step_s"] for h in hist])) if hist else float("nan")
    return dict(row, val_acc=float(nn.evaluate(model, Xv, yv)), polarised=float(vr.polarised()), step_ms=1e3 * step)


def report(rows: List[dict]) -> str:
    """One line per keep ratio and learning rate: mean validation accuracy over the seeds, and the
    learned mask minus the random one seed by seed (mean, standard error, how many seeds ahead)."""
    import numpy as np

    random = {(r["keep"], r["seed"]): r["val_acc"] for r in rows if r["method"] == "random"}
    keeps = sorted({r["keep"] for r in rows}, reverse=True)
    lines = ["Validation accuracy (%; the last 2,000 training digits), mean over seeds; learned minus random: "
             "the same seed's learned and random masks (same initialisation and batches), in points.", "",
             "| keep | lr of s | seeds | val. acc. | learned - random | standard error | learned ahead / seeds | "
             "s polarised | search step (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for keep in keeps:
        learned = [r for r in rows if r["method"] == "vr-pge" and r["keep"] == keep]
        for lr in sorted({r["lr_s"] for r in learned}):
            rs = sorted((r for r in learned if r["lr_s"] == lr), key=lambda r: r["seed"])
            d = np.array([100 * (r["val_acc"] - random[(keep, r["seed"])]) for r in rs
                          if (keep, r["seed"]) in random])
            diff = f"{d.mean():+.2f}" if d.size else "-"
            se = f"{d.std(ddof=1) / np.sqrt(d.size):.2f}" if d.size > 1 else "-"
            ahead = f"{int((d > 0).sum())} / {d.size}" if d.size else "-"
            lines.append(f"| {keep:g} | {lr:g} | {len(rs)} | {100 * np.mean([r['val_acc'] for r in rs]):.2f} | "
                         f"{diff} | {se} | {ahead} | {np.mean([r['polarised'] for r in rs]):.3f} | "
                         f"{np.median([r['step_ms'] for r in rs]):.2f} |")
        rnd = [v for (k, _), v in random.items() if k == keep]
        if rnd:
            lines.append(f"| {keep:g} | random mask | {len(rnd)} | {100 * np.mean(rnd):.2f} | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from sparsebp._argtypes import keep_ratio, nonnegative_int, positive_float, positive_int

    p = argparse.ArgumentParser(prog="python -m sparsebp.bench.vrpge_lr", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for vrpge_lr.csv and vrpge_lr.md")
    p.add_argument("--keeps", type=keep_ratio, nargs="+", default=[0.5, 0.25, 0.1])
    p.add_argument("--lrs", type=positive_float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.5],
                   help="Adam learning rates of s to compare")
    p.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--search", type=nonnegative_int, default=5, help="mask-search epochs (default 5)")
    p.add_argument("--finetune", type=nonnegative_int, default=5, help="fine-tuning epochs (default 5)")
    p.add_argument("--granularity", choices=["unit", "weight"], default="unit")
    p.add_argument("--jobs", type=positive_int, default=2, help="processes side by side (default 2)")
    a = p.parse_args(argv)
    keeps, lrs, seeds = (list(dict.fromkeys(v)) for v in (a.keeps, a.lrs, a.seeds))  # a repeat would be run twice
    g = a.granularity
    jobs = [("random", k, float("nan"), s, a.search, a.finetune, g) for k in keeps for s in seeds]
    jobs += [("vr-pge", k, lr, s, a.search, a.finetune, g) for k in keeps for lr in lrs for s in seeds]
    from sparsebp.bench.harness import run_study

    run_study(_run, jobs, a.jobs, a.out, "vrpge_lr", report)


if __name__ == "__main__":
    main()
