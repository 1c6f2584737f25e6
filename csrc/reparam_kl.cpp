// CPU kernels of reparam_kl: reparameterized sampling fused with its KL divergence.
//
//   z  = mu + exp(logvar / 2) * eps                                  (..., D)
//   kl = 1/2 sum_D( expm1(d) - d + t^2 ),  d = logvar - prior_logvar,
//        t = (mu - prior_mu) * exp(-prior_logvar / 2)                (...)
//
// and its backward (s = exp(logvar / 2), e = exp(-prior_logvar)):
//   grad_mu           = grad_z + grad_kl (mu - prior_mu) e
//   grad_logvar       = 1/2 (grad_z eps s + grad_kl expm1(d))
//   grad_prior_mu     = -grad_kl (mu - prior_mu) e
//   grad_prior_logvar = -1/2 grad_kl (expm1(d) + t^2)
//
// With `seed` instead of `eps`, the noise of flat element i is Philox normal i
// (common.h), drawn in the kernel and drawn again in the backward, never stored.
//
// Layout: the inputs are viewed as (rows, D) row-major. Each thread takes whole
// rows (so a row's KL sum stays in one thread) and walks them in spans of at most
// kTile elements: several whole rows when D is small, pieces of one row when D is
// large. A span is contiguous in the flat order, so its noise is one run of Philox
// groups. Everything a span needs is staged in L1-sized buffers (noise; inputs
// widened to float for float16/bfloat16) and one vectorised loop per row piece does
// all the math, so each tensor is read or written once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "common.h"
#include "reparam_kl_args.h"

namespace genkern::rkl {
namespace {

constexpr int64_t kTile = 1024;           // elements per span: the staging buffers stay in L1/L2
constexpr int64_t kGrainElems = 1 << 13;  // below ~8K elements a thread costs more than it saves

// --- element math, float32 via the vectorisable helpers, float64 via libm -------------
// The float32 forms take h = exp(x / 2) from the caller (often free: exp(logvar / 2)
// is needed for z anyway) and use exp(x) = h * h, so an intermediate only overflows
// when the result does.

// expm1(x) - x
GENKERN_INLINE float expm1_minus_x(float x, float h) {
  return std::fabs(x) < 1.0f ? expm1_minus_x_taylor_f32(x) : (h * h - 1.0f) - x;
}
GENKERN_INLINE double expm1_minus_x(double x, double) { return std::expm1(x) - x; }

// c * expm1(x), finite whenever the exact value fits (c * exp(x) as (c * h) * h)
GENKERN_INLINE float scaled_expm1(float c, float x, float h) {
  return std::fabs(x) < 1.0f ? c * (x + expm1_minus_x_taylor_f32(x)) : (c * h) * h - c;
}
GENKERN_INLINE double scaled_expm1(double c, double x, double) { return c * std::expm1(x); }

// exp(d / 2) for d = logvar - prior_logvar, given s = exp(logvar / 2): without a
// prior d = logvar and it is s (one exp per element instead of two).
template <bool kPrior, typename T>
GENKERN_INLINE T exp_half_d(T d, T s) {
  return kPrior ? exp_(T(0.5) * d) : s;
}

// Pointers to one row piece. Priors are either per column (a (D,) vector shared by
// all rows) or full; `ip` is exp(-prior_logvar / 2).
template <typename T>
struct Piece {
  const T *mu, *lv, *eps, *pm, *plv, *ip;
};

// Forward of one row piece of n elements: writes z, returns its part of sum_D(...).
// t is squared rather than (mu - prior_mu)^2 scaled by exp(-prior_logvar), so no
// intermediate overflows when the result fits.
template <typename T, bool kPrior>
T fwd_piece(int64_t n, Piece<T> p, T* __restrict__ z) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    T m = p.mu[j], l = p.lv[j];
    T s = exp_(T(0.5) * l);
    z[j] = m + s * p.eps[j];
    T d = kPrior ? l - p.plv[j] : l;
    T t = kPrior ? (m - p.pm[j]) * p.ip[j] : m;
    acc += expm1_minus_x(d, exp_half_d<kPrior>(d, s)) + t * t;
  }
  return acc;
}

template <typename T>
struct Grads {
  T *mu, *lv, *pm, *plv;
};

// Backward of one row piece; gkl is the row's grad_kl, broadcast over D.
template <typename T, bool kPrior>
void bwd_piece(int64_t n, T gkl, const T* __restrict__ gz, Piece<T> p, Grads<T> g) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    T m = p.mu[j], l = p.lv[j];
    T s = exp_(T(0.5) * l);
    T d = kPrior ? l - p.plv[j] : l;
    T c = T(0.5) * gkl;
    T c_em1 = scaled_expm1(c, d, exp_half_d<kPrior>(d, s));  // grad_kl expm1(d) / 2
    T glv = T(0.5) * gz[j] * p.eps[j] * s + c_em1;
    if constexpr (kPrior) {
      T t = (m - p.pm[j]) * p.ip[j];
      T a = gkl * t * p.ip[j];  // grad_kl (mu - prior_mu) exp(-prior_logvar)
      g.mu[j] = gz[j] + a;
      g.pm[j] = -a;
      g.plv[j] = -(c_em1 + (c * t) * t);
    } else {
      g.mu[j] = gz[j] + gkl * m;
    }
    g.lv[j] = glv;
  }
}

// Philox noise of flat elements [first, first + n) as acc_t; n <= kTile.
template <typename acc_t>
const acc_t* noise_span(PhiloxKey key, int64_t first, int64_t n, float* fbuf, acc_t* buf) {
  int64_t g0 = first >> 2, g1 = (first + n + 3) >> 2;
  philox_normal_groups(key, static_cast<uint32_t>(g0), g1 - g0, fbuf);
  const float* noise = fbuf + (first & 3);
  if constexpr (std::is_same_v<acc_t, float>) {
    return noise;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(noise[i]);  // float64: widen
    return buf;
  }
}

// Calls f(row, nrows, col, ncols) over spans covering rows [r0, r1) of a (rows, D)
// layout: whole rows packed up to kTile elements, or kTile-wide pieces of one row.
template <typename F>
void for_each_span(int64_t r0, int64_t r1, int64_t D, F&& f) {
  if (D <= kTile) {
    int64_t per = kTile / D;
    for (int64_t r = r0; r < r1; r += per) f(r, std::min(per, r1 - r), int64_t(0), D);
  } else {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < D; c += kTile) f(r, int64_t(1), c, std::min(kTile, D - c));
  }
}

int64_t grain_rows(int64_t D) { return std::max<int64_t>(1, kGrainElems / D); }

// Per-thread staging buffers for one span.
template <typename acc_t>
struct Staging {
  alignas(64) float noise[kTile + 8];
  alignas(64) acc_t mu[kTile], lv[kTile], eps[kTile], pm[kTile], plv[kTile], ip[kTile], gz[kTile];
  alignas(64) acc_t out[4][kTile];
};

// Loads a span of nrows x ncols elements from (row, col) = flat `first` (inputs and
// noise) and returns the pointers of its first row; `prior_step` is how far the prior
// pointers move per row (0 for per-column priors).
template <typename scalar_t, typename acc_t>
Piece<acc_t> load_piece(const Args& a, int64_t first, int64_t nrows, int64_t col, int64_t ncols, Staging<acc_t>& st,
                        int64_t& prior_step) {
  int64_t n = nrows * ncols;
  Piece<acc_t> p{};
  p.mu = load_as(a.mu.data_ptr<scalar_t>() + first, n, st.mu);
  p.lv = load_as(a.lv.data_ptr<scalar_t>() + first, n, st.lv);
  p.eps = a.eps.defined() ? load_as(a.eps.data_ptr<scalar_t>() + first, n, st.eps)
                          : noise_span(PhiloxKey(a.seed), first, n, st.noise, st.eps);
  prior_step = 0;
  if (a.has_prior && a.prior_is_vec) {
    p.pm = a.pm.data_ptr<acc_t>() + col;
    p.plv = a.plv.data_ptr<acc_t>() + col;
    p.ip = a.ip.data_ptr<acc_t>() + col;
  } else if (a.has_prior) {
    p.pm = load_as(a.pm.data_ptr<scalar_t>() + first, n, st.pm);
    p.plv = load_as(a.plv.data_ptr<scalar_t>() + first, n, st.plv);
    const acc_t* plv = p.plv;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) st.ip[i] = exp_(acc_t(-0.5) * plv[i]);
    p.ip = st.ip;
    prior_step = ncols;
  }
  return p;
}

template <typename T>
Piece<T> advance(Piece<T> p, int64_t step, int64_t prior_step) {
  return {p.mu + step, p.lv + step, p.eps + step, p.pm + prior_step, p.plv + prior_step, p.ip + prior_step};
}

// --- forward ----------------------------------------------------------------------------
template <typename scalar_t, bool kPrior>
void fwd_kernel(const Args& a, at::Tensor& z, at::Tensor& kl) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* zp = z.data_ptr<scalar_t>();
  scalar_t* klp = kl.data_ptr<scalar_t>();
  at::parallel_for(0, a.rows, grain_rows(a.D), [&](int64_t r0, int64_t r1) {
    Staging<acc_t> st;
    acc_t row_acc = 0;  // KL sum of a row split over several spans
    for_each_span(r0, r1, a.D, [&](int64_t row, int64_t nrows, int64_t col, int64_t ncols) {
      int64_t first = row * a.D + col, n = nrows * ncols, prior_step;
      Piece<acc_t> p = load_piece<scalar_t>(a, first, nrows, col, ncols, st, prior_step);
      acc_t* out = out_as(zp + first, st.out[0]);
      for (int64_t r = 0; r < nrows; ++r) {
        row_acc += fwd_piece<acc_t, kPrior>(ncols, advance(p, r * ncols, r * prior_step), out + r * ncols);
        if (col + ncols == a.D) {
          klp[row + r] = static_cast<scalar_t>(acc_t(0.5) * row_acc);
          row_acc = 0;
        }
      }
      store_as(zp + first, n, out);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> reparam_kl_fwd(const at::Tensor& mu, const at::Tensor& logvar,
                                                  const c10::optional<at::Tensor>& eps,
                                                  const c10::optional<at::Tensor>& prior_mu,
                                                  const c10::optional<at::Tensor>& prior_logvar,
                                                  const c10::optional<at::Tensor>& seed) {
  check_args(mu, logvar, eps, prior_mu, prior_logvar, seed);
  auto opts = mu.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor z = at::empty(mu.sizes(), opts);
  at::Tensor kl = at::empty(mu.sizes().slice(0, mu.dim() - 1), opts);
  if (mu.numel() == 0) {
    kl.zero_();  // D == 0: an empty sum; otherwise kl is empty too
    return {z, kl};
  }
  Args a = make_args(mu, logvar, eps, prior_mu, prior_logvar, seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_cpp_fwd", [&] {
    if (a.has_prior) fwd_kernel<scalar_t, true>(a, z, kl);
    else fwd_kernel<scalar_t, false>(a, z, kl);
  });
  return {z, kl};
}

// --- backward ---------------------------------------------------------------------------
template <typename scalar_t, bool kPrior>
void bwd_kernel(const Args& a, const at::Tensor& grad_z, const at::Tensor& grad_kl, std::array<at::Tensor, 4>& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gzp = grad_z.data_ptr<scalar_t>();
  const acc_t* gklp = grad_kl.data_ptr<acc_t>();
  scalar_t* outp[4];
  for (int i = 0; i < 4; ++i) outp[i] = kPrior || i < 2 ? g[i].data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, a.rows, grain_rows(a.D), [&](int64_t r0, int64_t r1) {
    Staging<acc_t> st;
    for_each_span(r0, r1, a.D, [&](int64_t row, int64_t nrows, int64_t col, int64_t ncols) {
      int64_t first = row * a.D + col, n = nrows * ncols, prior_step;
      Piece<acc_t> p = load_piece<scalar_t>(a, first, nrows, col, ncols, st, prior_step);
      const acc_t* gz = load_as(gzp + first, n, st.gz);
      acc_t* out[4];
      for (int i = 0; i < 4; ++i) out[i] = outp[i] ? out_as(outp[i] + first, st.out[i]) : nullptr;
      for (int64_t r = 0; r < nrows; ++r) {
        int64_t o = r * ncols;
        Grads<acc_t> gr{out[0] + o, out[1] + o, kPrior ? out[2] + o : nullptr, kPrior ? out[3] + o : nullptr};
        bwd_piece<acc_t, kPrior>(ncols, gklp[row + r], gz + o, advance(p, o, r * prior_step), gr);
      }
      for (int i = 0; i < 4; ++i)
        if (outp[i]) store_as(outp[i] + first, n, out[i]);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reparam_kl_bwd(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu, const at::Tensor& logvar,
    const c10::optional<at::Tensor>& eps, const c10::optional<at::Tensor>& prior_mu,
    const c10::optional<at::Tensor>& prior_logvar, const c10::optional<at::Tensor>& seed) {
  check_args(mu, logvar, eps, prior_mu, prior_logvar, seed);
  check_cpu(grad_z, "grad_z");
  check_same(grad_z, mu, "grad_z", "mu");
  check_cpu(grad_kl, "grad_kl");
  GENKERN_CHECK_TYPE(grad_kl.scalar_type() == mu.scalar_type(), "grad_kl has dtype ", grad_kl.scalar_type(),
                     " but mu has ", mu.scalar_type());
  auto kl_shape = mu.sizes().slice(0, mu.dim() - 1);
  GENKERN_CHECK_VALUE(grad_kl.sizes() == kl_shape, "grad_kl has shape ", grad_kl.sizes(), " but kl has shape ",
                      kl_shape);
  bool has_prior = prior_mu.has_value();
  auto opts = mu.options().memory_format(at::MemoryFormat::Contiguous);
  std::array<at::Tensor, 4> g;
  for (int i = 0; i < 4; ++i) g[i] = (i < 2 || has_prior) ? at::empty(mu.sizes(), opts) : at::empty({0}, opts);
  if (mu.numel() == 0) return {g[0], g[1], g[2], g[3]};
  Args a = make_args(mu, logvar, eps, prior_mu, prior_logvar, seed);
  at::Tensor gz = grad_z.contiguous();
  auto acc = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gkl = grad_kl.to(acc).contiguous();  // (rows,): widened once
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_cpp_bwd", [&] {
    if (has_prior) bwd_kernel<scalar_t, true>(a, gz, gkl, g);
    else bwd_kernel<scalar_t, false>(a, gz, gkl, g);
  });
  return {g[0], g[1], g[2], g[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CPU, m) {
  m.impl("reparam_kl_cpp_fwd", &reparam_kl_fwd);
  m.impl("reparam_kl_cpp_bwd", &reparam_kl_bwd);
}

}  // namespace genkern::rkl
