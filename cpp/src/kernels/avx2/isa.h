// AVX2 + FMA kernel set: 8 float lanes. Files of this folder are compiled with -mavx2 -mfma.
#pragma once
#include <immintrin.h>

#include <cstdint>

#define SPARSEBP_ISA_NS avx2
#define SPARSEBP_TABLE_GETTER get_avx2_table
#define SPARSEBP_TABLE_NAME "avx2"
// Widest register tiles, in vectors (measured best on the 4096x4096 layer): the forward keeps
// one accumulator per vector, the SDDMM one vector of G^T per vector.
#define SPARSEBP_FWD_NV 8
#define SPARSEBP_FWD_TILE_COLS (SPARSEBP_FWD_NV * 8)
#define SPARSEBP_SDDMM_TILE_COLS (SPARSEBP_SDDMM_NV * 8)
#define SPARSEBP_SDDMM_NV 8

namespace sparsebp {
namespace kernels {
namespace SPARSEBP_ISA_NS {
namespace {

// The vector vocabulary the shared kernels in ../simd/*.inc are written in.
struct Simd {
  using V = __m256;
  static constexpr int kLanes = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V abs(V v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
  // Bit i set where !(a[i] < b[i]): a >= b, or either is NaN.
  static uint32_t not_less_mask(V a, V b) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_NLT_UQ)));
  }
  static float reduce(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // reduce_group(v)[j] = sum of the lanes of v[j], for j < kLanes: a transpose-and-add tree
  // (21 instructions for 8 sums, against ~6 per sum one at a time).
  static V reduce_group(const V* v) {
    V z[2];
    for (int m = 0; m < 2; ++m) {
      V w[2];
      for (int h = 0; h < 2; ++h) {
        const V a = v[4 * m + 2 * h], b = v[4 * m + 2 * h + 1];
        w[h] = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
      }
      // Per 128-bit half: that half's sums of v[4m .. 4m+3].
      z[m] = _mm256_add_ps(_mm256_shuffle_ps(w[0], w[1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm256_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 2, 3, 2)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(z[0], z[1], 0x20), _mm256_permute2f128_ps(z[0], z[1], 0x31));
  }
  // Lanes [0, n) active, n in [1, kLanes]. Masked lanes are never read or written (no faults).
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load_partial(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static void store_partial(float* p, V v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
};

}  // namespace
}  // namespace SPARSEBP_ISA_NS
}  // namespace kernels
}  // namespace sparsebp
