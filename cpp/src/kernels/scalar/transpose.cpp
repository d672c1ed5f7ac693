// Scalar transpose, cache-blocked. Baseline flags.
#include <algorithm>

#include "kernels/scalar/isa.h"
#include "kernels/exports.h"

namespace sparsebp {
namespace kernels {
namespace SPARSEBP_ISA_NS {

void transpose(const TransposeArgs& a, int64_t row_begin, int64_t row_end) {
  constexpr int64_t kBlock = 32;
  for (int64_t i0 = row_begin; i0 < row_end; i0 += kBlock) {
    const int64_t i1 = std::min(i0 + kBlock, row_end);
    for (int64_t j0 = 0; j0 < a.cols; j0 += kBlock) {
      const int64_t j1 = std::min(j0 + kBlock, a.cols);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) a.dst[j * a.ldd + i] = a.src[i * a.lds + j];
    }
  }
}

}  // namespace SPARSEBP_ISA_NS
}  // namespace kernels
}  // namespace sparsebp
