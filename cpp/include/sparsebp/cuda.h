// CUDA variants of the kernels (compiled only with SPARSEBP_CUDA=ON; see cpp/src/kernels/cuda/).
// Every pointer is a device pointer on `device`; work is queued on `stream` (0: the legacy default
// stream; PyTorch passes its current stream). Dense operands are row-major with the given leading
// dimensions. Functions return after queuing (asynchronous), except that launch errors are checked.
// In builds without CUDA, compiled() is false, device_count() is 0 and every other function throws
// ValueError.
#pragma once
#include <cstdint>
#include <string>

namespace sparsebp {
namespace cuda {

bool compiled();
// GPUs the CUDA runtime sees (0 without a driver or device; never throws).
int device_count();
std::string device_name(int device);
// Blocks until the work queued on `stream` of `device` is done.
void synchronize(int device, uintptr_t stream);

// y[b, o] = bias[o] + sum_{p in row o} v(p) * x[b, indices[p]]  (b < batch, o < rows), with
// v(p) = values[value_index ? value_index[p] : p]. The input gradient dx = g W is this kernel over
// the CSC of W (value_index: its permutation into W's values). bias may be null.
void csr_rows_times_dense(int device, uintptr_t stream, int64_t batch, int64_t rows, const int64_t* indptr,
                          const int32_t* indices, const float* values, const int64_t* value_index, const float* bias,
                          const float* x, int64_t ldx, float* y, int64_t ldy);
// SDDMM at the stored positions of a CSR (rows x cols), feature-major operands:
//   dvalues[p] = sum_b gt[row(p) * ldg + b] * xt[indices[p] * ldx + b]; dbias[o] = sum_b gt[o * ldg + b]
// (dbias may be null). With g not null, gt is first filled with the transpose of g (batch x rows,
// row stride ldg_src). parts > 1 (with partials: parts * (nnz + rows) floats of scratch, and nnz):
// the batch is split into up to that many spans computed side by side, their partial sums added
// in a fixed order (for long batches over few rows: the warps per row would otherwise be too few).
void sddmm(int device, uintptr_t stream, int64_t batch, int64_t rows, const int64_t* indptr, const int32_t* indices,
           float* gt, int64_t ldg, const float* xt, int64_t ldx, float* dvalues, float* dbias,
           const float* g = nullptr, int64_t ldg_src = 0, float* partials = nullptr, int64_t parts = 1,
           int64_t nnz = 0);
// out (cols x rows, row stride ldo) = the transpose of in (rows x cols, row stride ldi).
void transpose(int device, uintptr_t stream, int64_t rows, int64_t cols, const float* in, int64_t ldi, float* out,
               int64_t ldo);
// The same product over a feature-major dense operand: y(b, r) = bias[r] + sum_{p in row r} v(p) *
// xt[indices[p] * ldx + b], written feature-major (y[r * ldy + b]) or, with y_batch_major,
// batch-major (y[b * ldy + r]). Vector loads where batch, ldx (and ldy) and the pointers allow.
// With x not null, xt is first filled with the transpose of x (batch x cols, row stride ldx_src).
void csr_times_feature_major(int device, uintptr_t stream, int64_t batch, int64_t rows, const int64_t* indptr,
                             const int32_t* indices, const float* values, const int64_t* value_index,
                             const float* bias, float* xt, int64_t ldx, float* y, int64_t ldy, bool y_batch_major,
                             const float* x = nullptr, int64_t cols = 0, int64_t ldx_src = 0);
// SDDMM over batch-major operands g (batch x rows, ldg) and x (batch x cols, ldx), for small
// batches (no transposes): dvalues[p] = sum_b g[b * ldg + row(p)] * x[b * ldx + indices[p]].
void sddmm_batch_major(int device, uintptr_t stream, int64_t batch, int64_t rows, const int64_t* indptr,
                       const int32_t* indices, const float* g, int64_t ldg, const float* x, int64_t ldx,
                       float* dvalues, float* dbias);
// Per row r < rows of src (n entries, stride lds): idx[r * k .. +k) = the k columns of largest |src|,
// ties to the lower column, increasing order. 0 < k <= n. nan_rows[r] = 1 if the row holds NaN.
void topk_rows(int device, uintptr_t stream, const float* src, int64_t rows, int64_t n, int64_t lds, int64_t k,
               int32_t* idx, uint8_t* nan_rows);
// out[j] = sum_r |src[r, j]| for j < n.
void abs_colsum(int device, uintptr_t stream, const float* src, int64_t rows, int64_t n, int64_t lds, float* out);
// Per-example sparse-gradient products for y = x W^T with W dense (out x in), the selection sel
// (batch x k, int32; each row strictly increasing, as top-k gives it) of the output gradient g
// (batch x out):
//   dx[b, :] = sum_t g[b, sel[b, t]] W[sel[b, t], :]                    (if dx not null)
//   dw[j, :] = sum over the b with j in sel[b] of g[b, j] x[b, :]       (if dw not null; b
//              increasing, no atomics: the same bits on every run; rows no example selected, 0)
void meprop_example(int device, uintptr_t stream, int64_t batch, int64_t k, int64_t out, int64_t in,
                    const int32_t* sel, const float* g, int64_t ldg, const float* w, const float* x, int64_t ldx,
                    float* dx, float* dw);
// C[i, j] = sum_l A(i, l) B(l, j) for i < m, j < n, l < kk, with A(i, l) = a[i * sa0 + l * sa1] and
// B(l, j) = b[l * sb0 + j * sb1] (any transposes through the strides); C row-major with ldc.
void gemm(int device, uintptr_t stream, int64_t m, int64_t n, int64_t kk, const float* a, int64_t sa0, int64_t sa1,
          const float* b, int64_t sb0, int64_t sb1, float* c, int64_t ldc);

}  // namespace cuda
}  // namespace sparsebp
