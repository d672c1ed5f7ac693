"""The bundled MNIST digits: shapes, ranges, the split's disjointness and its fidelity to the
source files (read independently here with gzip/numpy)."""
import gzip
import os

import numpy as np
import pytest

from sparsebp.datasets import load_mnist

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


def test_shapes_ranges_and_balance():
    X, y = load_mnist("train")
    Xt, yt = load_mnist("test", flatten=False, dtype=np.float64)
    assert X.shape == (13000, 784) and X.dtype == np.float32 and y.dtype == np.int64
    assert Xt.shape == (2000, 1, 28, 28) and Xt.dtype == np.float64
    for a, b in ((X, y), (Xt, yt)):
        assert 0.0 <= a.min() and a.max() <= 1.0 and a.max() > 0.99
        assert set(np.unique(b)) == set(range(10))
    assert np.bincount(y).min() > 1000  # shuffled, every class present in bulk
    assert len(set(y[:200])) == 10      # classes mixed (the 5k CSV is sorted by class)


def test_train_and_test_are_disjoint():
    X, _ = load_mnist("train")
    Xt, _ = load_mnist("test")
    seen = {r.tobytes() for r in (X * 255).round().astype(np.uint8)}
    assert not any(r.tobytes() in seen for r in (Xt * 255).round().astype(np.uint8))


def test_test_split_is_the_last_2000_official_test_images():
    path = os.path.join(os.path.dirname(__import__("sparsebp").__file__), "data", "mnist")
    with gzip.open(os.path.join(path, "t10k-images-idx3-ubyte.gz")) as f:
        imgs = np.frombuffer(f.read(), np.uint8, offset=16).reshape(10000, 784)
    with gzip.open(os.path.join(path, "t10k-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    Xt, yt = load_mnist("test")
    np.testing.assert_array_equal((Xt * 255).round().astype(np.uint8), imgs[8000:])
    np.testing.assert_array_equal(yt, labels[8000:])


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="the project's shared data folder is not beside this checkout")
def test_bundled_files_match_the_shared_data():
    path = os.path.join(os.path.dirname(__import__("sparsebp").__file__), "data", "mnist")
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "mnist_5k.csv.gz"):
        with open(os.path.join(path, name), "rb") as a, open(os.path.join(SHARED, name), "rb") as b:
            assert a.read() == b.read(), name


def test_limit_and_bad_arguments():
    X, y = load_mnist("test", limit=7)
    assert X.shape == (7, 784) and y.shape == (7,)
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation")
    with pytest.raises(ValueError, match="limit"):
        load_mnist(limit=0)
    with pytest.raises(TypeError, match="dtype"):
        load_mnist(dtype=np.int32)


def test_corrupt_idx_is_an_error(tmp_path):
    from sparsebp import datasets

    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write((2051).to_bytes(4, "big") + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    with pytest.raises(ValueError, match="data bytes"):
        datasets._read_idx(str(bad), 2051, (28, 28))
    with pytest.raises(ValueError, match="magic"):
        datasets._read_idx(str(bad), 2049, ())
