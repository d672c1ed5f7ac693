"""Choosing the demo's MSBP memory ratio alpha on held-out training data (never on the test split).

The demo's models (``sparsebp.demo.build``: MLP 784-500-500-10, dropout 0.1, Adam lr 1e-3, batch 32,
k = 20) are trained on the first 11,000 of the 13,000 training digits and scored after every epoch on
the last 2,000 of them (the validation split). alpha = 0 is exactly unified meProp. Each run uses one
thread for sparsebp and NumPy's BLAS; ``--jobs`` runs share the machine (times are not the point).

    python -m sparsebp.bench.msbp_alpha --out DIR [--seeds 0 1 2 3 4] [--alphas 0 0.3 0.5 0.8] [--jobs 2]
                                        [--memory gradient score column ...]

``--memory`` compares readings of MSBP's memory, whose exact equations could not be read here
(ALGORITHMS.md section 3): ``gradient`` is ``sparsebp.algorithms.MSBP`` (the dropped part of the
(batch, out) output gradient, added to the next batch's, row by row); ``score`` keeps alpha times
the unselected columns' scores (sum_b |G[b, j]| plus the memory) and adds them to the next step's
scores, so that often-dropped units get chosen, while G itself is propagated; ``column`` keeps alpha times the
dropped columns' sums (one number per unit) and spreads each evenly over the next batch's rows.
With alpha = 0 each is exactly unified meProp.

Writes DIR/msbp_alpha.csv (one row per model, seed and epoch) and DIR/msbp_alpha.md (the table).
"""
from __future__ import annotations

import argparse
from typing import List

N_FIT = 11000  # training digits used for fitting; the rest of the training split validates


MEMORIES = ("gradient", "score", "column")


def _memory_policy(memory: str, k: int, alpha: float):
    """The policy of one reading of MSBP's memory (see the module's doc)."""
    import numpy as np

    from sparsebp import algorithms as alg
    from sparsebp.sparse_grad import topk_columns

    if memory == "gradient":
        return alg.MSBP(k=k, alpha=alpha)

    class _Memory(alg.SparseGrad):
        mode = "unified"

        def __init__(self):
            super().__init__(k, None)
            self.memory = None

        def clone(self):
            return _memory_policy(memory, k, alpha)

        def select(self, g):
            kk = self.k_for(g.shape[1])
            fresh = self.memory is None or self.memory.shape[0] != g.shape[1]
            if memory == "score":
                scores = np.abs(g).sum(axis=0, dtype=np.float32)
                if not fresh:
                    scores += self.memory
                cols = topk_columns(scores[None, :], kk)
                self.memory = np.float32(alpha) * scores
                self.memory[cols] = 0.0
                return alg.Selection("unified", cols, g)
            u = g if fresh else g + (self.memory / np.float32(g.shape[0]))[None, :]
            cols = topk_columns(u, kk)
            self.memory = np.float32(alpha) * u.sum(axis=0, dtype=np.float32)
            self.memory[cols] = 0.0
            return alg.Selection("unified", cols, u)

    return _Memory()


def _train(job) -> List[dict]:
    kind, alpha, seed, epochs = job[:4]
    memory = job[4] if len(job) > 4 else "gradient"
    from sparsebp import demo, nn
    from sparsebp.datasets import load_mnist

    X, y = load_mnist("train")
    model = demo.build(kind, 20, 0.9, alpha, seed, 0.1)
    if kind == "msbp" and memory != "gradient":  # the same model, another reading of the memory
        for layer in model.layers:
            if getattr(layer, "policy", None) is not None:
                layer.policy = _memory_policy(memory, 20, alpha)
    opt = nn.Adam(model.params(), lr=1e-3)
    recs = nn.fit_epochs(model, opt, X[:N_FIT], y[:N_FIT], epochs=epochs, batch=32, X_test=X[N_FIT:],
                         y_test=y[N_FIT:], seed=seed, progress=False)
    name = "dense" if kind == "dense" else f"alpha={alpha:g}" + ("" if memory == "gradient" else f", {memory} memory")
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
    p.add_argument("--memory", choices=MEMORIES, nargs="+", default=["gradient"],
                   help="readings of MSBP's memory to compare (default: gradient, sparsebp.algorithms.MSBP)")
    a = p.parse_args(argv)
    seeds, alphas = list(dict.fromkeys(a.seeds)), list(dict.fromkeys(a.alphas))  # a repeat would mix curves
    jobs = [("meprop-unified", 0.0, s, a.epochs) for s in seeds] if 0.0 in alphas else []
    jobs += [("msbp", x, s, a.epochs, mem) for mem in dict.fromkeys(a.memory) for x in alphas if x > 0
             for s in seeds]
    if not a.no_dense:
        jobs += [("dense", 0.0, s, a.epochs) for s in seeds]
    from sparsebp.bench.harness import run_study

    run_study(_train, jobs, a.jobs, a.out, "msbp_alpha", lambda rows: report(rows, a.epochs))


if __name__ == "__main__":
    main()
