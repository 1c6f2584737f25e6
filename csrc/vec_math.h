// Vectorisable math of the CPU kernels: float32 exp/log/sin/cos (scalar code that GCC
// vectorises, and explicit AVX-512 and AVX2 forms), the exp_ family over float and double, and
// row reductions. One copy of each: every kernel file includes this through common.h.
#pragma once

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <limits>

namespace genkern {

// Branch-free, inlined scalar code that GCC vectorises inside `#pragma omp simd`
// loops (glibc's libmvec is only used under -ffast-math, which we avoid: it would
// also break the magic-number rounding below). Selects need -fno-trapping-math to be
// if-converted without AVX-512 masks (setup.py sets it). Accuracy is ~1-2 ulp on the
// ranges the kernels use; Cephes polynomials.
#define GENKERN_INLINE inline __attribute__((always_inline))

GENKERN_INLINE float bits_to_float(uint32_t b) { return __builtin_bit_cast(float, b); }
GENKERN_INLINE uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// Cephes expf / logf: ln 2 split for Cody-Waite reduction (kLn2Hi has 9 significant bits,
// so n * kLn2Hi is exact) and the polynomial coefficients, highest degree first.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr float kSqrt2 = 1.41421356f;  // log folds its mantissa into [sqrt(1/2), sqrt(2))
constexpr float kLogP[9] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f,
                            -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                            2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};

// exp(x) for float32: x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2),
// exp(r) by a degree-6 polynomial, 2^n built in the exponent field. n is rounded by
// adding 1.5 * 2^23 (no float->int conversion, so NaN stays well defined; it
// propagates through r). Inputs are clamped so that 2^(n-1) stays a normal number;
// results below ~2.4e-38 flush to 0, above FLT_MAX become +inf.
GENKERN_INLINE float exp_f32(float x) {
  const float kMagic = 12582912.0f;  // 1.5 * 2^23
  const float kHi = 88.72283f, kLo = -86.6f;
  float xc = x > kHi ? kHi : (x < kLo ? kLo : x);
  float t = xc * kLog2e + kMagic;
  float n = t - kMagic;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = kExpP[0];
  p = p * r + kExpP[1];
  p = p * r + kExpP[2];
  p = p * r + kExpP[3];
  p = p * r + kExpP[4];
  p = p * r + kExpP[5];
  p = p * r * r + r + 1.0f;
  // bits(t) = bits(kMagic) + n; scale = 2^(n-1), times 2 below, so n = 128 works.
  float scale = bits_to_float((float_to_bits(t) - 0x4B400000u + 126u) << 23);
  float y = p * scale * 2.0f;
  y = x > kHi ? std::numeric_limits<float>::infinity() : y;
  return x < kLo ? 0.0f : y;
}

// exp_ is exp in the kernels' accumulation types: exp_f32 for float32, libm for float64.
GENKERN_INLINE float exp_(float x) { return exp_f32(x); }
GENKERN_INLINE double exp_(double x) { return std::exp(x); }

// expm1(x) - x for |x| < 1 by its Taylor series (to x^11, relative error < 1e-8):
// ~x^2/2 at full precision as x -> 0, where exp(x) - 1 - x would cancel. For
// |x| >= 1, exp(x) - 1 - x loses at most a factor ~4 to cancellation.
GENKERN_INLINE float expm1_minus_x_taylor_f32(float x) {
  float q = 1.0f / 39916800.0f;  // 1/11!
  q = q * x + 1.0f / 3628800.0f;
  q = q * x + 1.0f / 362880.0f;
  q = q * x + 1.0f / 40320.0f;
  q = q * x + 1.0f / 5040.0f;
  q = q * x + 1.0f / 720.0f;
  q = q * x + 1.0f / 120.0f;
  q = q * x + 1.0f / 24.0f;
  q = q * x + 1.0f / 6.0f;
  q = q * x + 0.5f;
  return x * x * q;
}

// log(x) for positive normal float32 x: x = 2^e m with m in [sqrt(1/2), sqrt(2)),
// log(m) = f - f^2/2 + f^3 P(f), f = m - 1.
GENKERN_INLINE float log_f32(float x) {
  uint32_t b = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>(b >> 23) - 127);
  float m = bits_to_float((b & 0x007FFFFFu) | 0x3F800000u);
  bool big = m > kSqrt2;
  m = big ? m * 0.5f : m;
  e = big ? e + 1.0f : e;
  float f = m - 1.0f;
  float z = f * f;
  float p = kLogP[0];
  p = p * f + kLogP[1];
  p = p * f + kLogP[2];
  p = p * f + kLogP[3];
  p = p * f + kLogP[4];
  p = p * f + kLogP[5];
  p = p * f + kLogP[6];
  p = p * f + kLogP[7];
  p = p * f + kLogP[8];
  float y = f * z * p + e * kLn2Lo - 0.5f * z;
  return f + y + e * kLn2Hi;
}

// cos(2 pi u) and sin(2 pi u) for u in [0, 1). Reducing in turns is exact
// (u - q/4 needs no rounding), so only the final angle in [-pi/4, pi/4] is rounded.
GENKERN_INLINE void sincos_2pi_f32(float u, float& c, float& s) {
  const float kMagic = 12582912.0f;
  float t = u * 4.0f + kMagic;  // rint(4u), quadrant in the low bits
  uint32_t q = float_to_bits(t) & 3u;
  float a = (u - (t - kMagic) * 0.25f) * 6.28318530717958648f;
  float z = a * a;
  float sa = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * a + a;
  float ca =
      ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z - 0.5f * z + 1.0f;
  // rotate by q quarter turns: (c, s) -> (-s, c) per turn
  float c1 = (q & 1u) ? -sa : ca;
  float s1 = (q & 1u) ? ca : sa;
  c = (q & 2u) ? -c1 : c1;
  s = (q & 2u) ? -s1 : s1;
}

// --- explicit AVX-512 forms (16 lanes) ----------------------------------------------
#if defined(__AVX512F__)
// exp(-|z|), in [0, 1]: the exp_f32 reduction finished with vscalefps (NaN propagates,
// underflow goes gradually to 0). -|z| is clamped at -104 (exp(-104) rounds to 0): the
// Cody-Waite split is exact only while |n| < 2^15, and beyond ~3e13 the reduced r is
// garbage (NaN from -inf). vmaxps returns its second operand when one is NaN: x goes second.
GENKERN_INLINE __m512 exp_neg_abs_v(__m512 z) {
  __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(z)));
  __m512 n =
      _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpP[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP[i]));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// log(v) for v >= 1 (or NaN): v = 2^k m with m in (sqrt(1/2), sqrt(2)], log v = k ln 2 +
// log(1 + f), f = m - 1, by the log_f32 polynomial (~1 ulp).
GENKERN_INLINE __m512 log_ge1_v(__m512 v) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 k = _mm512_getexp_ps(v);
  __m512 m = _mm512_getmant_ps(v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);  // [1, 2)
  __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(kSqrt2), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  k = _mm512_mask_add_ps(k, big, k, one);
  __m512 f = _mm512_sub_ps(m, one);
  __m512 f2 = _mm512_mul_ps(f, f);
  __m512 q = _mm512_set1_ps(kLogP[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 9; ++i) q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(kLogP[i]));
  __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(f, f2), q, _mm512_mul_ps(_mm512_set1_ps(-0.5f), f2));
  return _mm512_fmadd_ps(k, _mm512_set1_ps(0.693147180559945309f), _mm512_add_ps(f, y));
}
#endif

// --- explicit AVX2 forms (8 lanes) ----------------------------------------------------
#if defined(__AVX2__) && defined(__FMA__)
// Lane t on (all bits set) when t < left: masks for _mm256_maskload_ps / _mm256_maskstore_ps.
GENKERN_INLINE __m256i lanes8(int64_t left) {
  const int n = int(left < 0 ? 0 : (left > 8 ? 8 : left));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The sum of the 8 lanes, pairwise.
GENKERN_INLINE float hsum8(__m256 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

// exp(-|z|) as exp_f32(-|z|), 8 lanes without vscalefps: NaN propagates (blends keep it), below kLo it is 0.
GENKERN_INLINE __m256 exp_neg_abs_v8(__m256 z) {
  const __m256 kLo = _mm256_set1_ps(-86.6f), magic = _mm256_set1_ps(12582912.0f);
  const __m256 x = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z));
  const __m256 xc = _mm256_max_ps(x, kLo);  // NaN: vmaxps returns its second operand, kLo; restored below
  const __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(kLog2e), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpP[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP[i]));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127 - 0x4B400000)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, kLo, _CMP_LT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // NaN in, NaN out
}

// log(v) for v >= 1 (or NaN, inf) by log_f32's reduction and polynomial.
GENKERN_INLINE __m256 log_ge1_v8(__m256 v) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256i b = _mm256_castps_si256(v);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 23), _mm256_set1_epi32(127)));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F800000)));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(kSqrt2), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  e = _mm256_add_ps(e, _mm256_and_ps(big, one));
  const __m256 f = _mm256_sub_ps(m, one), z = _mm256_mul_ps(f, f);
  __m256 q = _mm256_set1_ps(kLogP[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 9; ++i) q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kLogP[i]));
  __m256 y = _mm256_fmadd_ps(_mm256_mul_ps(f, z), q,
                             _mm256_fmadd_ps(e, _mm256_set1_ps(kLn2Lo), _mm256_mul_ps(_mm256_set1_ps(-0.5f), z)));
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(kLn2Hi), _mm256_add_ps(f, y));
  // inf stays inf, NaN stays NaN (the reduction above would give finite garbage for them)
  const __m256 special = _mm256_cmp_ps(v, _mm256_set1_ps(std::numeric_limits<float>::max()), _CMP_NLE_UQ);
  return _mm256_blendv_ps(y, v, special);
}

#endif

// --- row reductions -----------------------------------------------------------------
// max of s[0 .. n) (-inf when n = 0; NaN entries are skipped). The simd reduction makes
// GCC vectorise it, which it does not do for a plain max loop without -ffinite-math-only.
template <typename T>
GENKERN_INLINE T row_max(const T* s, int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t c = 0; c < n; ++c) mx = s[c] > mx ? s[c] : mx;
  return mx;
}

}  // namespace genkern
