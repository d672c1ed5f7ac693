"""Fine-tuning a pruned checkpoint with sparsebp, against the dense model trained in the same run.

1. A small ResNet-style CNN (sparsebp.torch.models.SmallResNet) is pretrained densely on the first
   part of the bundled MNIST training digits.
2. For each sparsity, a copy is magnitude-pruned with torch.nn.utils.prune (the residual-block
   convolutions, layer by layer, gradually with short recoveries on the pretraining digits) and
   saved as an ordinary pruned checkpoint (weight_orig + weight_mask).
3. A fresh model loads that checkpoint with sparsebp.torch.from_pruned (the exact mask becomes
   sparse layers) and is fine-tuned on the rest of the training digits.
4. The same pretrained model is fine-tuned densely in torch on the same data, same optimizer,
   same batches (AdamW).
Reported: test accuracy before and after fine-tuning and the time per epoch.

    python examples/transfer_learning.py                 # about 3-5 minutes on 2 cores
    python examples/transfer_learning.py --quick         # a few batches, for a smoke test
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import prune
from tqdm import tqdm

import sparsebp
import sparsebp.torch as st
from sparsebp.datasets import load_mnist
from sparsebp.torch.models import SmallResNet


def batches(X, y, batch, rng, limit=None):
    order = rng.permutation(len(X))
    steps = len(X) // batch
    if limit is not None:
        steps = min(steps, limit)
    for i in range(steps):
        idx = order[i * batch:(i + 1) * batch]
        yield X[idx], y[idx]


def train_epoch(model, opt, X, y, batch, seed, desc, limit=None):
    model.train()
    rng = np.random.default_rng(seed)
    steps = len(X) // batch if limit is None else min(len(X) // batch, limit)
    t0 = time.perf_counter()
    for xb, yb in tqdm(batches(X, y, batch, rng, limit), total=steps, desc=desc, leave=False, file=sys.stderr):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


@torch.no_grad()
def accuracy(model, X, y, batch=500):
    model.eval()
    correct = 0
    for i in range(0, len(X), batch):
        correct += int((model(X[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(X)


def prune_and_save(pretrained, sparsity, path, X, y, batch, lr, steps, seed):
    """What a user's pruning pipeline produces: gradual magnitude pruning with torch.nn.utils.prune
    (every residual-block convolution, layer by layer, through 50%, 75%, 90%, ... to `sparsity`,
    with `steps` recovery steps on the pretraining digits after each cut), saved as a state dict
    holding weight_orig + weight_mask. (One cut straight to 90% leaves this small network at chance:
    measured 10% test accuracy.)"""
    model = copy.deepcopy(pretrained)
    convs = [m for n, m in model.named_modules() if SmallResNet.prunable(n, m)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    done = 0.0
    for s in [v for v in (0.5, 0.75, 0.9) if v < sparsity] + [sparsity]:
        for m in convs:  # the amount applies to the weights still unpruned
            prune.l1_unstructured(m, "weight", amount=(s - done) / (1.0 - done))
        done = s
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(X), (batch,), generator=gen)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    torch.save(model.state_dict(), path)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    ap.add_argument("--pretrain", type=int, default=5000, help="training digits used for pretraining (default 5000)")
    ap.add_argument("--pretrain-epochs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (default 2)")
    ap.add_argument("--prune-steps", type=int, default=25,
                    help="recovery steps after each pruning cut, on the pretraining digits (default 25)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and sparsebp (default: all)")
    ap.add_argument("--quick", action="store_true", help="a few batches per epoch (smoke test)")
    ap.add_argument("--out", default=None, help="folder for the pruned checkpoints (default: a temporary one)")
    a = ap.parse_args(argv)
    for s in a.sparsities:
        if not 0.0 < s < 1.0:
            ap.error(f"--sparsities must lie in (0, 1); got {s}")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
        sparsebp.set_num_threads(a.threads)
    limit = 3 if a.quick else None
    torch.manual_seed(0)

    Xtr, ytr = load_mnist("train", flatten=False)
    Xte, yte = load_mnist("test", flatten=False, limit=300 if a.quick else None)
    Xtr, ytr, Xte, yte = map(torch.from_numpy, (Xtr, ytr, Xte, yte))
    Xpre, ypre = Xtr[:a.pretrain], ytr[:a.pretrain]
    Xft, yft = Xtr[a.pretrain:], ytr[a.pretrain:]
    print(f"MNIST (bundled): pretrain on {len(Xpre)}, fine-tune on {len(Xft)}, test on {len(Xte)} digits; "
          f"torch threads {torch.get_num_threads()}, sparsebp threads {sparsebp.get_num_threads()}, "
          f"ISA {sparsebp.active_isa()}")

    pretrained = SmallResNet()
    opt = torch.optim.AdamW(pretrained.parameters(), lr=a.lr, weight_decay=1e-4)
    for e in range(a.pretrain_epochs):
        train_epoch(pretrained, opt, Xpre, ypre, a.batch, seed=100 + e, desc=f"pretrain {e + 1}", limit=limit)
    print(f"pretrained dense model: test accuracy {accuracy(pretrained, Xte, yte):.4f}")

    out = a.out or tempfile.mkdtemp(prefix="sparsebp-tl-")
    os.makedirs(out, exist_ok=True)
    runs = [("dense (torch)", None)] + [(f"sparsebp {s:.0%}", s) for s in a.sparsities]
    rows = []
    for name, s in runs:
        if s is None:
            model = copy.deepcopy(pretrained)
            before = accuracy(model, Xte, yte)
        else:
            path = os.path.join(out, f"pruned_{int(round(s * 100))}.pt")
            pruned = prune_and_save(pretrained, s, path, Xpre, ypre, a.batch, a.lr, 3 if a.quick else a.prune_steps,
                                    seed=300)
            before = accuracy(pruned, Xte, yte)
            model = SmallResNet()
            report = st.from_pruned(model, path, layers=SmallResNet.prunable)
            model.layout = st.BatchInner()  # sparse layers read and write the batch-innermost layout
            achieved = sum(c.nnz for c in report.changes) / sum(int(np.prod(c.shape)) for c in report.changes)
            print(f"{name}: loaded {path} with from_pruned: {len(report.converted)} sparse layers, "
                  f"overall density {achieved:.4f}")
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr / 2, weight_decay=1e-4)
        times, accs = [], []
        for e in range(a.epochs):
            times.append(train_epoch(model, opt, Xft, yft, a.batch, seed=200 + e, desc=f"{name} epoch {e + 1}",
                                     limit=limit))
            accs.append(accuracy(model, Xte, yte))
            print(f"  {name} epoch {e + 1}: test accuracy {accs[-1]:.4f}, {times[-1]:.1f} s")
        rows.append((name, before, accs[-1], float(np.median(times))))

    dense_t = rows[0][3]
    print()
    print(f"| model | test acc. after pruning | after {a.epochs} fine-tuning epoch(s) | s / epoch | speed-up |")
    print("|---|---|---|---|---|")
    for name, before, after, t in rows:
        print(f"| {name} | {before:.4f} | {after:.4f} | {t:.1f} | {dense_t / t:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
