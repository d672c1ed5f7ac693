// Scalar sparse-gradient kernels: the executable specification (kernel_table.h). Baseline flags.
#include <algorithm>
#include <cmath>

#include "kernels/scalar/isa.h"
#include "kernels/exports.h"
#include "kernels/topk_select.h"

namespace sparsebp {
namespace kernels {
namespace SPARSEBP_ISA_NS {

void topk_rows(const TopkArgs& a, int64_t row_begin, int64_t row_end) {
  Candidates c;
  auto filter = [](const float* row, int64_t n, float t, float* cv, int32_t* col) {
    int64_t m = 0;
    for (int64_t j = 0; j < n; ++j) {
      const float v = std::fabs(row[j]);
      if (!(v < t)) {
        cv[m] = v;
        col[m++] = static_cast<int32_t>(j);
      }
    }
    return m;
  };
  for (int64_t r = row_begin; r < row_end; ++r)
    select_row(a.src + r * a.lds, a.n, a.k, a.idx + r * a.k, a.nan_rows + r, c, filter, kth_largest_scalar,
               take_top, a.one_pass_k >= 0 ? a.one_pass_k : kSmallK);
}

void abs_colsum(const AbsColsumArgs& a, int64_t col_begin, int64_t col_end) {
  for (int64_t j = col_begin; j < col_end; ++j) a.out[j] = 0.0f;
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* row = a.src + r * a.lds;
    for (int64_t j = col_begin; j < col_end; ++j) a.out[j] += std::fabs(row[j]);
  }
}

void spmm_rows(const SpmmRowsArgs& a, int64_t row_begin, int64_t row_end) {
  for (int64_t c0 = 0; c0 < a.ncols; c0 += a.panel) {
    const int64_t c1 = std::min(a.ncols, c0 + a.panel);
    for (int64_t r = row_begin; r < row_end; ++r) {
      float* o = a.out + r * a.ldo;
      std::fill(o + c0, o + c1, 0.0f);
      for (int64_t p = a.indptr[r]; p < a.indptr[r + 1]; ++p) {
        const float v = a.values[p];
        const float* d = a.d + static_cast<int64_t>(a.indices[p]) * a.ldd;
        for (int64_t j = c0; j < c1; ++j) o[j] = std::fma(v, d[j], o[j]);
      }
    }
  }
}

void spmm_scatter(const SpmmScatterArgs& a, int64_t col_begin, int64_t col_end) {
  for (int64_t c0 = col_begin; c0 < col_end; c0 += a.panel) {
    const int64_t c1 = std::min(col_end, c0 + a.panel);
    for (int64_t b = 0; b < a.out_rows; ++b) std::fill(a.out + b * a.ldo + c0, a.out + b * a.ldo + c1, 0.0f);
    for (int64_t r = 0; r < a.rows; ++r) {
      const float* d = a.d + r * a.ldd;
      for (int64_t p = a.indptr[r]; p < a.indptr[r + 1]; ++p) {
        float* o = a.out + static_cast<int64_t>(a.indices[p]) * a.ldo;
        const float v = a.values[p];
        for (int64_t j = c0; j < c1; ++j) o[j] = std::fma(v, d[j], o[j]);
      }
    }
  }
}

}  // namespace SPARSEBP_ISA_NS
}  // namespace kernels
}  // namespace sparsebp
