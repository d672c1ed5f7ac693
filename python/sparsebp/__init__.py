"""sparsebp: CPU-first sparse training. Backprop that costs what the nonzeros cost.

Sparse weights in CSR (forward, input gradient and weight gradient at the stored positions, all
proportional to nnz) and sparse gradients (meProp top-k, MSBP memory, meSimp shrinking), with C++
kernels for scalar, AVX2 and AVX-512 chosen at import. ``sparsebp.nn`` trains small networks with
NumPy alone; ``sparsebp.torch`` (optional) bridges to PyTorch.
"""
from ._runtime import (
    __version__,
    active_isa,
    available_isas,
    buffer_cache_info,
    build_info,
    clear_buffer_cache,
    get_num_threads,
    set_buffer_cache_limit,
    set_num_threads,
    set_thread_backend,
    thread_backend,
)
from .csr import CSR
from . import ops

__all__ = [
    "CSR",
    "ops",
    "active_isa",
    "available_isas",
    "buffer_cache_info",
    "build_info",
    "clear_buffer_cache",
    "get_num_threads",
    "set_buffer_cache_limit",
    "set_num_threads",
    "set_thread_backend",
    "thread_backend",
    "__version__",
]
