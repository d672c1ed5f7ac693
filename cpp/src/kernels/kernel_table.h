// Plain-data kernel arguments and the function-pointer table: the only header the ISA files include.
// Kernels trust their arguments (ops.cpp checks everything) and work on a range given by the caller,
// so that the threading policy lives in ops.cpp alone.
//
// Layout. Dense operands are *feature-major*: element (feature f, batch b) lives at data[f * ld + b],
// so the batch is the contiguous dimension. A NumPy array of shape (batch, features) in Fortran order
// is exactly this layout with ld = its column stride.
#pragma once
#include <cstdint>

namespace sparsebp {
namespace kernels {

// The structure of a CSR matrix of shape rows x cols; indices strictly increasing within a row.
struct CsrPattern {
  int64_t rows;
  int64_t cols;
  const int64_t* indptr;   // rows + 1 entries
  const int32_t* indices;  // indptr[rows] entries
};

// Forward of a sparse linear layer, Y = X W^T + b, in feature-major form:
//   yt[o, b] = bias[o] + sum_{p in row o} v(p) * xt[indices[p], b]
// for rows o in [row_begin, row_end) and b in [0, batch). Overwrites those rows of yt.
// v(p) = values[p], or values[value_index[p]] when value_index is not null: the input gradient
// runs this kernel over the transposed structure and reads W's values through the permutation.
// bias may be null (then 0). yt must not alias xt.
//
// Column panels: the SIMD kernels visit the nonzeros panel by panel (columns [0, panel),
// [panel, 2 panel), ...), so that the rows of xt one panel touches stay in cache while all output
// rows use them (the scalar specification may sweep once). `cursor` (w.rows entries, caller-owned
// scratch; disjoint row ranges may share it) remembers where each row's next panel starts.
// panel >= w.cols means a single sweep. The summation order depends on panel, so callers choose
// it from the shapes alone (never from the thread count).
struct LinearForwardArgs {
  CsrPattern w;
  const float* values;
  const int64_t* value_index;  // may be null
  const float* bias;
  const float* xt;  // w.cols x batch, leading dimension ldx >= batch
  int64_t ldx;
  float* yt;        // w.rows x batch, leading dimension ldy >= batch
  int64_t ldy;
  int64_t batch;
  int64_t panel;
  int64_t* cursor;
};
using LinearForwardFn = void (*)(const LinearForwardArgs&, int64_t row_begin, int64_t row_end);

// Weight gradient at the stored positions (a sampled dense-dense product, SDDMM):
//   dvalues[p] = sum_{b < batch} gt[row(p), b] * xt[indices[p], b]   for rows [row_begin, row_end)
// and, if dbias is not null, the bias gradient in the same sweep (G^T's rows are loaded anyway):
//   dbias[o]   = sum_{b < batch} gt[o, b]
// Overwrites those rows' entries of dvalues (and dbias), or adds to them when `accumulate` is set
// (the caller then runs the batch in pieces). panel / cursor as for the forward (cursor: w.rows
// entries; disjoint row ranges may share it).
struct SddmmArgs {
  CsrPattern w;
  const float* gt;  // w.rows x batch, leading dimension ldg
  int64_t ldg;
  const float* xt;  // w.cols x batch, leading dimension ldx
  int64_t ldx;
  float* dvalues;   // nnz entries
  float* dbias;     // w.rows entries, or null
  int64_t batch;
  int64_t panel;
  int64_t* cursor;
  bool accumulate;
};
using SddmmFn = void (*)(const SddmmArgs&, int64_t row_begin, int64_t row_end);

// The input gradient dX^T = W^T G^T is the forward kernel run over the transposed structure (the
// CSC of W, with value_index = its permutation): see ops.cpp.

// dst[j * ldd + i] = src[i * lds + j] for i in [row_begin, row_end), j in [0, cols). No aliasing.
// Gather products over per-entry offsets (implicit GEMM; convolution is built on them, see
// python/sparsebp/conv.py). Output row o, segment s = (so, si) with so < seg_outer, si < seg_inner:
//   y[o * y_row + so * y_outer + si * y_inner + j]
//     = bias[o] + sum_{p in row o} value(p) * x[offsets[p] + so * x_outer + si * x_inner + j],  j < ncols
// value(p) = values[value_index ? value_index[p] : p]. The weight gradient accumulates over all
// segments and columns, in a fixed order (segments, then column tiles), into dvalues / dbias,
// which the caller zeroes first:
//   dvalues[p] += sum_{s, j} g[o, s, j] * x[offsets[p] + shift(s) + j];   dbias[o] += sum_{s, j} g[o, s, j]
// Entry blocks (blocks non-null): each row's entries are split into nblocks consecutive ranges,
// row o's block b = [blocks[o * (nblocks + 1) + b], blocks[o * (nblocks + 1) + b + 1]); the
// kernels run every row's block 0, then every row's block 1, ... within each column tile, so the
// part of x one block reads stays in cache across rows (convolutions with many input channels).
// The forward accumulates y over the blocks (the bias with block 0); results equal the unblocked
// ones up to rounding.
// Windows (taps non-null; implicit zero padding): entry p has the window w = windows + 4 * taps[p]
// (taps[p] < ntaps <= 64) and contributes only to the segments with w[0] <= so < w[1] and, within
// them, to the columns w[2] <= j < w[3]; elsewhere its term is zero and x is not read there
// (offsets[p] may then be negative or reach past x).
// Every index is checked by ops.cpp before a kernel runs.
struct GatherArgs {
  int64_t rows;
  const int64_t* indptr;   // rows + 1
  const int64_t* offsets;  // indptr[rows]
  const float* values;
  const int64_t* value_index;  // may be null
  const float* bias;           // forward only; may be null
  const float* x;
  float* y;                    // forward: output; weight gradient: unused
  const float* g;              // weight gradient: the output gradient (y's layout); forward: unused
  float* dvalues;
  float* dbias;                // may be null
  int64_t y_row, y_outer, y_inner;
  int64_t x_outer, x_inner;
  int64_t seg_outer, seg_inner;
  int64_t ncols;
  const int64_t* blocks;       // may be null
  int64_t nblocks;
  const int32_t* taps;         // may be null: no windows
  const int64_t* windows;
  int64_t ntaps;
};
using GatherFn = void (*)(const GatherArgs&, int64_t row_begin, int64_t row_end);

struct TransposeArgs {
  const float* src;
  int64_t lds;
  float* dst;
  int64_t ldd;
  int64_t cols;
};
using TransposeFn = void (*)(const TransposeArgs&, int64_t row_begin, int64_t row_end);

// ---- Sparse gradients (meProp) ----------------------------------------------------------------
// Row-major operands: element (row r, column j) at data[r * ld + j].
//
// Top-k of each row by magnitude: for rows r in [row_begin, row_end) of src (n entries, stride
// lds), idx[r * k .. r * k + k) = the k columns with the largest |src[r, j]|, ties broken by the
// lower column, written in increasing column order. 0 < k < n (ops.cpp handles the rest).
// nan_rows[r] = 1 when row r holds a NaN (the selection is then unspecified), else 0.
struct TopkArgs {
  const float* src;
  int64_t lds;
  int64_t n;
  int64_t k;
  int32_t* idx;
  uint8_t* nan_rows;
  int64_t one_pass_k;  // the largest k that takes the one-pass path; -1: the kernel set's own rule
};
using TopkFn = void (*)(const TopkArgs&, int64_t row_begin, int64_t row_end);

// Column magnitude sums over all rows: out[j] = sum_{r < rows} |src[r, j]| (rows summed in
// increasing order), for columns j in [col_begin, col_end).
struct AbsColsumArgs {
  const float* src;
  int64_t lds;
  int64_t rows;
  float* out;
};
using AbsColsumFn = void (*)(const AbsColsumArgs&, int64_t col_begin, int64_t col_end);

// Sparse rows times a dense row-major matrix:
//   out[r, j] = sum_{p in [indptr[r], indptr[r+1])} values[p] * d[indices[p], j]   for j < ncols
// entries summed in order p; overwrites rows [row_begin, row_end) of out (rows without entries: 0).
// Columns are visited in panels of `panel` (all rows of a range per panel), so that the slice of d
// one panel gathers from stays in cache. With 0 < `dblock` < `d_rows` (allowed only when every
// row's indices are non-decreasing), each panel is further split into blocks of `dblock` rows of
// d: a row's entries in one block are summed in registers onto the partial sum stored by the block
// before, so a (dblock x panel) tile of d is reused from cache by all rows when d is too large to
// stay there. Neither the panel nor the block changes the result (the same sums, in order p).
struct SpmmRowsArgs {
  const int64_t* indptr;
  const int32_t* indices;
  const float* values;
  const float* d;
  int64_t ldd;
  float* out;
  int64_t ldo;
  int64_t ncols;
  int64_t panel;
  int64_t d_rows = 0;
  int64_t dblock = 0;
};
using SpmmRowsFn = void (*)(const SpmmRowsArgs&, int64_t row_begin, int64_t row_end);

// The transposed product, scattered: for the rows r of a CSR (in order) and their entries p,
//   out[indices[p], j] += values[p] * d[r, j]        for j in [col_begin, col_end)
// after zeroing out[0 .. out_rows, col_begin .. col_end). Each output element sums its terms in
// increasing r, so the result does not depend on how columns are split. Columns are visited in
// panels of `panel`, so that out's slice (out_rows x panel) stays in cache while d streams by.
struct SpmmScatterArgs {
  const int64_t* indptr;
  const int32_t* indices;
  const float* values;
  int64_t rows;
  const float* d;
  int64_t ldd;
  float* out;
  int64_t ldo;
  int64_t out_rows;
  int64_t panel;
};
using SpmmScatterFn = void (*)(const SpmmScatterArgs&, int64_t col_begin, int64_t col_end);

// ---- Unit masks (VR-PGE) -----------------------------------------------------------------------
// Row-major blocks. R(i) = rows ? rows[i] : i and C(j) = cols ? cols[j] : j, for j < ncols.
//   gather_block:      dst[i * ldd + j] = src[R(i) * lds + C(j)]
//   scatter_add_block: dst[R(i) * ldd + C(j)] += alpha * src[i * lds + j]
// over i in [i_begin, i_end). rows / cols hold no duplicates (ops.cpp checks), so disjoint i
// ranges never write the same element.
struct BlockArgs {
  const float* src;
  int64_t lds;
  float* dst;
  int64_t ldd;
  const int64_t* rows;  // may be null
  const int64_t* cols;  // may be null
  int64_t ncols;
  float alpha;          // scatter_add_block only
};
using BlockFn = void (*)(const BlockArgs&, int64_t i_begin, int64_t i_end);

// Lazy SGD with momentum and weight decay (PyTorch's rule: b = mu b + g + decay w; w -= lr b) over
// the block R x C of a row-major parameter w (leading dimension ld) and its momentum buffer buf.
// A step with g = 0 is linear in (w, b): (w, b) <- A (w, b), A = [[1 - lr decay, -lr mu],
// [decay, mu]]. The stamps count the steps an entry (or, with row_stamps, a whole row: then
// blocks always span whole rows, C = all) has received; an entry `lag = now - stamp` steps behind
// is first caught up with powers[4 lag .. 4 lag + 3] = A^lag (row-major; lag in [0, max_lag],
// else bad[i] = 1 and the row is not, or not wholly, updated). Then:
//   out (if not null): out[i * ldo + j] = the caught-up w;
//   g (if not null):   one step with gradient g[i * ldg + j], and stamp = now + 1; else now.
// peek (with out, without g): only out is written; w, buf and the stamps stay as they were (a
// later step of the same entries catches them up itself).
// stamp null: no catch-up (a plain fused step). Float arithmetic (as PyTorch's float32 step).
// gcols (not null; with g, without cols, not peek): the block spans whole rows but g holds only the
// columns gcols (ngcols per row, ldg = ngcols; 0 elsewhere): the row takes the step with g = 0,
// then at each column c = gcols[k]: b += g[k], w -= lr g[k] (the same step: it is linear in g).
struct LazySgdArgs {
  float* w;
  float* buf;
  int32_t* stamp;       // may be null; rows x ld entries, or rows entries with row_stamps
  bool row_stamps;
  int64_t ld;
  const int64_t* rows;  // may be null
  const int64_t* cols;  // may be null
  int64_t ncols;
  const float* powers;
  int64_t max_lag;
  int32_t now;
  const float* g;       // may be null
  int64_t ldg;
  float* out;           // may be null
  int64_t ldo;
  float lr, momentum, decay;
  bool peek;
  uint8_t* bad;         // one flag per block row i
  const int64_t* gcols; // may be null
  int64_t ngcols;
};
using LazySgdFn = void (*)(const LazySgdArgs&, int64_t i_begin, int64_t i_end);

// One fused Adam step over rows [i_begin, i_end) of the list (rows null: the rows themselves) of a
// rows x cols parameter p with gradient g (same shape and row index as p), moments m and v:
//   m = b1 m + a1 g;  v = b2 v + a2 g^2  (a1 = 1 - b1, a2 = 1 - b2);  p -= step_size * m / (sqrt(v * inv_c2) + eps)
// Moments below FLT_MIN in magnitude are flushed to zero (subnormal arithmetic is ~100x slower on
// x86, and rarely-nonzero gradients decay into them; their share of a step is below 1e-30 lr/eps).
struct AdamArgs {
  float* p;
  const float* g;
  float* m;
  float* v;
  int64_t cols;
  const int64_t* rows;  // may be null
  bool g_compact;       // g holds only the listed rows (row i of g is row rows[i] of p)
  float b1, b2, a1, a2, step_size, inv_c2, eps;  // a1 = 1 - b1, a2 = 1 - b2 (rounded from double)
};
using AdamFn = void (*)(const AdamArgs&, int64_t i_begin, int64_t i_end);

// Adam on VR-PGE's mask probabilities (double), entries [begin, end):
//   gi = scale g;  m = b1 m + (1 - b1) gi;  v = b2 v + (1 - b2) gi^2;  s -= step_size * m / (sqrt(v * inv_c2) + eps)
// Moments below DBL_MIN in magnitude are flushed to zero (as AdamArgs: an entry whose gradient
// stays zero decays m into subnormals within ~7,000 steps).
struct MaskAdamArgs {
  double* s;
  double* m;
  double* v;
  const double* g;
  double scale, b1, b2, step_size, inv_c2, eps;
};
using MaskAdamFn = void (*)(const MaskAdamArgs&, int64_t begin, int64_t end);

// The budget projection's passes over s (double), entries [begin, end), clip(x) = min(1, max(0, x)):
//   out null: part[q] = the sum of clip(s[i] - shift) over the i = begin + q (mod 4), each in
//             increasing i (a tail of fewer than 4 adds to part[0], part[1], .. in turn), and
//             *finite = whether every s[i] is finite;
//   out set:  out[i] = clip(s[i] - shift) (out may be s).
struct ClipArgs {
  const double* s;
  double shift;
  double* out;
  double* part;  // 4 entries
  uint8_t* finite;
};
using ClipFn = void (*)(const ClipArgs&, int64_t begin, int64_t end);

// A Bernoulli(s) mask of a rows x cols matrix of probabilities s, as the columns kept in each row,
// from a counter-based generator: u(e) = top 24 bits of h(seed, e) / 2^24 with e = (row0 + r) *
// cols + j, h = SplitMix64's mixer applied to the mixed seed plus e; m(e) = u(e) < s(e). A pure
// function of (seed, s): the same for every thread count and ISA. One pass: rows [begin, end) write
// their kept columns, increasing, row after row, from out + begin * cols on (room for
// (end - begin) * cols), and counts[r] = the kept entries of row r. The caller packs the chunks.
struct BernoulliArgs {
  const float* s;  // row 0 of the block
  int64_t lds;
  int64_t cols;
  uint64_t seed;
  int64_t row0;  // the generator's row number of the block's row 0
  int64_t* counts;
  int32_t* out;
  uint8_t* bad;  // per row of the block: 1 when an s of that row is outside [0, 1] or NaN
};
using BernoulliFn = void (*)(const BernoulliArgs&, int64_t row_begin, int64_t row_end);

// Element-wise ReLU over [begin, end) of contiguous arrays (y may alias x):
//   forward (mask null): y[i] = x[i] if x[i] > 0 or x[i] is NaN, else 0
//   backward:            y[i] = x[i] if mask[i] > 0, else 0   (x: the gradient, mask: the output)
struct EltwiseArgs {
  const float* x;
  const float* mask;
  float* y;
};
using EltwiseFn = void (*)(const EltwiseArgs&, int64_t begin, int64_t end);

// MSBP's memory step over [begin, end) of contiguous arrays: u[i] = x[i] + m[i] (m null: u is not
// written and x stands for it); y[i] = alpha * u[i], or 0 where that is below FLT_MIN in magnitude
// (subnormals flushed; NaN kept). y may not alias x, m or u.
struct ScaleFlushArgs {
  const float* x;
  const float* m;
  float* u;
  float* y;
  float alpha;
};
using ScaleFlushFn = void (*)(const ScaleFlushArgs&, int64_t begin, int64_t end);

// A hidden layer's activation under unit masks (VR-PGE), rows [begin, end) of out (rows x n,
// contiguous): out[i] = relu(z[zi] + bias) * keep[i / rpg], zi = i when z_shared is false, else
// i % rpg; bias may be null; out may be z itself (z_shared false). ReLU keeps NaN.
struct BiasReluMaskArgs {
  const float* z;
  bool z_shared;
  int64_t n;
  const float* bias;
  const float* keep;
  int64_t rpg;
  float* out;
};
using BiasReluMaskFn = void (*)(const BiasReluMaskArgs&, int64_t row_begin, int64_t row_end);

// Inverted dropout over [begin, end) of contiguous arrays (begin even): factor[i] = 0 where
// u(i) < p, else scale; y[i] = x[i] * factor[i] (y may alias x). u from the counter-based
// generator of bernoulli_rows, two draws per hash: h = SplitMix64's mixer applied to the mixed seed
// plus i / 2; u(i) = (top 24 bits of h for even i, bits 8..31 for odd i) / 2^24. A pure function
// of (seed, i): the same for every thread count and ISA.
struct DropoutArgs {
  const float* x;
  float* y;
  float* factor;
  uint64_t seed;
  float p;
  float scale;
};
using DropoutFn = void (*)(const DropoutArgs&, int64_t begin, int64_t end);

struct KernelTable {
  const char* name;
  // Batch columns one register tile of each kernel covers (ops.cpp sizes cache panels from them).
  int forward_tile_cols;
  int sddmm_tile_cols;
  LinearForwardFn linear_forward;
  SddmmFn sddmm;
  TransposeFn transpose;
  GatherFn gather_forward;
  GatherFn gather_sddmm;
  TopkFn topk_rows;
  AbsColsumFn abs_colsum;
  SpmmRowsFn spmm_rows;
  SpmmScatterFn spmm_scatter;
  BlockFn gather_block;
  BlockFn scatter_add_block;
  LazySgdFn lazy_sgd;
  AdamFn adam;
  MaskAdamFn mask_adam;
  ClipFn budget_clip;
  BernoulliFn bernoulli_rows;
  EltwiseFn relu;
  BiasReluMaskFn bias_relu_mask;
  DropoutFn dropout;
  ScaleFlushFn scale_flush;
};

// Each defined in exactly one kernel set; the only non-anonymous symbol of an ISA file.
const KernelTable* get_scalar_table();
const KernelTable* get_avx2_table();
const KernelTable* get_avx512_table();
const KernelTable* get_avx512_emulated_table();

}  // namespace kernels
}  // namespace sparsebp
