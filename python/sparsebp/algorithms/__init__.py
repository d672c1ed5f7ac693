"""Sparse-gradient policies, written once and used by the NumPy layers (``sparsebp.nn``) and the
torch layers (``sparsebp.torch``). The math is in ``design/ALGORITHMS.md`` sections 2-4.

- ``MeProp(k=... | ratio=..., mode="example" | "unified")``: keep the top-k of the output gradient
  (per example, or one set of k columns for the batch).
- ``MSBP(k=... | ratio=..., alpha=...)``: MSBP-style memory (our reading of the paper, see the docs):
  ``u = G + M``; ``Ĝ = unified top-k of u``; ``M = alpha * (u - Ĝ)``. ``alpha = 0`` is unified
  meProp, bit for bit.
- ``MeSimp(k=... | ratio=..., p=0.1)``: per-example meProp that counts, per output unit, how many
  examples selected it; ``prune_mask()`` gives the units to keep (selected by at least
  ``floor(p * seen)`` examples since the last prune). The layers apply the removal
  (``sparsebp.nn.Linear.remove_units``).

Every policy is an object with per-layer state: give each layer its own (``policy.clone()``; the
layers clone what they are given). ``policy.settings()`` / ``from_settings(d)``: a built-in policy's
settings as a JSON-able dict and back (what ``sparsebp.nn.save`` and ``sparsebp.torch.save`` store).
"""
from __future__ import annotations

import copy
from typing import Optional

import numpy as np

from .. import _core
from ..sparse_grad import _check_k, _rows_f32, topk, topk_columns

__all__ = ["MeProp", "MSBP", "MeSimp", "MeSimpSchedule", "SparseGrad", "Selection", "from_settings"]


def _unit_number(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)):
        raise TypeError(f"{name} must be a number; got {type(v).__name__}")
    if not (0.0 <= float(v) <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1]; got {v}")
    return float(v)


class Selection:
    """What a policy chose for one backward: the gradient to propagate and which entries it keeps.

    ``mode``: "example" (``cols`` is (batch, k): per-row columns) or "unified" (``cols`` is (k,)).
    ``grad``: the (batch, out) gradient whose selected entries are propagated (G itself, or G plus
    memory for MSBP); entries outside the selection count as zero.
    """

    __slots__ = ("mode", "cols", "grad")

    def __init__(self, mode: str, cols: np.ndarray, grad: np.ndarray):
        self.mode, self.cols, self.grad = mode, cols, grad

    def dense(self) -> np.ndarray:
        """Ĝ as a dense array (zeros outside the selection; per example, a column listed twice in a
        row counts twice, as in ``sparsebp.ops.selected_backward``); for tests and small layers."""
        out = np.zeros_like(self.grad)
        if self.mode == "example":
            cols = np.asarray(self.cols, dtype=np.int64)
            rows = np.broadcast_to(np.arange(cols.shape[0])[:, None], cols.shape)
            np.add.at(out, (rows, cols), self.grad[rows, cols])
        else:
            out[:, self.cols] = self.grad[:, self.cols]
        return out


class SparseGrad:
    """Base of the policies: k given directly or as a ratio of the layer's outputs."""

    mode = "example"

    def __init__(self, k: Optional[int] = None, ratio: Optional[float] = None):
        if (k is None) == (ratio is None):
            raise ValueError("give exactly one of k (an int >= 0) and ratio (a number in (0, 1])")
        if k is not None:
            k = _check_k(k)
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating)):
                raise TypeError(f"ratio must be a number; got {type(ratio).__name__}")
            if not (0.0 < float(ratio) <= 1.0):
                raise ValueError(f"ratio must lie in (0, 1]; got {ratio}")
            ratio = float(ratio)
        self.k, self.ratio = k, ratio

    def k_for(self, out_features: int) -> int:
        """k for a layer with ``out_features`` outputs (a ratio rounds, at least 1)."""
        if self.k is not None:
            return self.k
        return max(1, int(round(self.ratio * out_features)))

    def clone(self) -> "SparseGrad":
        """A fresh policy of the same type with the same settings and no state (one per layer): a
        deep copy, its state then cleared (``_clear_state``). A subclass keeps its type (it used to
        come back as the built-in class it derived from, silently dropping what it changed)."""
        new = copy.deepcopy(self)
        new._clear_state()
        return new

    def _clear_state(self) -> None:
        """Forget what ``select`` learned (nothing, for a stateless policy)."""

    def select(self, g: np.ndarray) -> Selection:
        """The selection for one backward of a layer whose output gradient is ``g`` (batch, out,
        float32): which entries to propagate, and from which gradient (``Selection``). Called once
        per backward, in order; stateful policies (MSBP's memory, meSimp's counters) update here."""
        raise NotImplementedError

    def settings(self) -> dict:
        """The policy's settings as a JSON-able dict (``{"type": "MeProp", "k": 20, ...}``), which
        ``from_settings`` turns back into a fresh policy. State (MSBP's memory, meSimp's counters)
        is not part of it. Only the built-in policies have settings."""
        raise NotImplementedError(f"{type(self).__name__} has no settings(); only the built-in policies do")

    def _desc(self) -> str:
        return f"k={self.k}" if self.k is not None else f"ratio={self.ratio}"


class MeProp(SparseGrad):
    """meProp: top-k of the output gradient, per example (``mode="example"``, as published) or one
    set for the batch (``mode="unified"``)."""

    def __init__(self, k: Optional[int] = None, ratio: Optional[float] = None, mode: str = "example"):
        super().__init__(k, ratio)
        if mode not in ("example", "unified"):
            raise ValueError(f"mode must be 'example' or 'unified'; got {mode!r}")
        self.mode = mode

    def select(self, g: np.ndarray) -> Selection:
        k = self.k_for(g.shape[1])
        cols = topk(g, k) if self.mode == "example" else topk_columns(g, k)
        return Selection(self.mode, cols, g)

    def settings(self) -> dict:
        return dict(type="MeProp", k=self.k, ratio=self.ratio, mode=self.mode)

    def __repr__(self) -> str:
        return f"MeProp({self._desc()}, mode={self.mode!r})"


class MSBP(SparseGrad):
    """MSBP-style memory of the dropped gradient (unified selection). The memory has the shape of
    the gradient, (batch, out); it restarts at zero when the batch size changes (e.g. a short last
    batch) and on ``reset()``. Memory entries below float32's smallest normal number (~1.2e-38)
    are stored as 0: the memory of a unit whose gradient stays 0 shrinks by ``alpha`` each step and
    would otherwise stay subnormal for many steps (23 at alpha = 0.5), slowing the arithmetic it
    enters."""

    mode = "unified"

    def __init__(self, k: Optional[int] = None, ratio: Optional[float] = None, alpha: float = 0.8):
        super().__init__(k, ratio)
        self.alpha = _unit_number(alpha, "alpha")
        self.memory: Optional[np.ndarray] = None

    def reset(self) -> None:
        """Forget the memory (the next backward starts from the plain gradient)."""
        self.memory = None

    _clear_state = reset

    def select(self, g: np.ndarray) -> Selection:
        k = self.k_for(g.shape[1])
        if self.alpha == 0.0:
            return Selection("unified", topk_columns(g, k), g)  # exactly unified meProp
        # One C++ pass (u = g + M, the column scores and their top k, the next memory). The NumPy
        # version (an add, the selection, a copy, a masked store and a scaling) took ~32 us a layer
        # per step in the demo (32 x 500), against ~13 (bench/results/demo_zen3/run_9bd336a/).
        g = _rows_f32(g, "g")
        mem = self.memory if self.memory is not None and self.memory.shape == g.shape else None
        u = g if mem is None else np.empty_like(g)
        cols = np.empty(min(k, g.shape[1]), dtype=np.int32)
        nxt = np.empty_like(g)
        _core.msbp_step(g, mem, None if mem is None else u, self.alpha, k, cols, nxt)
        self.memory = nxt
        return Selection("unified", cols, u)

    def settings(self) -> dict:
        return dict(type="MSBP", k=self.k, ratio=self.ratio, alpha=self.alpha)

    def __repr__(self) -> str:
        return f"MSBP({self._desc()}, alpha={self.alpha})"


class MeSimp(MeProp):
    """meSimp: per-example meProp plus activeness counters. ``hits[j]``: examples whose top-k held
    unit j since the last prune; ``seen``: examples since then. ``prune_mask()`` returns the units
    to keep (``hits >= floor(p * seen)``) and resets the counters; the layer removes the others."""

    def __init__(self, k: Optional[int] = None, ratio: Optional[float] = None, p: float = 0.1):
        super().__init__(k, ratio, "example")
        self.p = _unit_number(p, "p")
        self.hits: Optional[np.ndarray] = None
        self.seen = 0

    def _clear_state(self) -> None:
        self.hits, self.seen = None, 0

    def select(self, g: np.ndarray) -> Selection:
        sel = super().select(g)
        if self.hits is None or self.hits.shape[0] != g.shape[1]:
            self.hits = np.zeros(g.shape[1], dtype=np.int64)
        self.hits += np.bincount(sel.cols.reshape(-1), minlength=g.shape[1])
        self.seen += g.shape[0]
        return sel

    def prune_mask(self) -> np.ndarray:
        """Boolean (out,) mask of the units to keep; resets the counters. Before any backward, all."""
        if self.hits is None:
            raise ValueError("no backward pass has been counted since the last prune")
        keep = self.hits >= int(np.floor(self.p * self.seen))
        self.hits = None
        self.seen = 0
        return keep

    def settings(self) -> dict:
        return dict(type="MeSimp", k=self.k, ratio=self.ratio, p=self.p)

    def __repr__(self) -> str:
        return f"MeSimp({self._desc()}, p={self.p})"


_SETTINGS = {"MeProp": (MeProp, ("mode",)), "MSBP": (MSBP, ("alpha",)), "MeSimp": (MeSimp, ("p",))}
# The policies with settings (what sparsebp.nn.save and sparsebp.torch.save can write); a subclass
# of one is not among them (its settings could not rebuild it).
_BUILT_IN_POLICIES = tuple(cls for cls, _ in _SETTINGS.values())


def from_settings(settings: dict) -> SparseGrad:
    """A fresh policy from ``policy.settings()`` (as read back from JSON, say). Anything else (an
    unknown type, a missing or extra key, a value the policy refuses) is a ``TypeError`` or
    ``ValueError`` naming it."""
    if not isinstance(settings, dict):
        raise TypeError(f"settings must be a dict; got {type(settings).__name__}")
    kind = settings.get("type")
    if not isinstance(kind, str) or kind not in _SETTINGS:
        raise ValueError(f"settings['type'] must be one of {sorted(_SETTINGS)}; got {kind!r}")
    cls, extra = _SETTINGS[kind]
    want = {"type", "k", "ratio", *extra}
    if set(settings) != want:
        raise ValueError(f"settings of a {kind} must have the keys {sorted(want)}; got {sorted(settings)}")
    return cls(k=settings["k"], ratio=settings["ratio"], **{e: settings[e] for e in extra})


class MeSimpSchedule:
    """The meSimp authors' schedule, as an ``on_chunk`` callback for ``sparsebp.nn.fit``: each epoch
    is split into ``chunks`` parts (``fit(..., chunks=8)``); epochs come in cycles of ``cycle``
    "simplify" epochs followed by ``cycle`` "normal" ones. In a simplify epoch the model is
    simplified (``model.simplify(optimizer)``) after every chunk; in a normal epoch the counters
    are left to run. ``widths`` records (epoch, chunk, new widths) after each simplification."""

    def __init__(self, model, optimizer, chunks: int = 8, cycle: int = 5):
        for v, name in ((chunks, "chunks"), (cycle, "cycle")):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        self.model, self.optimizer, self.chunks, self.cycle = model, optimizer, chunks, cycle
        self.widths: list = []

    def simplifying(self, epoch: int) -> bool:
        """Whether epoch (0-based) is a simplify epoch."""
        return (epoch // self.cycle) % 2 == 0

    def __call__(self, epoch: int, chunk: int) -> None:
        if self.simplifying(epoch):
            self.widths.append((epoch, chunk, self.model.simplify(self.optimizer)))
