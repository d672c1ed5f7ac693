"""Saving and loading models with sparsebp layers, as ``.pt`` (torch.save) or ``.safetensors``.

A file holds the model's ``state_dict`` and a small JSON description of which modules are sparse
(name, type, shape). ``load(model, path)`` takes the *dense* architecture (or one already
converted), swaps the listed modules for sparse ones with the file's structures, then loads the
state strictly. Anything that does not fit is a ``ValueError`` naming the file and the entry.
``.pt`` files are read with ``weights_only=True`` (no arbitrary code runs on load).

The sparse-gradient policies of ``SparseLinear`` (``grad_topk`` / ``grad_policy``) and
``MePropLinear`` layers are saved as their settings (``policy.settings()``; not their state: MSBP's
memory and meSimp's counters start afresh, as an optimizer's state would without its own file).
``load`` gives each layer that has no policy the file's, turning a dense ``nn.Linear`` the file
knows as a ``MePropLinear`` into one; a policy already set on the model is kept.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, List, Tuple

import torch
from torch import nn

from .. import algorithms as _alg
from .._files import read_safetensors
from .convert import _fit_problems, _places, _replace
from .meprop import MePropLinear
from .modules import SparseConv2d, SparseLinear, check_structure_entries, conv_padding

__all__ = ["save", "load"]

_FORMAT = "sparsebp.torch"
_VERSION = 1
_TYPES = {"SparseLinear": (SparseLinear, nn.Linear), "SparseConv2d": (SparseConv2d, nn.Conv2d)}


def _geometry(m: nn.Module) -> dict:
    """The constructor arguments that must agree between a file and a model."""
    if isinstance(m, (SparseLinear, nn.Linear)):
        return dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)
    pad = conv_padding(m.padding, m.kernel_size, m.stride, m.dilation)
    geometry = dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=list(m.kernel_size),
                    stride=list(m.stride), padding=pad if isinstance(pad, str) else list(pad),
                    dilation=list(m.dilation), groups=m.groups, bias=m.bias is not None)
    if m.padding_mode != "zeros":  # (absent for zeros, as in the files written before it was kept)
        geometry["padding_mode"] = m.padding_mode
    return geometry


def _policy_of(m: nn.Module):
    """(layer kind, its sparse-gradient policy or None) of a module that can have one, else None."""
    if isinstance(m, SparseLinear):
        return "SparseLinear", m.__dict__.get("grad_policy")
    if isinstance(m, MePropLinear):
        return "MePropLinear", m.__dict__.get("policy")
    return None


def _policies(model: nn.Module) -> dict:
    """{module name: {"layer": kind, "policy": settings}} of the layers with a built-in policy."""
    out = {}
    for n, m in model.named_modules():
        kind_policy = _policy_of(m)
        if kind_policy is None or kind_policy[1] is None:
            continue
        kind, policy = kind_policy
        if type(policy) not in _alg._BUILT_IN_POLICIES:
            warnings.warn(f"the {kind} {n!r} has a policy of its own type ({type(policy).__name__}), which is not "
                          f"saved: set it again after loading", UserWarning, stacklevel=4)  # (at the save call)
            continue
        out[n] = dict(layer=kind, policy=policy.settings())
    return out


def _describe(model: nn.Module) -> dict:
    sparse = {}
    for n, m in model.named_modules():
        for tname, (cls, _) in _TYPES.items():
            if isinstance(m, cls):
                sparse[n] = dict(type=tname, **_geometry(m))
    # (A key that readers before it ignore: they load the weights and drop the policies, as they did.)
    return dict(format=_FORMAT, version=_VERSION, sparse_modules=sparse, grad_policies=_policies(model))


def _plan_policies(p: str, model: nn.Module, entries, swaps) -> List[tuple]:
    """What ``load`` will do with the file's policies, checked before anything changes: a list of
    (name, module after the swaps, policy). A module that already has a policy keeps it."""
    if entries is None:
        return []
    if not isinstance(entries, dict):
        raise ValueError(f"{p}: grad_policies must be an object; got {type(entries).__name__}")
    swapped = {name: new for name, _, new in swaps}
    plan = []
    for name, d in entries.items():
        if not isinstance(d, dict) or set(d) != {"layer", "policy"} or d["layer"] not in ("SparseLinear",
                                                                                          "MePropLinear"):
            raise ValueError(f"{p}: unknown grad policy entry for {name!r}: {d!r}")
        try:
            policy = _alg.from_settings(d["policy"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{p}: the grad policy of {name!r}: {e}") from None
        try:
            m = swapped[name] if name in swapped else model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{p}: the file has a grad policy for {name!r}, a module the model does not have") from None
        kind_policy = _policy_of(m)
        if kind_policy is not None and kind_policy[0] == d["layer"]:
            if kind_policy[1] is None:
                plan.append((name, m, policy))
        elif d["layer"] == "MePropLinear" and type(m) is nn.Linear:
            if name == "":
                raise ValueError(f"{p}: the model itself is a MePropLinear in the file; load into MePropLinear directly")
            plan.append((name, m, policy))
        else:
            raise ValueError(f"{p}: module {name!r} is {m!r} in the model but a {d['layer']} in the file")
    return plan


def _apply_policies(model: nn.Module, plan) -> None:
    for name, m, policy in plan:
        if isinstance(m, SparseLinear):
            m.grad_policy = policy
        else:  # a dense nn.Linear the file knows as a MePropLinear (weights loaded already)
            new = MePropLinear.from_linear(m, policy=policy)
            new.train(m.training)
            _replace(model, name, new)


def _is_safetensors(path) -> bool:
    return os.fspath(path).endswith(".safetensors")


def save(model: nn.Module, path) -> None:
    """Write ``model``'s state and its sparse-module description to ``path`` (``.safetensors`` by
    extension, else ``torch.save``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    meta = _describe(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if _is_safetensors(path):
        from safetensors.torch import save_file

        # safetensors refuses tensors sharing memory: give each its own.
        save_file({k: v.clone() for k, v in state.items()}, os.fspath(path), metadata={"sparsebp": json.dumps(meta)})
    else:
        torch.save({"sparsebp": meta, "state_dict": state}, path)


def _read_any(path) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(state dict, sparsebp description or {}) of a file; unreadable files are a ValueError."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"no checkpoint at {p}")
    if _is_safetensors(p):
        state, found, meta = read_safetensors(p, "pt")
        meta = meta if found else {}
        if not isinstance(meta, dict):
            raise ValueError(f"{p}: the sparsebp metadata must be a JSON object; got {type(meta).__name__}")
        return state, meta
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, truncated zip archives, ...
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"{p} is not a readable torch checkpoint ({type(e).__name__}: {first})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj.get("sparsebp"), dict):
        return obj["state_dict"], obj["sparsebp"]
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        if "state_dict" in obj and isinstance(obj["state_dict"], dict):
            return obj["state_dict"], {}
        return obj, {}
    raise ValueError(f"{p} does not hold a state dict; got {type(obj).__name__}")


def load(model: nn.Module, path, *, strict: bool = True) -> nn.Module:
    """Load a file written by ``save`` into ``model`` (converting the listed modules to sparse ones
    first) and return ``model``. Layers without a sparse-gradient policy get the file's (a policy
    set on the model is kept). Build the optimizer after loading."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    p = os.fspath(path)
    state, meta = _read_any(p)
    if meta:
        if meta.get("format") != _FORMAT or not isinstance(meta.get("sparse_modules"), dict):
            raise ValueError(f"{p}: unrecognised sparsebp metadata {meta!r}")
        if meta.get("version") != _VERSION:
            raise ValueError(f"{p}: written by format version {meta.get('version')}; this sparsebp reads {_VERSION}")
    swaps = []  # (name, the model's dense module, the sparse module that replaces it)
    for name, d in (meta.get("sparse_modules") or {}).items():
        if not isinstance(d, dict) or d.get("type") not in _TYPES:
            raise ValueError(f"{p}: unknown sparse module description for {name!r}: {d!r}")
        sparse_cls, dense_cls = _TYPES[d["type"]]
        try:
            m = model.get_submodule(name) if name else model
        except AttributeError:
            raise ValueError(f"{p}: the file has a sparse module {name!r} the model does not have") from None
        want = {k: v for k, v in d.items() if k != "type"}
        if not isinstance(m, (sparse_cls, dense_cls)) or _geometry(m) != want:
            raise ValueError(f"{p}: module {name!r} is {m!r} in the model but a {d['type']} {want} in the file")
        if isinstance(m, sparse_cls):
            continue
        ip, ix = state.get(f"{name}.indptr" if name else "indptr"), state.get(f"{name}.indices" if name else "indices")
        if ip is None or ix is None:
            raise ValueError(f"{p}: sparse module {name!r} has no indptr/indices entries")
        if name == "":
            raise ValueError(f"{p}: the model itself is a sparse layer; load into SparseLinear directly")
        # Any valid structure of the right shape; the state load below puts the file's in place.
        new = sparse_cls.from_dense(m, mask=torch.zeros(tuple(m.weight.shape), dtype=torch.bool))
        new.train(m.training)
        swaps.append((name, m, new))
    # Everything is checked before anything changes: a file that does not fit is an error and the
    # model stays as it was (torch's load_state_dict copies what fits before it reports the rest).
    policies = _plan_policies(p, model, meta.get("grad_policies"), swaps)
    _check_fits(p, model, swaps, state, strict)
    for name, _, new in swaps:
        _replace(model, name, new)  # every place the module is used, if it is shared
    try:
        model.load_state_dict(state, strict=strict)
    except Exception as e:  # what the checks above cannot foresee: put the original modules back
        for name, old, _ in swaps:
            _replace(model, name, old)
        if isinstance(e, (ValueError, TypeError)):
            raise
        raise ValueError(f"{p} does not fit the model: {e}") from None
    _apply_policies(model, policies)
    return model


def _check_fits(p: str, model: nn.Module, swaps, state: Dict[str, object], strict: bool) -> None:
    """Whether ``state`` loads into ``model`` once the ``swaps`` (name, old, new) are made, without
    making them: the keys (when strict), each sparse module's structure, every other tensor's shape."""
    expected = dict(model.state_dict(keep_vars=True))
    sparse_at = {}  # prefix -> sparse module (the model's own, and the new ones)
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, tuple(cls for cls, _ in _TYPES.values())):
            sparse_at[n + "." if n else ""] = m
    for _, old, new in swaps:
        for place in _places(model, old):
            pre = place + "."
            for k in [k for k in expected if k.startswith(pre)]:
                del expected[k]
            for k, v in new.state_dict(keep_vars=True).items():
                expected[pre + k] = v
            sparse_at[pre] = new
    structure_keys = set()
    for pre, m in sparse_at.items():
        try:
            check_structure_entries(m, *m._csr_shape, state, pre)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{p}: {e}") from None
        structure_keys.update(pre + k for k in ("indptr", "indices", "values"))
    missing, unexpected, bad = _fit_problems(expected, state, skip=structure_keys)
    if strict and (missing or unexpected):
        raise ValueError(f"{p} does not fit the model: missing keys {missing}, unexpected keys {unexpected}")
    if bad is not None:
        k, want, got = bad
        if not isinstance(got, torch.Tensor):
            raise ValueError(f"{p}: entry {k!r} must be a tensor; got {type(got).__name__}")
        raise ValueError(f"{p} does not fit the model: {k!r} has shape {tuple(got.shape)} in the file and "
                         f"{tuple(want.shape)} in the model")
