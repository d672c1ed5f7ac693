// AVX-512 kernel set: 16 float lanes. Compiled natively with -mavx512f -mavx512vl -mavx512bw
// -mavx512dq -mfma, or (SPARSEBP_EMULATE_AVX512) with baseline flags against SIMDe, whose native
// aliases map every _mm512_* onto portable code: the table "avx512-emulated" that tests select to
// check the AVX-512 logic (tails, masks) on machines without AVX-512.
#pragma once
#if defined(SPARSEBP_EMULATE_AVX512)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define SPARSEBP_ISA_NS avx512_emulated
#define SPARSEBP_TABLE_GETTER get_avx512_emulated_table
#define SPARSEBP_TABLE_NAME "avx512-emulated"
#else
#include <immintrin.h>
#define SPARSEBP_ISA_NS avx512
#define SPARSEBP_TABLE_GETTER get_avx512_table
#define SPARSEBP_TABLE_NAME "avx512"
#endif

#include <cstdint>

// Widest register tiles, in vectors (measured best on the 4096x4096 layer): the forward keeps
// one accumulator per vector, the SDDMM one vector of G^T per vector.
#define SPARSEBP_FWD_NV 16
#define SPARSEBP_FWD_TILE_COLS (SPARSEBP_FWD_NV * 16)
#define SPARSEBP_SDDMM_TILE_COLS (SPARSEBP_SDDMM_NV * 16)
#define SPARSEBP_SDDMM_NV 16

namespace sparsebp {
namespace kernels {
namespace SPARSEBP_ISA_NS {
namespace {

struct Simd {
  using V = __m512;
  static constexpr int kLanes = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  // Halves, then quarters, then pairs: the same fixed order on every machine (SIMDe has no
  // _mm512_reduce_add_ps, and GCC's warns about an undefined operand).
  static float reduce(V v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm512_castps512_ps256(_mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(3, 2, 3, 2))));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // reduce_group(v)[j] = sum of the lanes of v[j], for j < kLanes: a transpose-and-add tree
  // (45 instructions for 16 sums, against ~9 per sum one at a time).
  static V reduce_group(const V* v) {
    V z[4];
    for (int m = 0; m < 4; ++m) {
      V w[2];
      for (int h = 0; h < 2; ++h) {
        const V a = v[4 * m + 2 * h], b = v[4 * m + 2 * h + 1];
        // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3].
        w[h] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
      }
      // Per 128-bit lane: the lane's sums of v[4m], v[4m+1], v[4m+2], v[4m+3].
      z[m] = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 2, 3, 2)));
    }
    // Add the four 128-bit lanes: lane q of the result holds the totals of v[4q .. 4q+3].
    const V s01 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const V s23 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  // Lanes [0, n) active, n in [1, kLanes]; masked lanes are neither read nor written.
  static __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static V abs(V v) { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff))); }
  // Bit i set where !(a[i] < b[i]): a >= b, or either is NaN.
  static uint32_t not_less_mask(V a, V b) { return static_cast<uint32_t>(_mm512_cmp_ps_mask(a, b, _CMP_NLT_UQ)); }
#if defined(SPARSEBP_EMULATE_AVX512)
  // NOTE [ SIMDe masked memory ops ]
  // SIMDe 0.8 emulates _mm512_mask_storeu_ps as a full 16-lane store (zeros in masked lanes) and
  // _mm512_maskz_loadu_ps as a full load: both touch memory the real instructions leave alone,
  // which corrupts neighbours and can fault at a page end. The emulated table moves lanes one by one.
  static V load_partial(const float* p, int n) {
    alignas(64) float t[16] = {0};
    for (int i = 0; i < n; ++i) t[i] = p[i];
    return _mm512_load_ps(t);
  }
  static void store_partial(float* p, V v, int n) {
    alignas(64) float t[16];
    _mm512_store_ps(t, v);
    for (int i = 0; i < n; ++i) p[i] = t[i];
  }
#else
  static V load_partial(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static void store_partial(float* p, V v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
#endif
};

}  // namespace
}  // namespace SPARSEBP_ISA_NS
}  // namespace kernels
}  // namespace sparsebp
