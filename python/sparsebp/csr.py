"""The CSR container: a validated, immutable sparsity structure plus float32 values."""
from __future__ import annotations

import numbers

import numpy as np

from . import _core, _cuda

_INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def _shape_of(shape) -> tuple[int, int]:
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    # Integers only (a float 1.0 or 2.5 is a mistake, not a size); NumPy and torch integers count.
    if len(dims) != 2 or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"shape must be a pair of ints (rows, cols); got {shape!r}")
    rows, cols = int(dims[0]), int(dims[1])
    if rows < 0 or cols < 0:
        raise ValueError(f"shape must be non-negative; got ({rows}, {cols})")
    return rows, cols


def _index_array(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype not in _INDEX_DTYPES:
        if arr.size == 0 and arr.dtype.kind in "iuf":
            arr = arr.astype(np.int64)
        elif arr.dtype.kind in "iu":
            # Other integer widths are converted only when no value changes.
            conv = arr.astype(np.int64)
            if not np.array_equal(conv, arr):
                raise ValueError(f"{name} holds values outside the int64 range")
            arr = conv
        else:
            raise TypeError(f"{name} must be an integer array (int32 or int64); got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _values_array(values, nnz: int, name: str = "values") -> np.ndarray:
    if not isinstance(values, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of float32; got {_cuda.kind_of(values)}")
    if values.dtype != np.float32:
        raise TypeError(f"{name} must be float32 with shape ({nnz},); got {values.dtype} {values.shape}"
                        " (convert with .astype(np.float32))")
    if values.shape != (nnz,):
        raise ValueError(f"{name} must have shape ({nnz},) (one per stored entry); got {values.shape}")
    if not values.flags.c_contiguous or not values.flags.aligned:
        values = np.ascontiguousarray(values)
    return values


class CSR:
    """A sparse matrix in compressed sparse row form, float32 values.

    The structure (``indptr``, ``indices``, ``shape``) is validated once, when the matrix is
    built: ``indptr`` starts at 0 and never decreases, ends at ``len(indices)``, and each row's
    ``indices`` lie in ``[0, cols)``, strictly increasing (sorted, no duplicates). After that it is
    immutable (the arrays are read-only views), so kernels never check it again. ``values`` may
    change (a training step updates them in place) but keeps its dtype and length.

    A stored entry whose value is 0 is still an entry: its weight gradient is computed and it
    stays in the structure. That is how a fixed mask is represented.

    Parameters
    ----------
    indptr, indices : integer arrays (int32 or int64; copied)
    values : float32 array of len(indices) (kept by reference, not copied)
    shape : (rows, cols); cols must fit in int32
    """

    __slots__ = ("_structure", "_values")

    def __init__(self, indptr, indices, values, shape):
        rows, cols = _shape_of(shape)
        structure = _core.csr_structure(rows, cols, _index_array(indptr, "indptr"), _index_array(indices, "indices"))
        self._structure = structure
        self._values = _values_array(values, structure.nnz)

    @classmethod
    def _from_structure(cls, structure, values: np.ndarray) -> "CSR":
        obj = cls.__new__(cls)
        obj._structure = structure
        obj._values = _values_array(values, structure.nnz)
        return obj

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense, mask=None) -> "CSR":
        """Build from a 2-D array. The structure is ``mask`` (a boolean array of the same shape)
        if given, else the nonzero entries of ``dense``. Values are ``dense`` at those positions,
        converted to float32 (entries that are zero but inside the mask are stored)."""
        d = np.asarray(dense)
        if d.ndim != 2:
            raise ValueError(f"dense must be 2-D; got shape {d.shape}")
        if d.dtype.kind not in "biuf":
            raise TypeError(f"dense must be a real numeric array; got dtype {d.dtype}")
        if mask is None:
            keep = d != 0
        else:
            m = np.asarray(mask)
            if m.shape != d.shape:
                raise ValueError(f"mask must have the shape of dense {d.shape}; got {m.shape}")
            if m.dtype != np.bool_:
                raise TypeError(f"mask must be a boolean array; got dtype {m.dtype}")
            keep = m
        rows, cols = np.nonzero(keep)  # row-major order: sorted within each row
        indptr = np.zeros(d.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=d.shape[0]), out=indptr[1:])
        return cls(indptr, cols.astype(np.int32, copy=False), np.ascontiguousarray(d[rows, cols], dtype=np.float32),
                   d.shape)

    @classmethod
    def from_scipy(cls, m) -> "CSR":
        """Build from any SciPy sparse matrix or array (converted to CSR; duplicates summed,
        indices sorted; explicit zeros are kept as entries)."""
        try:
            import scipy.sparse as sp
        except ImportError as e:  # pragma: no cover - scipy is a test dependency
            raise ImportError("CSR.from_scipy needs SciPy (pip install scipy)") from e
        if not sp.issparse(m):
            raise TypeError(f"m must be a SciPy sparse matrix; got {type(m).__name__}")
        c = sp.csr_matrix(m, copy=True)
        c.sum_duplicates()
        c.sort_indices()
        return cls(c.indptr, c.indices, np.ascontiguousarray(c.data, dtype=np.float32), c.shape)

    # ---- conversion ---------------------------------------------------------------------------
    def to_scipy(self):
        """A scipy.sparse.csr_matrix with copies of the structure and values."""
        import scipy.sparse as sp

        return sp.csr_matrix((self._values.copy(), self.indices.copy(), self.indptr.copy()), shape=self.shape)

    def to_dense(self, dtype=np.float32) -> np.ndarray:
        """The dense (rows, cols) array; entries outside the structure are 0."""
        out = np.zeros(self.shape, dtype=dtype)
        out[self.row_indices(), self.indices] = self._values
        return out

    def mask(self) -> np.ndarray:
        """Boolean (rows, cols) array, True at the stored positions."""
        out = np.zeros(self.shape, dtype=bool)
        out[self.row_indices(), self.indices] = True
        return out

    def row_indices(self) -> np.ndarray:
        """The row of each stored entry (int64, len nnz)."""
        return np.repeat(np.arange(self.shape[0], dtype=np.int64), np.diff(self.indptr))

    def copy(self) -> "CSR":
        """Same (shared, immutable) structure, copied values."""
        return CSR._from_structure(self._structure, self._values.copy())

    def with_values(self, values: np.ndarray) -> "CSR":
        """Same (shared) structure, the given float32 values (kept by reference)."""
        return CSR._from_structure(self._structure, values)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self._structure.shape)

    @property
    def nnz(self) -> int:
        return self._structure.nnz

    @property
    def density(self) -> float:
        rows, cols = self.shape
        return self.nnz / (rows * cols) if rows * cols else 0.0

    @property
    def indptr(self) -> np.ndarray:
        """int64, read-only."""
        return self._structure.indptr

    @property
    def indices(self) -> np.ndarray:
        """int32, read-only."""
        return self._structure.indices

    @property
    def values(self) -> np.ndarray:
        """float32, len nnz, writable in place."""
        return self._values

    @values.setter
    def values(self, v) -> None:
        self._values = _values_array(v, self.nnz)

    @property
    def structure(self):
        """The validated structure object (shared by copies; used by the kernels)."""
        return self._structure

    def same_structure(self, other: "CSR") -> bool:
        """Whether ``other`` has this matrix's shape and nonzero positions (values may differ)."""
        return self._structure is other._structure or (
            self.shape == other.shape
            and np.array_equal(self.indptr, other.indptr)
            and np.array_equal(self.indices, other.indices)
        )

    def __reduce__(self):
        return (CSR, (self.indptr.copy(), self.indices.copy(), self._values.copy(), self.shape))

    def __repr__(self) -> str:
        return f"sparsebp.CSR(shape={self.shape}, nnz={self.nnz}, density={self.density:.4g})"
