"""A small NumPy training path (no torch): dense and sparse-weight linear layers, each optionally
with a sparse-gradient policy (``sparsebp.algorithms``), ReLU, dropout, softmax cross-entropy, Adam
and SGD, a training loop with a progress bar (``Sequential.train()`` / ``eval()`` switch dropout;
``evaluate`` always runs in evaluation mode), and ``save`` / ``load`` of a model (safetensors).

Arrays are float32, (batch, features), C-ordered. A layer's ``forward`` keeps what its
``backward`` needs; ``backward(grad)`` stores parameter gradients in ``Param.grad`` and returns the
input gradient.

Sparse gradients and the optimizers: a layer whose backward touched only some rows of its weight
(meProp) says so in ``Param.rows``; ``Adam`` and ``SGD`` then update only those rows (lazily, as
``torch.optim.SparseAdam`` does), so the update costs what the gradient holds. Dense layers are
updated everywhere.
"""
from __future__ import annotations

import json
import os
import time
from typing import Iterable, List, Optional

import numpy as np

from . import _core, _cuda, ops
from ._files import read_safetensors
from .algorithms import _BUILT_IN_POLICIES, MeSimp, SparseGrad
from .blocks import check_adam_args, check_lr, check_sgd_args, param_rows, row_gradient
from .csr import CSR
from .sparse_grad import csr_selected_backward, selected_backward

__all__ = ["Param", "Linear", "SparseLinear", "ReLU", "Dropout", "Sequential", "softmax_cross_entropy", "Adam", "SGD", "fit",
           "fit_epochs", "evaluate", "save", "load"]

_F32 = np.float32


class Param:
    """A parameter: ``data``, its gradient ``grad`` (None before a backward) and ``rows``: the rows
    of a 2-D gradient that may be nonzero, strictly increasing (None: all). With ``rows``, ``grad``
    holds either every row or only those (``len(rows)`` rows, in that order); ``dense_grad()`` gives
    the full-shape gradient either way."""

    __slots__ = ("name", "data", "grad", "rows")

    def __init__(self, name: str, data: np.ndarray):
        self.name, self.data, self.grad, self.rows = name, data, None, None

    def dense_grad(self) -> Optional[np.ndarray]:
        """The gradient with ``data``'s shape (zeros outside ``rows``); None before a backward."""
        if self.grad is None or self.rows is None or self.grad.shape == self.data.shape:
            return self.grad
        out = np.zeros(self.data.shape, dtype=self.grad.dtype)
        out[np.asarray(self.rows, dtype=np.int64)] = self.grad
        return out

    def __repr__(self) -> str:
        return f"Param({self.name}, shape={self.data.shape})"


def _as_input(x, features: int, name: str = "x") -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray; got {_cuda.kind_of(x)}")
    if x.dtype != _F32:
        raise TypeError(f"{name} must be float32; got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != features:
        raise ValueError(f"{name} must have shape (batch, {features}); got {x.shape}")
    return np.ascontiguousarray(x)


def _fraction(v, name: str) -> float:
    """v as a float in [0, 1) (a sparsity, a drop rate), or a ValueError naming it."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1); got {v!r}")
    return float(v)


def _check_policy(grad) -> Optional[SparseGrad]:
    if grad is not None and not isinstance(grad, SparseGrad):
        raise TypeError(f"grad must be a sparsebp.algorithms policy (MeProp, MSBP, MeSimp) or None; "
                        f"got {type(grad).__name__}")
    return None if grad is None else grad.clone()


def _keep_mask(keep, n: int, what: str) -> np.ndarray:
    """``keep`` as a boolean array of n entries (an integer array would index, not mask)."""
    keep = np.asarray(keep)
    if keep.dtype != np.bool_ or keep.shape != (n,):
        raise ValueError(f"keep must be a boolean array with one entry per {what} ({n},); "
                         f"got {keep.dtype} {keep.shape}")
    return keep


def _rng_or_default(rng) -> np.random.Generator:
    """``rng`` itself, or a fresh generator for None; anything else is a TypeError."""
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator or None; got {type(rng).__name__}")
    return rng


class Linear:
    """``y = x @ W.T + b`` with a dense ``W`` (out, in); ``grad=`` a sparse-gradient policy
    (cloned: each layer keeps its own state)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, grad: Optional[SparseGrad] = None,
                 rng: Optional[np.random.Generator] = None):
        for v, nm in ((in_features, "in_features"), (out_features, "out_features")):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{nm} must be a positive int; got {v!r}")
        rng = _rng_or_default(rng)
        bound = 1.0 / np.sqrt(in_features)
        self.weight = Param("weight", rng.uniform(-bound, bound, (out_features, in_features)).astype(_F32))
        self.bias = Param("bias", rng.uniform(-bound, bound, out_features).astype(_F32)) if bias else None
        self.policy = _check_policy(grad)
        self._x = None

    @property
    def in_features(self) -> int:
        return self.weight.data.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.data.shape[0]

    def params(self) -> List[Param]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``x @ W.T + b`` for x (batch, in_features) float32; keeps x for the backward."""
        x = _as_input(x, self.in_features)
        self._x = x
        y = x @ self.weight.data.T
        if self.bias is not None:
            y += self.bias.data
        return y

    def backward(self, g: np.ndarray, input_grad: bool = True) -> Optional[np.ndarray]:
        """From g = dL/dy (batch, out_features): sets the parameters' gradients (with a policy, only
        the selected rows, listed in ``weight.rows``) and returns dL/dx (None if not
        ``input_grad``)."""
        if self._x is None:
            raise RuntimeError("backward called before forward")
        g = _as_input(g, self.out_features, "grad")
        w, x = self.weight.data, self._x
        if self.policy is None:
            self.weight.grad, self.weight.rows = g.T @ x, None
            if self.bias is not None:
                self.bias.grad = g.sum(axis=0)
            return g @ w if input_grad else None
        sel = self.policy.select(g)
        # compact: the gradient of the touched rows only (what the optimizers update); Param.rows
        # lists them, increasing.
        res = selected_backward(sel.grad, x, w, sel.cols, sel.mode, input_grad=input_grad,
                                bias_grad=self.bias is not None, bias_from=g, compact=True)
        self.weight.grad = res.weight
        self.weight.rows = res.weight_rows
        if self.bias is not None:
            self.bias.grad = res.bias
        return res.input

    def remove_units(self, keep: np.ndarray) -> None:
        """Remove the output units where ``keep`` (a boolean array, one per unit) is False (rows of W
        and b) for good."""
        keep = _keep_mask(keep, self.out_features, "output units")
        self.weight.data = np.ascontiguousarray(self.weight.data[keep])
        if self.bias is not None:
            self.bias.data = np.ascontiguousarray(self.bias.data[keep])
        for p in self.params():
            p.grad, p.rows = None, None

    def remove_inputs(self, keep: np.ndarray) -> None:
        """Remove the input features where ``keep`` (a boolean array, one per input) is False
        (columns of W)."""
        keep = _keep_mask(keep, self.in_features, "inputs")
        self.weight.data = np.ascontiguousarray(self.weight.data[:, keep])
        self.weight.grad, self.weight.rows = None, None

    def __repr__(self) -> str:
        return f"Linear({self.in_features}, {self.out_features}, grad={self.policy!r})"


class SparseLinear:
    """``y = x @ W.T + b`` with ``W`` a fixed-mask CSR (sparsebp kernels; the gradient only at the
    stored entries), optionally with a sparse-gradient policy: then the backward runs on the rows of
    W the selection touched (unified: the k selected rows; per example: the union of the rows any
    example selected, with the unselected entries of G zero)."""

    def __init__(self, in_features: int, out_features: int, sparsity: float, bias: bool = True, *,
                 grad: Optional[SparseGrad] = None, rng: Optional[np.random.Generator] = None):
        sparsity = _fraction(sparsity, "sparsity")
        rng = _rng_or_default(rng)
        dense = Linear(in_features, out_features, bias, rng=rng)
        keep = max(1, int(round((1.0 - sparsity) * in_features)))
        mask = np.zeros((out_features, in_features), dtype=bool)
        for r in range(out_features):  # the same number of inputs per output unit
            mask[r, rng.choice(in_features, keep, replace=False)] = True
        bound = 1.0 / np.sqrt(keep)
        w = rng.uniform(-bound, bound, (out_features, in_features)).astype(_F32)
        self.csr = CSR.from_dense(np.where(mask, w, 0).astype(_F32), mask=mask)
        self.values = Param("values", self.csr.values)
        self.bias = dense.bias
        self.policy = _check_policy(grad)
        self._x = None

    @classmethod
    def from_csr(cls, weight: CSR, bias: Optional[np.ndarray] = None, *,
                 grad: Optional[SparseGrad] = None) -> "SparseLinear":
        """A layer with the given CSR weight (its structure fixed; its values copied) and bias (a
        float32 (out,) array, copied; None: no bias), for weights pruned elsewhere."""
        if not isinstance(weight, CSR):
            raise TypeError(f"weight must be a sparsebp.CSR; got {type(weight).__name__}")
        rows, cols = weight.shape
        if rows < 1 or cols < 1:
            raise ValueError(f"weight must have at least one row and one column; got shape {weight.shape}")
        if bias is not None:
            bias = ops._bias_array(bias, rows)
        layer = cls.__new__(cls)
        layer.csr = weight.copy()
        layer.values = Param("values", layer.csr.values)
        layer.bias = None if bias is None else Param("bias", np.array(bias, dtype=_F32))
        layer.policy = _check_policy(grad)
        layer._x = None
        return layer

    @property
    def in_features(self) -> int:
        return self.csr.shape[1]

    @property
    def out_features(self) -> int:
        return self.csr.shape[0]

    def params(self) -> List[Param]:
        return [self.values] + ([self.bias] if self.bias is not None else [])

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``x @ W.T + b`` with the CSR ``W`` (cost ∝ nnz); keeps x for the backward."""
        x = _as_input(x, self.in_features)
        self._x = x
        return ops.linear_forward(x, self.csr, None if self.bias is None else self.bias.data,
                                  values=self.values.data)

    def backward(self, g: np.ndarray, input_grad: bool = True) -> Optional[np.ndarray]:
        """From g = dL/dy: the gradient of the stored values only (with a policy, of the selected
        rows' entries, their positions in ``values.rows``), the bias gradient, and dL/dx (None if
        not ``input_grad``)."""
        if self._x is None:
            raise RuntimeError("backward called before forward")
        g = _as_input(g, self.out_features, "grad")
        w = self.csr.with_values(self.values.data)
        if self.policy is None:
            r = ops.linear_backward(g, self._x, w, input_grad=input_grad, bias_grad=self.bias is not None)
            self.values.grad, self.values.rows = r.grad_values, None
            if self.bias is not None:
                self.bias.grad = r.grad_bias
            return r.grad_input
        sel = self.policy.select(g)
        dx, dv, pos = csr_selected_backward(sel.grad, self._x, w, sel.cols, sel.mode, input_grad=input_grad)
        self.values.grad, self.values.rows = dv, pos  # only the selected rows' entries move
        if self.bias is not None:
            self.bias.grad = g.sum(axis=0)
        return dx

    def __repr__(self) -> str:
        return (f"SparseLinear({self.in_features}, {self.out_features}, density={self.csr.density:.3f}, "
                f"grad={self.policy!r})")


class ReLU:
    """``max(x, 0)`` with sparsebp's element-wise kernel (NumPy's ``np.maximum(x, 0)`` and
    ``np.where`` took 5-30x longer on these shapes here)."""

    def __init__(self):
        self._y = None

    def params(self) -> List[Param]:
        return []

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._y = ops.relu(x)
        return self._y

    def backward(self, g: np.ndarray, input_grad: bool = True) -> np.ndarray:
        if self._y is None:
            raise RuntimeError("backward called before forward")
        return ops.relu_backward(g, self._y)

    def __repr__(self) -> str:
        return "ReLU()"


class Dropout:
    """Inverted dropout: in training mode each entry is zeroed with probability ``p`` and the others
    are scaled by ``1 / (1 - p)`` (float32 out); in evaluation mode (``Sequential.eval()``, and
    always inside ``evaluate``) it is the identity. ``rng``: where the masks come from (default: a
    fresh generator). Each training forward takes one 64-bit draw from it and expands it in C++
    with a counter-based generator (SplitMix64's mixer, 24-bit uniforms), so the masks are fixed by
    ``rng``'s state, whatever the thread count or ISA."""

    def __init__(self, p: float = 0.5, *, rng: Optional[np.random.Generator] = None):
        p = _fraction(p, "p")
        if _F32(p) >= 1.0:  # the kernel compares in float32
            raise ValueError(f"p must be below 1 in float32 (the mask's precision); got {p!r}")
        self.p = p
        self.rng = _rng_or_default(rng)
        self.training = True
        self._scale = None

    def params(self) -> List[Param]:
        return []

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not self.training or self.p == 0.0:
            self._scale = None
            return x
        # One C++ pass: the kept entries' factor, 1 / (1 - p), or 0 where dropped (one array for both
        # passes), and y = x * factor. The mask comes from a counter-based generator keyed by one
        # draw of self.rng (NumPy's own generator cost ~70 of the ~120 us this step took at 32 x 500).
        x = np.ascontiguousarray(x, dtype=_F32)
        y = np.empty_like(x)
        self._scale = np.empty_like(x)
        seed = int(self.rng.integers(0, 2 ** 63, dtype=np.int64))
        _core.dropout(x, y, self._scale, seed, self.p, float(_F32(1.0 / (1.0 - self.p))))
        return y

    def backward(self, g: np.ndarray, input_grad: bool = True) -> np.ndarray:
        return g if self._scale is None else g * self._scale

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"


class Sequential:
    """Layers applied in order; ``backward(grad)`` runs them in reverse (the first layer computes no
    input gradient). ``train()`` / ``eval()`` switch the layers that behave differently in training
    (``Dropout``); a new model is in training mode."""

    def __init__(self, *layers):
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        for i, layer in enumerate(layers):
            if not all(callable(getattr(layer, a, None)) for a in ("forward", "backward", "params")):
                raise TypeError(f"layer {i} must have forward, backward and params methods (a sparsebp.nn layer); "
                                f"got {type(layer).__name__}")
        self.layers = list(layers)

    @property
    def training(self) -> bool:
        """True unless some layer (Dropout) is in evaluation mode."""
        return all(getattr(m, "training", True) for m in self.layers)

    def train(self, mode: bool = True) -> "Sequential":
        """Training mode (``mode=False``: evaluation mode) for every layer that has one; returns self."""
        for m in self.layers:
            if hasattr(m, "training"):
                m.training = bool(mode)
        return self

    def eval(self) -> "Sequential":
        """Evaluation mode (Dropout is the identity); returns self."""
        return self.train(False)

    def params(self) -> List[Param]:
        """Every layer's parameters, in layer order (what an optimizer takes)."""
        return [p for layer in self.layers for p in layer.params()]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The layers in order on x (batch, features); each keeps what its backward needs."""
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, g: np.ndarray) -> None:
        """Back from the gradient of the last forward's output: sets each parameter's ``grad`` (and
        ``rows``); the first layer's input gradient is not formed."""
        for i in range(len(self.layers) - 1, -1, -1):
            g = self.layers[i].backward(g, input_grad=i > 0)

    def simplify(self, optimizer=None) -> List[int]:
        """meSimp: for every ``Linear`` with a ``MeSimp`` policy followed (after element-wise layers)
        by a ``Linear``, remove the units its counters found inactive, from both layers and from the
        optimizer state. Returns the new widths of the simplified layers."""
        if optimizer is not None and not callable(getattr(optimizer, "select", None)):
            raise TypeError("optimizer must be a sparsebp.nn optimizer (Adam, SGD) or sparsebp.ops.LazySGD (an object "
                            f"with select(param, keep, axis)) or None; got {type(optimizer).__name__}")
        pairs = []  # checked first, so that an error changes nothing (counters included)
        for i, layer in enumerate(self.layers):
            if not (isinstance(layer, Linear) and isinstance(layer.policy, MeSimp) and layer.policy.hits is not None):
                continue
            nxt = next((m for m in self.layers[i + 1:] if isinstance(m, (Linear, SparseLinear))), None)
            if not isinstance(nxt, Linear):
                raise ValueError(f"layer {i} can shrink only when the next weight layer is a dense Linear")
            pairs.append((layer, nxt))
        widths = []
        for layer, nxt in pairs:
            keep = layer.policy.prune_mask()
            if not keep.any():
                keep[np.argmax(layer.weight.data.any(axis=1))] = True  # never remove every unit
            if optimizer is not None:
                optimizer.select(layer.weight, keep, axis=0)
                if layer.bias is not None:
                    optimizer.select(layer.bias, keep, axis=0)
                optimizer.select(nxt.weight, keep, axis=1)
            layer.remove_units(keep)
            nxt.remove_inputs(keep)
            widths.append(int(keep.sum()))
        return widths

    def __repr__(self) -> str:
        return "Sequential(\n" + "\n".join(f"  {layer!r}" for layer in self.layers) + "\n)"


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray):
    """Mean cross-entropy of softmax(logits) against integer labels, and its gradient. An empty
    batch gives a NaN loss (a mean over no examples) and an empty gradient."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (batch, classes); got shape {logits.shape}")
    labels = np.asarray(labels)
    if labels.shape != (logits.shape[0],) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers of shape ({logits.shape[0]},); got {labels.dtype} {labels.shape}")
    # One C++ pass (which checks each label against the classes and that there is at least one); probabilities far below float32's resolution (< e^-80 of the row's largest)
    # count as 0 and gradient entries below FLT_MIN are flushed: subnormals would slow every
    # product they enter.
    grad = np.empty(logits.shape, dtype=_F32)
    if logits.shape[0] == 0:  # the mean over no examples (as torch's cross_entropy); no gradient entries
        return float("nan"), grad
    loss = _core.softmax_xent(np.ascontiguousarray(logits, dtype=_F32), labels, grad)
    return loss, grad


class _Optimizer:
    def __init__(self, params: Iterable[Param], lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError("the optimizer got no parameters")
        check_lr(lr)
        self.lr = float(lr)
        self.state = {}

    def select(self, p: Param, keep: np.ndarray, axis: int) -> None:
        """Follow a parameter that lost rows (axis 0) or columns (axis 1)."""
        st = self.state.get(id(p))
        if st:
            for k, v in st.items():
                if isinstance(v, np.ndarray) and v.ndim > axis:
                    st[k] = np.ascontiguousarray(np.compress(keep, v, axis=axis))


class Adam(_Optimizer):
    """Adam (Kingma and Ba). Parameters whose gradient lists ``rows`` are updated only there."""

    def __init__(self, params: Iterable[Param], lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, lr)
        check_adam_args(betas, eps)
        self.b1, self.b2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.t = 0

    def step(self) -> None:
        self.t += 1
        c1 = 1.0 - self.b1 ** self.t
        c2 = 1.0 - self.b2 ** self.t
        for p in self.params:
            if p.grad is None:
                continue
            st = self.state.setdefault(id(p), {})
            if "m" not in st or st["m"].shape != p.data.shape:
                st["m"] = np.zeros_like(p.data)
                st["v"] = np.zeros_like(p.data)
            g = p.grad
            if g.dtype != np.float32 or p.data.dtype != np.float32 or not g.flags.c_contiguous:
                g = np.ascontiguousarray(g, dtype=np.float32)
            rows = param_rows(p)
            compact = rows is not None and g.shape[0] == len(rows) != p.data.shape[0]
            # One fused pass in C++ (m, v and the parameter together); with rows, only those rows.
            _core.adam_step(p.data, g, st["m"], st["v"], rows, self.b1, self.b2, self.lr / c1, 1.0 / c2, self.eps,
                            compact)


class SGD(_Optimizer):
    """SGD with optional momentum and weight decay (PyTorch's rule: ``b = momentum * b + g +
    weight_decay * w``; ``w -= lr * b``), one fused pass in C++ per parameter. Parameters whose
    gradient lists ``rows`` are updated only there (the other rows are left alone, momentum and
    decay included). For exact sparse updates of blocks see ``sparsebp.ops.LazySGD``."""

    def __init__(self, params: Iterable[Param], lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, lr)
        check_sgd_args(momentum, weight_decay)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)

    def step(self) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            st = self.state.setdefault(id(p), {})
            if "buf" not in st or st["buf"].shape != p.data.shape:
                st["buf"] = np.zeros_like(p.data)
            rows, g = row_gradient(p)
            _core.lazy_sgd(p.data, st["buf"], None, rows, None, None, 0, g, None, self.lr, self.momentum,
                           self.weight_decay)


def check_loop_args(X, y, epochs, batch) -> None:
    """The argument checks of a training loop (``fit`` here, ``VRPGE.fit``)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0; got {epochs!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int; got {batch!r}")
    if len(X) != len(y):
        raise ValueError(f"X and y differ in length: {len(X)} and {len(y)}")
    if epochs > 0 and len(X) < batch:  # the last partial batch of an epoch is dropped
        raise ValueError(f"batch ({batch}) is larger than the data ({len(X)} examples): an epoch would train on "
                         "nothing (the last partial batch of each epoch is dropped)")


def evaluate(model: Sequential, X: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    """Accuracy of argmax(model(X)) against y, in evaluation mode (the model's mode is restored).
    An empty X is a ValueError (an accuracy over no examples is undefined)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int; got {batch!r}")
    if len(X) != len(y):
        raise ValueError(f"X and y differ in length: {len(X)} and {len(y)}")
    if len(X) == 0:
        raise ValueError("X is empty: no accuracy to compute")
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for i in range(0, len(X), batch):
            correct += int((model.forward(X[i:i + batch]).argmax(axis=1) == y[i:i + batch]).sum())
    finally:
        model.train(was_training)
    return correct / len(X)


def fit(model: Sequential, optimizer, X: np.ndarray, y: np.ndarray, *, epochs: int = 1, batch: int = 32,
        X_test: Optional[np.ndarray] = None, y_test: Optional[np.ndarray] = None, seed: int = 0,
        desc: str = "train", progress: bool = True, on_chunk=None, chunks: int = 8) -> List[dict]:
    """Mini-batch training with softmax cross-entropy and a tqdm progress bar. Each epoch visits
    the examples in a fresh random order, in ``len(X) // batch`` full batches (the last partial
    batch is dropped; a batch larger than the data is a ValueError). Returns one dict per
    epoch: loss, test accuracy (when test data is given) and seconds spent in forward, backward
    and update. ``on_chunk(epoch, chunk)``, if given, runs after each of ``chunks`` equal parts of
    an epoch (meSimp's schedule). ``fit_epochs`` is the same, one epoch at a time."""
    return list(fit_epochs(model, optimizer, X, y, epochs=epochs, batch=batch, X_test=X_test, y_test=y_test,
                           seed=seed, desc=desc, progress=progress, on_chunk=on_chunk, chunks=chunks))


def fit_epochs(model: Sequential, optimizer, X: np.ndarray, y: np.ndarray, *, epochs: int = 1, batch: int = 32,
               X_test: Optional[np.ndarray] = None, y_test: Optional[np.ndarray] = None, seed: int = 0,
               desc: str = "train", progress: bool = True, on_chunk=None, chunks: int = 8):
    """``fit`` as an iterator: trains one epoch per ``next()`` and yields its record (so several
    models can be trained epoch by epoch in turn, and timed under the same machine conditions).
    The arguments are checked here, before the first epoch."""
    check_loop_args(X, y, epochs, batch)
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be a positive int; got {chunks!r}")
    if on_chunk is not None and not callable(on_chunk):
        raise TypeError(f"on_chunk must be callable or None; got {type(on_chunk).__name__}")
    return _fit_epochs(model, optimizer, X, y, epochs, batch, X_test, y_test, seed, desc, progress, on_chunk, chunks)


def _fit_epochs(model, optimizer, X, y, epochs, batch, X_test, y_test, seed, desc, progress, on_chunk, chunks):
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    steps = len(X) // batch
    for e in range(epochs):
        model.train()
        order = rng.permutation(len(X))
        tf = tb = tu = 0.0
        losses = []
        bounds = set(int(steps * (c + 1) / chunks) for c in range(chunks))
        bar = tqdm(range(steps), desc=f"{desc} epoch {e + 1}/{epochs}", leave=False, disable=not progress)
        for s in bar:
            idx = order[s * batch:(s + 1) * batch]
            xb, yb = X[idx], y[idx]
            t0 = time.perf_counter()
            logits = model.forward(xb)
            loss, g = softmax_cross_entropy(logits, yb)
            t1 = time.perf_counter()
            model.backward(g)
            t2 = time.perf_counter()
            optimizer.step()
            t3 = time.perf_counter()
            tf, tb, tu = tf + t1 - t0, tb + t2 - t1, tu + t3 - t2
            losses.append(loss)
            if on_chunk is not None and (s + 1) in bounds:
                on_chunk(e, sorted(bounds).index(s + 1))
        rec = dict(epoch=e + 1, loss=float(np.mean(losses)) if losses else float("nan"), forward_s=tf,
                   backward_s=tb, update_s=tu, total_s=tf + tb + tu)
        if X_test is not None:
            rec["test_acc"] = evaluate(model, X_test, y_test)
        yield rec


# ---------------------------------------------------------------------------------------------
# Saving and loading a Sequential (safetensors: the arrays, and a JSON description of the layers)
# ---------------------------------------------------------------------------------------------

_FORMAT, _VERSION = "sparsebp.nn", 1


def _layer_entry(i: int, layer, arrays: dict) -> dict:
    """The JSON description of layer i; its arrays go into ``arrays`` under ``"{i}.<name>"``."""
    if type(layer) in (Linear, SparseLinear):
        policy = layer.policy
        if policy is not None and type(policy) not in _BUILT_IN_POLICIES:
            raise TypeError(f"layer {i} has a policy of its own type ({type(policy).__name__}), which save cannot "
                            f"write; the built-in policies are {[c.__name__ for c in _BUILT_IN_POLICIES]}")
        entry = dict(type=type(layer).__name__, in_features=layer.in_features, out_features=layer.out_features,
                     bias=layer.bias is not None, grad=None if policy is None else policy.settings())
        if isinstance(layer, Linear):
            arrays[f"{i}.weight"] = layer.weight.data
        else:
            arrays[f"{i}.indptr"] = layer.csr.indptr
            arrays[f"{i}.indices"] = layer.csr.indices
            arrays[f"{i}.values"] = layer.values.data
        if layer.bias is not None:
            arrays[f"{i}.bias"] = layer.bias.data
        return entry
    if type(layer) is ReLU:
        return dict(type="ReLU")
    if type(layer) is Dropout:
        return dict(type="Dropout", p=layer.p)
    raise TypeError(f"layer {i} is a {type(layer).__name__}; save writes sparsebp.nn's Linear, SparseLinear, ReLU "
                    "and Dropout layers")


def save(model: Sequential, path) -> None:
    """Write ``model`` (a ``Sequential`` of ``Linear``, ``SparseLinear``, ``ReLU`` and ``Dropout``
    layers) to a ``.safetensors`` file: every layer's arrays (a sparse layer's CSR structure and
    values) and a description of the layers with their sparse-gradient policies' settings. Not
    saved: state that training rebuilds (an optimizer's moments, MSBP's memory, meSimp's counters,
    Dropout's generator). ``load(path)`` builds the model again."""
    from safetensors.numpy import save_file

    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a sparsebp.nn.Sequential; got {type(model).__name__}")
    p = os.fspath(path)
    if not p.endswith(".safetensors"):
        raise ValueError(f"path must end in .safetensors; got {p!r}")
    arrays: dict = {}
    layers = [_layer_entry(i, layer, arrays) for i, layer in enumerate(model.layers)]
    meta = dict(format=_FORMAT, version=_VERSION, layers=layers, training=model.training)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, p, metadata={"sparsebp": json.dumps(meta)})


def _array(arrays: dict, key: str, dtype, shape, p: str, used: set) -> np.ndarray:
    a = arrays.get(key)
    if a is None:
        raise ValueError(f"{p}: entry {key!r} is missing")
    used.add(key)
    if a.dtype != dtype or (shape is not None and a.shape != shape):
        raise ValueError(f"{p}: entry {key!r} must be {np.dtype(dtype)} with shape "
                         f"{'(n,)' if shape is None else shape}; got {a.dtype} {a.shape}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{p}: entry {key!r} holds NaN or infinite values")
    return a


def _int_field(d: dict, name: str, where: str, p: str) -> int:
    v = d.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{p}: {where}: {name} must be a positive int; got {v!r}")
    return v


def _build_layer(i: int, d, arrays: dict, p: str, used: set):
    from .algorithms import from_settings

    where = f"layer {i}"
    if not isinstance(d, dict) or d.get("type") not in ("Linear", "SparseLinear", "ReLU", "Dropout"):
        raise ValueError(f"{p}: {where}: unknown layer description {d!r}")
    kind = d["type"]
    linear_keys = {"type", "in_features", "out_features", "bias", "grad"}
    keys = {"Linear": linear_keys, "SparseLinear": linear_keys, "ReLU": {"type"}, "Dropout": {"type", "p"}}[kind]
    if set(d) != keys:
        raise ValueError(f"{p}: {where}: a {kind} must be described by the keys {sorted(keys)}; got {sorted(d)}")
    if kind == "ReLU":
        return ReLU()
    if kind == "Dropout":
        try:
            return Dropout(d["p"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{p}: {where}: {e}") from None
    n_in, n_out = _int_field(d, "in_features", where, p), _int_field(d, "out_features", where, p)
    if not isinstance(d["bias"], bool):
        raise ValueError(f"{p}: {where}: bias must be true or false; got {d['bias']!r}")
    try:
        grad = None if d["grad"] is None else from_settings(d["grad"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: {where}: the grad policy: {e}") from None
    bias = _array(arrays, f"{i}.bias", _F32, (n_out,), p, used) if d["bias"] else None
    if kind == "Linear":
        layer = Linear.__new__(Linear)
        layer.weight = Param("weight", _array(arrays, f"{i}.weight", _F32, (n_out, n_in), p, used).copy())
        layer.bias = None if bias is None else Param("bias", bias.copy())
        layer.policy, layer._x = grad, None
        return layer
    indptr = _array(arrays, f"{i}.indptr", np.int64, (n_out + 1,), p, used)
    indices = _array(arrays, f"{i}.indices", np.int32, None, p, used)
    values = _array(arrays, f"{i}.values", _F32, indices.shape, p, used)
    try:
        w = CSR(indptr, indices, values, (n_out, n_in))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: {where}: the CSR structure is invalid: {e}") from None
    return SparseLinear.from_csr(w, bias, grad=grad)


def load(path) -> Sequential:
    """The model ``save`` wrote to ``path``, in the mode it was saved in. A file that is not one
    (unreadable, another format, a layer description or array that does not fit, an invalid CSR
    structure, NaN or infinite values) is a ``ValueError`` naming the file and the entry."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"no model file at {p}")
    arrays, _, meta = read_safetensors(p, "np")
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{p} was not written by sparsebp.nn.save (no {_FORMAT!r} description in it)")
    if meta.get("version") != _VERSION:
        raise ValueError(f"{p}: written by format version {meta.get('version')!r}; this sparsebp reads {_VERSION}")
    layers = meta.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"{p}: the layer list must be a non-empty list; got {layers!r}")
    used: set = set()
    model = Sequential(*[_build_layer(i, d, arrays, p, used) for i, d in enumerate(layers)])
    extra = sorted(set(arrays) - used)
    if extra:
        raise ValueError(f"{p}: entries {extra} belong to no layer")
    widths = [(i, m) for i, m in enumerate(model.layers) if isinstance(m, (Linear, SparseLinear))]
    for (i, a), (j, b) in zip(widths, widths[1:]):
        if a.out_features != b.in_features:
            raise ValueError(f"{p}: layer {i} has {a.out_features} outputs but layer {j} takes {b.in_features} inputs")
    training = meta.get("training", True)
    if not isinstance(training, bool):
        raise ValueError(f"{p}: training must be true or false; got {training!r}")
    return model.train(training)
