"""``sparsebp demo``: the meProp paper's MLP (784-500-500-10, Adam) on the bundled MNIST digits,
trained densely and with sparse gradients / sparse weights, with the NumPy path (no torch needed).
Prints a table of test accuracy and time per epoch and writes a PNG of the learning curves. The
models train epoch by epoch in turn, so that their times are compared under the same conditions."""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional

import numpy as np

from . import algorithms as alg
from . import nn
from .datasets import load_mnist

HIDDEN = 500
QUICK_TRAIN = 2000  # training digits of a --quick run


def build(kind: str, k: int, sparsity: float, alpha: float, seed: int, dropout: float = 0.0) -> nn.Sequential:
    """The MLP 784-500-500-10 of one demo model; ``dropout`` after each hidden ReLU (0: none)."""
    rng = np.random.default_rng(seed)
    if kind == "dense":
        pol = None
    elif kind in ("meprop", "sparse+meprop"):
        pol = alg.MeProp(k=k, mode="example")
    elif kind == "meprop-unified":
        pol = alg.MeProp(k=k, mode="unified")
    elif kind == "msbp":
        pol = alg.MSBP(k=k, alpha=alpha)
    else:
        raise ValueError(f"unknown model kind {kind!r}")

    def hidden(n_in: int):
        # Hidden layers take the policy; the output layer stays dense (as in the authors' code).
        lin = (nn.SparseLinear(n_in, HIDDEN, sparsity, grad=pol, rng=rng) if kind == "sparse+meprop"
               else nn.Linear(n_in, HIDDEN, grad=pol, rng=rng))
        return [lin, nn.ReLU()] + ([nn.Dropout(dropout, rng=rng)] if dropout > 0 else [])

    return nn.Sequential(*hidden(784), *hidden(HIDDEN), nn.Linear(HIDDEN, 10, rng=rng))


def _torch_dense(X, y, Xt, yt, epochs, batch, lr, seed, progress, optimizer, dropout=0.0):
    """The same MLP dense in PyTorch: an iterator of per-epoch records, as ``nn.fit_epochs``."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(seed)
    drop = [torch.nn.Dropout(dropout)] if dropout > 0 else []
    model = torch.nn.Sequential(torch.nn.Linear(784, HIDDEN), torch.nn.ReLU(), *drop, torch.nn.Linear(HIDDEN, HIDDEN),
                                torch.nn.ReLU(), *drop, torch.nn.Linear(HIDDEN, 10))
    opt = (torch.optim.Adam(model.parameters(), lr=lr) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    tX, ty, tXt, tyt = map(torch.from_numpy, (X, y, Xt, yt))
    rng = np.random.default_rng(seed)
    steps = len(X) // batch
    for e in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(X)))
        tf = tb = tu = 0.0
        losses = []
        for s in tqdm(range(steps), desc=f"dense torch epoch {e + 1}/{epochs}", leave=False, disable=not progress):
            idx = order[s * batch:(s + 1) * batch]
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(tX[idx]), ty[idx])
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            tf, tb, tu = tf + t1 - t0, tb + t2 - t1, tu + t3 - t2
            losses.append(float(loss.detach()))
        model.eval()
        with torch.no_grad():
            acc = float((model(tXt).argmax(1) == tyt).double().mean())
        yield dict(epoch=e + 1, loss=float(np.mean(losses)), forward_s=tf, backward_s=tb, update_s=tu,
                   total_s=tf + tb + tu, test_acc=acc)


def run(epochs: int = 20, batch: int = 32, k: int = 20, sparsity: float = 0.9, alpha: float = 0.5,
        lr: Optional[float] = None, seed: int = 0, out: Optional[str] = "demo-results", quick: bool = False,
        progress: bool = True, with_torch: Optional[bool] = None, optimizer: str = "adam",
        dropout: float = 0.1, save_models: bool = False) -> Dict[str, List[dict]]:
    """Trains every model and prints the table. ``optimizer``: "adam" (the paper's; lr 1e-3) or
    "sgd" (momentum 0.9; lr 0.05). ``dropout``: after each hidden ReLU, in every model (0.1, as in
    the meProp authors' PyTorch code; 0 for none). ``alpha``: the MSBP model's memory ratio, 0.5 by
    default: chosen on held-out training digits, never the test split (``sparsebp.bench.msbp_alpha``;
    the MSBP paper's 0.8 was 0.4-0.5 points below unified meProp there). Returns each model's
    per-epoch history. ``save_models``: also write each NumPy model, trained, to
    ``out/<kind>.safetensors`` (``sparsebp.nn.load`` reads it back)."""
    if save_models and not out:
        raise ValueError("save_models needs an out folder to write the models to")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd'; got {optimizer!r}")
    dropout = nn._fraction(dropout, "dropout")
    lr = (1e-3 if optimizer == "adam" else 0.05) if lr is None else float(lr)
    X, y = load_mnist("train")
    Xt, yt = load_mnist("test")
    if quick:
        X, y, Xt, yt = X[:QUICK_TRAIN], y[:QUICK_TRAIN], Xt[:500], yt[:500]
    if out:  # before any training: a folder that cannot be made fails now, not after minutes
        os.makedirs(out, exist_ok=True)
    print(f"MNIST (bundled with sparsebp; LeCun, Cortes and Burges): {len(X)} training, {len(Xt)} test digits. "
          f"MLP 784-{HIDDEN}-{HIDDEN}-10, {'Adam' if optimizer == 'adam' else 'SGD (momentum 0.9)'} lr {lr}, "
          f"batch {batch}, dropout {dropout:g}, {epochs} epoch(s), seed {seed}.")
    runs = [("dense (NumPy)", "dense"), (f"meProp k={k}", "meprop"), (f"meProp k={k} unified", "meprop-unified"),
            (f"MSBP k={k}, alpha={alpha}", "msbp"),
            (f"sparse {sparsity:.0%} + meProp k={k}", "sparse+meprop")]
    # Every model trains epoch by epoch in turn (the order rotating each epoch), so their times
    # are measured under the same machine conditions: this machine's speed drifts by tens of
    # percent over a minute, and one model's 5 epochs take several seconds.
    epochs_of, models = {}, {}
    for name, kind in runs:
        model = models[kind] = build(kind, k, sparsity, alpha, seed, dropout)
        opt = nn.Adam(model.params(), lr=lr) if optimizer == "adam" else nn.SGD(model.params(), lr=lr, momentum=0.9)
        epochs_of[name] = nn.fit_epochs(model, opt, X, y, epochs=epochs, batch=batch, X_test=Xt, y_test=yt,
                                        seed=seed, desc=name, progress=progress)
    if with_torch is None:
        try:
            import torch  # noqa: F401

            with_torch = True
        except ImportError:
            with_torch = False
    if with_torch:
        epochs_of["dense (torch)"] = _torch_dense(X, y, Xt, yt, epochs, batch, lr, seed, progress, optimizer,
                                                     dropout)
    names = list(epochs_of)
    results: Dict[str, List[dict]] = {name: [] for name in names}
    for e in range(epochs):
        for i in range(len(names)):
            name = names[(i + e) % len(names)]
            results[name].append(next(epochs_of[name]))
    for name in names:
        if results[name]:
            print(f"  {name:32s} test accuracy {results[name][-1]['test_acc']:.4f}, "
                  f"{np.median([h['total_s'] for h in results[name]]):.2f} s/epoch")
    print()
    print(table(results))
    if out:
        _write_csv(os.path.join(out, "demo.csv"), results)
        png = _plot(os.path.join(out, "demo.png"), results)
        print(f"wrote {out}/demo.csv" + (f" and {png}" if png else " (matplotlib not installed: no PNG)"))
    if save_models:
        for kind, model in models.items():
            nn.save(model, os.path.join(out, f"{kind}.safetensors"))
        print(f"wrote the trained models to {out}/<model>.safetensors ({', '.join(models)}; sparsebp.nn.load reads them)")
    return results


def table(results: Dict[str, List[dict]]) -> str:
    base = results["dense (NumPy)"]
    med = lambda h, key: float(np.median([r[key] for r in h]))  # noqa: E731
    dense_total = med(base, "total_s")
    dense_acc = base[-1]["test_acc"]
    lines = ["| model | test acc. | vs dense (points) | forward s/epoch | backward s/epoch | update s/epoch | "
             "total s/epoch | speed-up (total) | speed-up (backward) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, h in results.items():
        lines.append(f"| {name} | {h[-1]['test_acc']:.4f} | {100 * (h[-1]['test_acc'] - dense_acc):+.2f} | "
                     f"{med(h, 'forward_s'):.2f} | {med(h, 'backward_s'):.2f} | {med(h, 'update_s'):.2f} | "
                     f"{med(h, 'total_s'):.2f} | {dense_total / med(h, 'total_s'):.2f}x | "
                     f"{med(base, 'backward_s') / med(h, 'backward_s'):.2f}x |")
    lines.append("")
    lines.append("Speed-ups are over the dense NumPy path (the same code with dense gradients); medians over epochs.")
    return "\n".join(lines)


def _write_csv(path: str, results: Dict[str, List[dict]]) -> None:
    from .bench.harness import write_csv

    keys = ["epoch", "loss", "test_acc", "forward_s", "backward_s", "update_s", "total_s"]
    write_csv(path, [{"model": name, **{k: r[k] for k in keys}} for name, h in results.items() for r in h])


def _plot(path: str, results: Dict[str, List[dict]]) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, h in results.items():
        ep = [r["epoch"] for r in h]
        ax[0].plot(ep, [r["loss"] for r in h], marker="o", label=name)
        ax[1].plot(ep, [100 * r["test_acc"] for r in h], marker="o", label=name)
    ax[0].set(xlabel="epoch", ylabel="training loss", title="Training loss")
    ax[1].set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy (2,000 held-out digits)")
    for a in ax:
        a.grid(alpha=0.3)
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
