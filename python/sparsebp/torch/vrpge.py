"""VR-PGE for PyTorch models (``design/ALGORITHMS.md`` section 5; the NumPy path and the shared
math are ``sparsebp.algorithms.vrpge``).

``VRPGETrainer(model, keep_ratio)`` learns unit masks (output features of ``nn.Linear``, output
channels of ``nn.Conv2d``) for every weight layer of an ``nn.Sequential`` except the last (the
classifier), under one global budget. Each sampled sub-network runs only its kept units: the
kept rows (and the kept input columns / channels of the next layer) of each weight are gathered
with ``index_select`` and the products run on the compacted tensors, so forward and backward cost
what the kept units cost; autograd scatters the gradients back into the full parameters.

Supported modules between the weight layers: anything that acts on each channel / feature on
its own and has no parameters (``ReLU`` and other activations, ``MaxPool2d``, ``AvgPool2d``,
``AdaptiveAvgPool2d``, ``Dropout``, ``Identity``) and ``Flatten``. A unit mask applies after the
activation that follows its layer (a dropped unit is exactly zero). Conv layers must have
``groups=1``. Batch norm is not supported (its statistics would mix masked and kept units).
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.vrpge import MaskAdam, _check_score, _check_seed, estimator
from ..blocks import check_lr, check_sgd_args

__all__ = ["VRPGETrainer"]

_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.MaxPool2d, nn.AvgPool2d,
                nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity)


class VRPGETrainer:
    """Trains ``model`` (an ``nn.Sequential``) with VR-PGE unit masks.

    Weights: ``torch.optim.SGD(lr, momentum, weight_decay)`` (or pass ``optimizer=``); mask
    probabilities ``s``: Adam with ``lr_s`` (default 0.05, as ``sparsebp.algorithms.vrpge.VRPGE``;
    on the MNIST MLP with a 5-epoch search, 0.2 did best on held-out digits:
    ``python -m sparsebp.bench.vrpge_lr``), projected onto ``sum s <= keep_ratio * n`` after each
    step; ``clip``: the joint gradient norm of (weights, s). ``score``: ``"authors"`` or
    ``"textbook"`` (see ``sparsebp.algorithms.vrpge``).
    """

    def __init__(self, model: nn.Sequential, keep_ratio: float, *, lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 5e-4, lr_s: float = 0.05, score: str = "authors", clip: Optional[float] = 3.0,
                 optimizer: Optional[torch.optim.Optimizer] = None, seed: int = 0):
        if not isinstance(model, nn.Sequential):
            raise TypeError(f"model must be a torch.nn.Sequential; got {type(model).__name__}")
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must lie in (0, 1]; got {keep_ratio!r}")
        if isinstance(lr_s, bool) or not isinstance(lr_s, (int, float)) or not lr_s > 0:
            raise ValueError(f"lr_s must be a positive number; got {lr_s!r}")
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
            raise ValueError(f"clip must be a positive number or None; got {clip!r}")
        _check_seed(seed)
        self.weights = []
        for i, m in enumerate(model):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                if isinstance(m, nn.Conv2d) and m.groups != 1:
                    raise ValueError(f"layer {i}: Conv2d with groups={m.groups} is not supported (groups=1 only)")
                self.weights.append(i)
            elif isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise ValueError(f"layer {i}: only Flatten(1, -1) is supported")
            elif not isinstance(m, _ELEMENTWISE):
                raise ValueError(f"layer {i}: {type(m).__name__} is not supported between masked layers "
                                 f"(weight layers: Linear, Conv2d; others: parameter-free per-unit modules, Flatten)")
        if len(self.weights) < 2:
            raise ValueError("the model needs at least two weight layers (a masked one and the classifier)")
        self.model = model
        self.keep_ratio, self.score, self.clip, self.lr_s = float(keep_ratio), _check_score(score), clip, float(lr_s)
        units = [self._units(model[i]) for i in self.weights[:-1]]
        self.s = [np.full(n, self.keep_ratio) for n in units]
        self.budget = self.keep_ratio * sum(units)
        self.adam = MaskAdam(self.s, self.lr_s, self.budget)
        self.rng = np.random.default_rng(seed)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None; got {type(optimizer).__name__}")
        if optimizer is None:
            check_lr(lr)
            check_sgd_args(momentum, weight_decay)
        self.optimizer = optimizer if optimizer is not None else torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    @staticmethod
    def _units(m) -> int:
        return m.out_features if isinstance(m, nn.Linear) else m.out_channels

    def sample(self) -> List[np.ndarray]:
        """One boolean unit mask per masked layer, m ~ Bern(s)."""
        return [self.rng.random(s.shape) < s for s in self.s]

    def density(self) -> float:
        """The expected fraction of units kept: the mean of the keep probabilities s."""
        return float(sum(s.sum() for s in self.s) / sum(s.size for s in self.s))

    def polarised(self, tol: float = 0.01) -> float:
        """The fraction of keep probabilities within ``tol`` of 0 or 1."""
        allv = np.concatenate(self.s)
        return float(np.mean((allv <= tol) | (allv >= 1 - tol)))

    # ---- the compacted forward --------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mask) -> torch.Tensor:
        """The sub-network ``mask`` on x, computing only the kept units (differentiable)."""
        cur = None  # kept indices along the activation's feature / channel dimension (None: all)
        li = 0
        dev = x.device
        for i, m in enumerate(self.model):
            if i in self.weights:
                last = li == len(self.weights) - 1
                rows = None if last else torch.as_tensor(np.flatnonzero(mask[li]), device=dev)
                w, b = m.weight, m.bias
                if rows is not None:
                    w = w.index_select(0, rows)
                    b = b.index_select(0, rows) if b is not None else None
                if cur is not None:
                    w = w.index_select(1, cur)
                if isinstance(m, nn.Linear):
                    x = F.linear(x, w, b)
                else:
                    x = m._conv_forward(x, w, b)  # nn.Conv2d's own: its padding_mode, 'same', stride, ...
                cur = rows
                li += 1
            elif isinstance(m, nn.Flatten):
                if cur is not None and x.dim() > 2:
                    hw = int(np.prod(x.shape[2:]))
                    cur = (cur[:, None] * hw + torch.arange(hw, device=dev)[None, :]).reshape(-1)
                x = m(x)
            else:
                x = m(x)
        return x

    def _check_batch(self, x, y) -> None:
        """x: a floating tensor of the model's dtype whose features (Linear first) or channels
        (Conv2d first) fit the first layer; y: a tensor with one target per example."""
        first = self.model[self.weights[0]]
        dtype = first.weight.dtype
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"x and y must be torch.Tensors; got {type(x).__name__} and {type(y).__name__}")
        if x.dtype != dtype:
            raise TypeError(f"x must have the model's dtype {dtype}; got {x.dtype}")
        if isinstance(first, nn.Linear) and self.weights[0] == 0 and (x.dim() < 2 or x.shape[-1] != first.in_features):
            raise ValueError(f"x must have shape (batch, {first.in_features}); got {tuple(x.shape)}")
        if isinstance(first, nn.Conv2d) and self.weights[0] == 0 and (x.dim() != 4 or x.shape[1] != first.in_channels):
            raise ValueError(f"x must have shape (batch, {first.in_channels}, H, W); got {tuple(x.shape)}")
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"x holds no examples; got shape {tuple(x.shape)}")
        if y.dim() < 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must hold one target per example of x ({x.shape[0]}); got shape {tuple(y.shape)}")

    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy) -> dict:
        """One VR-PGE step: two sampled sub-networks, weights by the optimizer, s by Adam."""
        self._check_batch(x, y)
        masks = (self.sample(), self.sample())
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for mk in masks:
            loss = loss_fn(self.forward(x, mk), y)
            (0.5 * loss).backward()  # g_w = (G_1 + G_2) / 2
            losses.append(float(loss.detach()))
        f1, f2 = losses
        gs = [estimator(f1, f2, a, b, s, self.score) for a, b, s in zip(masks[0], masks[1], self.s)]
        scale = 1.0
        if self.clip is not None:
            params = [p for p in self.model.parameters() if p.grad is not None]
            sq = sum(float(p.grad.detach().pow(2).sum()) for p in params) + sum(float(g @ g) for g in gs)
            norm = sq ** 0.5
            if norm > self.clip:
                scale = self.clip / (norm + 1e-6)
                for p in params:
                    p.grad.mul_(scale)
        self.optimizer.step()
        self.adam.step([g * scale for g in gs])
        return dict(loss1=f1, loss2=f2, kept=[float(m.mean()) for m in masks[0]])

    @torch.no_grad()
    def accuracy(self, loader_or_xy, mask) -> float:
        """Accuracy of the sub-network ``mask`` on ``(X, y)`` (tensors), in chunks of 1000."""
        X, y = loader_or_xy
        pred = torch.cat([self.forward(X[i:i + 1000], mask).argmax(1) for i in range(0, len(X), 1000)])
        return float((pred == y).float().mean())

    def best_mask(self, X: torch.Tensor, y: torch.Tensor, samples: int = 10):
        """The best of ``samples`` sampled masks by accuracy on (X, y), and that accuracy."""
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int; got {samples!r}")
        best, acc = None, -1.0
        for _ in range(samples):
            m = self.sample()
            a = self.accuracy((X, y), m)
            if a > acc:
                best, acc = m, a
        return best, acc

    @torch.no_grad()
    def compact(self, mask) -> nn.Sequential:
        """A new ``nn.Sequential`` with only the kept units (smaller Linear / Conv2d layers): the
        same function as the masked model, for fine-tuning with the mask frozen and for inference."""
        import copy

        out = []
        cur = None
        li = 0
        for i, m in enumerate(self.model):
            if i in self.weights:
                last = li == len(self.weights) - 1
                rows = None if last else torch.as_tensor(np.flatnonzero(mask[li]))
                w, b = m.weight, m.bias
                if rows is not None:
                    w, b = w[rows], (b[rows] if b is not None else None)
                if cur is not None:
                    w = w[:, cur]
                if isinstance(m, nn.Linear):
                    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
                else:
                    new = nn.Conv2d(w.shape[1], w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation,
                                    bias=b is not None, padding_mode=m.padding_mode)
                new = new.to(device=w.device, dtype=w.dtype)
                new.weight.copy_(w)
                if b is not None:
                    new.bias.copy_(b)
                out.append(new)
                cur = rows
                li += 1
            elif isinstance(m, nn.Flatten):
                out.append(copy.deepcopy(m))
                if cur is not None:
                    nxt = self.model[next(j for j in self.weights if j > i)]
                    if isinstance(nxt, nn.Linear):
                        c_in = self._units(self.model[self.weights[li - 1]])
                        hw = nxt.in_features // c_in
                        cur = (cur[:, None] * hw + torch.arange(hw)[None, :]).reshape(-1)
            else:
                out.append(copy.deepcopy(m))
        return nn.Sequential(*out)
