// The engine's operations over plain pointers. Every argument check and the threading policy
// live in ops.cpp; kernels trust what they are given.
#pragma once
#include <cstdint>
#include <vector>

#include "sparsebp/csr.h"

namespace sparsebp {

// A logical (batch x features) float32 matrix: element (b, f) at data[b * stride_batch +
// f * stride_feature] (strides in elements). It must be contiguous along one axis: stride_batch == 1
// (feature-major, the kernels' own layout: no copy) or stride_feature == 1 (batch-major, transposed
// into a scratch buffer first). Size-1 axes may have any stride.
template <typename T>
struct Dense {
  T* data;
  int64_t batch;
  int64_t features;
  int64_t stride_batch;
  int64_t stride_feature;
};
using DenseIn = Dense<const float>;
using DenseOut = Dense<float>;

// Leading dimension (in elements) for a feature-major block of `batch` columns that the kernels
// read fastest: rows on 64-byte boundaries, and never a multiple of 512 bytes (such strides map the
// rows a kernel gathers onto a fraction of the cache sets; measured up to 40% slower).
int64_t padded_ld(int64_t batch);

// Y = X W^T + b. w: out x in structure; values: w.nnz() floats; bias: out floats or null;
// x: B x in; y: B x out, overwritten. y must not overlap any input.
void linear_forward(const CsrStructure& w, const float* values, int64_t values_len, const float* bias,
                    int64_t bias_len, const DenseIn& x, const DenseOut& y);

// Backward of linear_forward from grad_output G (B x out):
//   grad_input  = G W                    (B x in; skipped when null), overwritten
//   grad_values[p] = sum_b G[b, row(p)] X[b, col(p)]   (nnz; at the stored positions), overwritten;
//                                                       skipped when null (frozen weights)
//   grad_bias   = sum_b G[b, :]          (out; skipped when null), overwritten
// Outputs must not overlap inputs or each other. Results are bit-identical for any thread count.
void linear_backward(const CsrStructure& w, const float* values, int64_t values_len, const DenseIn& grad_output,
                     const DenseIn& x, const DenseOut* grad_input, float* grad_values, int64_t grad_values_len,
                     float* grad_bias, int64_t grad_bias_len);

// Gather products over per-entry offsets (the implicit-GEMM core of convolution; the full
// contract is GatherArgs in kernels/kernel_table.h). All arrays are flat; every offset, shift and
// length is checked against the array sizes before a kernel runs (ValueError otherwise).
struct GatherGeometry {
  int64_t ncols, seg_outer, seg_inner, x_outer, x_inner, y_row, y_outer, y_inner;
  // Optional entry blocks (see GatherArgs in kernel_table.h): rows x (nblocks + 1), row o's from
  // indptr[o] to indptr[o + 1], non-decreasing. Null: one block.
  const int64_t* blocks = nullptr;
  int64_t nblocks = 0;
  // Optional windows (see GatherArgs; implicit zero padding): taps has one entry per nonzero,
  // in [0, ntaps); windows is ntaps x 4 (segment rows [lo, hi), columns [lo, hi)).
  const int32_t* taps = nullptr;
  const int64_t* windows = nullptr;
  int64_t ntaps = 0;
};
// y[o, s, :] = bias[o] + sum_p value(p) x[offsets[p] + shift(s) + :]. value_index may be null.
void gather_forward(const int64_t* indptr, int64_t rows, const int64_t* offsets, int64_t offsets_len,
                    const float* values, int64_t values_len, const int64_t* value_index, int64_t value_index_len,
                    const float* bias, int64_t bias_len, const float* x, int64_t x_len, float* y, int64_t y_len,
                    const GatherGeometry& geo);
// dvalues[p] = sum_{s, j} g[o, s, j] x[offsets[p] + shift(s) + j]; dbias[o] = sum_{s, j} g[o, s, j]
// (overwritten; dbias may be null).
void gather_sddmm(const int64_t* indptr, int64_t rows, const int64_t* offsets, int64_t offsets_len, const float* g,
                  int64_t g_len, const float* x, int64_t x_len, float* dvalues, int64_t dvalues_len, float* dbias,
                  int64_t dbias_len, const GatherGeometry& geo);

// ---- Sparse gradients (meProp): row-major operands, element (r, j) at data[r * ld + j] ----------
// idx (rows x min(k, n), row-major) = per row, the min(k, n) columns of largest |g| (ties: lower
// column first), in increasing order. k >= 0. A row holding NaN is a ValueError.
void topk_rows(const float* g, int64_t rows, int64_t n, int64_t ldg, int64_t k, int32_t* idx);
// out[j] = sum_r |g[r, j]| for j < n (rows summed in order).
void abs_colsum(const float* g, int64_t rows, int64_t n, int64_t ldg, float* out);
// One step of MSBP-style memory (sparsebp.algorithms.MSBP) on a rows x n gradient g: u = g + m
// (written to u; with m null, u is g itself and is not written), cols (min(k, n), increasing) = the
// k columns of largest sum_r |u[r, j]| (topk_rows' rule on abs_colsum's sums), and
// m_out = alpha * u outside cols, 0 in them, with every entry below FLT_MIN in magnitude flushed to
// 0. NaN in u is a ValueError when 0 < k < n (m_out is then scratch). m_out must not alias g, m
// or u.
void msbp_step(const float* g, int64_t rows, int64_t n, int64_t ldg, const float* m, int64_t ldm, float* u,
               int64_t ldu, float alpha, int64_t k, int32_t* cols, float* m_out, int64_t ldmo);
// out[r, :ncols] = sum_{p in row r} values[p] * d[indices[p], :ncols], r < rows (a CSR of `rows`
// rows with nnz = indptr[rows] entries times a dense d of d_rows rows). Indices checked.
void spmm_rows(const int64_t* indptr, int64_t rows, const int32_t* indices, const float* values, int64_t nnz,
               const float* d, int64_t d_rows, int64_t ldd, int64_t ncols, float* out, int64_t ldo);

// dst (cols x rows, row stride ldd) = the transpose of src (rows x cols, row stride lds), in
// blocks, threaded. No aliasing. (Layout changes of activations: see sparsebp.torch's conv.)
void transpose(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd);

// out (out_rows x ncols) = sum over the CSR's rows r and entries p: values[p] * d[r, :] into row
// indices[p] (the transposed product, d having `rows` rows). Indices checked.
void spmm_scatter(const int64_t* indptr, int64_t rows, const int32_t* indices, const float* values, int64_t nnz,
                  const float* d, int64_t ldd, int64_t ncols, float* out, int64_t out_rows, int64_t ldo);

// A per-row selection (rows x k columns of an n-column gradient g, each row's columns distinct and
// in [0, n)) regrouped by column, for the per-example products: CSR of the selected transpose.
// indptr (n + 1): column j's entries are [indptr[j], indptr[j + 1]), in increasing row order;
// row_of (rows * k): their rows; vals (rows * k): g[row, j]; touched: the columns selected at
// least once, increasing (its first *n_touched entries; room for min(n, rows * k)). Counting sort,
// O(rows * k + n). A column outside [0, n) is a ValueError. Optional (may be null):
// touched_indptr (room for min(n, rows * k) + 1): the touched columns' own pointers (indptr
// without its empty columns); by_row (rows * k): g[r, sel[r, q]] row by row (the values of the
// selection's CSR by row, whose indices are sel itself).
void selection_by_column(const int32_t* sel, int64_t rows, int64_t k, const float* g, int64_t ldg, int64_t n,
                         int64_t* indptr, int32_t* row_of, float* vals, int32_t* touched, int64_t* n_touched,
                         int64_t* touched_indptr = nullptr, float* by_row = nullptr);

// Per-example sparse-gradient backward of y = x W^T for a CSR W (rows x cols: output units x inputs),
// the output gradient g (B x rows, row stride ldg) kept only at sel (B x k columns per example, each
// in [0, rows); a column repeated in one example counts twice, as in the dense per-example path):
//   dx (B x cols, row stride lddx; may be null):  dx[b] = sum_q g[b, sel[b, q]] W[sel[b, q], :]
//   dvalues (nnz; may be null): entry p of row j:  sum over the examples b that selected j, in
//                               increasing b, of g[b, j] x[b, indices[p]]; 0 in rows none selected.
// x (B x cols, row stride ldx) is read only for dvalues. Cost ~ B k (nonzeros per row) for each, not
// B x nnz. touched (room for min(rows, B k)) / *n_touched: the rows selected at least once,
// increasing. The structure of the touched rows is checked (ValueError), the rest is not read,
// unless structure_checked (a CsrStructure's arrays: validated once when it was built). positions
// (room for nnz; may be null) / *n_positions: the positions of the touched rows' entries, in order.
void csr_example_backward(const int64_t* indptr, const int32_t* indices, const float* values, int64_t nnz,
                          int64_t rows, int64_t cols, const int32_t* sel, int64_t batch, int64_t k, const float* g,
                          int64_t ldg, const float* x, int64_t ldx, float* dx, int64_t lddx, float* dvalues,
                          int32_t* touched, int64_t* n_touched, bool structure_checked = false,
                          int64_t* positions = nullptr, int64_t* n_positions = nullptr);

// Unified sparse-gradient backward of y = x W^T for a CSR W (rows x cols) with the output gradient
// G (B x rows) kept only in the columns sel (n of them, strictly increasing, each in [0, rows);
// ValueError otherwise):
//   grad_input (B x cols; may be null) = G[:, sel] W[sel, :], overwritten
//   dvalues (nnz; may be null): entry p of a selected row j gets sum_b G[b, j] x[b, indices[p]];
//                               every other entry 0
// linear_backward's kernels over the selected rows' sub-matrix (built here, with G's selected
// columns, in one call: from Python the same steps cost ~70 us a call more). positions (room for
// nnz; may be null) / *n_positions: the positions in W of the selected rows' entries, increasing.
// Outputs must not overlap inputs or each other.
void csr_rows_backward(const CsrStructure& w, const float* values, int64_t values_len, const int32_t* sel, int64_t n,
                       const DenseIn& grad_output, const DenseIn& x, const DenseOut* grad_input, float* dvalues,
                       int64_t dvalues_len, int64_t* positions, int64_t* n_positions);

// Mean softmax cross-entropy of the logits z (rows x classes, row stride ldz) against labels (each
// in [0, classes), else ValueError), and its gradient into grad (rows x classes, contiguous):
// (softmax(z) - onehot(label)) / rows. Exponentials of entries more than 80 below their row's
// maximum are taken as 0 and gradient entries below FLT_MIN in magnitude are flushed to zero:
// subnormal floats slow every later operation they enter (~100x on x86) and lie far below float32's
// resolution next to the row's largest probability. Returns the loss (accumulated in double).
double softmax_xent(const float* z, int64_t rows, int64_t classes, int64_t ldz, const int64_t* labels, float* grad);

// The Euclidean projection onto {x in [0, 1]^n : sum x <= budget} of s (n doubles) into out:
// clip(s - v, 0, 1) with v = 0 when sum clip(s, 0, 1) <= budget, else the root v > 0 of
// sum clip(s - v, 0, 1) = budget, found exactly between the sorted breakpoints {s_i - 1, s_i}.
// out may be s.
void project_budget(const double* s, int64_t n, double budget, double* out);

// The same projection with the root found by selection instead of a sort: O(n) expected (each
// round evaluates f at a breakpoint drawn from those left in the bracket, then sets aside every
// entry whose part of f is linear on the narrowed bracket). The training path (mask_adam_project)
// uses it; it agrees with project_budget to rounding (a different summation order).
void project_budget_select(const double* s, int64_t n, double budget, double* out);

// VR-PGE's two-sample estimator of the gradient of the mask probabilities s (n doubles), into g:
// g_i = df / 2 * (m1_i - m2_i) / den_i with den_i = sqrt(s_i (1 - s_i)) (authors) or s_i (1 - s_i)
// (textbook), 0 where den_i is not > 0; m1, m2: n bools (0 or 1). Returns sum g_i^2.
double mask_estimator(const double* s, const uint8_t* m1, const uint8_t* m2, int64_t n, double df, bool textbook,
                      double* g);

// The same estimator for per-weight masks given as two CSR structures over a rows x cols s (row
// major): (indptr1, indices1) and (indptr2, indices2), column indices strictly increasing in each
// row. g (rows x cols) is written whole: the entries in exactly one of the two masks get
// df / 2 * (+-1) / den as above, every other entry 0, so no dense mask is built. Returns sum g_i^2
// (the nonzeros in row-major order, as mask_estimator sums them).
double mask_estimator_csr(const double* s, int64_t rows, int64_t cols, const int64_t* indptr1,
                          const int32_t* indices1, int64_t nnz1, const int64_t* indptr2, const int32_t* indices2,
                          int64_t nnz2, double df, bool textbook, double* g);

// The union of two masks m1, m2 (n bools) and each mask restricted to it: writes the positions
// where m1 or m2 is set, in increasing order, to idx (count entries, count = the number of such
// positions, which the caller has from mask_union_count), and keep (2 x count floats, row-major):
// keep[0][k] = m1[idx[k]], keep[1][k] = m2[idx[k]] as 1.0f / 0.0f.
int64_t mask_union_count(const uint8_t* m1, const uint8_t* m2, int64_t n);
void mask_union(const uint8_t* m1, const uint8_t* m2, int64_t n, int64_t count, int64_t* idx, float* keep);

// One Adam step on the mask probabilities s (n doubles, updated in place) from the gradient
// scale * g, then s = project_budget(s, budget): m = b1 m + (1 - b1) g'; v = b2 v + (1 - b2) g'^2;
// s -= step_size * m / (sqrt(v * inv_c2) + eps), with step_size = lr / (1 - b1^t) and
// inv_c2 = 1 / (1 - b2^t) given by the caller. All in double; moments below DBL_MIN in magnitude
// are flushed to zero. The gradient is checked (finite) before anything is written. The projection
// is project_budget_select's.
void mask_adam_project(double* s, double* m, double* v, const double* g, int64_t n, double scale, double b1,
                       double b2, double step_size, double inv_c2, double eps, double budget);

// One fused Adam step over a parameter viewed as (rows x cols), contiguous; only the rows listed in
// `row_list` (n_rows of them, strictly increasing, in [0, rows)) when it is not null, else all. In one pass:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= step_size * m / (sqrt(v * inv_c2) + eps)
// with step_size = lr / (1 - b1^t) and inv_c2 = 1 / (1 - b2^t) given by the caller; float arithmetic
// (1 - b rounded from double), vectorised per ISA, threaded over rows. g_compact (with a row list):
// g holds only the listed rows, n_rows x cols, row i for row row_list[i]; else g has p's shape.
void adam_step(float* p, const float* g, float* m, float* v, int64_t rows, int64_t cols, const int64_t* row_list,
               int64_t n_rows, bool g_compact, double b1, double b2, float step_size, float inv_c2, float eps);

// ---- Unit masks (VR-PGE): blocks of row-major matrices -------------------------------------------
// rows / cols: strictly increasing indices into the big matrix (null: all of them, n = its size).
// dst (n_rows x n_cols, leading dimension ldd) = src[rows][:, cols].
void gather_block(const float* src, int64_t src_rows, int64_t src_cols, int64_t lds, const int64_t* rows,
                  int64_t n_rows, const int64_t* cols, int64_t n_cols, float* dst, int64_t ldd);
// dst[rows][:, cols] += alpha * src (src: n_rows x n_cols, leading dimension lds).
void scatter_add_block(float* dst, int64_t dst_rows, int64_t dst_cols, int64_t ldd, const int64_t* rows,
                       int64_t n_rows, const int64_t* cols, int64_t n_cols, const float* src, int64_t lds,
                       float alpha);
// Lazy SGD over the block rows x cols of w (w_rows x w_cols, contiguous; buf alike; stamp:
// w_rows x w_cols, or w_rows with row_stamps, where cols must be null): the contract of
// kernels::LazySgdArgs (peek: only `out` is written). powers: 4 * (max_lag + 1) floats. g / out may be null (leading dimension
// = n_cols). A lag outside [0, max_lag] is a ValueError (that block row may be partly updated: the
// caller's bookkeeping is broken). n_gcols >= 0 (with g, without cols, not peek): the block spans
// whole rows but g is n_rows x n_gcols, the gradient at the columns g_cols (strictly increasing; 0
// elsewhere). n_gcols = -1: g spans the block.
void lazy_sgd(float* w, float* buf, int32_t* stamp, bool row_stamps, int64_t w_rows, int64_t w_cols,
              const int64_t* rows, int64_t n_rows, const int64_t* cols, int64_t n_cols, const float* powers,
              int64_t max_lag, int32_t now, const float* g, float* out, float lr, float momentum, float decay,
              bool peek = false, const int64_t* g_cols = nullptr, int64_t n_gcols = -1);
// ReLU over n contiguous floats (y may alias x): forward (mask null) y = x > 0 or NaN ? x : 0;
// backward y = mask > 0 ? x : 0 (x the gradient, mask the forward's output).
void relu(const float* x, const float* mask, float* y, int64_t n);
// Inverted dropout over n contiguous floats (y may alias x): factor[i] = 0 with probability p (a
// counter-based draw from seed and i, the same for every thread count and ISA), else scale;
// y[i] = x[i] * factor[i]. p in [0, 1).
void dropout(const float* x, float* y, float* factor, int64_t n, uint64_t seed, float p, float scale);
// A hidden layer's activation under unit masks, in one pass: out (groups * rpg rows x n, contiguous)
// row i = relu(z[zi] + bias) * keep[i / rpg], where zi = i when z has groups * rpg rows (one block
// of rows per mask) and i % rpg when it has rpg rows (one input shared by every mask). ReLU as
// relu() (NaN kept); bias may be null. out may be z itself when they have the same rows.
void bias_relu_mask(const float* z, int64_t z_rows, int64_t n, const float* bias, const float* keep, int64_t groups,
                    int64_t rpg, float* out);
// The CSR structure (indptr: rows + 1, indices) of a Bernoulli(s) mask: kernels::BernoulliArgs.
void bernoulli_csr(const float* s, int64_t rows, int64_t cols, int64_t lds, uint64_t seed,
                   std::vector<int64_t>* indptr, std::vector<int32_t>* indices);

}  // namespace sparsebp
