"""Reading the safetensors files sparsebp writes (``sparsebp.nn.save``, ``sparsebp.torch.save``)."""
from __future__ import annotations

import json
from typing import Optional, Tuple


def read_safetensors(p: str, framework: str) -> Tuple[dict, bool, Optional[object]]:
    """(arrays by name, whether the file has ``"sparsebp"`` metadata, that metadata parsed) of the
    file at ``p``, with ``framework`` ``"np"`` or ``"pt"``. A file safetensors cannot read, or
    metadata that is not JSON, is a ``ValueError`` naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(p, framework=framework) as f:
            meta_s = (f.metadata() or {}).get("sparsebp")
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{p} is not a readable safetensors file: {e}") from None
    try:
        return arrays, bool(meta_s), (json.loads(meta_s) if meta_s else None)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: the sparsebp metadata is not valid JSON: {e}") from None
