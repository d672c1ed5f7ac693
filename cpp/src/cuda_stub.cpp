// The CUDA entry points of a build without CUDA (SPARSEBP_CUDA=OFF): nothing compiled in.
#include "sparsebp/cuda.h"
#include "sparsebp/errors.h"

namespace sparsebp {
namespace cuda {
namespace {
[[noreturn]] void missing() {
  throw ValueError(
      "this build of sparsebp has no CUDA kernels (built with SPARSEBP_CUDA=OFF); reinstall with "
      "pip install . -Ccmake.define.SPARSEBP_CUDA=ON on a machine with the CUDA toolkit");
}
}  // namespace

bool compiled() { return false; }
int device_count() { return 0; }
std::string device_name(int) { missing(); }
void synchronize(int, uintptr_t) { missing(); }
void csr_rows_times_dense(int, uintptr_t, int64_t, int64_t, const int64_t*, const int32_t*, const float*,
                          const int64_t*, const float*, const float*, int64_t, float*, int64_t) {
  missing();
}
void sddmm(int, uintptr_t, int64_t, int64_t, const int64_t*, const int32_t*, float*, int64_t, const float*, int64_t,
           float*, float*, const float*, int64_t, float*, int64_t, int64_t) {
  missing();
}
void transpose(int, uintptr_t, int64_t, int64_t, const float*, int64_t, float*, int64_t) { missing(); }
void csr_times_feature_major(int, uintptr_t, int64_t, int64_t, const int64_t*, const int32_t*, const float*,
                             const int64_t*, const float*, float*, int64_t, float*, int64_t, bool, const float*,
                             int64_t, int64_t) {
  missing();
}
void sddmm_batch_major(int, uintptr_t, int64_t, int64_t, const int64_t*, const int32_t*, const float*, int64_t,
                       const float*, int64_t, float*, float*) {
  missing();
}
void topk_rows(int, uintptr_t, const float*, int64_t, int64_t, int64_t, int64_t, int32_t*, uint8_t*) { missing(); }
void abs_colsum(int, uintptr_t, const float*, int64_t, int64_t, int64_t, float*) { missing(); }
void meprop_example(int, uintptr_t, int64_t, int64_t, int64_t, int64_t, const int32_t*, const float*, int64_t,
                    const float*, const float*, int64_t, float*, float*) {
  missing();
}
void gemm(int, uintptr_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, int64_t,
          float*, int64_t) {
  missing();
}

}  // namespace cuda
}  // namespace sparsebp
