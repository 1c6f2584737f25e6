// Element math and passes of the gan_loss CPU kernel (gan_loss.cpp): each term with its
// derivative, and the vectorised passes over a flattened tensor that sum them
// deterministically and write the gradients.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.h"

namespace genkern::gan {

enum Shape { kSoftplus, kRelu, kLinear, kSquare };

constexpr int64_t kTile = 512;         // one vectorised loop; the staging buffers stay in L1
constexpr int64_t kBlock = 16 * 1024;  // unit of the thread split (fixed: deterministic sums)

// --- element math -------------------------------------------------------------------
// softplus and sigmoid of z from e = exp(-|z|) (never overflows): sp = max(z, 0) +
// log1p(e), sg = 1/(1+e) or e/(1+e). log1p(e) = log(u) + (e - (u - 1)) / u with u = 1 + e
// corrects the rounding of u, so sp(z) keeps its relative accuracy as z -> -inf.
// max is written `z < 0 ? 0 : z` so that NaN passes through.
GENKERN_INLINE void log1p_sigmoid(float z, float& lp, float& sg) {
  float e = exp_f32(-std::fabs(z));
  float u = 1.0f + e;
  float inv = 1.0f / u;
  lp = log_f32(u) + (e - (u - 1.0f)) * inv;
  sg = z >= 0.0f ? inv : e * inv;
}
GENKERN_INLINE void log1p_sigmoid(double z, double& lp, double& sg) {
  double e = std::exp(-std::fabs(z));
  double inv = 1.0 / (1.0 + e);
  lp = std::log1p(e);
  sg = z >= 0.0 ? inv : e * inv;
}

template <typename T>
struct Term {
  T sign = 1, shift = 0, scale = 1, c1 = 0;
};

// Term is taken by value: a loop-invariant copy keeps its fields in registers (by
// reference, GCC if-converts the c1 select into a gather).
template <int kShape, typename T>
GENKERN_INLINE void eval(T x, const Term<T> p, T& term, T& deriv) {
  if constexpr (kShape == kSoftplus) {
    T lp, sg, z = p.sign * (x - p.shift);
    log1p_sigmoid(z, lp, sg);
    // sp(z) = max(z, 0) + lp. Smoothed (c1 != 0), the linear parts scale max(z, 0) and c1 x meet
    // in one coefficient where z > 0, so an infinite x gives the limit, not inf - inf.
    T coef = p.scale * p.sign + p.c1;
    T above = (coef != T(0) ? coef * x : T(0)) - p.scale * p.sign * p.shift;
    T lin = p.c1 != T(0) ? (z > T(0) ? above : p.c1 * x) : p.scale * (z < T(0) ? T(0) : z);
    term = p.scale * lp + lin;  // max is written `z < 0 ? 0 : z` so that NaN passes through
    deriv = (p.scale * p.sign) * sg + p.c1;
  } else if constexpr (kShape == kRelu) {
    T t = p.shift + p.sign * x;
    term = t < T(0) ? T(0) : t;         // relu(NaN) = NaN
    deriv = t <= T(0) ? T(0) : p.sign;  // torch's relu backward: 0 at t = 0
  } else if constexpr (kShape == kLinear) {
    term = p.sign * x;
    deriv = p.sign;
  } else {
    T d = x - p.shift;
    term = T(0.5) * d * d;
    deriv = d;
  }
}

struct Sums {
  double term = 0, deriv = 0;
};

// Calls f(first, n, sums) for the tiles of [0, numel), block by block across threads,
// and returns the sums over all tiles, added in block order.
template <typename F>
Sums for_each_tile(int64_t numel, F&& f) {
  int64_t nblocks = (numel + kBlock - 1) / kBlock;
  c10::SmallVector<Sums, 64> part(nblocks);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t end = std::min(numel, (b + 1) * kBlock);
      for (int64_t first = b * kBlock; first < end; first += kTile) f(first, std::min(kTile, end - first), part[b]);
    }
  });
  Sums s;
  for (const Sums& p : part) {
    s.term += p.term;
    s.deriv += p.deriv;
  }
  return s;
}
// --- explicit AVX-512 path of the float32 softplus side pass --------------------------
// GCC's vectorisation of softplus_sigmoid keeps an IEEE division and the generic log_f32;
// here: e = exp(-|z|) by exp_neg_abs_v (vec_math.h: one clamp, NaN propagates, underflow
// goes gradually to 0) and 1/(1 + e) by vrcp14ps and one Newton step
// (~1 ulp). The loss needs only the sum of sp(z) = max(z, 0) + log1p(e), so no log is taken
// per element: with u = 1 + e (in [1, 2]) rounded, log1p(e) = log(u) + (e - (u - 1)) / u
// (u - 1 is exact), and each lane multiplies its u's over a tile (at most 2^32: no overflow;
// each product rounding is as small as one log's) and takes one log of the product.
#if defined(__AVX512F__)
#define GENKERN_GAN_AVX512 1
// side_pass<kSoftplus> for float32: sums of term and derivative, grad_k = d_k gs + gt.
inline Sums softplus_pass_avx512(const float* x, int64_t numel, Term<float> p, float gscale, float gshift,
                                 float* grad) {
  static_assert(kTile <= 32 * 16, "a lane multiplies at most 32 values of 1 + e in [1, 2] per tile");
  return for_each_tile(numel, [&](int64_t first, int64_t n, Sums& s) {
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    const __m512 sign = _mm512_set1_ps(p.sign), shift = _mm512_set1_ps(p.shift), c1 = _mm512_set1_ps(p.c1),
                 ds = _mm512_set1_ps(p.scale * p.sign), gs = _mm512_set1_ps(gscale), gt = _mm512_set1_ps(gshift);
    const bool smooth = p.c1 != 0.0f;
    // smoothed, where z > 0: coef x - scale sign shift (coef = scale sign + c1; 0 x would be NaN at inf)
    const float cf = p.scale * p.sign + p.c1;
    const __m512 coef = _mm512_set1_ps(cf), below = _mm512_set1_ps(-p.scale * p.sign * p.shift);
    // per lane: sum max(z, 0), product of u, sum of the rounding corrections, sum x, sum d
    __m512 smax = zero, prod = one, corr = zero, sx = zero, sd = zero;
    const float* xs = x + first;
    float* g = grad ? grad + first : nullptr;
    for (int64_t j = 0; j < n; j += 16) {
      __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1u);
      __m512 xv = _mm512_maskz_loadu_ps(m, xs + j);
      __m512 z = _mm512_mul_ps(sign, _mm512_sub_ps(xv, shift));
      __m512 e = exp_neg_abs_v(z);
      __m512 u = _mm512_add_ps(one, e);
      __m512 r0 = _mm512_rcp14_ps(u);
      __m512 inv = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(u, r0, one), r0);
      __m512 sg = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, zero, _CMP_GE_OQ), _mm512_mul_ps(e, inv), inv);
      __m512 d = _mm512_fmadd_ps(ds, sg, c1);
      sd = _mm512_mask_add_ps(sd, m, sd, d);
      if (smooth) {  // as eval: where z > 0 the linear parts meet in one coefficient (no inf - inf)
        __mmask16 pos = _mm512_cmp_ps_mask(z, zero, _CMP_GT_OQ);
        __m512 up = cf != 0.0f ? _mm512_fmadd_ps(coef, xv, below) : below;
        __m512 lin = _mm512_mask_blend_ps(pos, _mm512_mul_ps(c1, xv), up);
        sx = _mm512_mask_add_ps(sx, m, sx, lin);
      } else {
        smax = _mm512_mask_add_ps(smax, m, smax, _mm512_max_ps(zero, z));  // max(0, NaN) = NaN
      }
      prod = _mm512_mask_mul_ps(prod, m, prod, u);
      corr = _mm512_mask3_fmadd_ps(_mm512_sub_ps(e, _mm512_sub_ps(u, one)), inv, corr, m);
      if (g) _mm512_mask_storeu_ps(g + j, m, _mm512_fmadd_ps(d, gs, gt));
    }
    __m512 sp = _mm512_add_ps(_mm512_add_ps(smax, log_ge1_v(prod)), corr);
    s.term += static_cast<double>(p.scale) * _mm512_reduce_add_ps(sp);
    if (smooth) s.term += _mm512_reduce_add_ps(sx);
    s.deriv += _mm512_reduce_add_ps(sd);
  });
}
#elif defined(__AVX2__) && defined(__FMA__)
// The same pass on AVX2, where GCC leaves the generic loop scalar (control flow in the
// float32 softplus): exp and log by exp_neg_abs_v8 and log_ge1_v8 (vec_math.h), 1 / (1 + e)
// by an IEEE division.
#define GENKERN_GAN_AVX2 1
inline Sums softplus_pass_avx2(const float* x, int64_t numel, Term<float> p, float gscale, float gshift, float* grad) {
  return for_each_tile(numel, [&](int64_t first, int64_t n, Sums& s) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256 sign = _mm256_set1_ps(p.sign), shift = _mm256_set1_ps(p.shift), c1 = _mm256_set1_ps(p.c1),
                 ds = _mm256_set1_ps(p.scale * p.sign), gs = _mm256_set1_ps(gscale), gt = _mm256_set1_ps(gshift);
    const bool smooth = p.c1 != 0.0f;
    const float cf = p.scale * p.sign + p.c1;
    const __m256 coef = _mm256_set1_ps(cf), below = _mm256_set1_ps(-p.scale * p.sign * p.shift);
    __m256 smax = zero, prod = one, logs = zero, corr = zero, sx = zero, sd = zero;
    const float* xs = x + first;
    float* g = grad ? grad + first : nullptr;
    for (int64_t j = 0; j < n; j += 8) {
      if (j % 256 == 0 && j > 0) {  // a lane multiplies at most 32 values of 1 + e in [1, 2], as on AVX-512
        logs = _mm256_add_ps(logs, log_ge1_v8(prod));
        prod = one;
      }
      const int64_t left = std::min<int64_t>(8, n - j);
      const __m256i mi = lanes8(left);
      const __m256 m = _mm256_castsi256_ps(mi);
      const __m256 xv = left == 8 ? _mm256_loadu_ps(xs + j) : _mm256_maskload_ps(xs + j, mi);
      const __m256 z = _mm256_mul_ps(sign, _mm256_sub_ps(xv, shift));
      const __m256 e = exp_neg_abs_v8(z);
      const __m256 u = _mm256_add_ps(one, e);
      const __m256 inv = _mm256_div_ps(one, u);
      const __m256 sg = _mm256_blendv_ps(_mm256_mul_ps(e, inv), inv, _mm256_cmp_ps(z, zero, _CMP_GE_OQ));
      const __m256 d = _mm256_fmadd_ps(ds, sg, c1);
      sd = _mm256_add_ps(sd, _mm256_and_ps(m, d));
      if (smooth) {  // as eval: where z > 0 the linear parts meet in one coefficient (no inf - inf)
        const __m256 up = cf != 0.0f ? _mm256_fmadd_ps(coef, xv, below) : below;
        const __m256 lin = _mm256_blendv_ps(_mm256_mul_ps(c1, xv), up, _mm256_cmp_ps(z, zero, _CMP_GT_OQ));
        sx = _mm256_add_ps(sx, _mm256_and_ps(m, lin));
      } else {
        smax = _mm256_add_ps(smax, _mm256_and_ps(m, _mm256_max_ps(zero, z)));  // max(0, NaN) = NaN
      }
      prod = _mm256_mul_ps(prod, _mm256_blendv_ps(one, u, m));
      corr = _mm256_fmadd_ps(_mm256_and_ps(m, _mm256_sub_ps(e, _mm256_sub_ps(u, one))), inv, corr);
      if (g) {
        const __m256 gv = _mm256_fmadd_ps(d, gs, gt);
        if (left == 8) _mm256_storeu_ps(g + j, gv);
        else _mm256_maskstore_ps(g + j, mi, gv);
      }
    }
    const __m256 sp = _mm256_add_ps(_mm256_add_ps(smax, _mm256_add_ps(logs, log_ge1_v8(prod))), corr);
    s.term += static_cast<double>(p.scale) * hsum8(sp);
    if (smooth) s.term += hsum8(sx);
    s.deriv += hsum8(sd);
  });
}
#endif

// grad_k = grad_k * a + b in place (the relativistic fix-up of the side written first).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void affine_pass(scalar_t* g, int64_t numel, acc_t a, acc_t b) {
  for_each_tile(numel, [&](int64_t first, int64_t n, Sums&) {
    const acc_t ca = a, cb = b;
    scalar_t* gp = g + first;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) gp[j] = static_cast<scalar_t>(static_cast<acc_t>(gp[j]) * ca + cb);
  });
}

// One side of a mean/sum loss: sums of the term and of its derivative over x; with
// `grad`, also writes grad_k = deriv_k * gscale + gshift.
template <int kShape, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
Sums side_pass(const scalar_t* x, int64_t numel, Term<acc_t> p, acc_t gscale, acc_t gshift, scalar_t* grad) {
#ifdef GENKERN_GAN_AVX512
  if constexpr (kShape == kSoftplus && std::is_same_v<scalar_t, float>)
    return softplus_pass_avx512(x, numel, p, gscale, gshift, grad);
#elif defined(GENKERN_GAN_AVX2)
  if constexpr (kShape == kSoftplus && std::is_same_v<scalar_t, float>)
    return softplus_pass_avx2(x, numel, p, gscale, gshift, grad);
#endif
  return for_each_tile(numel, [&](int64_t first, int64_t n, Sums& s) {
    alignas(64) acc_t xb[kTile], gb[kTile];
    const Term<acc_t> q = p;
    const acc_t gs = gscale, gt = gshift;
    const acc_t* xs = load_as(x + first, n, xb);
    acc_t st = 0, sd = 0;
    if (grad) {
      acc_t* g = out_as(grad + first, gb);
#pragma omp simd reduction(+ : st, sd)
      for (int64_t j = 0; j < n; ++j) {
        acc_t t, d;
        eval<kShape>(xs[j], q, t, d);
        st += t;
        sd += d;
        g[j] = d * gs + gt;
      }
      store_as(grad + first, n, g);
    } else {
#pragma omp simd reduction(+ : st, sd)
      for (int64_t j = 0; j < n; ++j) {
        acc_t t, d;
        eval<kShape>(xs[j], q, t, d);
        st += t;
        sd += d;
      }
    }
    s.term += st;
    s.deriv += sd;
  });
}

// "none": loss_k = term_x(x_k) + term_y(y_k) (y optional), grads the per-element derivatives
// (not written for linear terms, whose gradient is a constant: see gan_loss_fwd).
template <int kShape, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void none_pass(int64_t numel, const scalar_t* x, Term<acc_t> px, scalar_t* gx, const scalar_t* y, Term<acc_t> py,
               scalar_t* gy, scalar_t* loss) {
  constexpr bool kGrads = kShape != kLinear;
  for_each_tile(numel, [&](int64_t first, int64_t n, Sums&) {
    alignas(64) acc_t xb[kTile], yb[kTile], lb[kTile], gxb[kTile], gyb[kTile];
    const Term<acc_t> qx = px, qy = py;
    const acc_t* xs = load_as(x + first, n, xb);
    acc_t *l = out_as(loss + first, lb), *dx = kGrads ? out_as(gx + first, gxb) : gxb;
    if (y) {
      const acc_t* ys = load_as(y + first, n, yb);
      acc_t* dy = kGrads ? out_as(gy + first, gyb) : gyb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        acc_t tx, ty;
        eval<kShape>(xs[j], qx, tx, dx[j]);
        eval<kShape>(ys[j], qy, ty, dy[j]);
        l[j] = tx + ty;
      }
      if constexpr (kGrads) store_as(gy + first, n, dy);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) eval<kShape>(xs[j], qx, l[j], dx[j]);
    }
    store_as(loss + first, n, l);
    if constexpr (kGrads) store_as(gx + first, n, dx);
  });
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
double mean_of(const scalar_t* x, int64_t numel) {
  Sums s = for_each_tile(numel, [&](int64_t first, int64_t n, Sums& s) {
    alignas(64) acc_t xb[kTile];
    const acc_t* xs = load_as(x + first, n, xb);
    acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) acc += xs[j];
    s.term += acc;
  });
  return s.term / static_cast<double>(numel);
}

}  // namespace genkern::gan
