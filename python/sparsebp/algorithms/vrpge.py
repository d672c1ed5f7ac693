"""VR-PGE (Zhou et al., NeurIPS 2021): learned Bernoulli masks under a global budget, trained by a
two-sample variance-reduced policy-gradient estimator, with truly sparse forward and backward.
The math is ``design/ALGORITHMS.md`` section 5; this is the NumPy path (no torch). The torch path
is ``sparsebp.torch.vrpge``.

One step on a minibatch (``VRPGE.step``)::

    draw m1, m2 ~ Bern(s)
    f_j, G_j = loss and weight gradient of the sub-network m_j (only kept units computed)
    g_w = (G_1 + G_2) / 2
    g_s = (f_1 - f_2) (psi(m1) - psi(m2)) / 2
    clip the joint norm of (g_w, g_s); w <- SGD(momentum, weight decay); s <- Adam; s <- project(s)

``psi``: ``score="authors"``, ``(m - s) / sqrt(s (1 - s))`` (the authors' code: an estimate of
``sqrt(s (1 - s)) * grad``), or ``"textbook"``, ``(m - s) / (s (1 - s))`` (the score function:
an unbiased estimate of the gradient itself). ``psi(m1) - psi(m2) = (m1 - m2) / den(s)``, so g_s
is nonzero only where the two masks differ.

Granularity. ``"unit"`` (default): one s per output unit of every hidden ``Linear`` (the
classifier is not masked); a mask applies after the activation, so a dropped unit is exactly
zero and is never computed: each sub-network runs on the compacted weights (the kept rows and
columns gathered by C++ kernels), its gradients are scattered back into the union of the two
masks, and the weights outside it are updated lazily (``sparsebp.ops.LazySGD``: exact, in closed
form, when next touched). ``"weight"``: one s per weight of every hidden ``Linear``; each sampled
mask becomes a CSR (``sparsebp.ops.bernoulli_csr``, no dense mask) and the sub-network runs on
sparsebp's CSR kernels.
"""
from __future__ import annotations

import math
import time
from typing import List, Optional, Sequence

import numpy as np

from .. import _core
from ..blocks import LazySGD, bernoulli_csr, check_adam_args, check_lr, relu, relu_backward
from ..csr import CSR

__all__ = ["project_budget", "score", "estimator", "plain_estimator", "VRPGE", "SCORES"]

SCORES = ("authors", "textbook")


def _check_score(kind: str) -> str:
    if kind not in SCORES:
        raise ValueError(f"score must be one of {SCORES}; got {kind!r}")
    return kind


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0; got {seed!r}")
    return int(seed)


def project_budget(s, budget: float, method: str = "sort") -> np.ndarray:
    """The projection onto ``{x in [0, 1]^n : sum x <= budget}``: ``clip(s - v, 0, 1)`` with
    ``v = 0`` when ``sum clip(s, 0, 1) <= budget``, else the root ``v > 0`` of
    ``sum clip(s - v, 0, 1) = budget``. ``method``: ``"sort"`` (exact: the piecewise-linear
    equation solved between its sorted breakpoints), ``"select"`` (the same equation, its linear
    piece found by selection in O(n) expected time instead of a sort: what training uses; equal to
    "sort" up to rounding) or ``"bisect"`` (in double, to 1e-15). Returns a float64 array."""
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"s must be 1-D; got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("s must be finite")
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)) or not budget >= 0:
        raise ValueError(f"budget must be a number >= 0; got {budget!r}")
    if method not in ("sort", "select", "bisect"):
        raise ValueError(f"method must be 'sort', 'select' or 'bisect'; got {method!r}")
    budget = float(budget)
    if method != "bisect":  # in C++: the sorted breakpoints walked once, or selection
        return _core.project_budget(s, budget, method == "select")
    c = np.clip(s, 0.0, 1.0)
    if c.sum() <= budget:
        return c
    lo, hi = 0.0, float(s.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.clip(s - mid, 0.0, 1.0).sum() > budget:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15:
            break
    return np.clip(s - hi, 0.0, 1.0)


def _den(s: np.ndarray, kind: str) -> np.ndarray:
    q = s * (1.0 - s)
    return np.sqrt(q) if kind == "authors" else q


def score(m, s, kind: str = "authors") -> np.ndarray:
    """psi(m): ``(m - s) / sqrt(s (1 - s))`` (authors) or ``(m - s) / (s (1 - s))`` (textbook);
    0 where s is 0 or 1 (there m = s with probability 1)."""
    _check_score(kind)
    s = np.asarray(s, dtype=np.float64)
    d = _den(s, kind)
    num = np.asarray(m, dtype=np.float64) - s
    return np.divide(num, d, out=np.zeros_like(s), where=d > 0)


def estimator(f1: float, f2: float, m1, m2, s, kind: str = "authors") -> np.ndarray:
    """The two-sample variance-reduced policy gradient ``(f1 - f2) (psi(m1) - psi(m2)) / 2``."""
    _check_score(kind)
    s = np.asarray(s, dtype=np.float64)
    d = _den(s, kind)
    diff = np.asarray(m1, dtype=np.float64) - np.asarray(m2, dtype=np.float64)
    return 0.5 * (float(f1) - float(f2)) * np.divide(diff, d, out=np.zeros_like(s), where=d > 0)


def plain_estimator(f1: float, f2: float, m1, m2, s, kind: str = "authors") -> np.ndarray:
    """Plain policy gradient averaged over the same two samples, ``(f1 psi(m1) + f2 psi(m2)) / 2``
    (the baseline the variance reduction is measured against)."""
    return 0.5 * (float(f1) * score(m1, s, kind) + float(f2) * score(m2, s, kind))


def run_interleaved(steps: int, step, reference=None, block: int = 8) -> None:
    """``step(i)`` for i in range(steps) and, when given, ``reference(i)`` for the same i, in
    alternating blocks of ``block``: the steps of a block then the reference on them, the next block
    the reference first. Each side runs several calls in a row (its working set stays in cache, as
    in training) while both see the same machine conditions (for timing one against the other)."""
    for lo in range(0, steps, block):
        hi = min(steps, lo + block)
        ref_first = reference is not None and (lo // block) % 2 == 1
        if ref_first:
            for i in range(lo, hi):
                reference(i)
        for i in range(lo, hi):
            step(i)
        if reference is not None and not ref_first:
            for i in range(lo, hi):
                reference(i)


class MaskAdam:
    """Adam on the mask probabilities, then the projection onto the global budget: the update of s
    shared by the NumPy and the torch trainers.

    ``s``: a list of float64 arrays. They are moved into one flat array, ``self.flat``, and the
    list's entries become views of it (so the caller's list, and any array taken from it after
    this, sees every update); the update and the projection then run once over all layers."""

    def __init__(self, s: list, lr: float, budget: float, betas=(0.9, 0.999), eps: float = 1e-8):
        if not isinstance(s, list):
            raise TypeError(f"s must be a list of arrays (its entries become views of one flat array); "
                            f"got {type(s).__name__}")
        check_lr(lr)
        check_adam_args(betas, eps)
        if isinstance(budget, bool) or not isinstance(budget, (int, float, np.floating)) or not budget >= 0:
            raise ValueError(f"budget must be a number >= 0; got {budget!r}")
        self.flat = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in s]) if s else np.zeros(0)
        o = 0
        for i, x in enumerate(s):
            s[i] = self.flat[o:o + x.size].reshape(x.shape)
            o += x.size
        self.s, self.lr, self.budget, self.betas, self.eps = s, lr, budget, betas, eps
        self.m = np.zeros_like(self.flat)
        self.v = np.zeros_like(self.flat)
        self.t = 0

    def step(self, grads, scale: float = 1.0) -> None:
        """One step from the gradients of s (times ``scale``): a list (one array per entry of s) or
        one flat float64 array. Adam and the projection run in one C++ pass, in double."""
        g = grads if isinstance(grads, np.ndarray) else np.concatenate([np.ravel(x) for x in grads])
        g = np.ascontiguousarray(g, dtype=np.float64)
        if g.shape != self.flat.shape:
            raise ValueError(f"the gradient of s must have {self.flat.size} entries; got {g.size}")
        b1, b2 = self.betas
        t = self.t + 1
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        _core.mask_adam_project(self.flat, self.m, self.v, g, float(scale), b1, b2, self.lr / c1, 1.0 / c2,
                                self.eps, float(self.budget))
        self.t = t  # only after the step took (a non-finite gradient is an error that changes nothing)


def _softmax_xent(z: np.ndarray, y: np.ndarray):
    g = np.empty(z.shape, dtype=np.float32)
    loss = _core.softmax_xent(np.ascontiguousarray(z, dtype=np.float32), y, g)
    return loss, g


def _positive(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"{name} must be a positive number; got {v!r}")
    return float(v)


class VRPGE:
    """VR-PGE trainer for a ``sparsebp.nn.Sequential`` MLP of the form
    ``Linear, ReLU, Linear, ReLU, ..., Linear`` (dense ``Linear`` layers, each hidden one followed
    by a ReLU; the last is the classifier).

    ``keep_ratio``: the budget ``sum s <= keep_ratio * n`` over all masked units (or weights),
    global across layers. ``s`` starts at ``keep_ratio``. Weights: SGD with ``momentum`` and
    ``weight_decay`` (lazy, exact: ``LazySGD``); ``s``: Adam with ``lr_s`` (default 0.05, as in
    ``sparsebp.torch.VRPGETrainer``; ``sparsebp vrpge`` uses 0.2, the best of 0.02-0.5 on held-out
    MNIST digits for a 5-epoch search: ``python -m sparsebp.bench.vrpge_lr``; a smaller rate polarises
    ``s`` later, so the search trains under random masks for longer); ``clip``: the joint gradient
    norm (``None``: no clipping). ``seed``: the mask samples' generator.
    """

    def __init__(self, model, keep_ratio: float, *, lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 5e-4, lr_s: float = 0.05, score: str = "authors", clip: Optional[float] = 3.0,
                 granularity: str = "unit", seed: int = 0):
        from ..nn import Linear, ReLU, Sequential

        if not isinstance(model, Sequential):
            raise TypeError(f"model must be a sparsebp.nn.Sequential; got {type(model).__name__}")
        layers = model.layers
        ok = len(layers) % 2 == 1 and len(layers) >= 3 and all(
            isinstance(m, Linear) if i % 2 == 0 else isinstance(m, ReLU) for i, m in enumerate(layers))
        if not ok:
            raise ValueError("VRPGE needs a Sequential of the form Linear, ReLU, Linear, ..., ReLU, Linear "
                             f"(dense Linear layers, at least one hidden); got {[type(m).__name__ for m in layers]}")
        if any(m.policy is not None for m in layers[::2]):
            raise ValueError("VRPGE does not combine with a sparse-gradient policy on the layers (grad=...)")
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must lie in (0, 1]; got {keep_ratio!r}")
        if granularity not in ("unit", "weight"):
            raise ValueError(f"granularity must be 'unit' or 'weight'; got {granularity!r}")
        if clip is not None:
            clip = _positive(clip, "clip")
        _check_seed(seed)
        self.model, self.linears = model, layers[::2]
        self.keep_ratio, self.score, self.clip, self.granularity = float(keep_ratio), _check_score(score), clip, granularity
        self.lr_s = _positive(lr_s, "lr_s")
        # One step counter per row (not per entry): the update of whole rows streams, and measured
        # on the MNIST MLP it costs less than a per-entry update of only the union's columns.
        self.opt = LazySGD(model.params(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           whole_rows=model.params())
        hidden = self.linears[:-1]
        if granularity == "unit":
            self.s = [np.full(m.out_features, self.keep_ratio) for m in hidden]
        else:
            self.s = [np.full(m.weight.data.shape, self.keep_ratio) for m in hidden]
        self.budget = self.keep_ratio * sum(x.size for x in self.s)
        self.adam = MaskAdam(self.s, self.lr_s, self.budget)
        self.rng = np.random.default_rng(seed)
        self._bufs, self._views = {}, {}

    # ---- masks -------------------------------------------------------------------------------------
    def sample(self) -> list:
        """One mask per hidden layer, m ~ Bern(s): bool arrays (units), or CSR structures
        ``(indptr, indices)`` (weights, built without a dense mask)."""
        if self.granularity == "unit":
            return self._split(self._sample_flat())
        return self._sample_weights([s.astype(np.float32) for s in self.s])

    def _sample_weights(self, s32: list) -> list:
        """CSR masks from s as float32 (what the generator compares with; a step converts it once
        for its two samples)."""
        return [bernoulli_csr(s, int(self.rng.integers(0, 2 ** 63))) for s in s32]

    def _sample_flat(self) -> np.ndarray:
        """Unit masks of every layer in one draw, as one flat bool array (the layers in order)."""
        return self.rng.random(self.adam.flat.size) < self.adam.flat

    def _split(self, flat: np.ndarray) -> list:
        """A flat array cut into one view per hidden layer, shaped as s."""
        out, o = [], 0
        for s in self.s:
            out.append(flat[o:o + s.size].reshape(s.shape))
            o += s.size
        return out

    def _dense(self, mask, l: int) -> np.ndarray:
        """A sampled mask of hidden layer l as a bool array of s's shape."""
        if self.granularity == "unit":
            return mask
        indptr, indices = mask
        out = np.zeros(self.s[l].shape, dtype=bool)
        out[np.repeat(np.arange(out.shape[0]), np.diff(indptr)), indices] = True
        return out

    def density(self) -> float:
        """Expected kept fraction, sum s / n."""
        return float(sum(s.sum() for s in self.s) / sum(s.size for s in self.s))

    def polarised(self, tol: float = 0.01) -> float:
        """Fraction of entries of s within ``tol`` of 0 or 1."""
        allv = np.concatenate([s.ravel() for s in self.s])
        return float(np.mean((allv <= tol) | (allv >= 1 - tol)))

    # ---- one step ----------------------------------------------------------------------------------
    def step(self, x: np.ndarray, y: np.ndarray) -> dict:
        """One VR-PGE step on a minibatch; returns the two losses and the kept fractions."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.asarray(y)
        if self.granularity == "unit":  # the estimator runs once over every layer's units, in C++
            flat = (self._sample_flat(), self._sample_flat())
            fs, gw = self._unit_grads(x, y, flat)
            gs = self._buf("gs", (self.adam.flat.size,), dtype=np.float64)
            gs_sq = _core.mask_estimator(self.adam.flat, flat[0], flat[1], float(fs[0]) - float(fs[1]),
                                         self.score == "textbook", gs)
            kept = [np.count_nonzero(m) / m.size for m in self._split(flat[0])]
        else:
            s32 = [s.astype(np.float32) for s in self.s]
            masks = (self._sample_weights(s32), self._sample_weights(s32))
            fs, gw = self._weight_grads(x, y, masks)
            # The estimator straight from the two CSR structures (no dense masks): g is nonzero only
            # where exactly one of the two masks keeps the weight.
            gs = self._buf("gs", (self.adam.flat.size,), dtype=np.float64)
            gs_sq, o = 0.0, 0
            for (ip1, ix1), (ip2, ix2), s in zip(masks[0], masks[1], self.s):
                gs_sq += _core.mask_estimator_csr(s, ip1, ix1, ip2, ix2, float(fs[0]) - float(fs[1]),
                                                  self.score == "textbook", gs[o:o + s.size].reshape(s.shape))
                o += s.size
            kept = [len(m[1]) / s.size for m, s in zip(masks[0], self.s)]
        scale = 1.0
        if self.clip is not None:
            norm = math.sqrt(sum(float(np.vdot(g, g)) for _, _, _, g in gw) + gs_sq)
            if norm > self.clip:
                scale = self.clip / (norm + 1e-6)
        for p, rows, g_cols, g in gw:
            if scale != 1.0:
                g *= np.float32(scale)
            self.opt._run(p, rows, None, g, None, g_cols=g_cols)
        self.opt.advance()
        self.adam.step(gs, scale)
        return dict(loss1=fs[0], loss2=fs[1], kept=kept)

    def _buf(self, name: str, shape: tuple, fill=None, dtype=np.float32) -> np.ndarray:
        """A reused work array (fresh multi-MB arrays cost page faults every step), set to ``fill``
        when given. The views are cached by (name, shape, dtype): a step asks for ~15 of them, and
        making each anew cost ~5 us (~4% of a polarised step)."""
        key = (name, shape, dtype)
        out = self._views.get(key)
        if out is None:
            b = self._bufs.get(name)
            n = math.prod(shape)
            if b is None or b.size < n or b.dtype != dtype:
                b = self._bufs[name] = np.empty(max(n, 1), dtype=dtype)
                self._views = {k: v for k, v in self._views.items() if k[0] != name}  # views of the old one
            out = self._views[key] = b[:n].reshape(shape)
        if fill is not None:
            out.fill(fill)
        return out

    def _unit_grads(self, x, y, flat):
        """Both sub-networks on compacted weights; returns the losses and the gradient blocks
        (param, rows, g_cols, g): whole rows of the union of the two masks' units (all rows for the
        classifier; every parameter keeps one step counter per row, so its lazy updates stream).
        g holds the columns g_cols only (the previous layer's union; None: all columns): the
        update steps the whole rows with a zero gradient outside them, which is what they have.
        The rows outside the union are updated lazily.

        The weights are gathered once, on the union U of the two masks' units. The first layer's
        input is the same for both samples, so it runs once over U (1 - (1 - r)^2 of its units
        instead of r twice). Above it the two samples run as one batch of 2B rows: sample j's
        activations are its rows with the units it drops set to zero (a mask applies after the
        activation, so that is exactly its sub-network), so each layer is one product over U for
        both samples, the weight gradient of a layer comes out already summed over the samples,
        and no per-sample gather or scatter is needed. Once s has polarised, U is barely larger
        than each mask, so the products cost what the two sub-networks cost."""
        lin, H = self.linears, len(self.linears) - 1
        opt = self.opt
        B = x.shape[0]
        # Internal calls go straight to the C++ kernels with int64 index arrays (the kernels still
        # check order and bounds); the Python-side validation cost ~1.5 ms per step.
        # per hidden layer: the union's units, and the two masks on it as a 2 x |U| float32 array
        # (1 kept, 0 dropped), in one pass over every layer's masks
        union, keep = zip(*_core.mask_union(flat[0], flat[1], [s.size for s in self.s]))
        union = list(union)
        rows_of = union + [None]
        cols_of = [None] + union
        wu = []  # the caught-up weights on the union: rows_of x cols_of (read only: a peek)
        for l, m in enumerate(lin):
            shape = (m.out_features if rows_of[l] is None else len(rows_of[l]),
                     m.in_features if cols_of[l] is None else len(cols_of[l]))
            wu.append(opt._gather(m.weight, rows_of[l], cols_of[l], self._buf(f"wu{l}", shape), peek=True))
        bu = [opt._gather(m.bias, rows_of[l], None, peek=True) if m.bias is not None else None
              for l, m in enumerate(lin)]
        # layer 0 over the union, once; then bias, ReLU and each sample's mask in one pass into the
        # two samples' rows
        z0 = self._buf("z0", (B, len(union[0])))
        np.matmul(x, wu[0].T, out=z0)
        a = self._buf("a0", (2 * B, len(union[0])))
        _core.bias_relu_mask(z0, bu[0], keep[0], a)
        acts = [a]
        for l in range(1, H + 1):
            z = self._buf(f"z{l}", (2 * B, wu[l].shape[0]))
            np.matmul(a, wu[l].T, out=z)
            if l < H:
                _core.bias_relu_mask(z, bu[l], keep[l], z)  # rows 0..B-1: sample 1's mask; B..2B-1: sample 2's
                acts.append(z)
                a = z
            elif bu[l] is not None:
                z += bu[l]
        g = self._buf(f"g{H}", z.shape)
        fs = [_core.softmax_xent(z[:B], y, g[:B]), _core.softmax_xent(z[B:], y, g[B:])]
        # g_w = (G_1 + G_2) / 2: halve the loss gradient here (exact: a power of two), and every
        # product below comes out already halved
        g *= np.float32(0.5)
        gw, gb = [None] * (H + 1), [None] * (H + 1)
        for l in range(H, 0, -1):
            gw[l] = g.T @ acts[l - 1]  # the union's columns; zero outside (the update takes it as such)
            if bu[l] is not None:
                # column sums as a GEMV: ~3x faster than g.sum(axis=0) on these shapes
                gb[l] = self._buf("ones", (g.shape[0],), fill=1) @ g
            gn = self._buf(f"g{l - 1}", acts[l - 1].shape)
            np.matmul(g, wu[l], out=gn)
            # dropped units have zero activations, so this also zeroes their gradient
            _core.relu(gn.reshape(-1), acts[l - 1].reshape(-1), gn.reshape(-1))
            g = gn
        g0 = self._buf("gsum", (B, g.shape[1]))
        np.add(g[:B], g[B:], out=g0)
        gw[0] = g0.T @ x
        if bu[0] is not None:
            gb[0] = self._buf("ones", (B,), fill=1) @ g0
        out = [(m.weight, rows_of[l], cols_of[l], gw[l]) for l, m in enumerate(lin)]
        out += [(m.bias, rows_of[l], None, gb[l]) for l, m in enumerate(lin) if m.bias is not None]
        return fs, out

    def _weight_grads(self, x, y, masks):
        """Both sub-networks on sparsebp's CSR kernels (hidden layers), dense classifier."""
        from .. import ops

        lin, H = self.linears, len(self.linears) - 1
        self.opt.flush()  # dense parameters read directly below
        gw = [np.zeros_like(m.weight.data) for m in lin]
        gb = [np.zeros_like(m.bias.data) if m.bias is not None else None for m in lin]
        fs = []
        for mask in masks:
            csrs, acts = [], [x]
            a = x
            for l in range(H):
                w = lin[l].weight.data
                indptr, indices = mask[l]
                # flat positions of the kept weights: 1-D take / fancy index (2-D fancy indexing
                # cost ~4 ms of a 642,000-weight step)
                flat = np.repeat(np.arange(w.shape[0], dtype=np.int64) * w.shape[1], np.diff(indptr))
                flat += indices
                vals = np.take(w.reshape(-1), flat)
                csr = CSR(indptr, indices, vals, w.shape)
                csrs.append((csr, flat))
                a = relu(ops.linear_forward(a, csr, None if lin[l].bias is None else lin[l].bias.data))
                acts.append(np.ascontiguousarray(a))
            z = acts[-1] @ lin[H].weight.data.T
            if lin[H].bias is not None:
                z += lin[H].bias.data
            loss, g = _softmax_xent(z, y)
            fs.append(loss)
            gw[H] += 0.5 * (g.T @ acts[H])
            if gb[H] is not None:
                gb[H] += 0.5 * g.sum(axis=0)
            g = relu_backward(g @ lin[H].weight.data, acts[H])
            for l in range(H - 1, -1, -1):
                csr, flat = csrs[l]
                r = ops.linear_backward(np.ascontiguousarray(g), acts[l], csr, input_grad=l > 0,
                                        bias_grad=gb[l] is not None)
                gw[l].reshape(-1)[flat] += 0.5 * r.grad_values  # the positions are unique: no np.add.at
                if gb[l] is not None:
                    gb[l] += 0.5 * r.grad_bias
                if l > 0:
                    g = relu_backward(r.grad_input, acts[l])
        out = [(m.weight, None, None, gw[l]) for l, m in enumerate(lin)]
        out += [(m.bias, None, None, gb[l]) for l, m in enumerate(lin) if m.bias is not None]
        return fs, out

    # ---- using a mask --------------------------------------------------------------------------------
    def forward(self, x: np.ndarray, mask) -> np.ndarray:
        """Logits of the sub-network ``mask`` (as ``sample()`` gives) on x."""
        self.opt.flush()
        a = np.ascontiguousarray(x, dtype=np.float32)
        H = len(self.linears) - 1
        for l, m in enumerate(self.linears):
            w = m.weight.data
            if self.granularity == "weight" and l < H:
                w = np.where(self._dense(mask[l], l), w, np.float32(0))
            z = a @ w.T
            if m.bias is not None:
                z += m.bias.data
            if l < H:
                a = relu(z)
                if self.granularity == "unit":
                    a *= mask[l]
        return z

    def accuracy(self, X: np.ndarray, y: np.ndarray, mask, batch: int = 1000) -> float:
        correct = 0
        for i in range(0, len(X), batch):
            correct += int((self.forward(X[i:i + batch], mask).argmax(axis=1) == y[i:i + batch]).sum())
        return correct / max(len(X), 1)

    def best_mask(self, X: np.ndarray, y: np.ndarray, samples: int = 10) -> tuple:
        """Draw ``samples`` masks; return (the one with the best accuracy on (X, y), its accuracy)."""
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int; got {samples!r}")
        best, best_acc = None, -1.0
        for _ in range(samples):
            m = self.sample()
            acc = self.accuracy(X, y, m)
            if acc > best_acc:
                best, best_acc = m, acc
        return best, best_acc

    def compact(self, mask):
        """A new ``sparsebp.nn.Sequential`` holding only the kept units of ``mask`` (unit
        granularity: the hidden layers really shrink, so fine-tuning it costs what the kept units
        cost) or, for weights, sparsebp ``SparseLinear`` layers with the mask as their structure.
        Computes the same function as the masked network."""
        from ..nn import Linear, ReLU, Sequential, SparseLinear, Param

        self.opt.flush()
        H = len(self.linears) - 1
        layers = []
        if self.granularity == "unit":
            keep = [np.flatnonzero(m) for m in mask]
            for l, k in enumerate(keep):
                if len(k) == 0:
                    raise ValueError(f"the mask keeps no unit of hidden layer {l}: the network would output a "
                                     "constant; sample another mask")
            for l, m in enumerate(self.linears):
                r = keep[l] if l < H else slice(None)
                w = m.weight.data[r]
                if l > 0:
                    w = w[:, keep[l - 1]]
                new = Linear(w.shape[1], w.shape[0], m.bias is not None)
                new.weight.data = np.ascontiguousarray(w, dtype=np.float32)
                if m.bias is not None:
                    new.bias.data = np.ascontiguousarray(m.bias.data[r])
                layers += [new, ReLU()] if l < H else [new]
            return Sequential(*layers)
        for l, m in enumerate(self.linears):
            if l < H:
                indptr, indices = mask[l]
                rows = np.repeat(np.arange(m.out_features), np.diff(indptr))
                new = SparseLinear.__new__(SparseLinear)
                new.csr = CSR(indptr, indices, np.ascontiguousarray(m.weight.data[rows, indices]),
                              m.weight.data.shape)
                new.values = Param("values", new.csr.values)
                new.bias = Param("bias", m.bias.data.copy()) if m.bias is not None else None
                new.policy, new._x = None, None
                layers += [new, ReLU()]
            else:
                new = Linear(m.in_features, m.out_features, m.bias is not None)
                new.weight.data = m.weight.data.copy()
                if m.bias is not None:
                    new.bias.data = m.bias.data.copy()
                layers.append(new)
        return Sequential(*layers)

    # ---- training loop ------------------------------------------------------------------------------
    def fit(self, X: np.ndarray, y: np.ndarray, *, epochs: int = 1, batch: int = 128, seed: int = 0,
            progress: bool = True, desc: str = "vr-pge", reference=None) -> List[dict]:
        """Mask search: ``epochs`` passes of ``step`` over shuffled minibatches, with a tqdm bar.
        One record per epoch: mean losses, expected density (sum s / n), realised kept fraction of
        the last samples, the fraction of s polarised (within 0.01 of 0 or 1), seconds per step.

        ``reference``: an optional callable ``f(x, y)`` (for example a dense model's training
        step) run on the same minibatches and timed apart, in alternating blocks of 8 batches
        (``run_interleaved``): its seconds per call go in the record as ``reference_step_s``, so
        that a step-time ratio is measured under the same machine conditions."""
        from tqdm import tqdm

        from ..nn import check_loop_args

        check_loop_args(X, y, epochs, batch)
        if reference is not None and not callable(reference):
            raise TypeError(f"reference must be a callable f(x, y) or None; got {type(reference).__name__}")
        rng = np.random.default_rng(seed)
        steps = len(X) // batch
        history = []
        for e in range(epochs):
            order = rng.permutation(len(X))
            losses, kept, t = [], [], [0.0, 0.0]  # seconds in steps, in reference calls
            bar = tqdm(total=steps, desc=f"{desc} epoch {e + 1}/{epochs}", leave=False, disable=not progress)

            def one(i):
                idx = order[i * batch:(i + 1) * batch]
                t0 = time.perf_counter()
                r = self.step(X[idx], y[idx])
                t[0] += time.perf_counter() - t0
                losses.append(0.5 * (r["loss1"] + r["loss2"]))
                kept.append(r["kept"])
                bar.update(1)

            def ref(i):
                idx = order[i * batch:(i + 1) * batch]
                t0 = time.perf_counter()
                reference(X[idx], y[idx])
                t[1] += time.perf_counter() - t0

            run_interleaved(steps, one, ref if reference is not None else None)
            bar.close()
            rec = dict(epoch=e + 1, loss=float(np.mean(losses)) if losses else float("nan"),
                       density=self.density(), kept=np.mean(kept, axis=0).tolist() if kept else [],
                       polarised=self.polarised(), step_s=t[0] / max(steps, 1))
            if reference is not None:
                rec["reference_step_s"] = t[1] / max(steps, 1)
            history.append(rec)
        self.opt.flush()
        return history
