"""PyTorch bridge: drop-in sparse modules, autograd through sparsebp's kernels, converters.

Needs PyTorch (``pip install "sparsebp[torch]"``); ``import sparsebp`` alone never imports torch.

- ``SparseLinear``: ``nn.Linear`` with a CSR weight (parameters: the stored ``values`` and ``bias``;
  structure in buffers).
- ``sparsify(model, sparsity=...)``: magnitude-prune eligible layers and swap them in place;
  ``from_pruned(model)``: take the masks a pruned checkpoint already has; ``densify(model)``: back to
  plain torch modules.
- ``save(model, path)`` / ``load(model, path)``: ``.pt`` or ``.safetensors`` files of sparse models.
- ``VRPGETrainer``: VR-PGE learned unit masks with compacted forward and backward.
- ``ops.linear``: the functional form; the operators are registered as ``torch.ops.sparsebp.*``.

Layout: outputs follow the input's layout. Row-major (the usual) input gives row-major output; an
input with the batch innermost (``x.t().contiguous().t()``) gives such an output and skips the
kernels' transposes, so a stack of sparse layers fed that way pays none.

Under ``torch.autocast`` the layers run as autocast's float32 operators: a float16 / bfloat16 input
is cast up and the output is float32.
"""
try:
    import torch as _torch  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError("sparsebp.torch needs PyTorch: pip install \"sparsebp[torch]\"") from e

from .. import _core

if _core.openmp_available():
    # Share PyTorch's OpenMP threads instead of running a second pool beside them (see the README).
    _core.set_thread_backend("openmp")

from . import _ops as ops
from . import _conv as conv_ops
from ._conv import batch_inner, empty_cache
from .modules import BatchInner, SparseConv2d, SparseLinear, magnitude_mask, random_mask
from .convert import LayerChange, Report, densify, from_pruned, sparsify
from .meprop import MePropLinear
from .io import load, save
from .vrpge import VRPGETrainer

__all__ = ["SparseLinear", "SparseConv2d", "BatchInner", "MePropLinear", "batch_inner", "empty_cache", "conv_ops",
           "magnitude_mask", "random_mask", "ops", "sparsify", "from_pruned", "densify", "Report", "LayerChange", "save",
           "load", "VRPGETrainer"]
