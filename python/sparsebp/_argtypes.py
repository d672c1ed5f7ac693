"""argparse ``type=`` checks shared by the command lines (``sparsebp``, ``sparsebp vrpge``, the
benchmarks): a bad value is a usage error naming the option, never a traceback."""
from __future__ import annotations

import argparse


def positive_int(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int; got {v}")
    return n


def nonnegative_int(v: str) -> int:
    n = int(v)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0; got {v}")
    return n


def fraction(v: str) -> float:
    """A number in [0, 1) (a sparsity, a drop rate)."""
    f = float(v)
    if not 0.0 <= f < 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must lie in [0, 1); got {v}")
    return f


def unit(v: str) -> float:
    """A number in [0, 1]."""
    f = float(v)
    if not 0.0 <= f <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1]; got {v}")
    return f


def keep_ratio(v: str) -> float:
    """A number in (0, 1] (a keep ratio)."""
    f = float(v)
    if not 0.0 < f <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1]; got {v}")
    return f


def positive_float(v: str) -> float:
    """A positive finite number (a learning rate)."""
    f = float(v)
    if not 0.0 < f < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number; got {v}")
    return f
