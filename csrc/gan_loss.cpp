// CPU kernels of gan_loss (the loss and its gradient w.r.t. the logits in one pass) and
// the C++ autograd of the differentiable ops gan_loss_cpp / gan_loss_triton.
//
// Every per-element term of genkern/reference/gan_loss.py is one of four shapes,
// evaluated with its derivative by `eval` below (x a logit; sp softplus, sg sigmoid):
//
//   kSoftplus  scale * sp(sign (x - shift)) + c1 x   d = scale sign sg(sign (x - shift)) + c1
//   kRelu      relu(shift + sign x)                  d = sign where shift + sign x > 0, else 0
//   kLinear    sign x                                d = sign
//   kSquare    (x - shift)^2 / 2                     d = x - shift
//
// (c1 = 1 - real_label gives the label-smoothed real term: l sp(-x) + (1 - l) sp(x) =
// sp(-x) + (1 - l) x.) A loss is one or two "sides" (tensor + term); "mean" scales each
// side's gradient by 1/N of its own tensor. kLinear sides (the wasserstein terms, the
// hinge generator term) have one derivative for every logit: their gradient is returned
// 0-d and expanded by the backward, never written per element (see gan_loss_fwd).
//
// Relativistic average: with x the tensor of the sp(-(x - mean(y))) term (real for D,
// fake for G) and y the other, a_i = sg(my - x_i), b_j = sg(y_j - mx), A = sum a,
// B = sum b, the mean loss has
//   dL/dx_k = -a_k / Nx - B / (Nx Ny),   dL/dy_k = b_k / Ny + A / (Nx Ny)
// and the sum loss dL/dx_k = -a_k - B / Nx, dL/dy_k = b_k + A / Ny: a first pass finds
// the means, a second the sums A and B (and the loss), a third writes the gradients.
// With "none" the kernel returns the per-element partials (-a_k, b_k) and the autograd
// backward adds the terms through the means: with incoming gradient g,
//   grad_x = g gx - mean(g gy),   grad_y = g gy - mean(g gx).
//
// Layout: tensors are flattened; fixed blocks of kBlock elements are spread over threads
// and each block's sums are kept apart and added in block order, so results do not depend
// on the thread count. Inside a block, tiles of kTile elements are summed in acc_t by a
// vectorised loop and the tile sums added in double (1M-element means stay accurate).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/SmallVector.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <tuple>
#include <utility>
#include <type_traits>

#include "common.h"
#include "gan_loss.h"

namespace genkern {
namespace {

enum Shape { kSoftplus, kRelu, kLinear, kSquare };

constexpr int64_t kTile = 512;         // one vectorised loop; the staging buffers stay in L1
constexpr int64_t kBlock = 16 * 1024;  // unit of the thread split (fixed: deterministic sums)

// --- element math -------------------------------------------------------------------
// softplus and sigmoid of z from e = exp(-|z|) (never overflows): sp = max(z, 0) +
// log1p(e), sg = 1/(1+e) or e/(1+e). log1p(e) = log(u) + (e - (u - 1)) / u with u = 1 + e
// corrects the rounding of u, so sp(z) keeps its relative accuracy as z -> -inf.
// max is written `z < 0 ? 0 : z` so that NaN passes through.
GENKERN_INLINE void softplus_sigmoid(float z, float& sp, float& sg) {
  float e = exp_f32(-std::fabs(z));
  float u = 1.0f + e;
  float inv = 1.0f / u;
  sp = (z < 0.0f ? 0.0f : z) + (log_f32(u) + (e - (u - 1.0f)) * inv);
  sg = z >= 0.0f ? inv : e * inv;
}
GENKERN_INLINE void softplus_sigmoid(double z, double& sp, double& sg) {
  double e = std::exp(-std::fabs(z));
  double inv = 1.0 / (1.0 + e);
  sp = (z < 0.0 ? 0.0 : z) + std::log1p(e);
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
    T sp, sg;
    softplus_sigmoid(p.sign * (x - p.shift), sp, sg);
    T cx = p.c1 * x;
    term = p.scale * sp + (p.c1 != T(0) ? cx : T(0));  // no 0 * inf when unsmoothed
    deriv = (p.scale * p.sign) * sg + p.c1;
  } else if constexpr (kShape == kRelu) {
    T t = p.shift + p.sign * x;
    term = t < T(0) ? T(0) : t;              // relu(NaN) = NaN
    deriv = t <= T(0) ? T(0) : p.sign;       // torch's relu backward: 0 at t = 0
  } else if constexpr (kShape == kLinear) {
    term = p.sign * x;
    deriv = p.sign;
  } else {
    T d = x - p.shift;
    term = T(0.5) * d * d;
    deriv = d;
  }
}

// --- staging: a tile of a scalar_t tensor as acc_t, copied only when widening --------
template <typename acc_t, typename scalar_t>
GENKERN_INLINE const acc_t* load_tile(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

template <typename acc_t, typename scalar_t>
GENKERN_INLINE acc_t* out_tile(scalar_t* dst, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) return dst;
  else return buf;
}

template <typename acc_t, typename scalar_t>
GENKERN_INLINE void store_tile(scalar_t* dst, int64_t n, const acc_t* buf) {
  if constexpr (!std::is_same_v<acc_t, scalar_t>)
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(buf[i]);
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
// here: e = exp(-|z|) by a range reduction finished with vscalefps (no clamps, NaN
// propagates, underflow goes gradually to 0) and 1/(1 + e) by vrcp14ps and one Newton step
// (~1 ulp). The loss needs only the sum of sp(z) = max(z, 0) + log1p(e), so no log is taken
// per element: with u = 1 + e (in [1, 2]) rounded, log1p(e) = log(u) + (e - (u - 1)) / u
// (u - 1 is exact), and each lane multiplies its u's over a tile (at most 2^32: no overflow;
// each product rounding is as small as one log's) and takes one log of the product.
#if defined(__AVX512F__)
#define GENKERN_GAN_AVX512 1
GENKERN_INLINE __m512 exp_neg_abs_v(__m512 z) {
  __m512 x = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(z));  // -|z|
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);  // in [0, 1]
}

// log(v) for v >= 1 (or NaN): v = 2^k m with m in (sqrt(1/2), sqrt(2)], log v = k ln 2 +
// log(1 + f), f = m - 1, by the Cephes logf polynomial (~1 ulp).
GENKERN_INLINE __m512 log_ge1_v(__m512 v) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 k = _mm512_getexp_ps(v);
  __m512 m = _mm512_getmant_ps(v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);  // [1, 2)
  __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  k = _mm512_mask_add_ps(k, big, k, one);
  __m512 f = _mm512_sub_ps(m, one);
  __m512 f2 = _mm512_mul_ps(f, f);
  __m512 q = _mm512_set1_ps(7.0376836292e-2f);
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(-1.1514610310e-1f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(1.1676998740e-1f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(-1.2420140846e-1f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(1.4249322787e-1f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(-1.6668057665e-1f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(2.0000714765e-1f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(-2.4999993993e-1f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(3.3333331174e-1f));
  __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(f, f2), q, _mm512_mul_ps(_mm512_set1_ps(-0.5f), f2));
  return _mm512_fmadd_ps(k, _mm512_set1_ps(0.693147180559945309f), _mm512_add_ps(f, y));
}

// side_pass<kSoftplus> for float32: sums of term and derivative, grad_k = d_k gs + gt.
Sums softplus_pass_avx512(const float* x, int64_t numel, Term<float> p, float gscale, float gshift, float* grad) {
  static_assert(kTile <= 32 * 16, "a lane multiplies at most 32 values of 1 + e in [1, 2] per tile");
  return for_each_tile(numel, [&](int64_t first, int64_t n, Sums& s) {
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    const __m512 sign = _mm512_set1_ps(p.sign), shift = _mm512_set1_ps(p.shift), c1 = _mm512_set1_ps(p.c1),
                 ds = _mm512_set1_ps(p.scale * p.sign), gs = _mm512_set1_ps(gscale), gt = _mm512_set1_ps(gshift);
    const bool smooth = p.c1 != 0.0f;
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
      smax = _mm512_mask_add_ps(smax, m, smax, _mm512_max_ps(zero, z));  // max(0, NaN) = NaN
      prod = _mm512_mask_mul_ps(prod, m, prod, u);
      corr = _mm512_mask3_fmadd_ps(_mm512_sub_ps(e, _mm512_sub_ps(u, one)), inv, corr, m);
      if (smooth) sx = _mm512_mask_add_ps(sx, m, sx, xv);
      if (g) _mm512_mask_storeu_ps(g + j, m, _mm512_fmadd_ps(d, gs, gt));
    }
    __m512 sp = _mm512_add_ps(_mm512_add_ps(smax, log_ge1_v(prod)), corr);
    s.term += static_cast<double>(p.scale) * _mm512_reduce_add_ps(sp);
    if (smooth) s.term += static_cast<double>(p.c1) * _mm512_reduce_add_ps(sx);  // no 0 * inf when unsmoothed
    s.deriv += _mm512_reduce_add_ps(sd);
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
#endif
  return for_each_tile(numel, [&](int64_t first, int64_t n, Sums& s) {
    alignas(64) acc_t xb[kTile], gb[kTile];
    const Term<acc_t> q = p;
    const acc_t gs = gscale, gt = gshift;
    const acc_t* xs = load_tile(x + first, n, xb);
    acc_t st = 0, sd = 0;
    if (grad) {
      acc_t* g = out_tile(grad + first, gb);
#pragma omp simd reduction(+ : st, sd)
      for (int64_t j = 0; j < n; ++j) {
        acc_t t, d;
        eval<kShape>(xs[j], q, t, d);
        st += t;
        sd += d;
        g[j] = d * gs + gt;
      }
      store_tile(grad + first, n, g);
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
    const acc_t* xs = load_tile(x + first, n, xb);
    acc_t *l = out_tile(loss + first, lb), *dx = kGrads ? out_tile(gx + first, gxb) : gxb;
    if (y) {
      const acc_t* ys = load_tile(y + first, n, yb);
      acc_t* dy = kGrads ? out_tile(gy + first, gyb) : gyb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        acc_t tx, ty;
        eval<kShape>(xs[j], qx, tx, dx[j]);
        eval<kShape>(ys[j], qy, ty, dy[j]);
        l[j] = tx + ty;
      }
      if constexpr (kGrads) store_tile(gy + first, n, dy);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) eval<kShape>(xs[j], qx, l[j], dx[j]);
    }
    store_tile(loss + first, n, l);
    if constexpr (kGrads) store_tile(gx + first, n, dx);
  });
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
double mean_of(const scalar_t* x, int64_t numel) {
  Sums s = for_each_tile(numel, [&](int64_t first, int64_t n, Sums& s) {
    alignas(64) acc_t xb[kTile];
    const acc_t* xs = load_tile(x + first, n, xb);
    acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) acc += xs[j];
    s.term += acc;
  });
  return s.term / static_cast<double>(numel);
}

// --- the loss as sides ----------------------------------------------------------------
// x is the first side (real for D, fake for G), y the second (fake for D, real for the
// relativistic G; absent for the other G kinds).
template <typename scalar_t>
struct Side {
  const scalar_t* x = nullptr;
  scalar_t* grad = nullptr;
  int64_t n = 0;
  Term<at::opmath_type<scalar_t>> term;
};

template <int kShape, typename scalar_t>
double run_shape(Side<scalar_t> s0, Side<scalar_t> s1, int64_t reduction, bool relativistic, scalar_t* loss) {
  using acc_t = at::opmath_type<scalar_t>;
  if (reduction == kNone) {
    none_pass<kShape>(s0.n, s0.x, s0.term, s0.grad, s1.x, s1.term, s1.grad, loss);
    return 0;
  }
  bool mean = reduction == kMean;
  if (relativistic) {
    // The cross terms need A and B (sums of the derivatives) before any gradient is written.
    double n0 = static_cast<double>(s0.n), n1 = static_cast<double>(s1.n);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      // Side 1 first, its raw derivatives b_k written; side 0 then writes its final
      // gradients (B known); side 1's are fixed up by one affine pass once A is known.
      Sums b = side_pass<kShape>(s1.x, s1.n, s1.term, acc_t(1), acc_t(0), s1.grad);
      double B = b.deriv;
      Sums a = side_pass<kShape>(s0.x, s0.n, s0.term, acc_t(mean ? 1 / n0 : 1),
                                 acc_t(mean ? -B / (n0 * n1) : -B / n0), s0.grad);
      double A = -a.deriv;
      affine_pass(s1.grad, s1.n, acc_t(mean ? 1 / n1 : 1), acc_t(mean ? A / (n0 * n1) : A / n1));
      return mean ? a.term / n0 + b.term / n1 : a.term + b.term;
    }
    Sums a = side_pass<kShape>(s0.x, s0.n, s0.term, acc_t(0), acc_t(0), static_cast<scalar_t*>(nullptr));
    Sums b = side_pass<kShape>(s1.x, s1.n, s1.term, acc_t(0), acc_t(0), static_cast<scalar_t*>(nullptr));
    double A = -a.deriv, B = b.deriv;  // the derivatives of side 0 are -a_i
    side_pass<kShape>(s0.x, s0.n, s0.term, acc_t(mean ? 1 / n0 : 1), acc_t(mean ? -B / (n0 * n1) : -B / n0), s0.grad);
    side_pass<kShape>(s1.x, s1.n, s1.term, acc_t(mean ? 1 / n1 : 1), acc_t(mean ? A / (n0 * n1) : A / n1), s1.grad);
    return mean ? a.term / n0 + b.term / n1 : a.term + b.term;
  }
  double total = 0;
  for (const Side<scalar_t>* s : {&s0, &s1}) {
    if (!s->x) continue;
    double inv = mean ? 1.0 / static_cast<double>(s->n) : 1.0;
    total += side_pass<kShape>(s->x, s->n, s->term, acc_t(inv), acc_t(0), s->grad).term * inv;
  }
  return total;
}

template <typename scalar_t>
void run(const at::Tensor& r, const at::Tensor& f, at::Tensor& gr, at::Tensor& gf, at::Tensor& loss, int64_t kind,
         int64_t reduction, double real_label, bool generator) {
  using acc_t = at::opmath_type<scalar_t>;
  using T = Term<acc_t>;
  int shape = kSoftplus;
  if (kind != kRelativistic) {
    int linear = generator ? kind == kHinge || kind == kWasserstein : kind == kWasserstein;
    shape = linear ? kLinear : kind == kLeastSquares ? kSquare : kind == kHinge ? kRelu : kSoftplus;
  }
  // Linear terms have constant gradients (0-d, filled by gan_loss_fwd): nothing to write.
  auto side = [&](const at::Tensor& t, at::Tensor& g, T term) {
    return Side<scalar_t>{t.data_ptr<scalar_t>(), shape == kLinear ? nullptr : g.data_ptr<scalar_t>(), t.numel(),
                          term};
  };
  Side<scalar_t> s0, s1;
  if (kind == kRelativistic) {  // x_side: sp(-(x - my)), y side: sp(y - mx)
    const at::Tensor &x = generator ? f : r, &y = generator ? r : f;
    at::Tensor &gx = generator ? gf : gr, &gy = generator ? gr : gf;
    acc_t mx = static_cast<acc_t>(mean_of(x.data_ptr<scalar_t>(), x.numel()));
    acc_t my = static_cast<acc_t>(mean_of(y.data_ptr<scalar_t>(), y.numel()));
    s0 = side(x, gx, T{-1, my, 1, 0});
    s1 = side(y, gy, T{1, mx, 1, 0});
  } else if (generator) {
    s0 = side(f, gf, kind == kNonsaturating ? T{-1, 0, 1, 0} : kind == kMinimax ? T{1, 0, -1, 0}
                     : kind == kLeastSquares ? T{1, 1, 1, 0} : T{-1, 0, 1, 0});
  } else {
    acc_t c1 = static_cast<acc_t>(1.0 - real_label);
    bool sq = kind == kLeastSquares, hinge = kind == kHinge;
    s0 = side(r, gr, T{-1, acc_t(sq || hinge ? 1 : 0), 1, shape == kSoftplus ? c1 : acc_t(0)});
    s1 = side(f, gf, T{1, acc_t(hinge ? 1 : 0), 1, 0});
  }
  scalar_t* lp = loss.data_ptr<scalar_t>();
  double v = 0;
  switch (shape) {
    case kSoftplus: v = run_shape<kSoftplus>(s0, s1, reduction, kind == kRelativistic, lp); break;
    case kRelu: v = run_shape<kRelu>(s0, s1, reduction, false, lp); break;
    case kLinear: v = run_shape<kLinear>(s0, s1, reduction, false, lp); break;
    default: v = run_shape<kSquare>(s0, s1, reduction, false, lp); break;
  }
  if (reduction != kNone) *lp = static_cast<scalar_t>(static_cast<acc_t>(v));
}

}  // namespace

// Terms whose derivative is one constant for every logit: the wasserstein terms (D and G),
// the hinge generator term, and real logits that a non-relativistic generator loss does not
// read (0). Their gradient is returned 0-d (below), so no per-element gradient is written.
bool const_grad_real(int64_t kind, bool generator) { return generator ? kind != kRelativistic : kind == kWasserstein; }
bool const_grad_fake(int64_t kind, bool generator) { return kind == kWasserstein || (generator && kind == kHinge); }

// That constant: the term's sign, over the tensor's size for "mean".
double const_grad_value(bool real, int64_t kind, int64_t reduction, bool generator, int64_t numel) {
  if (real && generator) return 0.0;
  double sign = real || generator ? -1.0 : 1.0;
  return reduction == kMean ? sign / static_cast<double>(numel) : sign;
}

namespace {

void check_args(const c10::optional<at::Tensor>& real, const at::Tensor& fake, int64_t kind, int64_t reduction,
                double real_label, bool generator) {
  GENKERN_CHECK_VALUE(kind >= 0 && kind < kNumKinds, "kind must be a code in [0, ", int64_t(kNumKinds),
                      ") (nonsaturating, minimax, hinge, wasserstein, least_squares, relativistic), got ", kind);
  GENKERN_CHECK_VALUE(reduction >= 0 && reduction < kNumReductions,
                      "reduction must be a code in [0, 3) (mean, sum, none), got ", reduction);
  check_float(fake, "fake_logits");
  check_cpu(fake, "fake_logits");
  GENKERN_CHECK_VALUE(fake.numel() > 0, "fake_logits is empty; a GAN loss needs at least one logit");
  bool uses_real = !generator || kind == kRelativistic;
  GENKERN_CHECK_VALUE(!uses_real || real.has_value(), "real_logits is required by the ",
                      generator ? "relativistic generator" : "discriminator", " loss, got None");
  GENKERN_CHECK_VALUE(generator || real_label == 1.0 || kind == kNonsaturating || kind == kMinimax,
                      "real_label only applies to the nonsaturating and minimax kinds, got real_label=", real_label,
                      " for kind code ", kind);
  if (!real.has_value()) return;
  GENKERN_CHECK_TYPE(real->scalar_type() == fake.scalar_type(), "real_logits has dtype ", real->scalar_type(),
                     " but fake_logits has ", fake.scalar_type());
  GENKERN_CHECK_VALUE(real->device() == fake.device(), "real_logits is on ", real->device(),
                      " but fake_logits is on ", fake.device());
  GENKERN_CHECK_VALUE(real->numel() > 0, "real_logits is empty; a GAN loss needs at least one logit");
  GENKERN_CHECK_VALUE(!uses_real || reduction != kNone || real->sizes() == fake.sizes(),
                      "reduction none needs real_logits and fake_logits of one shape, got ", real->sizes(), " and ",
                      fake.sizes());
}

}  // namespace

// (loss, grad_real, grad_fake), the schema of csrc/genkern.cpp, in the logits' dtype:
//   loss       0-d (mean, sum) or fake_logits' shape (none)
//   grad_real  real_logits' shape, contiguous; 0-d where const_grad_real (the constant
//              derivative, 1/N-scaled for mean); (0,) when real_logits is None
//   grad_fake  fake_logits' shape, contiguous; 0-d where const_grad_fake
// A 0-d gradient stands for that value at every element (broadcast it to the logits' shape);
// the autograd backward below returns it expanded, never materialised. The Triton launcher
// (genkern/triton/gan_loss.py) and the fake kernel (genkern/ops/gan_loss.py) follow the same
// contract.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gan_loss_fwd(const c10::optional<at::Tensor>& real,
                                                            const at::Tensor& fake, int64_t kind, int64_t reduction,
                                                            double real_label, bool generator) {
  check_args(real, fake, kind, reduction, real_label, generator);
  bool uses_real = !generator || kind == kRelativistic;
  bool cr = real.has_value() && const_grad_real(kind, generator), cf = const_grad_fake(kind, generator);
  auto opts = fake.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor f = fake.contiguous(), r = uses_real ? real->contiguous() : at::Tensor();
  at::Tensor loss = reduction == kNone ? at::empty(fake.sizes(), opts) : at::empty({}, opts);
  at::Tensor gf = cf ? at::empty({}, opts) : at::empty(fake.sizes(), opts);
  at::Tensor gr = !real.has_value() ? at::empty({0}, opts) : cr ? at::empty({}, opts) : at::empty(real->sizes(), opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fake.scalar_type(), "gan_loss_cpp_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    run<scalar_t>(r, f, gr, gf, loss, kind, reduction, real_label, generator);
    if (cr)
      *gr.data_ptr<scalar_t>() = static_cast<scalar_t>(
          static_cast<acc_t>(const_grad_value(true, kind, reduction, generator, real->numel())));
    if (cf)
      *gf.data_ptr<scalar_t>() = static_cast<scalar_t>(
          static_cast<acc_t>(const_grad_value(false, kind, reduction, generator, fake.numel())));
  });
  return {loss, gr, gf};
}

TORCH_LIBRARY_IMPL(genkern, CPU, m) { m.impl("gan_loss_cpp_fwd", &gan_loss_fwd); }

}  // namespace genkern
