// Staging of tensor data in the accumulation type acc_t (at::opmath_type: float for
// float16/bfloat16/float32, double for float64): a kernel reads a tile through load_as
// and writes through out_as + store_as, which copy only when the types differ.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "vec_math.h"

namespace genkern {

// d[0 .. n) = s[0 .. n) as acc_t (exact: float16/bfloat16 -> float32 loses nothing).
template <typename acc_t, typename scalar_t>
GENKERN_INLINE void widen(const scalar_t* s, int64_t n, acc_t* d) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float> &&
                (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>)) {
    for (; i + 16 <= n; i += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
      if constexpr (std::is_same_v<scalar_t, at::Half>) _mm512_storeu_ps(d + i, _mm512_cvtph_ps(h));
      else  // bfloat16 is the top half of a float32
        _mm512_storeu_ps(d + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
  }
#endif
  for (; i < n; ++i) d[i] = static_cast<acc_t>(s[i]);
}

// src[0 .. n) as acc_t: src itself when the types agree, else widened into buf.
template <typename acc_t, typename scalar_t>
GENKERN_INLINE const acc_t* load_as(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return src;
  } else {
    widen(src, n, buf);
    return buf;
  }
}

// Where to write n acc_t results bound for dst: dst itself when the types agree, else
// buf, which store_as then narrows into dst.
template <typename acc_t, typename scalar_t>
GENKERN_INLINE acc_t* out_as(scalar_t* dst, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) return dst;
  else return buf;
}

template <typename acc_t, typename scalar_t>
GENKERN_INLINE void store_as(scalar_t* dst, int64_t n, const acc_t* buf) {
  if constexpr (!std::is_same_v<acc_t, scalar_t>)
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(buf[i]);
}

}  // namespace genkern
