"""argparse ``type=`` checks shared by the command lines (``sparsebp``, ``sparsebp vrpge``, the
benchmarks): a bad value is a usage error naming the option, never a traceback."""
from __future__ import annotations

import argparse
import os


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


def out_folder(parser: argparse.ArgumentParser, option: str, path: str) -> None:
    """Create the results folder ``path`` now, so that one that cannot be written is a usage error
    before any training or timing, not a traceback minutes later."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        parser.error(f"argument {option}: cannot create the folder {path!r} ({e.strerror or e})")
    if not os.access(path, os.W_OK):
        parser.error(f"argument {option}: the folder {path!r} is not writable")


def batch_fits(parser: argparse.ArgumentParser, batch: int, examples: int) -> None:
    """A mini-batch larger than the training set would train nothing (partial batches are dropped)."""
    if batch > examples:
        parser.error(f"argument --batch: {batch} is larger than the {examples} training digits")
