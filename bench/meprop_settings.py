"""Per-example meProp under the training settings of the meProp paper's own code.

The demo trains with batch 32 and dropout 0.1 (the authors' PyTorch code), the initialisation of
``sparsebp.nn.Linear`` (uniform in +-1/sqrt(in), as torch) and sparsebp's Adam, which moves only the
rows a step's gradient touches. The C# code behind the paper's MNIST figures (lancopku/meProp,
``meprop (CSharp)``, read for its settings only) differs in four ways: batch 10 (the mean gradient),
an Adam whose every moment decays and moves its weight at every step (as ``torch.optim.Adam``),
Glorot-normal weights with zero biases, no dropout; it also clips each gradient entry to +-5. This
study trains per-example meProp (k = 20) and dense under each named setting, with the demo's MLP
and data, and scores both on the test split after every epoch. Nothing is chosen from it: the
demo's settings stay as they are. Each run uses one thread for sparsebp and NumPy's BLAS; ``--jobs``
runs share the machine (times are not the point).

    python -m sparsebp.bench.meprop_settings --out DIR [--seeds 0 1 2] [--epochs 20] [--jobs 2]
                                             [--settings NAME ...]

Writes DIR/meprop_settings.csv (one row per setting, model, seed and epoch) and
DIR/meprop_settings.md (the table).
"""
from __future__ import annotations

import argparse
from typing import List

# name: (batch, Adam on every row, Glorot init + zero bias, dropout, element-wise clip)
SETTINGS = {
    "demo (batch 32)": (32, False, False, 0.1, None),
    "batch 10": (10, False, False, 0.1, None),
    "batch 10, Adam on every row": (10, True, False, 0.1, None),
    "batch 10, no dropout": (10, False, False, 0.0, None),
    "the paper's C# settings": (10, True, True, 0.0, 5.0),
}


def _dense_key(setting: str) -> tuple:
    """What a dense run depends on: every setting but Adam's row rule, which changes nothing for
    dense (every row has a gradient). Settings with the same key share one dense run."""
    batch, _every_row, glorot, dropout, clip = SETTINGS[setting]
    return batch, glorot, dropout, clip


def _optimizer(params, every_row: bool, clip):
    import numpy as np

    from sparsebp import nn

    class StudyAdam(nn.Adam):
        """nn.Adam, optionally on every row (a touched-rows gradient made dense: the other rows'
        moments decay and move them, as in the paper's C# and torch.optim.Adam), optionally with
        each gradient entry clipped to +-clip first."""

        def step(self) -> None:
            for p in self.params:
                if p.grad is None:
                    continue
                if every_row and p.rows is not None:
                    p.grad, p.rows = p.dense_grad(), None
                if clip is not None:
                    p.grad = np.clip(p.grad, -clip, clip)
            super().step()

    return StudyAdam(params, lr=1e-3)


def _glorot(model, seed: int) -> None:
    import numpy as np

    from sparsebp import nn

    rng = np.random.default_rng([seed, 1])
    for layer in model.layers:
        if isinstance(layer, nn.Linear):
            out_f, in_f = layer.weight.data.shape
            layer.weight.data[...] = rng.normal(0.0, np.sqrt(2.0 / (in_f + out_f)), (out_f, in_f))
            if layer.bias is not None:
                layer.bias.data[...] = 0.0


def _train(job) -> List[dict]:
    setting, kind, seed, epochs = job
    batch, every_row, glorot, dropout, clip = SETTINGS[setting]
    from sparsebp import demo, nn
    from sparsebp.datasets import load_mnist

    X, y = load_mnist("train")
    Xt, yt = load_mnist("test")
    model = demo.build(kind, 20, 0.9, 0.5, seed, dropout)
    if glorot:
        _glorot(model, seed)
    opt = _optimizer(model.params(), every_row, clip)
    recs = nn.fit_epochs(model, opt, X, y, epochs=epochs, batch=batch, X_test=Xt, y_test=yt, seed=seed,
                         progress=False)
    name = "dense" if kind == "dense" else "meProp k=20 per example"
    return [dict(setting=setting, model=name, seed=seed, epoch=r["epoch"], loss=float(r["loss"]),
                 test_acc=float(r["test_acc"])) for r in recs]


def _jobs(seeds, epochs, settings=None) -> list:
    jobs, dense_done = [], set()
    for setting in settings or list(SETTINGS):
        for s in seeds:
            jobs.append((setting, "meprop", s, epochs))
        key = _dense_key(setting)  # one dense run per key
        if key not in dense_done:
            dense_done.add(key)
            jobs += [(setting, "dense", s, epochs) for s in seeds]
    return jobs


def report(rows: List[dict], epochs: int) -> str:
    import numpy as np

    seeds = sorted(set(r["seed"] for r in rows))

    def curve(setting, model, s):
        rs = sorted((r for r in rows if r["setting"] == setting and r["model"] == model and r["seed"] == s),
                    key=lambda r: r["epoch"])
        return np.array([r["test_acc"] for r in rs]) * 100, np.array([r["loss"] for r in rs])

    def dense_of(setting):
        for other in SETTINGS:
            if _dense_key(other) == _dense_key(setting) and any(
                    r["setting"] == other and r["model"] == "dense" for r in rows):
                return other
        return None

    lines = [f"Test accuracy (2,000 digits), mean over seeds {', '.join(map(str, seeds))}; per-example meProp "
             "k = 20 in points against dense trained with the same setting and seeds.", "",
             f"| setting | dense after {epochs} epochs, % | meProp after {epochs} | per seed | "
             f"meProp, mean over epochs {max(1, epochs - 2)}-{epochs} | meProp's first-epoch loss (dense) |",
             "|---|---|---|---|---|---|"]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        if not any(r["setting"] == setting and r["model"] != "dense" for r in rows):
            continue
        ds = dense_of(setting)
        if ds is None:
            continue
        mp = [curve(setting, "meProp k=20 per example", s) for s in seeds]
        dn = [curve(ds, "dense", s) for s in seeds]
        d_final = [m[0][-1] - d[0][-1] for m, d in zip(mp, dn)]
        d_last3 = [m[0][-3:].mean() - d[0][-3:].mean() for m, d in zip(mp, dn)]
        lines.append(f"| {setting} | {np.mean([d[0][-1] for d in dn]):.2f} | {np.mean(d_final):+.2f} | "
                     + ", ".join(f"{v:+.2f}" for v in d_final)
                     + f" | {np.mean(d_last3):+.2f} | {np.mean([m[1][0] for m in mp]):.2f} "
                     f"({np.mean([d[1][0] for d in dn]):.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from sparsebp._argtypes import nonnegative_int, positive_int

    p = argparse.ArgumentParser(prog="python -m sparsebp.bench.meprop_settings", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for meprop_settings.csv and meprop_settings.md")
    p.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("--jobs", type=positive_int, default=2, help="processes side by side (default 2)")
    p.add_argument("--settings", choices=list(SETTINGS), nargs="+", default=list(SETTINGS),
                   help="which settings to run (default: all)")
    a = p.parse_args(argv)
    seeds = list(dict.fromkeys(a.seeds))
    from sparsebp.bench.harness import run_study

    jobs = _jobs(seeds, a.epochs, list(dict.fromkeys(a.settings)))
    run_study(_train, jobs, a.jobs, a.out, "meprop_settings", lambda rows: report(rows, a.epochs))


if __name__ == "__main__":
    main()
