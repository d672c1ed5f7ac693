"""Choosing the demo's MSBP memory ratio alpha on held-out training data (never on the test split).

The demo's models (``sparsebp.demo.build``: MLP 784-500-500-10, dropout 0.1, Adam lr 1e-3, batch 32,
k = 20) are trained on the first 11,000 of the 13,000 training digits and scored after every epoch on
the last 2,000 of them (the validation split). alpha = 0 is exactly unified meProp. Each run uses one
thread for sparsebp and NumPy's BLAS; ``--jobs`` runs share the machine (times are not the point).

    python -m sparsebp.bench.msbp_alpha --out DIR [--seeds 0 1 2 3 4] [--alphas 0 0.3 0.5 0.8] [--jobs 2]

Writes DIR/msbp_alpha.csv (one row per model, seed and epoch) and DIR/msbp_alpha.md (the table).
"""
from __future__ import annotations

import argparse
from typing import List

N_FIT = 11000  # training digits used for fitting; the rest of the training split validates


def _train(job) -> List[dict]:
    kind, alpha, seed, epochs = job
    from sparsebp import demo, nn
    from sparsebp.datasets import load_mnist

    X, y = load_mnist("train")
    model = demo.build(kind, 20, 0.9, alpha, seed, 0.1)
    opt = nn.Adam(model.params(), lr=1e-3)
    recs = nn.fit_epochs(model, opt, X[:N_FIT], y[:N_FIT], epochs=epochs, batch=32, X_test=X[N_FIT:],
                         y_test=y[N_FIT:], seed=seed, progress=False)
    name = "dense" if kind == "dense" else f"alpha={alpha:g}"
    return [dict(model=name, alpha=alpha if kind != "dense" else float("nan"), seed=seed, epoch=r["epoch"],
                 val_acc=float(r["test_acc"])) for r in recs]


def report(rows: List[dict], epochs: int) -> str:
    import numpy as np

    models = list(dict.fromkeys(r["model"] for r in rows))
    seeds = sorted(set(r["seed"] for r in rows))

    def curve(m, s):
        return np.array([r["val_acc"] for r in sorted((r for r in rows if r["model"] == m and r["seed"] == s),
                                                      key=lambda r: r["epoch"])])

    measures = {
        f"after {epochs} epochs": lambda c: c[-1],
        f"mean over epochs {max(1, epochs - 2)}-{epochs}": lambda c: c[-3:].mean(),
        "best epoch": lambda c: c.max(),
    }
    if epochs > 10:
        measures["after 10 epochs"] = lambda c: c[9]
    base = "alpha=0" if "alpha=0" in models else None
    lines = [f"Validation accuracy (%), mean over seeds {', '.join(map(str, seeds))}; in brackets: points "
             f"against alpha = 0 (unified meProp), the same seeds.", "",
             "| model | " + " | ".join(measures) + " |", "|---|" + "---|" * len(measures)]
    for m in models:
        cells = []
        for fn in measures.values():
            v = np.mean([fn(curve(m, s)) for s in seeds]) * 100
            cell = f"{v:.2f}"
            if base and m != base:
                d = v - np.mean([fn(curve(base, s)) for s in seeds]) * 100
                cell += f" ({d:+.2f})"
            cells.append(cell)
        label = "alpha = 0 (unified meProp)" if m == base else m.replace("alpha=", "MSBP alpha = ")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from sparsebp._argtypes import fraction, nonnegative_int, positive_int

    p = argparse.ArgumentParser(prog="python -m sparsebp.bench.msbp_alpha", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for msbp_alpha.csv and msbp_alpha.md")
    p.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--alphas", type=fraction, nargs="+", default=[0.0, 0.3, 0.5, 0.8])
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("--jobs", type=positive_int, default=2, help="processes side by side (default 2)")
    p.add_argument("--no-dense", action="store_true", help="leave out the dense reference")
    a = p.parse_args(argv)
    seeds, alphas = list(dict.fromkeys(a.seeds)), list(dict.fromkeys(a.alphas))  # a repeat would mix curves
    jobs = [("msbp" if x > 0 else "meprop-unified", x, s, a.epochs) for x in alphas for s in seeds]
    if not a.no_dense:
        jobs += [("dense", 0.0, s, a.epochs) for s in seeds]
    from sparsebp.bench.harness import run_study

    run_study(_train, jobs, a.jobs, a.out, "msbp_alpha", lambda rows: report(rows, a.epochs))


if __name__ == "__main__":
    main()
