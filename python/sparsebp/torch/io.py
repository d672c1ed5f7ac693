"""Saving and loading models with sparsebp layers, as ``.pt`` (torch.save) or ``.safetensors``.

A file holds the model's ``state_dict`` and a small JSON description of which modules are sparse
(name, type, shape). ``load(model, path)`` takes the *dense* architecture (or one already
converted), swaps the listed modules for sparse ones with the file's structures, then loads the
state strictly. Anything that does not fit is a ``ValueError`` naming the file and the entry.
``.pt`` files are read with ``weights_only=True`` (no arbitrary code runs on load).
Training settings (a ``SparseLinear``'s sparse-gradient policy) are not saved: set them again.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import torch
from torch import nn

from .convert import _fit_problems, _places, _replace
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


def _describe(model: nn.Module) -> dict:
    sparse = {}
    for n, m in model.named_modules():
        for tname, (cls, _) in _TYPES.items():
            if isinstance(m, cls):
                sparse[n] = dict(type=tname, **_geometry(m))
    return dict(format=_FORMAT, version=_VERSION, sparse_modules=sparse)


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
        try:
            from safetensors import safe_open

            with safe_open(p, framework="pt") as f:
                meta_s = (f.metadata() or {}).get("sparsebp")
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{p} is not a readable safetensors file: {e}") from None
        try:
            meta = json.loads(meta_s) if meta_s else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: the sparsebp metadata is not valid JSON: {e}") from None
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
    first) and return ``model``. Build the optimizer after loading."""
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
