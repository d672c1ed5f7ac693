"""``sparsebp vrpge``: VR-PGE mask learning on the bundled MNIST digits (no torch needed).

The MLP 784-500-500-10, trained four ways in one run:

- dense: SGD (momentum 0.9, weight decay 5e-4) for ``search + finetune`` epochs;
- VR-PGE at each keep ratio: ``search`` epochs of mask learning (unit masks on both hidden
  layers, one global budget), the best of 10 sampled masks (training accuracy on 3,000 digits),
  then ``finetune`` epochs of the compacted network with the mask frozen;
- a random fixed mask with the same number of kept units per layer, trained for
  ``search + finetune`` epochs (the same number of weight updates).

Reports test accuracy, the realised density of the final mask (kept units / hidden units), how
polarised s is, and the time of a training step against a dense step: a dense model of its own
is stepped on the same batches, in alternating blocks of 8 batches with the timed steps, so the
ratio is measured under the same machine conditions (this machine's speed drifts by tens of
percent over a minute). Writes a markdown table and a CSV.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from . import nn
from .algorithms.vrpge import VRPGE, run_interleaved
from .bench.harness import write_csv
from .datasets import load_mnist

SIZES = (784, 500, 500, 10)


def mlp(seed: int):
    r = np.random.default_rng(seed)
    return nn.Sequential(nn.Linear(784, 500, rng=r), nn.ReLU(), nn.Linear(500, 500, rng=r), nn.ReLU(),
                         nn.Linear(500, 10, rng=r))


def train_plain(model, X, y, epochs, batch, lr, seed, desc, progress, reference=None):
    """SGD (momentum 0.9, weight decay 5e-4); returns the median step time (s), and with
    ``reference`` (a callable f(x, y) run on the same batches in alternating blocks of 8, as
    ``VRPGE.fit`` does) the pair (median step time, median reference time)."""
    from tqdm import tqdm

    one = _sgd_step(model, lr)
    rng = np.random.default_rng(seed)
    steps = len(X) // batch
    times, ref_times = [], []

    def timed(f, idx, into):
        t0 = time.perf_counter()
        f(X[idx], y[idx])
        into.append(time.perf_counter() - t0)

    for e in range(epochs):
        order = rng.permutation(len(X))
        bar = tqdm(total=steps, desc=f"{desc} epoch {e + 1}/{epochs}", leave=False, disable=not progress)

        def step(i):
            timed(one, order[i * batch:(i + 1) * batch], times)
            bar.update(1)

        def ref(i):
            timed(reference, order[i * batch:(i + 1) * batch], ref_times)

        run_interleaved(steps, step, ref if reference is not None else None)
        bar.close()
    med = float(np.median(times)) if times else float("nan")
    if reference is None:
        return med
    return med, float(np.median(ref_times)) if ref_times else float("nan")


def _sgd_step(model, lr: float):
    """One training step of ``model`` (softmax cross-entropy; SGD, momentum 0.9, weight decay 5e-4)
    as a callable f(x, y)."""
    opt = nn.SGD(model.params(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def step(x, y):
        _, g = nn.softmax_cross_entropy(model.forward(x), y)
        model.backward(g)
        opt.step()

    return step


def _dense_step(seed: int, lr: float):
    """A training step of its own dense MLP: the reference a mask-search step is timed against, on
    the same batches and interleaved with it."""
    return _sgd_step(mlp(seed), lr)


def random_units(keep: float, seed: int):
    """Boolean unit masks with round(keep * n) units per hidden layer, uniformly at random."""
    r = np.random.default_rng(seed)
    out = []
    for n in SIZES[1:-1]:
        m = np.zeros(n, dtype=bool)
        m[r.choice(n, max(1, int(round(keep * n))), replace=False)] = True
        out.append(m)
    return out


def _mask_density(vr, mask) -> float:
    """Kept fraction of the masked units (unit masks) or hidden-layer weights (CSR masks)."""
    if vr.granularity == "unit":
        return sum(int(m.sum()) for m in mask) / sum(SIZES[1:-1])
    return sum(len(m[1]) for m in mask) / sum(s.size for s in vr.s)


def learn_mask(X, y, keep: float, seed: int, *, search: int, finetune: int, batch: int, lr: float, lr_s: float,
               granularity: str, progress: bool = False, reference=None):
    """VR-PGE as ``sparsebp vrpge`` runs it: ``search`` epochs of mask learning on ``mlp(seed)``, the
    best of 10 sampled masks (training accuracy on the first 3,000 digits), then ``finetune`` epochs
    of the compacted network. ``reference``: as for ``VRPGE.fit``. Returns (the trainer, the mask,
    the fine-tuned compact model, the search's per-epoch records)."""
    vr = VRPGE(mlp(seed), keep, lr=lr, lr_s=lr_s, seed=seed, granularity=granularity)
    hist = vr.fit(X, y, epochs=search, batch=batch, seed=seed, progress=progress, desc=f"vr-pge {keep}",
                  reference=reference)
    mask, _ = vr.best_mask(X[:3000], y[:3000], samples=10)
    small = vr.compact(mask)
    train_plain(small, X, y, finetune, batch, lr, seed, f"fine-tune {keep}", progress)
    return vr, mask, small, hist


def random_baseline(keep: float, seed: int, granularity: str):
    """The random fixed mask a learned one is compared with, from the same initialisation
    ``mlp(seed)``: ``round(keep * n)`` units per hidden layer, or a Bernoulli(keep) mask per weight
    (the same expected size). Returns (a VRPGE whose ``compact`` applies it, the mask)."""
    if granularity == "unit":
        return VRPGE(mlp(seed), 0.5), random_units(keep, seed + 100)  # the trainer: only its compaction is used
    base = VRPGE(mlp(seed), keep, granularity="weight", seed=seed + 100)
    return base, base.sample()


def run(keeps=(0.5, 0.25, 0.1), seeds=(0, 1, 2), search=5, finetune=5, batch=128, lr=0.05, lr_s=0.2,
        out_dir=None, progress=True, limit=None, granularity="unit"):
    X, y = load_mnist("train", limit=limit)
    Xt, yt = load_mnist("test")
    if out_dir:  # before any training: a folder that cannot be made fails now, not after minutes
        os.makedirs(out_dir, exist_ok=True)
    total = search + finetune
    rows = []

    def add(**kw):
        rows.append(kw)
        print("  " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()),
              flush=True)

    model = mlp(0)
    t_dense = train_plain(model, X, y, total, batch, lr, 0, "dense", progress)
    add(method="dense", keep=1.0, seed=0, test_acc=nn.evaluate(model, Xt, yt), density=1.0, polarised=float("nan"),
        step_ms=1e3 * t_dense, step_vs_dense=1.0, dense_step_ms=1e3 * t_dense)
    for keep in keeps:
        for seed in (seeds if keep == min(keeps) else seeds[:1]):
            ref = _dense_step(seed, lr)  # a dense model stepped on the same batches, interleaved
            vr, mask, small, hist = learn_mask(X, y, keep, seed, search=search, finetune=finetune, batch=batch,
                                               lr=lr, lr_s=lr_s, granularity=granularity, progress=progress,
                                               reference=ref)
            t_step = float(np.median([h["step_s"] for h in hist])) if hist else float("nan")
            t_ref = float(np.median([h["reference_step_s"] for h in hist])) if hist else float("nan")
            # the ratio of each epoch (its steps and its reference steps ran side by side), then the median
            ratio = float(np.median([h["step_s"] / h["reference_step_s"] for h in hist])) if hist else float("nan")
            add(method="vr-pge", keep=keep, seed=seed, test_acc=nn.evaluate(small, Xt, yt),
                density=_mask_density(vr, mask), polarised=vr.polarised(), step_ms=1e3 * t_step,
                step_vs_dense=ratio, dense_step_ms=1e3 * t_ref)
            base, rmask = random_baseline(keep, seed, granularity)
            rnd = base.compact(rmask)
            t_r, t_ref = train_plain(rnd, X, y, total, batch, lr, seed, f"random {keep}", progress,
                                     reference=_dense_step(seed, lr))
            add(method="random", keep=keep, seed=seed, test_acc=nn.evaluate(rnd, Xt, yt),
                density=_mask_density(base, rmask), polarised=float("nan"), step_ms=1e3 * t_r,
                step_vs_dense=t_r / t_ref, dense_step_ms=1e3 * t_ref)
    if out_dir:
        write_csv(os.path.join(out_dir, "vrpge.csv"), rows)
        with open(os.path.join(out_dir, "vrpge.md"), "w") as f:
            f.write(summary(rows, search, finetune, batch))
    print(summary(rows, search, finetune, batch))
    return rows


def summary(rows, search, finetune, batch) -> str:
    dense = next(r for r in rows if r["method"] == "dense")
    lines = [f"VR-PGE on the MNIST MLP 784-500-500-10 (batch {batch}; search {search} epochs + fine-tune {finetune}; "
             f"dense and random masks: {search + finetune} epochs). Means over seeds where there are several. "
             "Step / dense step: against a dense step on the same batches, in alternating blocks of 8 steps "
             "(vr-pge: the median over the search epochs of each epoch's ratio of mean step times).", "",
             "| method | keep | seeds | test acc. | vs dense (points) | realised density | s polarised | "
             "step (ms) | step / dense step |", "|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["keep"]), []).append(r)
    for (method, keep), rs in groups.items():
        acc = float(np.mean([r["test_acc"] for r in rs]))
        pol = float(np.mean([r["polarised"] for r in rs]))
        lines.append(f"| {method} | {keep:g} | {len(rs)} | {acc:.4f} | {100 * (acc - dense['test_acc']):+.2f} | "
                     f"{np.mean([r['density'] for r in rs]):.3f} | {'-' if np.isnan(pol) else f'{pol:.3f}'} | "
                     f"{np.mean([r['step_ms'] for r in rs]):.2f} | {np.mean([r['step_vs_dense'] for r in rs]):.3f} |")
    paired = paired_differences(rows)
    if paired:
        lines += ["", "Learned minus random mask, seed by seed (the same seed's weights initialisation and batches):", "",
                  "| keep | seeds | mean (points) | standard error | learned ahead | tied | random ahead |",
                  "|---|---|---|---|---|---|---|"]
        for keep, d in paired.items():
            se = f"{np.std(d, ddof=1) / np.sqrt(len(d)):.2f}" if len(d) > 1 else "-"
            lines.append(f"| {keep:g} | {len(d)} | {np.mean(d):+.2f} | {se} | {int(np.sum(d > 0))} | "
                         f"{int(np.sum(d == 0))} | {int(np.sum(d < 0))} |")
    return "\n".join(lines) + "\n"


def paired_differences(rows) -> dict:
    """{keep: array of (learned - random) test accuracy in points, one per seed that ran both}, in
    the order the seeds ran. A seed's learned and random runs share the initialisation seed."""
    acc = {(r["method"], r["keep"], r["seed"]): r["test_acc"] for r in rows}
    out = {}
    for (method, keep, seed), a in acc.items():
        if method == "vr-pge" and ("random", keep, seed) in acc:
            out.setdefault(keep, []).append(100.0 * (a - acc[("random", keep, seed)]))
    return {k: np.round(np.array(v), 10) for k, v in out.items()}


def main(argv=None) -> int:
    from ._argtypes import batch_fits, keep_ratio, nonnegative_int, out_folder, positive_float, positive_int

    p = argparse.ArgumentParser(prog="sparsebp vrpge",
                                description="VR-PGE mask learning on the bundled MNIST digits (no torch needed): "
                                            "dense vs learned unit masks vs random masks of the same size.")
    p.add_argument("--keep", type=keep_ratio, nargs="+", default=[0.5, 0.25, 0.1],
                   help="keep ratios (default 0.5 0.25 0.1)")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds at the smallest keep ratio (default 3)")
    p.add_argument("--search", type=nonnegative_int, default=5, help="mask-search epochs (default 5)")
    p.add_argument("--finetune", type=nonnegative_int, default=5, help="fine-tuning epochs (default 5)")
    p.add_argument("--batch", type=positive_int, default=128, help="mini-batch size (default 128)")
    p.add_argument("--lr", type=positive_float, default=0.05, help="SGD learning rate of the weights (default 0.05)")
    p.add_argument("--lr-s", type=positive_float, default=0.2,
                   help="Adam learning rate of s (default 0.2, chosen on held-out training digits: "
                        "python -m sparsebp.bench.vrpge_lr)")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N training digits")
    p.add_argument("--out", default=None, help="folder for vrpge.md and vrpge.csv")
    p.add_argument("--granularity", choices=["unit", "weight"], default="unit",
                   help="unit masks (default; compacted dense products) or one s per weight (CSR kernels)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    batch_fits(p, a.batch, len(load_mnist("train", limit=a.limit)[0]))
    if a.out:
        out_folder(p, "--out", a.out)
    run(tuple(a.keep), tuple(range(a.seeds)), a.search, a.finetune, a.batch, a.lr, a.lr_s, a.out,
        not a.no_progress, a.limit, a.granularity)
    return 0
