// CUDA variants of sparsebp's kernels: CUDA runtime only (no cuSPARSE / cuBLAS). Contracts in
// include/sparsebp/cuda.h. Compiled only with SPARSEBP_CUDA=ON.
//
// Choices (tested and benchmarked on H100s; results and the protocol in the README):
//  - CSR times a feature-major dense operand (batch >= 32, or an operand already feature-major):
//    one warp per sparse row, lanes over the batch with 1-, 2- or 4-wide vector loads, the row's
//    (index, value) pairs broadcast by shuffles; a batch-major operand is transposed first by the
//    tiled transpose kernel (same call), a batch-major output staged through shared memory. The
//    input gradient is the same kernel over W's CSC.
//  - CSR times a batch-major operand (small batches): one thread per output element (b, o),
//    threads of a warp on consecutive output rows o of one example b (coalesced writes, the
//    example's input row reused from L1 by the whole warp).
//  - SDDMM over feature-major operands: one warp per weight row, 8 lanes per stored entry with the
//    gradient row in registers (vectorized; a warp-wide scalar fallback for odd batches or
//    misaligned rows); the bias gradient in the same pass. Small batches: one warp per row, lanes
//    over its entries, on batch-major operands.
//  - top-k: one block per row; radix select on the bits of |g| (4 passes of 8-bit histograms in
//    shared memory) finds the k-th largest key T and how many entries equal to T to take; an ordered
//    block-wide compaction then writes the selected columns in increasing order, taking the ties at
//    T from the lowest columns (the engine's tie rule). Any row length.
//  - per-example meProp: one block per example; dW accumulated with atomics.
//  - gemm: 16 x 16 shared-memory tiles, transposes through strides.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "sparsebp/cuda.h"
#include "sparsebp/errors.h"

namespace sparsebp {
namespace cuda {
namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a sticky-free error so later calls start clean
    throw ValueError(str_cat("CUDA error in ", what, ": ", cudaGetErrorString(e)));
  }
}

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    SPARSEBP_CHECK_VALUE(device >= 0 && device < device_count(), "CUDA device ", device,
                         " does not exist (this process sees ", device_count(), ")");
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;  // lane 0 holds the sum
}

// ---- CSR rows times a dense matrix ---------------------------------------------------------------
constexpr int kRowsPerBlock = 32;
constexpr int kBatchPerBlock = 8;

__global__ void csr_rows_kernel(int64_t batch, int64_t rows, const int64_t* __restrict__ indptr,
                                const int32_t* __restrict__ indices, const float* __restrict__ values,
                                const int64_t* __restrict__ vidx, const float* __restrict__ bias,
                                const float* __restrict__ x, int64_t ldx, float* __restrict__ y, int64_t ldy) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x;
  const int64_t b = static_cast<int64_t>(blockIdx.y) * kBatchPerBlock + threadIdx.y;
  if (o >= rows || b >= batch) return;
  const float* xb = x + b * ldx;
  float acc = bias ? bias[o] : 0.0f;
  const int64_t end = indptr[o + 1];
  for (int64_t p = indptr[o]; p < end; ++p) acc = fmaf(values[vidx ? vidx[p] : p], xb[indices[p]], acc);
  y[b * ldy + o] = acc;
}

// ---- transpose -------------------------------------------------------------------------------------
// out (cols x rows, ldo) = in (rows x cols, ldi)^T through 32 x 33 shared-memory tiles (coalesced
// reads and writes, no bank conflicts); blocks of 32 x 8 threads, 4 elements per thread.
constexpr int kTT = 32;

__global__ void transpose_kernel(int64_t rows, int64_t cols, const float* __restrict__ in, int64_t ldi,
                                 float* __restrict__ out, int64_t ldo) {
  __shared__ float tile[kTT][kTT + 1];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTT, r0 = static_cast<int64_t>(blockIdx.y) * kTT;
  const int tx = threadIdx.x, ty = threadIdx.y;
#pragma unroll
  for (int k = 0; k < kTT; k += 8) {
    const int64_t r = r0 + ty + k, c = c0 + tx;
    if (r < rows && c < cols) tile[ty + k][tx] = in[r * ldi + c];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kTT; k += 8) {
    const int64_t c = c0 + ty + k, r = r0 + tx;
    if (c < cols && r < rows) out[c * ldo + r] = tile[tx][ty + k];
  }
}

// ---- CSR rows times a feature-major dense matrix ----------------------------------------------------
// One warp per sparse row r; lane l holds the V consecutive batch columns b0 + l*V .. +V of a chunk of
// 32*V (grid.y walks the chunks). The row's (index, value) pairs are read 32 at a time, coalesced,
// and broadcast by shuffles; each then costs one coalesced 4V-byte load per lane from xt's row.
// Output: feature-major (yt[r * ldy + b], vector stores) or batch-major (y[b * ldy + r]): then the
// block's kFmWarps rows go through shared memory so that each b gets one 4*kFmWarps-byte store.
// Rows of one length row_len >= 0 need no indptr: a per-example selection (indices: the k selected
// columns of each example, row r's values read from values[r * ldv + column], the gradient itself),
// for per-example meProp's input gradient over W's rows.
constexpr int kFmWarps = 8;

template <int V>
struct Vec;
template <>
struct Vec<1> {
  using T = float;
  __device__ static T load(const float* p) { return __ldg(p); }
  __device__ static void fma(float* acc, float w, T x) { acc[0] = fmaf(w, x, acc[0]); }
  __device__ static void store(float* p, const float* acc) { *p = acc[0]; }
};
template <>
struct Vec<2> {
  using T = float2;
  __device__ static T load(const float* p) { return __ldg(reinterpret_cast<const float2*>(p)); }
  __device__ static void fma(float* acc, float w, T x) {
    acc[0] = fmaf(w, x.x, acc[0]);
    acc[1] = fmaf(w, x.y, acc[1]);
  }
  __device__ static void store(float* p, const float* acc) { *reinterpret_cast<float2*>(p) = make_float2(acc[0], acc[1]); }
};
template <>
struct Vec<4> {
  using T = float4;
  __device__ static T load(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
  __device__ static void fma(float* acc, float w, T x) {
    acc[0] = fmaf(w, x.x, acc[0]);
    acc[1] = fmaf(w, x.y, acc[1]);
    acc[2] = fmaf(w, x.z, acc[2]);
    acc[3] = fmaf(w, x.w, acc[3]);
  }
  __device__ static void store(float* p, const float* acc) {
    *reinterpret_cast<float4*>(p) = make_float4(acc[0], acc[1], acc[2], acc[3]);
  }
};

template <int V>
__global__ void __launch_bounds__(kFmWarps * 32)
    csr_fm_kernel(int64_t batch, int64_t rows, const int64_t* __restrict__ indptr, const int32_t* __restrict__ indices,
                  const float* __restrict__ values, const int64_t* __restrict__ vidx, const float* __restrict__ bias,
                  const float* __restrict__ xt, int64_t ldx, float* __restrict__ y, int64_t ldy, bool batch_major,
                  int64_t row_len, int64_t ldv) {
  __shared__ float stage[kFmWarps][32 * V + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kFmWarps + warp;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * (32 * V);
  const int64_t b = b0 + lane * V;
  const bool active = b < batch;  // batch % V == 0: a lane's vector is all inside or all outside
  float acc[V];
  if (r < rows) {  // uniform per warp
    const float b_r = bias ? bias[r] : 0.0f;
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = b_r;
    const int64_t begin = row_len >= 0 ? r * row_len : indptr[r];
    const int64_t end = row_len >= 0 ? begin + row_len : indptr[r + 1];
    const float* xb = xt + (active ? b : 0);
    for (int64_t p0 = begin; p0 < end; p0 += 32) {
      const int n = static_cast<int>(min(static_cast<int64_t>(32), end - p0));
      int my_col = 0;
      float my_val = 0.0f;
      if (lane < n) {
        my_col = indices[p0 + lane];
        my_val = row_len >= 0 ? values[r * ldv + my_col] : values[vidx ? vidx[p0 + lane] : p0 + lane];
      }
      int j = 0;
      for (; j + 4 <= n; j += 4) {  // four loads in flight before their first use
        int c[4];
        float w[4];
        typename Vec<V>::T xv[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          c[u] = __shfl_sync(0xffffffffu, my_col, j + u);
          w[u] = __shfl_sync(0xffffffffu, my_val, j + u);
        }
        if (active) {
#pragma unroll
          for (int u = 0; u < 4; ++u) xv[u] = Vec<V>::load(xb + static_cast<int64_t>(c[u]) * ldx);
#pragma unroll
          for (int u = 0; u < 4; ++u) Vec<V>::fma(acc, w[u], xv[u]);
        }
      }
      for (; j < n; ++j) {
        const int c = __shfl_sync(0xffffffffu, my_col, j);
        const float w = __shfl_sync(0xffffffffu, my_val, j);
        if (active) Vec<V>::fma(acc, w, Vec<V>::load(xb + static_cast<int64_t>(c) * ldx));
      }
    }
    if (!batch_major && active) Vec<V>::store(y + r * ldy + b, acc);
  }
  if (!batch_major) return;  // uniform per launch
  if (r < rows && active) {
#pragma unroll
    for (int v = 0; v < V; ++v) stage[warp][lane * V + v] = acc[v];
  }
  __syncthreads();
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kFmWarps;
  for (int i = threadIdx.x; i < 32 * V * kFmWarps; i += kFmWarps * 32) {
    const int w = i % kFmWarps, bl = i / kFmWarps;
    if (r0 + w < rows && b0 + bl < batch) y[(b0 + bl) * ldy + r0 + w] = stage[w][bl];
  }
}

// ---- SDDMM -----------------------------------------------------------------------------------------
constexpr int kWarpsPerBlock = 8;

__global__ void sddmm_kernel(int64_t batch, int64_t rows, const int64_t* __restrict__ indptr,
                             const int32_t* __restrict__ indices, const float* __restrict__ gt, int64_t ldg,
                             const float* __restrict__ xt, int64_t ldx, float* __restrict__ dvalues,
                             float* __restrict__ dbias) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // uniform per warp
  const float* g = gt + row * ldg;
  if (dbias) {
    float s = 0.0f;
    for (int64_t b = lane; b < batch; b += 32) s += g[b];
    s = warp_sum(s);
    if (lane == 0) dbias[row] = s;
  }
  const int64_t end = indptr[row + 1];
  for (int64_t p = indptr[row]; p < end; ++p) {
    const float* xr = xt + static_cast<int64_t>(indices[p]) * ldx;
    float s = 0.0f;
    for (int64_t b = lane; b < batch; b += 32) s = fmaf(g[b], xr[b], s);
    s = warp_sum(s);
    if (lane == 0) dvalues[p] = s;
  }
}

// Vectorized SDDMM over feature-major operands (batch % 4 == 0, 16-byte aligned rows): one warp
// per row, four groups of 8 lanes, each group one stored entry at a time. A chunk of 32*S batch
// columns: lane (group, sub) holds g's columns s*32 + sub*4 .. +4 (s < S) in registers, reads the
// same columns of x's row (the group's 8 lanes read 128 contiguous bytes per step), and the
// group's sum is 3 shuffles. Batches beyond one chunk: chunk by chunk, the partial sums added to
// dvalues (the same lane writes an entry in every chunk, in order: deterministic).
// Long batches with few rows (a convolution's patches: batch = images x pixels) are also split
// across blockIdx.y: block column y covers batch columns [y * span, (y + 1) * span) and writes its
// partial sums at dvalues + y * pstride (dbias + y * pstride), summed afterwards in a fixed order
// by sum_partials_kernel. kSplit false: one block column (the code as without the split: its
// extra registers slowed the unsplit kernel by up to 30% at S = 8).
template <int S, bool kSplit>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    sddmm_vec_kernel(int64_t batch, int64_t rows, const int64_t* __restrict__ indptr,
                     const int32_t* __restrict__ indices, const float* __restrict__ gt, int64_t ldg,
                     const float* __restrict__ xt, int64_t ldx, float* __restrict__ dvalues,
                     float* __restrict__ dbias, int64_t span, int64_t pstride) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x & 31, group = lane >> 3, sub = lane & 7;
  if (row >= rows) return;  // uniform per warp
  const int64_t begin = indptr[row], end = indptr[row + 1];
  const int64_t cb = kSplit ? static_cast<int64_t>(blockIdx.y) * span : 0;
  const int64_t ce = kSplit ? min(batch, cb + span) : batch;
  if (kSplit) {
    dvalues += static_cast<int64_t>(blockIdx.y) * pstride;
    if (dbias) dbias += static_cast<int64_t>(blockIdx.y) * pstride;
  }
  const float* g = gt + row * ldg;
  float bsum = 0.0f;
  for (int64_t c0 = cb; c0 < ce; c0 += 32 * S) {
    float4 gv[S];
    bool in[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int64_t b = c0 + s * 32 + sub * 4;
      in[s] = b < ce;
      gv[s] = in[s] ? __ldg(reinterpret_cast<const float4*>(g + b)) : make_float4(0.f, 0.f, 0.f, 0.f);
      bsum += (gv[s].x + gv[s].y) + (gv[s].z + gv[s].w);
    }
    for (int64_t p = begin + group; p < end; p += 4) {
      const float* xr = xt + static_cast<int64_t>(__ldg(indices + p)) * ldx + c0 + sub * 4;
      float4 xv[S];
#pragma unroll
      for (int s = 0; s < S; ++s)
        xv[s] = in[s] ? __ldg(reinterpret_cast<const float4*>(xr + s * 32)) : make_float4(0.f, 0.f, 0.f, 0.f);
      float acc = 0.0f;
#pragma unroll
      for (int s = 0; s < S; ++s) {
        acc = fmaf(gv[s].x, xv[s].x, acc);
        acc = fmaf(gv[s].y, xv[s].y, acc);
        acc = fmaf(gv[s].z, xv[s].z, acc);
        acc = fmaf(gv[s].w, xv[s].w, acc);
      }
      // (lanes of other groups may have left this loop: only the group's own lanes take part)
      const unsigned mask = 0xffu << (group * 8);
      acc += __shfl_xor_sync(mask, acc, 4);
      acc += __shfl_xor_sync(mask, acc, 2);
      acc += __shfl_xor_sync(mask, acc, 1);
      if (sub == 0) dvalues[p] = c0 == cb ? acc : dvalues[p] + acc;
    }
  }
  if (dbias) {  // every group holds the whole row of g: group 0's lanes sum it
    bsum += __shfl_xor_sync(0xffffffffu, bsum, 4);
    bsum += __shfl_xor_sync(0xffffffffu, bsum, 2);
    bsum += __shfl_xor_sync(0xffffffffu, bsum, 1);
    if (lane == 0) dbias[row] = bsum;
  }
}

// out[i] = sum over c < parts of part[c * pstride + i], in order (deterministic), i < n; the first
// nv go to dvalues, the rest to dbias.
__global__ void sum_partials_kernel(const float* __restrict__ part, int64_t n, int64_t nv, int64_t parts,
                                    int64_t pstride, float* __restrict__ dvalues, float* __restrict__ dbias) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float s = 0.0f;
  for (int64_t c = 0; c < parts; ++c) s += part[c * pstride + i];
  if (i < nv) {
    dvalues[i] = s;
  } else {
    dbias[i - nv] = s;
  }
}

// SDDMM over batch-major operands (small batches, no transposes): one warp per row, lanes over the
// row's stored entries, the batch loop inside (g[b, row] is one broadcast load per b).
__global__ void sddmm_bm_kernel(int64_t batch, int64_t rows, const int64_t* __restrict__ indptr,
                                const int32_t* __restrict__ indices, const float* __restrict__ g, int64_t ldg,
                                const float* __restrict__ x, int64_t ldx, float* __restrict__ dvalues,
                                float* __restrict__ dbias) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // uniform per warp
  if (dbias) {
    float s = 0.0f;
    for (int64_t b = lane; b < batch; b += 32) s += g[b * ldg + row];
    s = warp_sum(s);
    if (lane == 0) dbias[row] = s;
  }
  const int64_t end = indptr[row + 1];
  for (int64_t p = indptr[row] + lane; p < end; p += 32) {
    const int64_t col = indices[p];
    float s = 0.0f;
    for (int64_t b = 0; b < batch; ++b) s = fmaf(__ldg(g + b * ldg + row), __ldg(x + b * ldx + col), s);
    dvalues[p] = s;
  }
}

// ---- top-k -----------------------------------------------------------------------------------------
constexpr int kTopkThreads = 256;

__device__ __forceinline__ uint32_t abs_key(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// Exclusive scan of v over the block (blockDim.x == kTopkThreads); *total = the sum. sh: scratch.
template <typename T>
__device__ T block_scan(T v, T* sh, T* total) {
  const int t = threadIdx.x;
  sh[t] = v;
  __syncthreads();
  for (int off = 1; off < kTopkThreads; off <<= 1) {
    const T add = t >= off ? sh[t - off] : T(0);
    __syncthreads();
    sh[t] += add;
    __syncthreads();
  }
  const T incl = sh[t];
  *total = sh[kTopkThreads - 1];
  __syncthreads();
  return incl - v;
}

__global__ void topk_kernel(const float* __restrict__ src, int64_t n, int64_t lds, int64_t k,
                            int32_t* __restrict__ idx, uint8_t* __restrict__ nan_rows) {
  __shared__ unsigned int hist[256];
  __shared__ int scan[kTopkThreads];
  __shared__ int64_t scan64[kTopkThreads];
  __shared__ uint32_t s_prefix;
  __shared__ int64_t s_remaining;
  __shared__ int s_nan;
  const int64_t r = blockIdx.x;
  const float* row = src + r * lds;
  const int t = threadIdx.x;
  if (t == 0) {
    s_prefix = 0;
    s_remaining = k;
    s_nan = 0;
  }
  __syncthreads();
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = t; i < 256; i += kTopkThreads) hist[i] = 0;
    __syncthreads();
    const uint32_t prefix = s_prefix;
    for (int64_t j = t; j < n; j += kTopkThreads) {
      const float v = row[j];
      if (shift == 24 && isnan(v)) s_nan = 1;
      const uint32_t key = abs_key(v);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    {  // the digit of the k-th largest key among those sharing the prefix: thread t looks at digit
       // d = 255 - t, with `above` keys of larger digits (a scan from the top digit down), and the
       // one where the count crosses `need` takes it (d = 0 when none above does). A scan, where
       // one thread walking the 256 digits took most of the kernel's time.
      const int64_t need = s_remaining;  // (read by all before the scan; written after it)
      const int d = 255 - t;
      const int64_t c = hist[d];
      int64_t total = 0;
      const int64_t above = block_scan(c, scan64, &total);
      if (above < need && (d == 0 || above + c >= need)) {
        s_remaining = need - above;  // how many with this digit (and the prefix) are still to take
        s_prefix = prefix | (static_cast<uint32_t>(d) << shift);
      }
    }
    mask |= 255u << shift;
    __syncthreads();
  }
  const uint32_t T = s_prefix;
  const int64_t ties = s_remaining;  // entries equal to T to take, lowest columns first
  int64_t eq_seen = 0, written = 0;
  for (int64_t base = 0; base < n; base += kTopkThreads) {
    const int64_t j = base + t;
    const uint32_t key = j < n ? abs_key(row[j]) : 0u;
    const int gt = j < n && key > T;
    const int eq = j < n && key == T;
    int eq_total = 0;
    const int eq_before = block_scan(eq, scan, &eq_total);
    const int take = gt || (eq && eq_seen + eq_before < ties);
    int take_total = 0;
    const int pos = block_scan(take, scan, &take_total);
    if (take) idx[r * k + written + pos] = static_cast<int32_t>(j);
    eq_seen += eq_total;
    written += take_total;
  }
  if (t == 0) nan_rows[r] = static_cast<uint8_t>(s_nan);
}

__global__ void abs_colsum_kernel(const float* __restrict__ src, int64_t rows, int64_t n, int64_t lds,
                                  float* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  float s = 0.0f;
  for (int64_t r = 0; r < rows; ++r) s += fabsf(src[r * lds + j]);
  out[j] = s;
}

// ---- per-example meProp products ---------------------------------------------------------------------
// dW[j] = sum, over the examples b whose selection holds unit j (b increasing), of g[b, j] * x[b]. One
// block per unit j: its threads search the examples' sorted selections for j in parallel (a binary
// search each), stage the hits of a window of examples in shared memory in example order (a block
// scan), then add them into dW's row, every column by one thread. No atomics: the sums are the
// same bits on every run, and a unit no example selected gets a row of zeros. (It replaced a kernel
// that added each example's k rows into dW with atomics: 172 million at 4096x4096, batch 256.)
constexpr int kDwWindow = 1024;  // examples searched per pass

template <int V>
__global__ void __launch_bounds__(kTopkThreads)
    meprop_dw_unit_kernel(int64_t batch, int64_t k, int64_t in, const int32_t* __restrict__ sel,
                          const float* __restrict__ g, int64_t ldg, const float* __restrict__ x, int64_t ldx,
                          float* __restrict__ dw) {
  __shared__ int32_t s_b[kDwWindow];
  __shared__ float s_g[kDwWindow];
  __shared__ int scan[kTopkThreads];
  const int32_t j = static_cast<int32_t>(blockIdx.x);
  const int t = threadIdx.x;
  float* row = dw + static_cast<int64_t>(j) * in;
  for (int64_t w0 = 0; w0 == 0 || w0 < batch; w0 += kDwWindow) {
    const int64_t w1 = min(w0 + kDwWindow, batch);
    int hits = 0;  // uniform across the block
    for (int64_t c0 = w0; c0 < w1; c0 += kTopkThreads) {
      const int64_t b = c0 + t;
      int hit = 0;
      float gv = 0.0f;
      if (b < w1 && k > 0) {
        const int32_t* s = sel + b * k;
        int64_t lo = 0, hi = k;  // the first position whose column is >= j
        while (lo < hi) {
          const int64_t mid = (lo + hi) / 2;
          if (s[mid] < j) lo = mid + 1; else hi = mid;
        }
        if (lo < k && s[lo] == j) {
          hit = 1;
          gv = g[b * ldg + j];
        }
      }
      int total = 0;
      const int pos = block_scan(hit, scan, &total);
      if (hit) {
        s_b[hits + pos] = static_cast<int32_t>(b);
        s_g[hits + pos] = gv;
      }
      hits += total;
    }
    __syncthreads();
    for (int64_t i = static_cast<int64_t>(t) * V; i < in; i += kTopkThreads * V) {  // V columns per thread
      float acc[V];
      if (w0 == 0) {
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] = 0.0f;
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] = row[i + v];
      }
      int e = 0;
      for (; e + 4 <= hits; e += 4) {  // four loads in flight before their first use
        typename Vec<V>::T xv[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) xv[u] = Vec<V>::load(x + static_cast<int64_t>(s_b[e + u]) * ldx + i);
#pragma unroll
        for (int u = 0; u < 4; ++u) Vec<V>::fma(acc, s_g[e + u], xv[u]);
      }
      for (; e < hits; ++e) Vec<V>::fma(acc, s_g[e], Vec<V>::load(x + static_cast<int64_t>(s_b[e]) * ldx + i));
      Vec<V>::store(row + i, acc);
    }
    __syncthreads();
  }
}

// ---- gemm ------------------------------------------------------------------------------------------
constexpr int kTile = 16;

__global__ void gemm_kernel(int64_t m, int64_t n, int64_t kk, const float* __restrict__ a, int64_t sa0, int64_t sa1,
                            const float* __restrict__ b, int64_t sb0, int64_t sb1, float* __restrict__ c,
                            int64_t ldc) {
  __shared__ float as[kTile][kTile];
  __shared__ float bs[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kTile + ty;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTile + tx;
  float acc = 0.0f;
  for (int64_t l0 = 0; l0 < kk; l0 += kTile) {
    as[ty][tx] = (i < m && l0 + tx < kk) ? a[i * sa0 + (l0 + tx) * sa1] : 0.0f;
    bs[ty][tx] = (l0 + ty < kk && j < n) ? b[(l0 + ty) * sb0 + j * sb1] : 0.0f;
    __syncthreads();
#pragma unroll
    for (int l = 0; l < kTile; ++l) acc = fmaf(as[ty][l], bs[l][tx], acc);
    __syncthreads();
  }
  if (i < m && j < n) c[i * ldc + j] = acc;
}

void check_grid(int64_t blocks, const char* what) {
  SPARSEBP_CHECK_VALUE(blocks <= 2147483647LL, what, ": too large for one CUDA grid");
}

void check_grid_y(int64_t blocks, const char* what) {
  SPARSEBP_CHECK_VALUE(blocks <= 65535, what, ": too large for one CUDA grid (second dimension)");
}

}  // namespace

bool compiled() { return true; }

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string device_name(int device) {
  SPARSEBP_CHECK_VALUE(device >= 0 && device < device_count(), "CUDA device ", device, " does not exist");
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  return std::string(prop.name);
}

void synchronize(int device, uintptr_t stream) {
  DeviceGuard guard(device);
  check(cudaStreamSynchronize(as_stream(stream)), "cudaStreamSynchronize");
}

void csr_rows_times_dense(int device, uintptr_t stream, int64_t batch, int64_t rows, const int64_t* indptr,
                          const int32_t* indices, const float* values, const int64_t* value_index, const float* bias,
                          const float* x, int64_t ldx, float* y, int64_t ldy) {
  SPARSEBP_CHECK_VALUE(batch >= 0 && rows >= 0, "bad shape for csr_rows_times_dense");
  if (batch == 0 || rows == 0) return;
  DeviceGuard guard(device);
  const int64_t gx = ceil_div(rows, kRowsPerBlock), gy = ceil_div(batch, kBatchPerBlock);
  check_grid(gx, "csr_rows_times_dense");
  check_grid_y(gy, "csr_rows_times_dense (batch)");
  csr_rows_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(kRowsPerBlock, kBatchPerBlock), 0,
                    as_stream(stream)>>>(batch, rows, indptr, indices, values, value_index, bias, x, ldx, y, ldy);
  check(cudaGetLastError(), "csr_rows_times_dense launch");
}

namespace {
bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

void launch_transpose(cudaStream_t st, int64_t rows, int64_t cols, const float* in, int64_t ldi, float* out,
                      int64_t ldo, const char* what) {
  if (rows == 0 || cols == 0) return;
  const int64_t gx = ceil_div(cols, kTT), gy = ceil_div(rows, kTT);
  check_grid(gx, what);
  check_grid_y(gy, what);
  transpose_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(kTT, 8), 0, st>>>(
      rows, cols, in, ldi, out, ldo);
  check(cudaGetLastError(), what);
}
// csr_fm_kernel with the widest vector that the batch, the leading dimensions and the pointers allow.
void launch_csr_fm(cudaStream_t st, int64_t batch, int64_t rows, const int64_t* indptr, const int32_t* indices,
                   const float* values, const int64_t* value_index, const float* bias, const float* xt, int64_t ldx,
                   float* y, int64_t ldy, bool y_batch_major, int64_t row_len, int64_t ldv, const char* what) {
  auto fits = [&](int v) {
    return batch % v == 0 && ldx % v == 0 && aligned(xt, 4 * v) &&
           (y_batch_major || (ldy % v == 0 && aligned(y, 4 * v)));
  };
  const int v = batch >= 128 && fits(4) ? 4 : batch >= 64 && fits(2) ? 2 : 1;
  const int64_t gx = ceil_div(rows, kFmWarps), gy = ceil_div(batch, 32 * v);
  check_grid(gx, what);
  check_grid_y(gy, what);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  if (v == 4) {
    csr_fm_kernel<4><<<grid, kFmWarps * 32, 0, st>>>(batch, rows, indptr, indices, values, value_index, bias, xt, ldx,
                                                     y, ldy, y_batch_major, row_len, ldv);
  } else if (v == 2) {
    csr_fm_kernel<2><<<grid, kFmWarps * 32, 0, st>>>(batch, rows, indptr, indices, values, value_index, bias, xt, ldx,
                                                     y, ldy, y_batch_major, row_len, ldv);
  } else {
    csr_fm_kernel<1><<<grid, kFmWarps * 32, 0, st>>>(batch, rows, indptr, indices, values, value_index, bias, xt, ldx,
                                                     y, ldy, y_batch_major, row_len, ldv);
  }
  check(cudaGetLastError(), what);
}

}  // namespace

void transpose(int device, uintptr_t stream, int64_t rows, int64_t cols, const float* in, int64_t ldi, float* out,
               int64_t ldo) {
  SPARSEBP_CHECK_VALUE(rows >= 0 && cols >= 0 && ldi >= cols && ldo >= rows, "bad shape for transpose");
  DeviceGuard guard(device);
  launch_transpose(as_stream(stream), rows, cols, in, ldi, out, ldo, "transpose launch");
}

void csr_times_feature_major(int device, uintptr_t stream, int64_t batch, int64_t rows, const int64_t* indptr,
                             const int32_t* indices, const float* values, const int64_t* value_index,
                             const float* bias, float* xt, int64_t ldx, float* y, int64_t ldy, bool y_batch_major,
                             const float* x, int64_t cols, int64_t ldx_src) {
  SPARSEBP_CHECK_VALUE(batch >= 0 && rows >= 0 && ldx >= batch && ldy >= (y_batch_major ? rows : batch) &&
                           (x == nullptr || (cols >= 0 && ldx_src >= cols)),
                       "bad shape for csr_times_feature_major");
  if (batch == 0) return;
  DeviceGuard guard(device);
  if (x) launch_transpose(as_stream(stream), batch, cols, x, ldx_src, xt, ldx, "csr_times_feature_major transpose");
  if (rows == 0) return;
  launch_csr_fm(as_stream(stream), batch, rows, indptr, indices, values, value_index, bias, xt, ldx, y, ldy,
                y_batch_major, -1, 0, "csr_times_feature_major");
}

void sddmm(int device, uintptr_t stream, int64_t batch, int64_t rows, const int64_t* indptr, const int32_t* indices,
           float* gt, int64_t ldg, const float* xt, int64_t ldx, float* dvalues, float* dbias, const float* g,
           int64_t ldg_src, float* partials, int64_t parts, int64_t nnz) {
  SPARSEBP_CHECK_VALUE(batch >= 0 && rows >= 0 && (g == nullptr || ldg_src >= rows), "bad shape for sddmm");
  SPARSEBP_CHECK_VALUE(parts >= 1 && (parts == 1 || (partials != nullptr && nnz >= 0)),
                       "sddmm: a split batch needs the partial-sum buffer and nnz");
  if (rows == 0) return;
  DeviceGuard guard(device);
  if (g) launch_transpose(as_stream(stream), batch, rows, g, ldg_src, gt, ldg, "sddmm transpose");
  const int64_t blocks = ceil_div(rows, kWarpsPerBlock);
  check_grid(blocks, "sddmm");
  const cudaStream_t st = as_stream(stream);
  const bool vec = batch > 0 && batch % 4 == 0 && ldg % 4 == 0 && ldx % 4 == 0 && aligned(gt, 16) && aligned(xt, 16);
  const unsigned nb = static_cast<unsigned>(blocks), nt = kWarpsPerBlock * 32;
  // The split (vector kernel only): spans of whole 1024-column steps, every block column non-empty.
  int64_t span = batch, used = 1;
  if (vec && parts > 1 && batch > 1024) {
    span = ceil_div(ceil_div(batch, parts), 1024) * 1024;
    used = ceil_div(batch, span);
  }
  SPARSEBP_CHECK_VALUE(used <= 65535, "sddmm: too many batch parts");
  const dim3 grid(nb, static_cast<unsigned>(used));
  float* dv = used > 1 ? partials : dvalues;
  float* db = used > 1 ? (dbias ? partials + nnz : nullptr) : dbias;
  const int64_t pstride = used > 1 ? nnz + rows : 0;
  if (!vec) {
    sddmm_kernel<<<nb, nt, 0, st>>>(batch, rows, indptr, indices, gt, ldg, xt, ldx, dvalues, dbias);
  } else if (used > 1) {
    sddmm_vec_kernel<8, true><<<grid, nt, 0, st>>>(batch, rows, indptr, indices, gt, ldg, xt, ldx, dv, db, span,
                                                   pstride);
  } else if (batch <= 32) {
    sddmm_vec_kernel<1, false><<<nb, nt, 0, st>>>(batch, rows, indptr, indices, gt, ldg, xt, ldx, dv, db, span, 0);
  } else if (batch <= 64) {
    sddmm_vec_kernel<2, false><<<nb, nt, 0, st>>>(batch, rows, indptr, indices, gt, ldg, xt, ldx, dv, db, span, 0);
  } else if (batch <= 128) {
    sddmm_vec_kernel<4, false><<<nb, nt, 0, st>>>(batch, rows, indptr, indices, gt, ldg, xt, ldx, dv, db, span, 0);
  } else {
    sddmm_vec_kernel<8, false><<<nb, nt, 0, st>>>(batch, rows, indptr, indices, gt, ldg, xt, ldx, dv, db, span, 0);
  }
  check(cudaGetLastError(), "sddmm launch");
  if (used > 1) {
    const int64_t n = nnz + (dbias ? rows : 0);
    const int64_t rb = ceil_div(n, int64_t{256});
    check_grid(rb, "sddmm partial sums");
    if (n > 0)
      sum_partials_kernel<<<static_cast<unsigned>(rb), 256, 0, st>>>(partials, n, nnz, used, pstride, dvalues, dbias);
    check(cudaGetLastError(), "sddmm partial sums launch");
  }
}

void sddmm_batch_major(int device, uintptr_t stream, int64_t batch, int64_t rows, const int64_t* indptr,
                       const int32_t* indices, const float* g, int64_t ldg, const float* x, int64_t ldx,
                       float* dvalues, float* dbias) {
  SPARSEBP_CHECK_VALUE(batch >= 0 && rows >= 0 && ldg >= rows, "bad shape for sddmm_batch_major");
  if (rows == 0) return;
  DeviceGuard guard(device);
  const int64_t blocks = ceil_div(rows, kWarpsPerBlock);
  check_grid(blocks, "sddmm_batch_major");
  sddmm_bm_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, as_stream(stream)>>>(
      batch, rows, indptr, indices, g, ldg, x, ldx, dvalues, dbias);
  check(cudaGetLastError(), "sddmm_batch_major launch");
}

void topk_rows(int device, uintptr_t stream, const float* src, int64_t rows, int64_t n, int64_t lds, int64_t k,
               int32_t* idx, uint8_t* nan_rows) {
  SPARSEBP_CHECK_VALUE(rows >= 0 && n >= 0 && lds >= n && k > 0 && k <= n, "bad arguments for topk_rows");
  if (rows == 0) return;
  DeviceGuard guard(device);
  check_grid(rows, "topk_rows");
  topk_kernel<<<static_cast<unsigned>(rows), kTopkThreads, 0, as_stream(stream)>>>(src, n, lds, k, idx, nan_rows);
  check(cudaGetLastError(), "topk_rows launch");
}

void abs_colsum(int device, uintptr_t stream, const float* src, int64_t rows, int64_t n, int64_t lds, float* out) {
  SPARSEBP_CHECK_VALUE(rows >= 0 && n >= 0 && lds >= n, "bad shape for abs_colsum");
  if (n == 0) return;
  DeviceGuard guard(device);
  const int64_t blocks = ceil_div(n, 256);
  check_grid(blocks, "abs_colsum");
  abs_colsum_kernel<<<static_cast<unsigned>(blocks), 256, 0, as_stream(stream)>>>(src, rows, n, lds, out);
  check(cudaGetLastError(), "abs_colsum launch");
}

void meprop_example(int device, uintptr_t stream, int64_t batch, int64_t k, int64_t out, int64_t in,
                    const int32_t* sel, const float* g, int64_t ldg, const float* w, const float* x, int64_t ldx,
                    float* dx, float* dw) {
  SPARSEBP_CHECK_VALUE(batch >= 0 && k >= 0 && out >= 0 && in >= 0, "bad shape for meprop_example");
  DeviceGuard guard(device);
  check_grid(batch, "meprop_example");
  check_grid(out, "meprop_example");
  if (in == 0) return;
  if (dx && batch > 0) {  // dx[b] = sum_t g[b, sel[b, t]] W[sel[b, t]]: the CSR kernel over W's rows
    launch_csr_fm(as_stream(stream), in, batch, nullptr, sel, g, nullptr, nullptr, w, in, dx, in, false, k, ldg,
                  "meprop dx launch");
  }
  if (dw && out > 0) {  // every row written (zeros where no example selected the unit, or batch = 0)
    const cudaStream_t st = as_stream(stream);
    const unsigned blocks = static_cast<unsigned>(out);
    if (in % 4 == 0 && ldx % 4 == 0 && aligned(x, 16) && aligned(dw, 16)) {
      meprop_dw_unit_kernel<4><<<blocks, kTopkThreads, 0, st>>>(batch, k, in, sel, g, ldg, x, ldx, dw);
    } else {
      meprop_dw_unit_kernel<1><<<blocks, kTopkThreads, 0, st>>>(batch, k, in, sel, g, ldg, x, ldx, dw);
    }
    check(cudaGetLastError(), "meprop dw launch");
  }
}

void gemm(int device, uintptr_t stream, int64_t m, int64_t n, int64_t kk, const float* a, int64_t sa0, int64_t sa1,
          const float* b, int64_t sb0, int64_t sb1, float* c, int64_t ldc) {
  SPARSEBP_CHECK_VALUE(m >= 0 && n >= 0 && kk >= 0 && ldc >= n, "bad shape for gemm");
  if (m == 0 || n == 0) return;
  DeviceGuard guard(device);
  const int64_t gx = ceil_div(n, kTile), gy = ceil_div(m, kTile);
  check_grid(gx, "gemm");
  check_grid_y(gy, "gemm (rows)");
  gemm_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(kTile, kTile), 0,
                as_stream(stream)>>>(m, n, kk, a, sa0, sa1, b, sb0, sb1, c, ldc);
  check(cudaGetLastError(), "gemm launch");
}

}  // namespace cuda
}  // namespace sparsebp
