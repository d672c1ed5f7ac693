"""The MNIST digits bundled with the package (see ``sparsebp/data/mnist/README.md`` for the
source and licence): 13,000 training and 2,000 test digits, no network needed."""
from __future__ import annotations

import gzip
import os
from typing import Optional, Tuple

import numpy as np

_HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist")
_N_TEST_TRAIN = 8000  # test-set images lent to training; the rest (2,000) are the test split


def _read_idx(path: str, magic: int, item_shape: Tuple[int, ...]) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = len(item_shape) + 1
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes)")
    got_magic = int.from_bytes(raw[:4], "big")
    if got_magic != magic:
        raise ValueError(f"{path}: IDX magic number {got_magic}, expected {magic}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if dims[1:] != item_shape:
        raise ValueError(f"{path}: items of shape {dims[1:]}, expected {item_shape}")
    body = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {body.size} data bytes, expected {int(np.prod(dims))}")
    return body.reshape(dims)


def _read_csv(path: str) -> Tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label; got shape {data.shape}")
    if data.min() < 0 or data[:, :784].max() > 255 or data[:, 784].max() > 9:
        raise ValueError(f"{path}: pixel or label values out of range")
    return data[:, :784].astype(np.uint8).reshape(-1, 28, 28), data[:, 784].astype(np.uint8)


_cache: dict = {}


def _raw() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if "raw" not in _cache:
        ti = _read_idx(os.path.join(_HERE, "t10k-images-idx3-ubyte.gz"), 2051, (28, 28))
        tl = _read_idx(os.path.join(_HERE, "t10k-labels-idx1-ubyte.gz"), 2049, ())
        if len(ti) != len(tl):
            raise ValueError(f"MNIST test images ({len(ti)}) and labels ({len(tl)}) differ in number")
        ci, cl = _read_csv(os.path.join(_HERE, "mnist_5k.csv.gz"))
        _cache["raw"] = (ci, cl, ti, tl)
    return _cache["raw"]


def load_mnist(split: str = "train", *, flatten: bool = True, dtype=np.float32,
               limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Bundled MNIST digits as ``(X, y)``: pixels scaled to [0, 1], labels int64 in 0..9.

    ``split``: ``"train"`` (13,000: the 5k training digits and the first 8,000 official test images,
    shuffled with a fixed seed so that classes are mixed) or ``"test"`` (the last 2,000 official
    test images, disjoint from train). ``flatten``: X is (n, 784); otherwise (n, 1, 28, 28).
    ``limit``: keep the first ``limit`` digits.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"limit must be a positive int or None; got {limit!r}")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"dtype must be a floating dtype; got {dtype}")
    ci, cl, ti, tl = _raw()
    if split == "train":
        imgs = np.concatenate([ci, ti[:_N_TEST_TRAIN]])
        labels = np.concatenate([cl, tl[:_N_TEST_TRAIN]])
        order = np.random.default_rng(20170611).permutation(len(imgs))
        imgs, labels = imgs[order], labels[order]
    else:
        imgs, labels = ti[_N_TEST_TRAIN:], tl[_N_TEST_TRAIN:]
    if limit is not None:
        imgs, labels = imgs[:limit], labels[:limit]
    X = imgs.astype(dtype) / dtype.type(255.0)
    X = X.reshape(len(X), 784) if flatten else X.reshape(len(X), 1, 28, 28)
    return np.ascontiguousarray(X), labels.astype(np.int64)
