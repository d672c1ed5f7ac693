// Scalar sparse linear kernels: the executable specification of kernel_table.h's contracts.
// Plain loops in the natural summation order; compiled with the baseline flags only.
#include <algorithm>

#include "kernels/scalar/isa.h"
#include "kernels/exports.h"

namespace sparsebp {
namespace kernels {
namespace SPARSEBP_ISA_NS {

void linear_forward(const LinearForwardArgs& a, int64_t row_begin, int64_t row_end) {
  const int64_t batch = a.batch;
  for (int64_t o = row_begin; o < row_end; ++o) {
    float* y = a.yt + o * a.ldy;
    const float init = a.bias ? a.bias[o] : 0.0f;
    for (int64_t b = 0; b < batch; ++b) y[b] = init;
    for (int64_t p = a.w.indptr[o]; p < a.w.indptr[o + 1]; ++p) {
      const float v = a.value_index ? a.values[a.value_index[p]] : a.values[p];
      const float* x = a.xt + static_cast<int64_t>(a.w.indices[p]) * a.ldx;
      for (int64_t b = 0; b < batch; ++b) y[b] += v * x[b];
    }
  }
}

void sddmm(const SddmmArgs& a, int64_t row_begin, int64_t row_end) {
  for (int64_t o = row_begin; o < row_end; ++o) {
    const float* g = a.gt + o * a.ldg;
    if (a.dbias) {
      float s = 0.0f;
      for (int64_t b = 0; b < a.batch; ++b) s += g[b];
      a.dbias[o] = a.accumulate ? a.dbias[o] + s : s;
    }
    for (int64_t p = a.w.indptr[o]; p < a.w.indptr[o + 1]; ++p) {
      const float* x = a.xt + static_cast<int64_t>(a.w.indices[p]) * a.ldx;
      float s = 0.0f;
      for (int64_t b = 0; b < a.batch; ++b) s += g[b] * x[b];
      a.dvalues[p] = a.accumulate ? a.dvalues[p] + s : s;
    }
  }
}

}  // namespace SPARSEBP_ISA_NS
}  // namespace kernels
}  // namespace sparsebp

namespace sparsebp {
namespace kernels {
namespace SPARSEBP_ISA_NS {

namespace {
// Whether entry p contributes to segment row so, and then the columns [*j0, *j1) it adds to
// (GatherArgs' windows; without them every segment and column).
bool in_window(const GatherArgs& a, int64_t p, int64_t so, int64_t* j0, int64_t* j1) {
  if (!a.taps) return true;
  const int64_t* w = a.windows + 4 * static_cast<int64_t>(a.taps[p]);
  if (so < w[0] || so >= w[1]) return false;
  *j0 = std::max(*j0, w[2]);
  *j1 = std::min(*j1, w[3]);
  return *j0 < *j1;
}
}  // namespace

void gather_forward(const GatherArgs& a, int64_t row_begin, int64_t row_end) {
  for (int64_t o = row_begin; o < row_end; ++o) {
    const float init = a.bias ? a.bias[o] : 0.0f;
    for (int64_t so = 0; so < a.seg_outer; ++so) {
      for (int64_t si = 0; si < a.seg_inner; ++si) {
        float* y = a.y + o * a.y_row + so * a.y_outer + si * a.y_inner;
        const int64_t shift = so * a.x_outer + si * a.x_inner;
        for (int64_t j = 0; j < a.ncols; ++j) y[j] = init;
        for (int64_t p = a.indptr[o]; p < a.indptr[o + 1]; ++p) {
          const float v = a.value_index ? a.values[a.value_index[p]] : a.values[p];
          int64_t j0 = 0, j1 = a.ncols;
          if (!in_window(a, p, so, &j0, &j1)) continue;
          const float* x = a.x + shift;
          for (int64_t j = j0; j < j1; ++j) y[j] += v * x[a.offsets[p] + j];
        }
      }
    }
  }
}

void gather_sddmm(const GatherArgs& a, int64_t row_begin, int64_t row_end) {
  for (int64_t o = row_begin; o < row_end; ++o) {
    for (int64_t so = 0; so < a.seg_outer; ++so) {
      for (int64_t si = 0; si < a.seg_inner; ++si) {
        const float* g = a.g + o * a.y_row + so * a.y_outer + si * a.y_inner;
        const int64_t shift = so * a.x_outer + si * a.x_inner;
        if (a.dbias) {
          float s = 0.0f;
          for (int64_t j = 0; j < a.ncols; ++j) s += g[j];
          a.dbias[o] += s;
        }
        for (int64_t p = a.indptr[o]; p < a.indptr[o + 1]; ++p) {
          int64_t j0 = 0, j1 = a.ncols;
          if (!in_window(a, p, so, &j0, &j1)) continue;
          const float* x = a.x + shift;
          float s = 0.0f;
          for (int64_t j = j0; j < j1; ++j) s += g[j] * x[a.offsets[p] + j];
          a.dvalues[p] += s;
        }
      }
    }
  }
}

}  // namespace SPARSEBP_ISA_NS
}  // namespace kernels
}  // namespace sparsebp
