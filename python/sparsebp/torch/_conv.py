"""Sparse-weight 2-D convolution as PyTorch custom operators over sparsebp's gather kernels.

The weight (out_channels, in_channels / groups, kh, kw) is a CSR matrix with one row per output
channel and columns ``(c, kh, kw)`` flattened. The kernels work with the batch innermost: an
activation of logical shape (N, C, H, W) is stored as (C, H, W, N). Then, for stride 1 along the
width, one output image row ``y[o, oh, :, :]`` is OW * N contiguous floats, and each stored
weight ``(c, kh, kw)`` adds ``w`` times an equally long contiguous run of the (zero-padded) input
starting at ``x[c, oh * sh + kh * dh, kw * dw, 0]``: a sparse-times-dense product with per-entry
offsets (implicit GEMM), run by the same register tiles as the linear kernels.

- forward: ``gather_forward`` over the padded input;
- weight and bias gradients: ``gather_sddmm`` (dot products of output-gradient runs with the same
  input runs), accumulated over all output rows in a fixed order (bit-identical for any thread count);
- input gradient: ``gather_forward`` again, over the transposed structure (one row per input
  channel; the values copied into its order once per call) and the output gradient zero-padded by
  the kernel's reach (and, for stride > 1 without implicit padding, dilated by the stride:
  stride_h * stride_w times the useful flops).
With a width stride sw > 1, the padded input is also split by column phase ((C, Hp, sw, Wp / sw,
N), padded column m * sw + q at [:, :, q, m]): each entry's run over an output row is contiguous
again. A strided 1x1 convolution without padding runs on the subsampled input.

Implicit zero padding (batch a multiple of 8, at most 64 taps; the forward and weight gradient:
width stride 1): the kernels then read the unpadded input (and output gradient) directly, each
entry with a window of the output rows and columns where its tap lands inside the image
(``taps`` / ``windows`` of the gather kernels); no padded copy is made. The input gradient of a
strided convolution then runs one stride phase of the input at a time (only the taps landing on
that phase, over the unpadded output gradient): only the useful flops. Other cases copy into
zero-bordered buffers as described above.

Layouts: the output (and the input gradient) follow the input's layout. A tensor stored batch-
innermost (``x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)``, see ``batch_inner``) is
used as it is, and the output is stored that way too, so stacked sparse convolutions pay no
layout changes; an ordinary (N, C, H, W)-contiguous input is converted on the way in and out.

On CUDA tensors (builds with SPARSEBP_CUDA=ON) the convolution is the linear layer's sparse
product over the input's patches (im2col: ``torch.nn.functional.unfold``, one column per output
pixel and image): forward ``Y = W U``, weight gradient at the stored entries by the SDDMM of G and
U, input gradient ``W^T G`` folded back (``fold``). Groups are one product: row o of W reads the
patch rows of its group. The patches take (C kh kw) / C times the input's memory while a step
runs; the backward unfolds the input again instead of keeping them.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import weakref
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import _core
from . import _ops

# ---------------------------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------------------------


def is_batch_inner(t: Tensor) -> bool:
    """True when a 4-D (N, C, H, W) tensor is stored as contiguous (C, H, W, N)."""
    return t.dim() == 4 and t.shape[0] > 1 and t.permute(1, 2, 3, 0).is_contiguous()


def batch_inner(t: Tensor) -> Tensor:
    """The same (N, C, H, W) tensor stored batch-innermost, the layout the convolution kernels read
    without conversion (a copy unless it already is; differentiable: the gradient comes back in
    t's layout)."""
    if t.dim() != 4:
        raise ValueError(f"batch_inner expects a 4-D (N, C, H, W) tensor; got {t.dim()}-D")
    if is_batch_inner(t):
        return t
    if t.requires_grad and torch.is_grad_enabled():
        from .modules import _ToBatchInner

        return _ToBatchInner.apply(t)
    return _chwn(t).permute(3, 0, 1, 2)


# Layout changes between (N, C, H, W)- and (C, H, W, N)-contiguous float32 CPU tensors are 2-D
# transposes of an N x CHW matrix: sparsebp's blocked transpose kernel does them 2-8x faster than
# torch's strided copy (e.g. 64 x 32 x 28 x 28: 0.8 against 5.6 ms one way, 1.3 against 9 ms back).
def _fast_transpose(t: Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.numel() > 0 and t.shape[0] > 1


def _chwn(t: Tensor) -> Tensor:
    """(C, H, W, N) contiguous view or copy of an (N, C, H, W) tensor."""
    v = t.permute(1, 2, 3, 0)
    if v.is_contiguous():
        return v
    if t.is_contiguous() and _fast_transpose(t) and not (t.requires_grad and torch.is_grad_enabled()):
        n = t.shape[0]
        out = torch.empty(v.shape, dtype=t.dtype)
        _core.transpose(t.detach().reshape(n, -1).numpy(), out.view(-1, n).numpy())
        return out
    return v.contiguous()


def _nchw(t: Tensor) -> Tensor:
    """(N, C, H, W)-contiguous view or copy of an (N, C, H, W) tensor."""
    if t.is_contiguous():
        return t
    if is_batch_inner(t) and _fast_transpose(t) and not (t.requires_grad and torch.is_grad_enabled()):
        n = t.shape[0]
        out = torch.empty(t.shape, dtype=t.dtype)
        _core.transpose(t.detach().permute(1, 2, 3, 0).reshape(-1, n).numpy(), out.view(n, -1).numpy())
        return out
    return t.contiguous()


_scratch_local = threading.local()
# Kept per thread: every padded shape of a network (one per layer geometry, forward and backward)
# up to this many bytes in all; the least recently used go first beyond it.
_SCRATCH_BYTES = 512 << 20
# Entry blocks of the gather kernels: how much input one block may read under a column tile
# (bytes; SPARSEBP_CONV_BLOCK_KB overrides), and the widest column tile of the kernels (floats).
def _block_bytes() -> int:
    # 512: interleaved, one core, 95% sparse 3x3 layers: 128 KB -> 512 KB took 128 channels at 7x7
    # from 9.3 to 8.3 ms and 256 at 14x14 from 97 to 93 ms; 1 MB slowed the latter to 116 ms.
    raw = os.environ.get("SPARSEBP_CONV_BLOCK_KB", "512")
    try:
        kb = int(raw)
    except ValueError:
        kb = 0
    if kb < 1:
        raise ValueError(f"the environment variable SPARSEBP_CONV_BLOCK_KB must be a positive integer; got {raw!r}")
    return kb << 10


_BLOCK_BYTES = _block_bytes()
# Implicit zero padding (see the module docstring); SPARSEBP_CONV_IMPLICIT_PADDING=0 turns it off
# (always the padded copies: for comparisons).
_IMPLICIT = os.environ.get("SPARSEBP_CONV_IMPLICIT_PADDING", "1") != "0"
# ... for batches that are a multiple of this (where it was measured; other batches take the padded
# copies. The kernels handle any batch: the tests lower this to 1).
_IMPLICIT_BATCH_MULTIPLE = 8
_GATHER_TILE = 128


def _zero_bordered_scratch(tag: str, shape: tuple, dtype) -> Tensor:
    """A thread-local buffer of ``shape`` whose cells outside the interior an operator writes stay
    zero between calls (it is zeroed once, when first made). ``tag`` must identify that interior
    (with the shape): two users writing different cells of the same shape need different tags. Reused because allocating and zeroing
    a fresh padded copy per call costs more than the copy itself (page faults)."""
    cache = getattr(_scratch_local, "buffers", None)
    if cache is None:
        cache = _scratch_local.buffers = {}
    key = (tag, shape, dtype)
    buf = cache.pop(key, None)
    if buf is None:
        buf = torch.zeros(shape, dtype=dtype)
    cache[key] = buf  # most recently used last
    total = sum(b.numel() * b.element_size() for b in cache.values())
    while total > _SCRATCH_BYTES and len(cache) > 1:
        old = cache.pop(next(iter(cache)))
        total -= old.numel() * old.element_size()
    return buf


def _padded_chwn(t: Tensor, ph: int, pw: int) -> Tensor:
    """(C, H + 2ph, W + 2pw, N) contiguous with zeros around; a scratch buffer, valid until the
    next call on this thread."""
    n, c, h, w = t.shape
    if ph == pw == 0:
        return _chwn(t)
    out = _zero_bordered_scratch(f"x{ph},{pw}", (c, h + 2 * ph, w + 2 * pw, n), t.dtype)
    out[:, ph:ph + h, pw:pw + w, :] = _chwn_source(t)
    return out


def _chwn_source(t: Tensor) -> Tensor:
    """t's values as a (C, H, W, N) tensor to copy from: a view when t is batch-innermost, else a
    transposed copy (one fast transpose and one plain strided copy beat one transposing copy)."""
    v = t.permute(1, 2, 3, 0)
    return v if v.is_contiguous() or not (t.is_contiguous() and _fast_transpose(t)) else _chwn(t)


def _refs(pool: list, i: int) -> int:
    return sys.getrefcount(pool[i])


_FREE_REFS = _refs([np.zeros(1, np.float32)], 0)  # an array held by its pool list alone


class _Pool:
    """Float32 buffers for the large tensors the convolution operators return or keep, reused once
    torch has let go of them. Each is a NumPy array whose torch view (``torch.from_numpy``) holds
    a reference to it for as long as any tensor uses its memory (autograd's saved tensors
    included), so an array whose only reference is this pool is free and is handed out again:
    steady-state training reuses the same memory every step. (Fresh tensors this large come from
    the OS each time, and their page faults cost about as much as the kernels that fill them: in
    the example CNN's training step, a fifth of the step.) New buffers are zero-filled and 64-byte
    aligned; the key says what their contents are to a caller (padded inputs: zero borders, since
    the callers overwrite exactly the interior the key identifies)."""

    MIN_BYTES = 1 << 20  # smaller tensors: torch's allocator (the heap serves them without faults)

    def __init__(self, limit_bytes: int):
        self.lock = threading.Lock()
        self.pools = {}
        self.bytes = 0
        self.limit = limit_bytes

    def take(self, key: tuple, shape: tuple, zeroed: bool) -> np.ndarray:
        """A free float32 array of ``shape`` under ``key``; ``zeroed``: the caller relies on cells it
        does not write being zero (the pooled ones are zero-filled when made and keep that)."""
        nbytes = 4 * math.prod(shape)
        if nbytes < self.MIN_BYTES:
            return np.zeros(shape, np.float32) if zeroed else np.empty(shape, np.float32)
        key = (key, tuple(shape))
        with self.lock:
            pool = self.pools.setdefault(key, [])
            for i in range(len(pool)):
                if _refs(pool, i) == _FREE_REFS:
                    return pool[i]
            raw = np.zeros(nbytes + 64, dtype=np.uint8)
            at = -raw.ctypes.data % 64  # 64-byte aligned, as torch's own allocations
            arr = raw[at:at + nbytes].view(np.float32).reshape(shape)
            if self.bytes + nbytes > self.limit:
                self._drop_free()
            if self.bytes + nbytes <= self.limit:
                pool.append(arr)
                self.bytes += nbytes
            return arr

    def _drop_free(self) -> None:
        for pool in self.pools.values():
            i = 0
            while i < len(pool):
                if _refs(pool, i) == _FREE_REFS:
                    self.bytes -= pool.pop(i).nbytes
                else:
                    i += 1


_pool = _Pool(1 << 30)


def empty_cache() -> int:
    """Frees the convolution buffers sparsebp keeps for reuse that no tensor is using: pooled
    outputs and padded inputs (up to 1 GB in all while training) and this thread's zero-bordered
    scratch buffers (up to 512 MB). Returns the bytes released. Like ``torch.cuda.empty_cache``:
    only worth calling when the memory is wanted elsewhere; the next step makes them again."""
    freed = 0
    with _pool.lock:
        before = _pool.bytes
        _pool._drop_free()
        freed += before - _pool.bytes
    cache = getattr(_scratch_local, "buffers", None)
    if cache:
        freed += sum(b.numel() * b.element_size() for b in cache.values())
        cache.clear()
    return freed


def _source_copy(t: Tensor, p: "_Plan", kept: bool) -> Tensor:
    """What the padded-copy path's forward and weight gradient read: t as (C, H, W, N) zero-padded
    (a view of t without padding); with a width stride sw > 1, split by column phase as well:
    (C, Hp, sw, wq, N) with padded column m * sw + q at [:, :, q, m], so that the columns one entry
    reads for consecutive output pixels are adjacent. ``kept``: a buffer of its own (``_Pool``), for
    the backward; else this thread's scratch."""
    n, c, h, w = t.shape
    ph, pw = p.padding
    sw = p.stride[1]
    if sw == 1:
        if not (ph or pw):
            return _chwn(t)
        return _padded_chwn_kept(t, ph, pw) if kept else _padded_chwn(t, ph, pw)
    shape = (c, p.hp, sw, p.wq, n)
    if kept:
        out = torch.from_numpy(_pool.take(("phased", ph, pw, sw, w), shape, zeroed=True))
    else:
        out = _zero_bordered_scratch(f"q{ph},{pw},{sw},{w}", shape, t.dtype)
    src = _chwn_source(t)
    for q in range(sw):
        w0 = (q - pw) % sw  # the first column of t that lands on phase q
        if w0 < w:
            m0, cnt = (w0 + pw) // sw, len(range(w0, w, sw))
            out[:, ph:ph + h, q, m0:m0 + cnt, :] = src[:, :, w0::sw, :]
    return out


def _padded_chwn_kept(t: Tensor, ph: int, pw: int) -> Tensor:
    """As ``_padded_chwn``, but a buffer of its own until the caller lets go of it (``_Pool``):
    kept by the forward for the backward's weight gradient, which then needs no second copy."""
    n, c, h, w = t.shape
    out = torch.from_numpy(_pool.take(("padded", ph, pw), (c, h + 2 * ph, w + 2 * pw, n), zeroed=True))
    out[:, ph:ph + h, pw:pw + w, :] = _chwn_source(t)
    return out


def _batch_inner_strides(n: int, c: int, h: int, w: int) -> Tuple[int, int, int, int]:
    return (1, h * w * n, w * n, n)


def _new_result(x: Tensor, shape: tuple) -> Tuple[Tensor, Optional[Tensor]]:
    """For a float32 result of logical shape (N, C, H, W) = ``shape`` in x's layout: the (C, H, W,
    N) buffer the kernels fill (from ``_pool``), and the result tensor when it is that same memory
    (x batch-innermost; ``_finish`` copies otherwise). The result is a tensor of its own, not a
    view, so in-place operators such as ``ReLU(inplace=True)`` work on it."""
    n, c, h, w = shape
    arr = _pool.take(("out",), (c, h, w, n), zeroed=False)
    if not (is_batch_inner(x) or n == 1):  # a scratch buffer, copied out by _finish
        return torch.from_numpy(arr), None
    buf = torch.from_numpy(arr)
    return buf, _strided_alias(buf, (n, c, h, w), _batch_inner_strides(n, c, h, w))


def _strided_alias(buf: Tensor, shape: tuple, strides: tuple) -> Tensor:
    """A tensor over buf's memory with these shape and strides that is not a view in autograd's
    sense (so in-place operators on it are fine); it keeps buf's memory (and its pooled NumPy
    array) alive as long as it lives."""
    return torch.empty(0, dtype=buf.dtype).set_(buf.untyped_storage(), buf.storage_offset(), shape, strides)


def _finish(buf: Tensor, out: Optional[Tensor]) -> Tensor:
    """The result of ``_new_result``'s buffer once filled: ``out``, or an (N, C, H, W)-contiguous copy."""
    return out if out is not None else _nchw(buf.permute(3, 0, 1, 2))


def _in_layout_of(x: Tensor, t: Tensor) -> Tensor:
    """A new (N, C, H, W) tensor (not a view) holding t's values in x's layout (the float64 paths)."""
    if is_batch_inner(x) or t.shape[0] == 1:
        out = torch.empty_strided(t.shape, _batch_inner_strides(*t.shape), dtype=t.dtype, device=t.device)
        out.copy_(t)
        return out
    return t.contiguous() if t._base is None else t.clone(memory_format=torch.contiguous_format)


def _flat(t: Tensor) -> np.ndarray:
    return t.detach().reshape(-1).numpy()


# ---------------------------------------------------------------------------------------------
# Plans: offsets and transposed structures, cached per structure and input size
# ---------------------------------------------------------------------------------------------


def _entry_blocks(indptr: np.ndarray, chan: np.ndarray, channels: int, nb: int) -> Optional[np.ndarray]:
    """(rows, nb + 1) entry blocks splitting each row's entries (sorted by the channel ``chan`` they
    read) into nb even channel ranges; None for one block."""
    if nb <= 1:
        return None
    per_block = -(-channels // nb)  # even blocks
    rows = len(indptr) - 1
    row_of = np.repeat(np.arange(rows, dtype=np.int64), np.diff(indptr))
    key_e = row_of * nb + chan // per_block  # non-decreasing over the entries
    want = (np.arange(rows, dtype=np.int64)[:, None] * nb + np.arange(nb + 1)[None, :]).reshape(-1)
    b = np.searchsorted(key_e, want, side="left").reshape(rows, nb + 1)
    b[:, -1] = indptr[1:]
    return np.ascontiguousarray(b, dtype=np.int64)


class _Plan:
    """Everything about one (structure, geometry, input size) that does not depend on the batch."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, cout: int, cin: int, kh: int, kw: int, stride,
                 padding, dilation, groups: int, h: int, w: int):
        sh, sw = stride
        ph, pw = padding
        dh, dw = dilation
        self.cout, self.cin, self.kh, self.kw, self.groups = cout, cin, kh, kw, groups
        self.h, self.w = h, w
        self.hp, self.wp = h + 2 * ph, w + 2 * pw
        self.oh = (self.hp - dh * (kh - 1) - 1) // sh + 1
        self.ow = (self.wp - dw * (kw - 1) - 1) // sw + 1
        if self.oh <= 0 or self.ow <= 0:
            raise ValueError(f"input of size {h}x{w} is too small for kernel {kh}x{kw} with padding {padding}, "
                             f"dilation {dilation}: the output would be {self.oh}x{self.ow}")
        self.stride, self.padding, self.dilation = (sh, sw), (ph, pw), (dh, dw)
        cin_g, cout_g = cin // groups, cout // groups
        self.indptr = np.ascontiguousarray(indptr, dtype=np.int64)
        nnz = len(indices)
        rows = np.repeat(np.arange(cout, dtype=np.int64), np.diff(self.indptr))
        col = np.asarray(indices, dtype=np.int64)
        c_loc, rem = np.divmod(col, kh * kw)
        ki, kj = np.divmod(rem, kw)
        c = (rows // cout_g) * cin_g + c_loc
        # Forward / weight gradient: pixel offset of each entry's run in the padded input.
        self.fwd_px = (c * self.hp + ki * dh) * self.wp + kj * dw
        if sw > 1:  # the padded input split by column phase, (C, Hp, sw, wq, N): see _source_copy
            self.wq = -(-self.wp // sw)
            self.fwd_px = ((c * self.hp + ki * dh) * sw + (kj * dw) % sw) * self.wq + (kj * dw) // sw
        # Input gradient: rows = input channels, entries (o, ki, kj), read from the dilated and
        # zero-padded output gradient Gz of size (cout, hz, wz).
        ah, aw = (kh - 1) * dh, (kw - 1) * dw
        self.hz, self.wz = self.hp + ah, self.wp + aw
        self.gz_origin = (ah, aw)
        order = np.lexsort((kj, ki, rows, c))  # by input channel, then output channel, then tap
        self.t_indptr = np.zeros(cin + 1, dtype=np.int64)
        np.cumsum(np.bincount(c, minlength=cin), out=self.t_indptr[1:])
        self.t_perm = order.astype(np.int64)
        o_t, ki_t, kj_t = rows[order], ki[order], kj[order]
        self.bwd_px = ((o_t * self.hz + (kh - 1 - ki_t) * dh) * self.wz + (kw - 1 - kj_t) * dw
                       + ph * self.wz + pw)
        self.nnz = nnz
        # Implicit padding: the same entries over the unpadded input (and output gradient).
        self._c, self._ki, self._kj = c, ki, kj
        self._o_t, self._ki_t, self._kj_t = o_t, ki_t, kj_t
        self.taps = (ki * kw + kj).astype(np.int32)
        self.t_taps = (ki_t * kw + kj_t).astype(np.int32)
        self._implicit = {}
        # Entry blocks over the channels a row reads (input channels forward and for the weight
        # gradient; output channels for the input gradient), sized so that one block's part of the
        # input under a column tile stays in L2 across all rows (see GatherArgs).
        self._c_loc, self._o_loc_t = c_loc, o_t % cout_g
        self._blocks = {}

    def blocks(self, n: int, transposed: bool) -> Optional[np.ndarray]:
        """The (rows, nblocks + 1) entry blocks for batch n, or None (one block fits)."""
        key = (n, transposed, _BLOCK_BYTES)
        if key not in self._blocks:
            nb = self._nblocks(n, transposed)
            if transposed:
                indptr, chan = self.t_indptr, self._o_loc_t
            else:
                indptr, chan = self.indptr, self._c_loc
            self._blocks[key] = _entry_blocks(indptr, chan, (self.cout if transposed else self.cin) // self.groups, nb)
        return self._blocks[key]

    def _nblocks(self, n: int, transposed: bool) -> int:
        channels = (self.cout if transposed else self.cin) // self.groups
        dw = self.dilation[1]
        seg = min(_GATHER_TILE, (self.w if transposed else self.ow) * n)
        per_channel = 4 * self.kh * (seg + (self.kw - 1) * dw * n)
        per_block = max(1, _BLOCK_BYTES // per_channel)
        return -(-channels // per_block)

    def strided_input_grad_phases(self, n: int) -> list:
        """The input gradient of a strided convolution, one stride phase (rh, rw) of the input at a
        time: input pixel (rh + l sh, rw + m sw) takes output-gradient pixel (l + dh_e, m + dw_e)
        from the entries whose tap lands on its phase, dh_e = (rh + ph - ki dh) / sh (exact; other
        entries' taps fall between output pixels). Per phase: a stride-1 gather over the unpadded
        output gradient with windows, no zero-dilated copy and only the useful flops.
        Returns [(rh, rw, lh, lw, indptr, offsets, value_index, taps, windows, geometry, blocks)]."""
        key = ("phases", n, _BLOCK_BYTES)
        if key not in self._implicit:
            sh, sw = self.stride
            ph, pw = self.padding
            dh, dw = self.dilation
            rows_t = np.repeat(np.arange(self.cin, dtype=np.int64), np.diff(self.t_indptr))
            phases = []
            for rh in range(min(sh, self.h)):
                for rw in range(min(sw, self.w)):
                    lh, lw = len(range(rh, self.h, sh)), len(range(rw, self.w, sw))
                    ah, aw = rh + ph - self._ki_t * dh, rw + pw - self._kj_t * dw
                    sel = (ah % sh == 0) & (aw % sw == 0)
                    dh_e, dw_e = ah[sel] // sh, aw[sel] // sw
                    indptr = np.zeros(self.cin + 1, np.int64)
                    np.cumsum(np.bincount(rows_t[sel], minlength=self.cin), out=indptr[1:])
                    off = ((self._o_t[sel] * self.oh + dh_e) * self.ow + dw_e) * n
                    tap = self._ki_t[sel] * self.kw + self._kj_t[sel]
                    used, taps = np.unique(tap, return_inverse=True)  # compact tap ids for this phase
                    wins = np.zeros((max(len(used), 1), 4), np.int64)
                    for t, u in enumerate(used):
                        i, j = divmod(int(u), self.kw)
                        a, b = (rh + ph - i * dh) // sh, (rw + pw - j * dw) // sw
                        wins[t] = (max(0, -a), min(lh, self.oh - a), max(0, -b) * n, min(lw, self.ow - b) * n)
                    geo = (lw * n, lh, 1, self.ow * n, 0, lh * lw * n, lw * n, 0)
                    blocks = _entry_blocks(indptr, self._o_loc_t[sel], self.cout // self.groups,
                                           self._nblocks(n, True))
                    phases.append((rh, rw, lh, lw, indptr, off, self.t_perm[sel],
                                   taps.astype(np.int32).reshape(-1), wins, geo, blocks))
            self._implicit[key] = phases
        return self._implicit[key]

    def forward_geometry(self, n: int) -> Tuple[np.ndarray, tuple]:
        """Offsets and geometry over _source_copy's buffer: one output row per segment (with a
        width stride, the input split by column phase makes each entry's run contiguous again)."""
        sh, sw = self.stride
        row = self.wp if sw == 1 else sw * self.wq
        geo = (self.ow * n, self.oh, 1, sh * row * n, 0, self.oh * self.ow * n, self.ow * n, 0)
        return self.fwd_px * n, geo

    def implicit(self, n: int) -> bool:
        """Whether the forward and the weight gradient read the unpadded input (windows)."""
        return (_IMPLICIT and any(self.padding) and self.stride[1] == 1 and n % _IMPLICIT_BATCH_MULTIPLE == 0
                and self.kh * self.kw <= 64)  # (the kernels' tap masks are 64 bits)

    def implicit_input_grad(self, n: int) -> bool:
        """Whether the input gradient reads the output gradient unpadded (windows; strided
        convolutions: one stride phase of the input at a time, see strided_input_grad_phases)."""
        return _IMPLICIT and n % _IMPLICIT_BATCH_MULTIPLE == 0 and self.kh * self.kw <= 64

    def implicit_forward_geometry(self, n: int) -> Tuple[np.ndarray, tuple, np.ndarray]:
        """Offsets, geometry and windows over the unpadded (C, H, W, N) input: the output row oh
        reads input row oh * sh - ph + ki * dh, which exists for oh in [ceil((ph - ki dh) / sh),
        ceil((H + ph - ki dh) / sh)); output column ow reads ow - pw + kj * dw, inside for ow in
        [pw - kj dw, W + pw - kj dw)."""
        key = ("fwd", n)
        if key not in self._implicit:
            sh = self.stride[0]
            ph, pw = self.padding
            dh, dw = self.dilation
            off = ((self._c * self.h + self._ki * dh - ph) * self.w + self._kj * dw - pw) * n
            geo = (self.ow * n, self.oh, 1, sh * self.w * n, 0, self.oh * self.ow * n, self.ow * n, 0)
            wins = np.empty((self.kh * self.kw, 4), np.int64)
            for i in range(self.kh):
                for j in range(self.kw):
                    r0 = -((i * dh - ph) // sh)  # ceil((ph - i dh) / sh)
                    r1 = -((i * dh - ph - self.h) // sh)
                    c0, c1 = pw - j * dw, self.w + pw - j * dw
                    wins[i * self.kw + j] = (max(r0, 0), min(r1, self.oh), max(c0, 0) * n, min(c1, self.ow) * n)
            self._implicit[key] = (off, geo, wins)
        return self._implicit[key]

    def implicit_input_grad_geometry(self, n: int) -> Tuple[np.ndarray, tuple, np.ndarray]:
        """As above for the input gradient (stride 1): input row h takes output-gradient row
        h + ph - ki dh, inside for h in [ki dh - ph, OH + ki dh - ph); columns likewise."""
        key = ("bwd", n)
        if key not in self._implicit:
            ph, pw = self.padding
            dh, dw = self.dilation
            off = ((self._o_t * self.oh + ph - self._ki_t * dh) * self.ow + pw - self._kj_t * dw) * n
            geo = (self.w * n, self.h, 1, self.ow * n, 0, self.h * self.w * n, self.w * n, 0)
            wins = np.empty((self.kh * self.kw, 4), np.int64)
            for i in range(self.kh):
                for j in range(self.kw):
                    r0, r1 = i * dh - ph, self.oh + i * dh - ph
                    c0, c1 = j * dw - pw, self.ow + j * dw - pw
                    wins[i * self.kw + j] = (max(r0, 0), min(r1, self.h), max(c0, 0) * n, min(c1, self.w) * n)
            self._implicit[key] = (off, geo, wins)
        return self._implicit[key]

    def input_grad_geometry(self, n: int) -> Tuple[np.ndarray, tuple]:
        geo = (self.w * n, self.h, 1, self.wz * n, 0, self.h * self.w * n, self.w * n, 0)
        return self.bwd_px * n, geo


_plans = _ops.IndexKeyedCache()


def _plan(indptr: Tensor, indices: Tensor, cout: int, cin: int, kh: int, kw: int, stride, padding, dilation,
          groups: int, h: int, w: int) -> _Plan:
    def make(ip, ix):
        # Validates the structure (sorted, in range, no duplicates) once per plan.
        _core.csr_structure(cout, (cin // groups) * kh * kw, ip, ix)
        return _Plan(ip, ix, cout, cin, kh, kw, stride, padding, dilation, groups, h, w)

    return _plans.get(indptr, indices, (cout, cin, kh, kw, tuple(stride), tuple(padding), tuple(dilation), groups, h, w),
                      make)


def _dense_weight(values: Tensor, indptr: Tensor, indices: Tensor, cout: int, cin_g: int, kh: int, kw: int) -> Tensor:
    return _ops._dense_weight(values, indptr, indices, cout, cin_g * kh * kw).reshape(cout, cin_g, kh, kw)


def _out_like_fake(x: Tensor, shape) -> Tensor:
    """The empty tensor the operators return for ``shape`` (their fake implementations)."""
    if is_batch_inner(x) or shape[0] == 1:
        return x.new_empty_strided(tuple(shape), _batch_inner_strides(*shape))
    return x.new_empty(tuple(shape))


# ---------------------------------------------------------------------------------------------
# CUDA: the linear layer's kernels over the input's patches (im2col)
# ---------------------------------------------------------------------------------------------

_grouped: "dict" = {}


def _patch_indices(indptr: Tensor, indices: Tensor, cout: int, cin: int, kh: int, kw: int, groups: int) -> Tensor:
    """W's column indices into the patch rows of all input channels (``unfold``'s rows: channel,
    then kh, kw): row o of group g reads rows ``g * cols_g + j``. The structure is validated here
    once (per group: sorted, in range, no duplicates; a clear error, never a kernel reading out of
    bounds); cached per index tensors while they are unchanged."""
    cols_g = (cin // groups) * kh * kw
    key = (indices.data_ptr(), indptr.data_ptr(), cout, cols_g, groups)
    versions = (indices._version, indptr._version)
    hit = _grouped.get(key)
    if hit is not None and hit[0]() is indices and hit[1] == versions:
        return hit[2]
    _core.csr_structure(cout, cols_g, indptr.detach().to("cpu", torch.int64).numpy(),
                        indices.detach().to("cpu", torch.int32).numpy())
    if groups == 1:
        out = indices.detach().to(torch.int32)
    else:
        group = _ops._rows_of(indptr, cout) // (cout // groups)
        out = (indices.to(torch.int64) + group * cols_g).to(torch.int32)
    # (the dict bound as a default: at interpreter exit the module's globals may already be None)
    _grouped[key] = (weakref.ref(indices, lambda _, k=key, d=_grouped: d.pop(k, None)), versions, out)
    return out


def _out_size(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> Tuple[int, int]:
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"input of size {h}x{w} is too small for kernel {kh}x{kw} with padding {tuple(padding)}, "
                         f"dilation {tuple(dilation)}: the output would be {oh}x{ow}")
    return oh, ow


def _patches(x: Tensor, kh: int, kw: int, stride, padding, dilation) -> Tensor:
    """x's patches as (C kh kw, N L) contiguous rows, L = output pixels per image: the
    feature-major operand of the CUDA kernels (its transpose is the (N L, C kh kw) input)."""
    u = torch.nn.functional.unfold(x, (kh, kw), dilation=tuple(dilation), padding=tuple(padding),
                                   stride=tuple(stride))  # (N, C kh kw, L)
    return u.transpose(0, 1).reshape(u.shape[1], u.shape[0] * u.shape[2])


def _conv2d_cuda(x: Tensor, values: Tensor, bias: Optional[Tensor], indptr: Tensor, indices: Tensor,
                 out_channels: int, kernel_size, stride, padding, dilation, groups: int) -> Tensor:
    """The float32 convolution on the GPU; the output in x's layout (as on the CPU)."""
    n, cin, h, w = x.shape
    kh, kw = kernel_size
    oh, ow = _out_size(h, w, kh, kw, stride, padding, dilation)
    ix = _patch_indices(indptr, indices, out_channels, cin, kh, kw, groups)
    y = _out_like_fake(x, (n, out_channels, oh, ow))
    if n == 0:
        return y
    u = _patches(x, kh, kw, stride, padding, dilation)
    yf = _ops._cuda_forward(u.t(), values, bias, indptr, ix, out_channels)[0]  # (N L, cout)
    y.copy_(yf.t().reshape(out_channels, n, oh, ow).transpose(0, 1))
    return y


def _conv2d_backward_cuda(grad_y: Tensor, x: Tensor, values: Tensor, indptr: Tensor, indices: Tensor,
                          out_channels: int, kernel_size, stride, padding, dilation, groups: int, input_grad: bool,
                          weight_grad: bool, bias_grad: bool):
    """``(gi, gv, gb)`` of the float32 convolution on the GPU, None where not asked for."""
    n, cin, h, w = x.shape
    kh, kw = kernel_size
    oh, ow = grad_y.shape[2], grad_y.shape[3]
    cols = cin * kh * kw
    ix = _patch_indices(indptr, indices, out_channels, cin, kh, kw, groups)
    if n == 0:
        return (_out_like_fake(x, tuple(x.shape)) if input_grad else None,
                values.new_zeros(values.shape) if weight_grad else None,
                values.new_zeros((out_channels,)) if bias_grad else None)
    entry = _ops._cuda_structure_entry(indptr, ix, out_channels, cols)
    gt = grad_y.transpose(0, 1).reshape(out_channels, n * oh * ow)  # G as (cout, N L) rows
    u = _patches(x, kh, kw, stride, padding, dilation) if weight_grad else None
    gu, gv, gb = _ops._cuda_backward(gt.t(), None, u, values, _ops._cuda_dev(x), entry[1], cols, out_channels,
                                     input_grad, weight_grad, bias_grad)
    gi = None
    if input_grad:  # the patches' gradient (N L, C kh kw), added back into the image
        gu = gu.t().reshape(cols, n, oh * ow).transpose(0, 1)
        gi = torch.nn.functional.fold(gu, (h, w), (kh, kw), dilation=tuple(dilation), padding=tuple(padding),
                                      stride=tuple(stride))
        gi = _in_layout_of(x, gi) if is_batch_inner(x) else gi
    return gi, gv, gb


# ---------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------


def _conv2d_impl(x: Tensor, values: Tensor, bias: Optional[Tensor], indptr: Tensor, indices: Tensor, out_channels: int,
              kernel_size: List[int], stride: List[int], padding: List[int], dilation: List[int],
              groups: int, keep_padded: bool = False) -> Tuple[Tensor, Tensor]:
    """The convolution and, with ``keep_padded`` (float32, padding > 0), the zero-padded (C, Hp,
    Wp, N) copy of x it read, for the backward's weight gradient; else an empty tensor."""
    n, cin, h, w = x.shape
    kh, kw = kernel_size
    none = x.new_empty((0,))
    if x.dtype == torch.float64:
        wd = _dense_weight(values, indptr, indices, out_channels, cin // groups, kh, kw)
        y = torch.nn.functional.conv2d(x, wd, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
        return _in_layout_of(x, y), none
    if x.is_cuda:
        return _conv2d_cuda(x, values, bias, indptr, indices, out_channels, kernel_size, stride, padding, dilation,
                            groups), none
    p = _plan(indptr, indices, out_channels, cin, kh, kw, stride, padding, dilation, groups, h, w)
    y, result = _new_result(x, (n, out_channels, p.oh, p.ow))
    if p.implicit(n):
        # The unpadded input; kept for the weight gradient only when it had to be copied.
        xs = _chwn(x)
        if n > 0:
            off, geo, wins = p.implicit_forward_geometry(n)
            _core.gather_forward(p.indptr, off, _flat(values), None, None if bias is None else _flat(bias),
                                 _flat(xs), _flat(y), geo, p.blocks(n, False), p.taps, wins)
        return _finish(y, result), (xs if keep_padded and not x.permute(1, 2, 3, 0).is_contiguous() else none)
    keep = keep_padded and (any(p.padding) or p.stride[1] > 1)
    xp = _source_copy(x, p, keep)
    if n > 0:
        off, geo = p.forward_geometry(n)
        _core.gather_forward(p.indptr, off, _flat(values), None, None if bias is None else _flat(bias), _flat(xp),
                             _flat(y), geo, p.blocks(n, False))
    return _finish(y, result), (xp if keep else none)



conv2d_op = torch.library.custom_op("sparsebp::conv2d", mutates_args=())(_conv2d_impl)


@conv2d_op.register_fake
def _(x, values, bias, indptr, indices, out_channels, kernel_size, stride, padding, dilation, groups,
      keep_padded=False):
    n, cin, h, w = x.shape
    kh, kw = kernel_size
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    keep = (keep_padded and x.dtype != torch.float64 and x.device.type != "cuda"
            and bool(padding[0] or padding[1] or stride[1] > 1))
    hp, wp = h + 2 * padding[0], w + 2 * padding[1]
    if keep and _IMPLICIT and stride[1] == 1 and n % _IMPLICIT_BATCH_MULTIPLE == 0 and kh * kw <= 64:  # _Plan.implicit
        xp = x.new_empty((cin, h, w, n)) if not x.permute(1, 2, 3, 0).is_contiguous() else x.new_empty((0,))
    elif keep and stride[1] > 1:  # _source_copy's phase split
        xp = x.new_empty((cin, hp, stride[1], -(-wp // stride[1]), n))
    else:
        xp = x.new_empty((cin, hp, wp, n)) if keep else x.new_empty((0,))
    return _out_like_fake(x, (n, out_channels, oh, ow)), xp


def _conv2d_backward_impl(grad_y: Tensor, x: Tensor, values: Tensor, indptr: Tensor, indices: Tensor,
                       out_channels: int, kernel_size: List[int], stride: List[int], padding: List[int],
                       dilation: List[int], groups: int, input_grad: bool, weight_grad: bool,
                       bias_grad: bool, x_padded: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    n, cin, h, w = x.shape
    kh, kw = kernel_size
    def empty():  # a new one per unused return (returns must not alias each other)
        return values.new_empty((0,))

    if x.dtype == torch.float64:
        wd = _dense_weight(values, indptr, indices, out_channels, cin // groups, kh, kw)
        args = (tuple(stride), tuple(padding), tuple(dilation), groups)
        gi = _in_layout_of(x, torch.nn.grad.conv2d_input(x.shape, wd, grad_y, *args)) if input_grad else empty()
        if weight_grad:
            gw = torch.nn.grad.conv2d_weight(x, wd.shape, grad_y, *args).reshape(out_channels, -1)
            gv = gw[_ops._rows_of(indptr, out_channels), indices.to(torch.int64)].contiguous()
        else:
            gv = empty()
        gb = grad_y.sum((0, 2, 3)) if bias_grad else empty()
        return gi, gv, gb
    if x.is_cuda:
        gi, gv, gb = _conv2d_backward_cuda(grad_y, x, values, indptr, indices, out_channels, kernel_size, stride,
                                           padding, dilation, groups, input_grad, weight_grad, bias_grad)
        return (empty() if gi is None else gi, empty() if gv is None else gv, empty() if gb is None else gb)
    p = _plan(indptr, indices, out_channels, cin, kh, kw, stride, padding, dilation, groups, h, w)
    g = _chwn(grad_y)  # (cout, oh, ow, n)
    gv = values.new_empty(values.shape) if weight_grad else empty()
    gb = values.new_empty((out_channels,)) if bias_grad else empty()
    if bias_grad and not weight_grad:
        gb = g.sum((1, 2, 3))
    elif weight_grad:
        # The forward's (padded, or with implicit padding unpadded) copy when it kept one (same x:
        # autograd saved both unchanged).
        kept = x_padded is not None and x_padded.numel() > 0
        if n == 0:
            gv.zero_()
            gb.zero_()
        elif p.implicit(n):
            xs = x_padded if kept else _chwn(x)
            off, geo, wins = p.implicit_forward_geometry(n)
            _core.gather_sddmm(p.indptr, off, _flat(g), _flat(xs), _flat(gv), _flat(gb) if bias_grad else None, geo,
                               p.blocks(n, False), p.taps, wins)
        else:
            xp = x_padded if kept else _source_copy(x, p, False)
            off, geo = p.forward_geometry(n)
            _core.gather_sddmm(p.indptr, off, _flat(g), _flat(xp), _flat(gv), _flat(gb) if bias_grad else None, geo,
                               p.blocks(n, False))
    gi = empty()
    if input_grad:
        dx, result = _new_result(x, (n, cin, h, w))
        # The input gradient's rows list the entries in transposed order: the values are copied into
        # that order once (nnz floats) rather than read through the permutation inside the kernel
        # (interleaved, 3x3 64 and 256 channels, s = 0.9 / 0.95: 0.94x-0.96x of the pass's time).
        vals = _flat(values)
        if n > 0 and p.implicit_input_grad(n) and p.stride == (1, 1):
            off, geo, wins = p.implicit_input_grad_geometry(n)
            _core.gather_forward(p.t_indptr, off, np.take(vals, p.t_perm), None, None, _flat(g), _flat(dx),
                                 geo, p.blocks(n, True), p.t_taps, wins)
        elif n > 0 and p.implicit_input_grad(n):
            dxv = dx.view(cin, h, w, n)
            for rh, rw, lh, lw, indptr_q, off, vidx, taps, wins, geo, blocks in p.strided_input_grad_phases(n):
                buf = torch.from_numpy(_pool.take(("phase",), (cin, lh, lw, n), zeroed=False))
                _core.gather_forward(indptr_q, off, np.take(vals, vidx), None, None, _flat(g), _flat(buf), geo,
                                     blocks, taps, wins)
                dxv[:, rh::p.stride[0], rw::p.stride[1], :] = buf
                del buf  # (free for the next phase's take)
        elif n > 0:
            sh, sw = p.stride
            ah, aw = p.gz_origin
            gz = _zero_bordered_scratch(f"g{sh},{sw},{ah},{aw},{p.oh},{p.ow}", (out_channels, p.hz, p.wz, n), g.dtype)
            gz[:, ah:ah + (p.oh - 1) * sh + 1:sh, aw:aw + (p.ow - 1) * sw + 1:sw, :] = g
            off, geo = p.input_grad_geometry(n)
            _core.gather_forward(p.t_indptr, off, np.take(vals, p.t_perm), None, None, _flat(gz), _flat(dx), geo,
                                 p.blocks(n, True))
        gi = _finish(dx, result)
    return gi, gv, gb


conv2d_backward_op = torch.library.custom_op("sparsebp::conv2d_backward", mutates_args=())(_conv2d_backward_impl)


@conv2d_backward_op.register_fake
def _(grad_y, x, values, indptr, indices, out_channels, kernel_size, stride, padding, dilation, groups, input_grad,
      weight_grad, bias_grad, x_padded=None):
    gi = _out_like_fake(x, tuple(x.shape)) if input_grad else values.new_empty((0,))
    gv = values.new_empty(values.shape) if weight_grad else values.new_empty((0,))
    gb = values.new_empty((out_channels,)) if bias_grad else values.new_empty((0,))
    return gi, gv, gb


def _conv_setup(ctx, inputs, output):
    x, values, bias, indptr, indices, out_channels, kernel_size, stride, padding, dilation, groups, _keep = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd hands the backward a zero-filled grad for it
    ctx.save_for_backward(x, values, indptr, indices, output[1])
    ctx.geom = (out_channels, kernel_size, stride, padding, dilation, groups)
    ctx.has_bias = bias is not None


def _conv_backward(ctx, grad_y, _grad_padded):
    x, values, indptr, indices, x_padded = ctx.saved_tensors
    need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    none9 = (None,) * 9
    if grad_y is None or not (need_x or need_v or need_b):  # (None: the output did not reach the loss)
        return (None, None, None) + none9
    if torch.is_grad_enabled():  # a graph-building backward (see _ops.with_graphed_backward)
        return conv_grads_graphed(grad_y, x, values, indptr, indices, ctx.geom, need_x, need_v, need_b) + none9
    gi, gv, gb = conv2d_backward_op(grad_y, x, values, indptr, indices, *ctx.geom, need_x, need_v, need_b,
                                    x_padded)
    return (gi if need_x else None, gv if need_v else None, gb if need_b else None) + none9


conv2d_op.register_autograd(_conv_backward, setup_context=_conv_setup)


def conv_grads_graphed(grad_y: Tensor, x: Tensor, values: Tensor, indptr: Tensor, indices: Tensor, geom,
                       need_x: bool, need_v: bool, need_b: bool):
    """``(gi, gv, gb)`` of the convolution by torch's differentiable dense products (None where not
    needed): the backward of a graph-building (create_graph=True) backward."""
    out_channels, (kh, kw), stride, padding, dilation, groups = geom
    w = _dense_weight(values, indptr, indices, out_channels, x.shape[1] // groups, kh, kw)
    gi = gv = gb = None
    if need_x:
        gi = torch.nn.grad.conv2d_input(tuple(x.shape), w, grad_y, tuple(stride), tuple(padding), tuple(dilation),
                                        groups)
    if need_v:
        gw = torch.nn.grad.conv2d_weight(x, tuple(w.shape), grad_y, tuple(stride), tuple(padding), tuple(dilation),
                                         groups)
        gv = gw.reshape(out_channels, -1)[_ops._rows_of(indptr, out_channels), indices.to(torch.int64)]
    if need_b:
        gb = grad_y.sum((0, 2, 3))
    return gi, gv, gb


def _conv2d_backward_graphed(ctx, grad_y):
    x, values, indptr, indices, _x_padded = ctx.saved_tensors
    need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    return conv_grads_graphed(grad_y, x, values, indptr, indices, ctx.geom, need_x, need_v, need_b) + (None,) * 4


def _conv2d_backward_eager(ctx, grad_y):
    x, values, indptr, indices, x_padded = ctx.saved_tensors
    need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    if not (need_x or need_v or need_b):
        return (None,) * 7
    gi, gv, gb = _conv2d_backward_impl(grad_y, x, values, indptr, indices, *ctx.geom, need_x, need_v, need_b,
                                       x_padded)
    return (gi if need_x else None, gv if need_v else None, gb if need_b else None) + (None,) * 4


class _Conv2dEager(torch.autograd.Function):
    """The same forward and backward as the registered operators, called directly: in eager mode
    the custom-operator machinery (dispatch, the generated autograd wrapper, filling in defaults)
    cost ~0.5 ms per convolution forward + backward, about as much as a small layer's kernels.
    Tracing (torch.compile, fake tensors) goes through the operators instead (see conv2d)."""

    @staticmethod
    def forward(ctx, x, values, bias, indptr, indices, geom, keep):
        y, xp = _conv2d_impl(x, values, bias, indptr, indices, *geom, keep)
        ctx.save_for_backward(x, values, indptr, indices, xp)
        ctx.geom = geom
        ctx.has_bias = bias is not None
        return y

    backward = _ops.with_graphed_backward(_conv2d_backward_eager, _conv2d_backward_graphed)


_eager = _ops.eager


def _pair(v, name: str, minimum: int) -> Tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
        raise TypeError(f"{name} must be an int or a pair of ints; got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {tuple(v)}")
    return int(v[0]), int(v[1])


def conv2d(x: Tensor, values: Tensor, bias: Optional[Tensor], indptr: Tensor, indices: Tensor, in_channels: int,
           out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """``torch.nn.functional.conv2d`` with a CSR weight (rows: output channels; columns:
    ``(c, kh, kw)`` of ``in_channels // groups`` input channels). ``x``: (N, C, H, W) or (C, H, W)."""
    for v, name in ((in_channels, "in_channels"), (out_channels, "out_channels"), (groups, "groups")):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int >= 1; got {v!r}")
        if v < 1:
            raise ValueError(f"{name} must be an int >= 1; got {v!r}")
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups = {groups} must divide in_channels = {in_channels} and out_channels = {out_channels}")
    _ops._check_tensor(x, "x")
    _ops._check_tensor(values, "values")
    _ops._check_same_device(x=x, values=values, bias=bias, indptr=indptr, indices=indices)
    x = _ops.autocast_input(x, values.dtype)
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 (or float64, a slow reference path); got {x.dtype}")
    for t, name in ((values, "values"), (bias, "bias")):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}; got {t.dtype}")
    unbatched = x.dim() == 3
    if x.dim() not in (3, 4) or x.shape[-3] != in_channels:
        raise ValueError(f"x must have shape (N, {in_channels}, H, W) or ({in_channels}, H, W); got {tuple(x.shape)}")
    if unbatched:
        x = x.unsqueeze(0)
    kh, kw = _pair(kernel_size, "kernel_size", 1)
    stride, padding = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
    if x.is_cuda and x.dtype == torch.float32:
        _ops._cuda_dev(x)  # (a clear error on a build without the CUDA kernels)
    if (kh, kw) == (1, 1) and padding == (0, 0) and stride != (1, 1) and x.dtype == torch.float32 and not x.is_cuda:
        # A strided 1x1 convolution (ResNet's projection shortcuts) is a 1x1 convolution of the
        # subsampled input: no strided segments, no zero-dilated gradient (4x the flops at stride 2).
        x, stride = _Subsample.apply(x, stride), (1, 1)
    # Keep the forward's zero-padded input for the weight gradient when one will be needed: one
    # padded copy per step instead of two (more memory held until the backward, one input's worth).
    keep = torch.is_grad_enabled() and values.requires_grad
    geom = (out_channels, [kh, kw], list(stride), list(padding), list(_pair(dilation, "dilation", 1)), groups)
    if _eager(x, values, bias, indptr, indices):
        y = _Conv2dEager.apply(x, values, bias, indptr, indices, geom, keep)
    else:
        y, _ = conv2d_op(x, values, bias, indptr, indices, *geom, keep)
    return y.squeeze(0) if unbatched else y


def pad_input(x: Tensor, pads: Tuple[int, int, int, int], mode: str, in_channels: int, kernel_size,
              dilation) -> Tensor:
    """``x`` (N, C, H, W) or (C, H, W) padded by ``pads`` = (left, right, top, bottom) in ``mode``
    (a ``padding_mode`` of ``nn.Conv2d``), the way ``nn.Conv2d`` pads before its convolution; a
    batch-innermost x gives a batch-innermost result. Input that cannot be padded so (a reflection
    as wide as the input, a convolution that would have no output) is a ValueError."""
    _ops._check_tensor(x, "x")
    if x.dim() not in (3, 4) or x.shape[-3] != in_channels:
        raise ValueError(f"x must have shape (N, {in_channels}, H, W) or ({in_channels}, H, W); got {tuple(x.shape)}")
    h, w = x.shape[-2], x.shape[-1]
    left, right, top, bottom = pads
    (kh, kw), (dh, dw) = kernel_size, dilation
    if h + top + bottom - dh * (kh - 1) <= 0 or w + left + right - dw * (kw - 1) <= 0:
        raise ValueError(f"input of size {h}x{w} is too small for kernel {kh}x{kw} with padding (left, right, top, "
                         f"bottom) = {tuple(pads)}, dilation {(dh, dw)}: the convolution would have no output")
    if mode == "reflect" and (max(top, bottom) >= h or max(left, right) >= w):
        raise ValueError(f"padding_mode='reflect' needs each padding smaller than the input's side; got padding "
                         f"(left, right, top, bottom) = {tuple(pads)} for an input of size {h}x{w}")
    if mode == "circular" and (max(top, bottom) > h or max(left, right) > w):
        raise ValueError(f"padding_mode='circular' needs each padding at most the input's side; got padding "
                         f"(left, right, top, bottom) = {tuple(pads)} for an input of size {h}x{w}")
    if mode != "zeros" and (h == 0 or w == 0):
        raise ValueError(f"padding_mode={mode!r} needs an input of nonzero size; got {h}x{w}")
    if is_batch_inner(x) or (x.dim() == 4 and x.is_contiguous() and _fast_transpose(x) and type(x) in _ops._PLAIN
                             and not torch.compiler.is_compiling()):
        # Padded batch-innermost, the layout the kernels read: F.pad would return a row-major
        # result, its reflections run ~6x slower on a batch-innermost input, and the kernels would
        # transpose a row-major one anyway (here the engine's transpose does it, before the gather).
        return _PadBatchInner.apply(x, tuple(pads), mode)
    return torch.nn.functional.pad(x, pads, mode="constant" if mode == "zeros" else mode)


class _ToRowMajor(torch.autograd.Function):
    """An (N, C, H, W) tensor made (N, C, H, W)-contiguous by the engine's transpose; the gradient
    comes back batch-innermost."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return _nchw(t)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return _chwn(g).permute(3, 0, 1, 2)


def row_major(t: Tensor) -> Tensor:
    """``t`` (N, C, H, W)-contiguous (differentiable; the fast transpose on float32 CPU tensors)."""
    if t.is_contiguous():
        return t
    return _ToRowMajor.apply(t) if t.requires_grad and torch.is_grad_enabled() else _nchw(t)


def _pad_source(n: int, before: int, after: int, mode: str, device) -> Tensor:
    """For each of the n + before + after positions along one padded side, the input position it
    copies (reflect, replicate or circular; int64)."""
    i = torch.arange(-before, n + after, device=device)
    if mode == "reflect":
        i = i.abs()
        return torch.where(i > n - 1, 2 * (n - 1) - i, i)
    if mode == "replicate":
        return i.clamp(0, n - 1)
    return i.remainder(n)  # circular


class _PadBatchInner(torch.autograd.Function):
    """pad_input into a batch-innermost result, from a batch-innermost x or a row-major one (then
    transposed first): in the (C, H, W, N) view, one slice copy (zeros) or one gather of whole
    (W x N) rows. The backward folds the border's gradient back onto the input positions it copied
    (index_add_ of the border only) and gives it in x's layout."""

    @staticmethod
    def forward(ctx, x: Tensor, pads: Tuple[int, int, int, int], mode: str) -> Tensor:
        left, right, top, bottom = pads
        c = _chwn(x)
        ch, h, w, n = c.shape
        ctx.pads, ctx.mode, ctx.hw, ctx.row_major = pads, mode, (h, w), not is_batch_inner(x)
        if mode == "zeros":
            out = c.new_zeros((ch, h + top + bottom, w + left + right, n))
            out[:, top:top + h, left:left + w] = c
        else:
            # (kept for the backward: where each padded row and column came from)
            ctx.sources = (_pad_source(h, top, bottom, mode, x.device), _pad_source(w, left, right, mode, x.device))
            hi, wi = ctx.sources
            out = c[:, hi[:, None], wi[None, :], :]
        return out.permute(3, 0, 1, 2)

    @staticmethod
    def backward(ctx, g: Tensor):
        left, right, top, bottom = ctx.pads
        h, w = ctx.hw
        gc = g.permute(1, 2, 3, 0)
        if ctx.mode == "zeros":
            return _PadBatchInner._in_layout(ctx, gc[:, top:top + h, left:left + w].contiguous()), None, None
        gr = gc[:, top:top + h].contiguous()  # the interior rows, then the border rows folded in
        rows = list(range(top)) + list(range(top + h, top + h + bottom))
        hi, wi = ctx.sources
        if rows:
            gr.index_add_(1, hi[rows], gc[:, rows])
        gx = gr[:, :, left:left + w].contiguous()
        cols = list(range(left)) + list(range(left + w, left + w + right))
        if cols:
            gx.index_add_(2, wi[cols], gr[:, :, cols])
        return _PadBatchInner._in_layout(ctx, gx), None, None

    @staticmethod
    def _in_layout(ctx, gx: Tensor) -> Tensor:
        """The (C, H, W, N)-contiguous gradient gx as an (N, C, H, W) tensor in the input's layout."""
        g = gx.permute(3, 0, 1, 2)
        return _nchw(g) if ctx.row_major else g


class _Subsample(torch.autograd.Function):
    """x[:, :, ::sh, ::sw] as a new tensor in x's layout (batch-innermost stays so); the backward
    puts the gradient back at those pixels of a zero tensor in x's layout."""

    @staticmethod
    def forward(ctx, x: Tensor, stride: Tuple[int, int]) -> Tensor:
        sh, sw = stride
        ctx.shape, ctx.stride_hw, ctx.inner = x.shape, stride, is_batch_inner(x)
        v = x[:, :, ::sh, ::sw]
        if ctx.inner:
            out = torch.empty_strided(v.shape, _batch_inner_strides(*v.shape), dtype=x.dtype)
            out.copy_(v)
            return out
        return v.contiguous()

    @staticmethod
    def backward(ctx, g: Tensor):
        sh, sw = ctx.stride_hw
        if ctx.inner and not torch.is_grad_enabled():
            # A pooled buffer (fresh ones this size fault their pages in: 2 of 4.5 ms here), zeroed
            # each time: autograd may add another gradient into it in place.
            n, c, h, w = ctx.shape
            arr = _pool.take(("out",), (c, h, w, n), zeroed=False)
            arr.fill(0.0)
            gx = _strided_alias(torch.from_numpy(arr), (n, c, h, w), _batch_inner_strides(n, c, h, w))
        elif ctx.inner:  # (a graph-building backward: a tensor of its own, not a pooled buffer)
            gx = torch.empty_strided(ctx.shape, _batch_inner_strides(*ctx.shape), dtype=g.dtype,
                                     device=g.device).zero_()
        else:
            gx = g.new_zeros(ctx.shape)
        gx[:, :, ::sh, ::sw] = g
        return gx, None
