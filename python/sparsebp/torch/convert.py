"""Converters between dense torch models and sparsebp's sparse modules (in place)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .modules import (SparseConv2d, SparseLinear, _check_mask, _check_no_nan, _check_sparsity, _first_bad,
                      _magnitude_mask, random_mask)

__all__ = ["sparsify", "from_pruned", "densify", "Report", "LayerChange"]

_SPARSE_OF = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}
LayerFilter = Union[None, Iterable[str], Callable[[str, nn.Module], bool]]


@dataclass
class LayerChange:
    name: str
    kind: str  # the module type before the change
    shape: tuple
    sparsity: float  # fraction of zeros in the weight after the change (or that it would have had)
    nnz: int
    action: str  # "sparsified", "densified" or "kept dense (...)"


@dataclass
class Report:
    """What a converter changed, layer by layer; ``str(report)`` is a table."""

    changes: List[LayerChange] = field(default_factory=list)

    @property
    def converted(self) -> List[str]:
        return [c.name for c in self.changes if c.action in ("sparsified", "densified")]

    def __str__(self) -> str:
        lines = [f"{'layer':30s} {'type':12s} {'shape':>18s} {'sparsity':>9s} {'nnz':>10s}  action"]
        for c in self.changes:
            lines.append(f"{c.name:30s} {c.kind:12s} {str(c.shape):>18s} {c.sparsity:9.4f} {c.nnz:10d}  {c.action}")
        return "\n".join(lines)


def _select(model: nn.Module, layers: LayerFilter, types) -> List[tuple]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    named = [(n, m) for n, m in model.named_modules() if type(m) in types]
    if layers is None:
        return named
    if callable(layers):
        return [(n, m) for n, m in named if layers(n, m)]
    if isinstance(layers, str):
        raise TypeError("layers must be a collection of module names or a callable, not a single string")
    try:
        wanted = list(layers)
    except TypeError:
        raise TypeError(f"layers must be a collection of module names or a callable; got {type(layers).__name__}") from None
    have = {n for n, _ in named}
    unknown = [w for w in wanted if w not in have]
    if unknown:
        raise ValueError(f"layers names modules that are not eligible layers of the model: {unknown}; "
                         f"eligible: {sorted(have)}")
    return [(n, m) for n, m in named if n in set(wanted)]


def _places(model: nn.Module, module: nn.Module) -> List[str]:
    """The names under which ``module`` sits in ``model`` (more than one when it is shared)."""
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the module ``name`` is, and everywhere else the same module object is
    used (a layer shared between places stays shared, now as ``new``)."""
    if name == "":
        raise ValueError("the model itself is the layer to replace; wrap it in a container (nn.Sequential(layer))")
    for place in _places(model, model.get_submodule(name)):
        parent_name, _, attr = place.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _check_min_sparsity(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0):
        raise ValueError(f"min_sparsity must be a number in [0, 1]; got {v!r}")
    return float(v)


def sparsify(model: nn.Module, sparsity: float, *, scheme: str = "magnitude", scope: str = "layer",
             min_sparsity: float = 0.0, layers: LayerFilter = None,
             generator: Optional[torch.Generator] = None) -> Report:
    """Prune the eligible layers of ``model`` (``nn.Linear``, ``nn.Conv2d``) and swap in sparsebp modules, in place.

    - ``scheme="magnitude"`` keeps the largest |w|; ``"random"`` a uniformly random mask.
    - ``scope="layer"``: every layer at ``sparsity``; ``scope="global"`` (magnitude only): one
      threshold over all selected layers together, so that ``sparsity`` holds overall and layers
      differ.
    - ``min_sparsity``: a layer that would end below it stays dense (sparse kernels do not pay off
      on nearly dense layers); reported as kept.
    - ``layers``: module names, or a callable ``(name, module) -> bool``; default all eligible.

    Returns a ``Report``. Build the optimizer after converting (the parameters are new).
    """
    s = _check_sparsity(sparsity)
    if scheme not in ("magnitude", "random"):
        raise ValueError(f"scheme must be 'magnitude' or 'random'; got {scheme!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global'; got {scope!r}")
    if scope == "global" and scheme != "magnitude":
        raise ValueError("scope='global' needs scheme='magnitude' (a global random mask is a per-layer one)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    min_s = _check_min_sparsity(min_sparsity)
    chosen = _select(model, layers, _SPARSE_OF)
    masks: Dict[str, Tensor] = {}
    if scope == "global" and chosen:
        for n, m in chosen:  # (before any ranking: the error names the layer)
            _check_no_nan(m.weight, f"layer {n!r}'s weight")
        flat = torch.cat([m.weight.detach().reshape(-1).abs().to(torch.float64).cpu() for _, m in chosen])
        keep_all = _magnitude_mask(flat, s, None)
        off = 0
        for n, m in chosen:
            k = m.weight.numel()
            masks[n] = keep_all[off:off + k].reshape(m.weight.shape)
            off += k
    else:
        for n, m in chosen:
            masks[n] = (_magnitude_mask(m.weight, s, f"layer {n!r}'s weight") if scheme == "magnitude"
                        else random_mask(tuple(m.weight.shape), s, generator))
    return _convert(model, chosen, masks, min_s)


def _check_finite(weight: Tensor, name: str) -> None:
    """A ValueError naming ``name`` and the first position when ``weight`` holds NaN or infinity (a
    pruned checkpoint's layer would carry it into its outputs; ``load`` refuses such values too)."""
    at = _first_bad(weight, lambda w: ~torch.isfinite(w))
    if at is not None:
        raise ValueError(f"{name} holds {weight.detach()[at].item()} at {at}; a layer is converted only from finite "
                         "weights")


def _convert(model, chosen, masks, min_s) -> Report:
    # Every layer is checked and built before the first is swapped in: an error leaves the model
    # as it was, not half converted.
    plan = []
    for n, m in chosen:
        mask = _check_mask(masks[n], m.weight.shape, f"the mask of {n!r}")  # before its sparsity is counted
        if m.weight.device.type == "meta":
            raise ValueError(f"layer {n!r} is on the meta device (no values to keep); materialise it first "
                             "(e.g. module.to_empty(device='cpu') and load its weights)")
        nnz = int(mask.sum())
        sp = 1.0 - nnz / max(mask.numel(), 1)
        new = None
        if sp >= min_s:
            new = _SPARSE_OF[type(m)].from_dense(m, mask=mask)
            new.train(m.training)
        plan.append((n, m, sp, nnz, new))
    report = Report()
    for n, m, sp, nnz, new in plan:
        if new is None:
            report.changes.append(LayerChange(n, type(m).__name__, tuple(m.weight.shape), sp, nnz,
                                              f"kept dense (sparsity below min_sparsity={min_s})"))
            continue
        _replace(model, n, new)
        report.changes.append(LayerChange(n, type(m).__name__, tuple(m.weight.shape), sp, nnz, "sparsified"))
    return report


def _pruned_state(checkpoint):
    """(state, masks): a state dict (or a path to one) with ``X.weight_orig`` and ``X.weight_mask``
    (torch.nn.utils.prune) folded into ``X.weight``, and the masks found, by module."""
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        from .io import _read_any

        state, _ = _read_any(checkpoint)
    else:
        state = checkpoint
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint must be a state dict (a mapping) or a path; got {type(state).__name__}")
    state = dict(state)
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = dict(state["state_dict"])
    pruned = {}
    for key in [k for k in state if k.endswith(".weight_orig") or k == "weight_orig"]:
        base = key[: -len("weight_orig")]
        mkey = base + "weight_mask"
        if mkey not in state:
            raise ValueError(f"checkpoint has {key} but no {mkey} (a torch.nn.utils.prune checkpoint stores both)")
        orig, mask = state.pop(key), state.pop(mkey)
        if not isinstance(orig, Tensor) or not isinstance(mask, Tensor) or orig.shape != mask.shape:
            raise ValueError(f"checkpoint entries {key} and {mkey} must be tensors of one shape; got "
                             f"{getattr(orig, 'shape', type(orig).__name__)} and "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")
        state[base + "weight"] = orig * mask
        pruned[base.rstrip(".")] = mask != 0
    return state, pruned


def _fit_problems(expected: Dict[str, object], state: Dict[str, object], skip=frozenset()):
    """What keeps ``state`` from loading into a model whose state dict is ``expected``: the missing
    and the unexpected keys (sorted), and the first key (in ``expected``'s order, outside ``skip``)
    present in both whose checkpoint entry is not a tensor of the model tensor's shape, as
    (key, model tensor, checkpoint entry), or None."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = next(((k, want, state[k]) for k, want in expected.items()
                if k in state and k not in skip and isinstance(want, Tensor)
                and (not isinstance(state[k], Tensor) or tuple(state[k].shape) != tuple(want.shape))), None)
    return missing, unexpected, bad


def _check_pruned_state_fits(model: nn.Module, chosen, state: Dict[str, object]) -> None:
    """Whether ``state`` loads strictly into ``model`` once the chosen layers' pruning
    reparametrisation is removed (their ``weight_orig`` / ``weight_mask`` become ``weight``), without
    changing anything: the keys, and every tensor's shape."""
    expected = dict(model.state_dict(keep_vars=True))
    for n, m in chosen:
        if hasattr(m, "weight_orig"):
            pre = n + "." if n else ""
            expected[pre + "weight"] = expected.pop(pre + "weight_orig")
            expected.pop(pre + "weight_mask", None)
    missing, unexpected, bad = _fit_problems(expected, state)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing keys {missing}, unexpected keys {unexpected}")
    if bad is not None:
        k, want, got = bad
        raise ValueError(f"checkpoint does not fit the model: {k!r} is "
                         f"{tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__} in the "
                         f"checkpoint and {tuple(want.shape)} in the model")


def from_pruned(model: nn.Module, checkpoint=None, *, masks: Optional[Mapping[str, Tensor]] = None,
                min_sparsity: float = 0.5, layers: LayerFilter = None) -> Report:
    """Swap the layers of a pruned model for sparsebp modules, keeping exactly the pruned mask.

    The mask of each eligible layer (``nn.Linear``, ``nn.Conv2d``) comes from, in order:
    1. ``masks[name]`` (a boolean tensor of the weight's shape), if given;
    2. ``torch.nn.utils.prune``'s ``weight_mask`` (on the live module, or in ``checkpoint``: a
       state dict or a ``.pt`` path holding ``weight_orig`` + ``weight_mask``);
    3. the nonzeros of the dense weight (a checkpoint saved after ``prune.remove``).
    ``checkpoint`` (optional) is loaded into ``model`` first; a checkpoint that does not fit the
    model is a ``ValueError``. Layers whose sparsity is below ``min_sparsity`` stay dense (e.g. an
    unpruned classifier head). A weight holding NaN or infinity (the checkpoint's, or the live
    model's; where pruned, ``weight_orig * weight_mask``, as torch's forward computes it) is a
    ``ValueError`` naming the layer and the position. Returns a ``Report``.
    """
    min_s = _check_min_sparsity(min_sparsity)
    chosen = _select(model, layers, _SPARSE_OF)
    if masks is not None:
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a mapping from module name to boolean tensor; got {type(masks).__name__}")
        known = {n for n, _ in chosen}
        unknown = [k for k in masks if k not in known]
        if unknown:
            raise ValueError(f"masks names modules that are not eligible layers of the model: {unknown}")
        shapes = {n: m.weight.shape for n, m in chosen}
        masks = {n: _check_mask(v, shapes[n], f"the mask of {n!r}") for n, v in masks.items()}
    # Everything is checked before the model changes: an error leaves it as it was.
    from_file: Dict[str, Tensor] = {}
    if checkpoint is not None:
        state, from_file = _pruned_state(checkpoint)
        _check_pruned_state_fits(model, chosen, state)
        for n, _ in chosen:  # the weights the layers will get: weight_orig * weight_mask where pruned
            key = f"{n}.weight" if n else "weight"
            _check_finite(state[key], f"checkpoint entry {key!r}" + (" (weight_orig * weight_mask)" if n in from_file
                                                                      else ""))
        # prune's reparametrisation on the live model would fight the incoming weight: remove it.
        for _, m in chosen:
            if hasattr(m, "weight_orig"):
                torch.nn.utils.prune.remove(m, "weight")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # (what the checks above cannot foresee)
            raise ValueError(f"checkpoint does not fit the model: {e}") from None
    else:
        for n, m in chosen:
            if hasattr(m, "weight_mask") and hasattr(m, "weight_orig"):
                _check_finite(m.weight_orig * m.weight_mask, f"layer {n!r}'s weight_orig * weight_mask")
            else:
                _check_finite(m.weight, f"layer {n!r}'s weight")
    found: Dict[str, Tensor] = {}
    for n, m in chosen:
        if masks is not None and n in masks:
            found[n] = masks[n]
        elif hasattr(m, "weight_mask") and hasattr(m, "weight_orig"):
            found[n] = m.weight_mask.detach() != 0
            torch.nn.utils.prune.remove(m, "weight")  # folds weight_orig * weight_mask into weight
        elif n in from_file:
            found[n] = from_file[n]
        else:
            found[n] = m.weight.detach() != 0
    return _convert(model, chosen, found, min_s)


def densify(model: nn.Module, layers: LayerFilter = None) -> Report:
    """Swap sparsebp modules back for plain torch ones (zeros outside the mask), in place."""
    report = Report()
    for n, m in _select(model, layers, {SparseLinear, SparseConv2d}):
        new = m.to_dense()
        new.train(m.training)
        _replace(model, n, new)
        report.changes.append(LayerChange(n, type(m).__name__, tuple(new.weight.shape), m.sparsity, m.nnz,
                                          "densified"))
    return report
