"""Which kernels run and on how many threads: thin wrappers over the engine's dispatch."""
from __future__ import annotations

import numbers
import os

from . import _core

__version__ = _core.version


def active_isa() -> str:
    """Name of the kernel table in use: 'avx512', 'avx2', 'scalar' (or 'avx512-emulated' in tests).

    Chosen once at import: the best table this CPU runs, unless the environment variable
    ``SPARSEBP_ISA`` names one (an unknown or unsupported name makes the import fail with the list
    of valid choices).
    """
    return _core.active_isa()


def available_isas() -> list[str]:
    """Kernel tables compiled into this build that this CPU can run, best first.

    'avx512-emulated' (the AVX-512 code compiled against SIMDe, runnable anywhere) is listed last:
    tests select it to check the AVX-512 logic on machines without AVX-512; it is never the default.
    """
    return list(_core.available_isas())


def _set_isa(name: str) -> None:
    """Select a kernel table by name (for tests and benchmarks). ValueError lists the choices."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str; got {type(name).__name__}")
    _core.set_isa(name)


def get_num_threads() -> int:
    """Number of threads the kernels use (default: ``SPARSEBP_NUM_THREADS`` when set, else the CPUs
    this process may run on)."""
    return _core.get_num_threads()


def _int_from_environment(name: str, minimum: int, what: str) -> int | None:
    """The integer the environment variable ``name`` holds (None when unset or blank); anything
    else, or a value below ``minimum``, is a ValueError saying ``what`` it must be."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        n = int(raw.strip())
    except ValueError:
        n = minimum - 1
    if n < minimum:
        raise ValueError(f"the environment variable {name} must be {what}; got {raw!r}")
    return n


def _threads_from_environment() -> None:
    """Applies ``SPARSEBP_NUM_THREADS`` (a positive integer) at import; anything else is an error."""
    n = _int_from_environment("SPARSEBP_NUM_THREADS", 1, "a positive integer")
    if n is not None:
        _core.set_num_threads(n)


_threads_from_environment()


def set_num_threads(n: int) -> None:
    """Set the number of threads the kernels use: 1 to 1024 (or up to the CPU count, if larger).
    Results are bit-identical for any n."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int >= 1; got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be an int >= 1; got {n}")
    if n > 2 ** 31 - 1:  # (the engine's own bound, 1024 or the CPU count, is checked there)
        raise ValueError(f"n must be at most 1024 (or the CPU count, if larger); got {n}")
    _core.set_num_threads(int(n))


def buffer_cache_info() -> dict:
    """The cache of large output buffers: ``cached_bytes`` / ``cached_blocks`` kept free for reuse,
    ``limit_bytes`` (the most kept free), ``min_bytes`` (outputs below this size are not cached),
    ``hits`` and ``misses`` (requests served from the cache, and new allocations).

    Why it exists: glibc maps every allocation above 32 MB afresh and returns it to the kernel on
    free, so a call returning such an array pays for the kernel zeroing every page of it on first
    touch (a 64 MB array: ~9 against ~4 ms to fill on a Zen 3 core). Per-example meProp's weight
    gradient of a 4096 x 4096 layer is such an array, every step. Its memory now comes from this
    cache, and goes back to it when the last array using it is gone; the next step's request of
    the same size reuses it. Arrays in use are never handed out twice."""
    return dict(_core.buffer_cache_stats())


def set_buffer_cache_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` of freed large buffers for reuse (default 256 MiB, or
    ``SPARSEBP_BUFFER_CACHE_MB`` at import); 0 keeps none (every large output is then allocated
    and freed as NumPy's are). Lowering the limit frees what is over it at once."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral):
        raise TypeError(f"nbytes must be an int >= 0; got {type(nbytes).__name__}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be an int >= 0; got {nbytes}")
    _core.set_buffer_cache_limit(int(min(nbytes, 2 ** 62)))


def clear_buffer_cache() -> None:
    """Free every buffer the cache keeps (buffers in use are not affected)."""
    _core.clear_buffer_cache()


def _buffer_cache_from_environment() -> None:
    """Applies ``SPARSEBP_BUFFER_CACHE_MB`` (an integer >= 0, MiB) at import; anything else is an
    error."""
    mb = _int_from_environment("SPARSEBP_BUFFER_CACHE_MB", 0, "an integer >= 0")
    if mb is not None:
        set_buffer_cache_limit(mb << 20)


_buffer_cache_from_environment()


def set_thread_backend(name: str) -> None:
    """Where the kernels' threads come from: ``"pool"`` (sparsebp's own, the default) or
    ``"openmp"`` (the process's OpenMP runtime, shared with PyTorch's operators; builds with OpenMP
    only). ``import sparsebp.torch`` selects ``"openmp"`` when available. Results do not change."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str; got {type(name).__name__}")
    _core.set_thread_backend(name)


def thread_backend() -> str:
    """The thread back end in use: ``"pool"`` or ``"openmp"``."""
    return _core.thread_backend()


def build_info() -> dict:
    """What this build contains and what it runs on. ``cuda``: whether the CUDA kernels are
    compiled in (``SPARSEBP_CUDA=ON``); ``cuda_devices``: the GPUs they can run on here;
    ``l2_cache_bytes``: the level-2 cache per core the C library reports (0: unknown);
    ``llc_share_bytes``: the last-level cache one core shares with its neighbours, from Linux's
    /sys (0: unknown), which sizes the tiles of the gathered per-example products."""
    return {
        "version": __version__,
        "compiled_isas": list(_core.compiled_isas()),
        "available_isas": available_isas(),
        "active_isa": active_isa(),
        "isa_override": os.environ.get("SPARSEBP_ISA") or None,
        "num_threads": get_num_threads(),
        "thread_backend": thread_backend(),
        "openmp": bool(_core.openmp_available()),
        "compiler": _core.compiler,
        "build_type": _core.build_type,
        "cpu_features": dict(_core.cpu_features()),
        "l2_cache_bytes": int(_core.l2_cache_bytes()),
        "llc_share_bytes": int(_core.llc_share_bytes()),
        "cuda": bool(_core.cuda_compiled()),
        "cuda_devices": [_core.cuda_device_name(i) for i in range(_core.cuda_device_count())],
    }
