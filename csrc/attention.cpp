// CPU kernels of attention: out = softmax(scale * q k^T [causal mask]) v, flash-attention
// style (FlashAttention-2): the (T, S) score matrix never exists, only tiles of it.
//
// Forward, per (batch, head, query block): walk the visible key blocks keeping a running
// row max m, a running row sum l and an output accumulator rescaled by exp(m_old - m_new)
// whenever m grows; lse = m + log l, out = acc / l.
//
// Backward, from lse (P is recomputed, never stored), with delta_i = rowsum(dO_i O_i) - grad_lse_i:
//   P = exp(scale q k^T - lse), dV = P^T dO, dP = dO V^T, dS = P (dP - delta),
//   dQ = scale dS K, dK = scale dS^T Q.
// A key block's dK/dV sums over every query head of its KV group, so each is owned by
// one task: either a task per (batch, kv head) that also owns those query heads' dQ
// (five GEMMs per tile, race-free), or, when there are too few (batch, kv head) pairs to
// keep the threads busy, a dK/dV pass per (batch, kv head, key block) and a dQ pass per
// (batch, head, query block) (seven GEMMs per tile, but all threads busy).
//
// Causal alignment is bottom-right: query i sees keys j < i + 1 + S - T. Tiles fully
// above the diagonal are skipped, tiles on it are trimmed to the last visible key/first
// seeing query and masked row by row.
//
// Tile products run on the BLAS behind at::native::cpublas::gemm (column-major). A row-major
// (r x c, ld) matrix is the column-major (c x r, ld) matrix, so row-major C = A B is
// computed as column-major C^T = B^T A^T: the operands swap and keep their flags.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"

namespace genkern {
namespace {

// Block sizes (queries x keys per tile), tuned at D = 64 on AVX-512: tall tiles pack and
// stream each K/V block fewer times (a 256 x 512 score tile, 512 KiB in float32, stays in
// L2); short ones waste less of the causal diagonal. The forward shrinks its query block
// when there would be too few tasks to balance the threads (see fwd_rows).
constexpr int64_t kFwdBq = 256, kFwdBk = 512;
constexpr int64_t kBwdBq = 128, kBwdBk = 128;

GENKERN_INLINE float exp_(float x) { return exp_f32(x); }
GENKERN_INLINE double exp_(double x) { return std::exp(x); }

// --- row kernels of a score tile (n visible entries of one row) -------------------------
// Plain loops: GCC vectorises them (exp_f32 inlined) to AVX-512 / AVX2 as built.
template <typename T>
T row_max(const T* s, int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t c = 0; c < n; ++c) mx = s[c] > mx ? s[c] : mx;
  return mx;
}

// s <- exp(s - m); returns the sum.
template <typename T>
T row_exp_sum(T* s, int64_t n, T m) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    T e = exp_(s[c] - m);
    s[c] = e;
    sum += e;
  }
  return sum;
}

// p <- exp(p - lse), ds <- p (ds - delta): P and dS from the scores and dP.
template <typename T>
void row_p_ds(T* p, T* ds, int64_t n, T lse, T delta) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    T e = exp_(p[c] - lse);
    p[c] = e;
    ds[c] = e * (ds[c] - delta);
  }
}


// Column-major BLAS C (m x n) = alpha op(A) op(B) + beta C. The float/double
// overloads of at::native::cpublas::gemm are not exported from libtorch, so this calls
// the BLAS they wrap (sgemm_/dgemm_, MKL's in the x86 wheels, exported by libtorch_cpu).
// Weak references: on a build without them the pointer reads null and addmm_ on views
// takes over, instead of the extension failing to load. LP64 (32-bit ints), as ATen
// declares them.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

template <typename T>
void col_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
              int64_t ldb, T beta, T* c, int64_t ldc) {
  auto* fn = [] {
    if constexpr (std::is_same_v<T, float>) return &sgemm_;
    else return &dgemm_;
  }();
  if (fn != nullptr) {
    const char cta = ta ? 'T' : 'N', ctb = tb ? 'T' : 'N';
    const int im = int(m), in = int(n), ik = int(k), ia = int(lda), ib = int(ldb), ic = int(ldc);
    fn(&cta, &ctb, &im, &in, &ik, &alpha, a, &ia, b, &ib, &beta, c, &ic);
    return;
  }
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool t) {  // op() of a column-major matrix
    auto x = at::from_blob(const_cast<T*>(p), {t ? cols : rows, t ? rows : cols}, {1, ld}, opts);
    return t ? x.t() : x;
  };
  view(c, m, n, ldc, false).addmm_(view(a, m, k, lda, ta), view(b, k, n, ldb, tb), beta, alpha);
}

// Row-major C (m x n) = alpha * A (m x k) B^T (n x k) + beta * C
template <typename T>
void gemm_abt(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta,
              T* c, int64_t ldc) {
  col_gemm<T>(true, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// Row-major C (m x n) = alpha * A (m x k) B (k x n) + beta * C
template <typename T>
void gemm_ab(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta,
             T* c, int64_t ldc) {
  col_gemm<T>(false, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// Row-major C (m x n) = alpha * A^T (A is k x m) B (k x n) + beta * C
template <typename T>
void gemm_atb(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta,
              T* c, int64_t ldc) {
  col_gemm<T>(false, true, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// A (B, H, L, D) tensor with unit stride along D: rows are addressed by stride.
template <typename T>
struct Mat {
  T* p = nullptr;
  int64_t sb = 0, sh = 0, sl = 0;
  T* row(int64_t b, int64_t h, int64_t i) const { return p + b * sb + h * sh + i * sl; }
};

// Makes t usable as BLAS rows: unit stride along D, non-overlapping rows, a row stride
// that fits BLAS' int. Anything else (a transpose of D, an expand over L) is copied;
// strided rows are not.
at::Tensor as_rows(const at::Tensor& t) {
  int64_t L = t.size(2), D = t.size(3);
  bool ok = (t.stride(3) == 1 || D == 1) && (L == 1 || (t.stride(2) >= D && t.stride(2) <= INT32_MAX));
  return ok ? t : t.contiguous();
}

template <typename T>
Mat<T> mat(const at::Tensor& t) {
  Mat<T> m;
  m.p = static_cast<T*>(t.data_ptr());
  m.sb = t.stride(0);
  m.sh = t.stride(1);
  m.sl = t.size(2) == 1 ? t.size(3) : t.stride(2);  // a single row: BLAS wants ld >= D
  return m;
}

template <typename F>
struct Problem {
  int64_t B, H, Hkv, G, T, S, D;
  bool causal;
  F scale;
  Mat<const F> q, k, v;
  // Keys [0, key_end(i)) are visible to query i.
  int64_t key_end(int64_t i) const { return causal ? std::clamp<int64_t>(i + 1 + S - T, 0, S) : S; }
  // First query that sees key j.
  int64_t first_query(int64_t j) const { return causal ? std::clamp<int64_t>(j - (S - T), 0, T) : 0; }
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Spreads the causal triangle's uneven blocks over at::parallel_for's contiguous
// chunks: block order 0, n-1, 1, n-2, ... pairs a short block with a long one.
int64_t zigzag(int64_t u, int64_t n) { return (u & 1) ? n - 1 - (u >> 1) : (u >> 1); }

// --- forward --------------------------------------------------------------------------
// Queries [i0, i0 + bq) of head h: out rows into o (ld D) and lse. With o == nullptr only
// lse (the backward's float64 lse, see run_bwd).
template <typename T, typename L>
void fwd_block(const Problem<T>& P, int64_t b, int64_t h, int64_t i0, int64_t bq, T* o, L* lse, T* s, T* m,
               T* l) {
  const int64_t D = P.D, kvh = h / P.G;
  const T* q = P.q.row(b, h, i0);
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t kend = P.key_end(i0 + bq - 1);
  for (int64_t r = 0; r < bq; ++r) m[r] = ninf, l[r] = 0;
  for (int64_t j0 = 0; j0 < kend; j0 += kFwdBk) {
    const int64_t bk = std::min(kFwdBk, kend - j0);
    gemm_abt<T>(bq, bk, D, P.scale, q, P.q.sl, P.k.row(b, kvh, j0), P.k.sl, T(0), s, bk);
    for (int64_t r = 0; r < bq; ++r) {
      T* sr = s + r * bk;
      const int64_t lim = std::clamp<int64_t>(P.key_end(i0 + r) - j0, 0, bk);
      const T mx = row_max(sr, lim);
      const T mnew = mx > m[r] ? mx : m[r];
      const T sum = lim > 0 ? row_exp_sum(sr, lim, mnew) : T(0);
      for (int64_t c = lim; c < bk; ++c) sr[c] = 0;
      // A row that saw no key yet keeps m = -inf (and an all-zero accumulator): no
      // rescale, which would compute exp(-inf + inf).
      if (mnew != m[r]) {
        const T alpha = exp_(m[r] - mnew);
        l[r] *= alpha;
        if (o != nullptr && j0 > 0) {  // the accumulator holds sums against the old max
          T* orow = o + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) orow[d] *= alpha;
        }
      }
      l[r] += sum;
      m[r] = mnew;
    }
    if (o != nullptr) gemm_ab<T>(bq, D, bk, T(1), s, bk, P.v.row(b, kvh, j0), P.v.sl, T(j0 > 0 ? 1 : 0), o, D);
  }
  for (int64_t r = 0; r < bq; ++r) {
    const bool empty = l[r] == T(0);  // the row sees no key (a NaN in l propagates instead)
    lse[r] = empty ? -std::numeric_limits<L>::infinity() : static_cast<L>(m[r] + std::log(l[r]));
    if (o == nullptr) continue;
    T* orow = o + r * D;
    const T inv = T(1) / l[r];
    if (empty) std::fill(orow, orow + D, T(0));  // unwritten when no key block was visible
    else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) orow[d] *= inv;
    }
  }
}

// Query rows per forward task: the largest of 256, 128, .. 32 that still gives every
// thread several tasks, so that the causal blocks' unequal costs even out.
int64_t fwd_rows(int64_t BH, int64_t T) {
  int64_t bq = kFwdBq;
  while (bq > 32 && BH * ceil_div(T, bq) < 4 * at::get_num_threads()) bq /= 2;
  return bq;
}

template <typename T, typename L>
void fwd_kernel(const Problem<T>& P, T* out, L* lse) {
  const int64_t rows = fwd_rows(P.B * P.H, P.T), nqb = ceil_div(P.T, rows);
  at::parallel_for(0, P.B * P.H * nqb, 1, [&](int64_t u0, int64_t u1) {
    std::vector<T> s(rows * kFwdBk), m(rows), l(rows);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bh = u / nqb, i0 = zigzag(u % nqb, nqb) * rows;
      const int64_t b = bh / P.H, h = bh % P.H, bq = std::min(rows, P.T - i0);
      T* o = out != nullptr ? out + (bh * P.T + i0) * P.D : nullptr;
      fwd_block(P, b, h, i0, bq, o, lse + bh * P.T + i0, s.data(), m.data(), l.data());
    }
  });
}

// --- backward -------------------------------------------------------------------------
template <typename T>
struct Grads {
  Mat<const T> dout;
  const T* lse;      // (B, H, T)
  const T* delta;    // (B, H, T)
  T *dq, *dk, *dv;   // contiguous accumulators, zero-initialised
};

// One tile: queries [i0, i0 + bq) of head h against keys [j0, j0 + bk). Recomputes P and
// dS in p and ds (bq x bk) and adds the tile's share to dK/dV and/or dQ.
template <typename T>
void bwd_tile(const Problem<T>& P, const Grads<T>& g, int64_t b, int64_t h, int64_t i0, int64_t bq, int64_t j0,
              int64_t bk, T* p, T* ds, bool want_dkdv, bool want_dq) {
  const int64_t D = P.D, kvh = h / P.G, bh = b * P.H + h, bkv = b * P.Hkv + kvh;
  const T* q = P.q.row(b, h, i0);
  const T* k = P.k.row(b, kvh, j0);
  const T* dout = g.dout.row(b, h, i0);
  gemm_abt<T>(bq, bk, D, P.scale, q, P.q.sl, k, P.k.sl, T(0), p, bk);
  gemm_abt<T>(bq, bk, D, T(1), dout, g.dout.sl, P.v.row(b, kvh, j0), P.v.sl, T(0), ds, bk);
  const T* lse = g.lse + bh * P.T + i0;
  const T* delta = g.delta + bh * P.T + i0;
  for (int64_t r = 0; r < bq; ++r) {
    T* pr = p + r * bk;
    T* dsr = ds + r * bk;
    const int64_t lim = std::clamp<int64_t>(P.key_end(i0 + r) - j0, 0, bk);
    const T lr = lse[r], dr = delta[r];
    row_p_ds(pr, dsr, lim, lr, dr);
    for (int64_t c = lim; c < bk; ++c) pr[c] = 0, dsr[c] = 0;
  }
  if (want_dkdv) {
    gemm_atb<T>(bk, D, bq, T(1), p, bk, dout, g.dout.sl, T(1), g.dv + (bkv * P.S + j0) * D, D);
    gemm_atb<T>(bk, D, bq, P.scale, ds, bk, q, P.q.sl, T(1), g.dk + (bkv * P.S + j0) * D, D);
  }
  if (want_dq) gemm_ab<T>(bq, D, bk, P.scale, ds, bk, k, P.k.sl, T(1), g.dq + (bh * P.T + i0) * D, D);
}

// dK/dV of key blocks [jb0, jb1) of (b, kvh), over every query of its group; with
// want_dq also those queries' dQ (the caller owns the whole group then).
template <typename T>
void dkdv_blocks(const Problem<T>& P, const Grads<T>& g, int64_t b, int64_t kvh, int64_t jb0, int64_t jb1,
                 bool want_dq, T* p, T* ds) {
  for (int64_t jb = jb0; jb < jb1; ++jb) {
    const int64_t j0 = jb * kBwdBk, bk = std::min(kBwdBk, P.S - j0);
    for (int64_t h = kvh * P.G; h < (kvh + 1) * P.G; ++h)
      for (int64_t i0 = P.first_query(j0); i0 < P.T; i0 += kBwdBq)
        bwd_tile(P, g, b, h, i0, std::min(kBwdBq, P.T - i0), j0, bk, p, ds, true, want_dq);
  }
}

template <typename T>
void bwd_kernel(const Problem<T>& P, const Grads<T>& g) {
  const int64_t nkb = ceil_div(P.S, kBwdBk), nqb = ceil_div(P.T, kBwdBq), groups = P.B * P.Hkv;
  // (batch, kv head) tasks all cost the same: they balance when they divide evenly
  // over the threads or are plentiful.
  const int64_t nt = at::get_num_threads();
  const bool fused = groups % nt == 0 || groups >= 4 * nt;
  auto buffers = [] { return std::make_pair(std::vector<T>(kBwdBq * kBwdBk), std::vector<T>(kBwdBq * kBwdBk)); };
  if (fused) {
    at::parallel_for(0, groups, 1, [&](int64_t u0, int64_t u1) {
      auto [p, ds] = buffers();
      for (int64_t u = u0; u < u1; ++u) dkdv_blocks(P, g, u / P.Hkv, u % P.Hkv, 0, nkb, true, p.data(), ds.data());
    });
    return;
  }
  at::parallel_for(0, groups * nkb, 1, [&](int64_t u0, int64_t u1) {
    auto [p, ds] = buffers();
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bkv = u / nkb, jb = zigzag(u % nkb, nkb);
      dkdv_blocks(P, g, bkv / P.Hkv, bkv % P.Hkv, jb, jb + 1, false, p.data(), ds.data());
    }
  });
  at::parallel_for(0, P.B * P.H * nqb, 1, [&](int64_t u0, int64_t u1) {
    auto [p, ds] = buffers();
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bh = u / nqb, i0 = zigzag(u % nqb, nqb) * kBwdBq, bq = std::min(kBwdBq, P.T - i0);
      const int64_t kend = P.key_end(i0 + bq - 1);
      for (int64_t j0 = 0; j0 < kend; j0 += kBwdBk)
        bwd_tile(P, g, bh / P.H, bh % P.H, i0, bq, j0, std::min(kBwdBk, kend - j0), p.data(), ds.data(), false,
                 true);
    }
  });
}

// delta_i = rowsum(dO_i * O_i) - grad_lse_i, in the accumulation type.
template <typename T>
void delta_kernel(const Problem<T>& P, const Mat<const T>& dout, const Mat<const T>& out, const float* grad_lse,
                  T* delta) {
  at::parallel_for(0, P.B * P.H * P.T, 2048, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % P.T, bh = r / P.T;
      const T* a = dout.row(bh / P.H, bh % P.H, i);
      const T* o = out.row(bh / P.H, bh % P.H, i);
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < P.D; ++d) acc += a[d] * o[d];
      delta[r] = acc - (grad_lse ? static_cast<T>(grad_lse[r]) : T(0));
    }
  });
}

// --- arguments ------------------------------------------------------------------------
void check_4d(const at::Tensor& t, const char* name, const char* dims) {
  check_cpu(t, name);
  check_float(t, name);
  GENKERN_CHECK_VALUE(t.dim() == 4, name, " must be 4-d ", dims, ", got shape ", t.sizes());
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_4d(q, "q", "(B, H, T, D)");
  check_4d(k, "k", "(B, Hkv, S, D)");
  check_4d(v, "v", "(B, Hkv, S, D)");
  GENKERN_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "k has dtype ", k.scalar_type(), " but q has ",
                     q.scalar_type());
  check_same(v, k, "v", "k");
  const int64_t H = q.size(1), Hkv = k.size(1);
  GENKERN_CHECK_VALUE(k.size(0) == q.size(0) && k.size(3) == q.size(3), "k must be (B=", q.size(0),
                      ", Hkv, S, D=", q.size(3), ") to match q of shape ", q.sizes(), ", got ", k.sizes());
  GENKERN_CHECK_VALUE(Hkv > 0 ? H % Hkv == 0 : H == 0, "q's heads H=", H, " must be a multiple of k's heads Hkv=",
                      Hkv);
  GENKERN_CHECK_VALUE(q.size(3) >= 1 && q.size(3) <= INT32_MAX, "the head dim D must be in [1, 2^31), got q of shape ",
                      q.sizes());
}

void check_rows_f32(const at::Tensor& t, const at::Tensor& q, const char* name) {
  check_cpu(t, name);
  GENKERN_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  auto want = q.sizes().slice(0, 3);
  GENKERN_CHECK_VALUE(t.sizes() == want, name, " must have shape (B, H, T) = ", want, ", got ", t.sizes());
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale) {
  Problem<T> P;
  P.B = q.size(0), P.H = q.size(1), P.T = q.size(2), P.D = q.size(3);
  P.Hkv = k.size(1), P.S = k.size(2), P.G = P.H / P.Hkv;
  P.causal = causal;
  P.scale = static_cast<T>(scale);
  P.q = mat<const T>(q), P.k = mat<const T>(k), P.v = mat<const T>(v);
  return P;
}

bool is_low_precision(at::ScalarType s) { return s == at::kHalf || s == at::kBFloat16; }

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                 bool causal, double scale) {
  check_qkv(q_, k_, v_);
  const auto dt = q_.scalar_type();
  if (is_low_precision(dt)) {
    auto [o, lse] = attention_fwd(q_.to(at::kFloat), k_.to(at::kFloat), v_.to(at::kFloat), causal, scale);
    return {o.to(dt), lse};
  }
  auto opts = q_.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty(q_.sizes(), opts);
  at::Tensor lse = at::empty(q_.sizes().slice(0, 3), opts.dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  at::Tensor q = as_rows(q_), k = as_rows(k_), v = as_rows(v_);
  if (dt == at::kDouble) fwd_kernel(make_problem<double>(q, k, v, causal, scale), out.data_ptr<double>(),
                                    lse.data_ptr<float>());
  else fwd_kernel(make_problem<float>(q, k, v, causal, scale), out.data_ptr<float>(), lse.data_ptr<float>());
  return {out, lse};
}

template <typename T>
void run_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse, bool causal,
             double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  Problem<T> P = make_problem<T>(q, k, v, causal, scale);
  auto rows = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor delta = at::empty(lse.sizes(), rows);
  at::Tensor gl = grad_lse.has_value() ? grad_lse->contiguous() : at::Tensor();
  delta_kernel(P, mat<const T>(dout), mat<const T>(out), gl.defined() ? gl.data_ptr<float>() : nullptr,
               delta.data_ptr<T>());
  // float64 recomputes lse in float64 (one extra QK^T pass): the float32 lse would put
  // a ~1e-7 relative error into every gradient, far above float64's precision.
  at::Tensor lse_acc = lse;
  if constexpr (std::is_same_v<T, double>) {
    lse_acc = at::empty(lse.sizes(), rows);
    fwd_kernel<T, T>(P, nullptr, lse_acc.data_ptr<T>());
  }
  Grads<T> g{mat<const T>(dout), lse_acc.data_ptr<T>(), delta.data_ptr<T>(), dq.data_ptr<T>(), dk.data_ptr<T>(),
             dv.data_ptr<T>()};
  bwd_kernel(P, g);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& grad_out, const at::Tensor& q_,
                                                             const at::Tensor& k_, const at::Tensor& v_,
                                                             const at::Tensor& out_, const at::Tensor& lse_,
                                                             const c10::optional<at::Tensor>& grad_lse, bool causal,
                                                             double scale) {
  check_qkv(q_, k_, v_);
  check_cpu(grad_out, "grad_out");
  check_same(grad_out, q_, "grad_out", "q");
  check_cpu(out_, "out");
  check_same(out_, q_, "out", "q");
  check_rows_f32(lse_, q_, "lse");
  if (grad_lse.has_value()) check_rows_f32(*grad_lse, q_, "grad_lse");
  const auto dt = q_.scalar_type();
  if (is_low_precision(dt)) {
    auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
    auto [dq, dk, dv] = attention_bwd(f(grad_out), f(q_), f(k_), f(v_), f(out_), lse_, grad_lse, causal, scale);
    return {dq.to(dt), dk.to(dt), dv.to(dt)};
  }
  auto opts = q_.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::zeros(q_.sizes(), opts), dk = at::zeros(k_.sizes(), opts), dv = at::zeros(v_.sizes(), opts);
  if (dq.numel() == 0) return {dq, dk, dv};
  at::Tensor q = as_rows(q_), k = as_rows(k_), v = as_rows(v_), dout = as_rows(grad_out), out = as_rows(out_);
  at::Tensor lse = lse_.contiguous();
  if (dt == at::kDouble) run_bwd<double>(dout, q, k, v, out, lse, grad_lse, causal, scale, dq, dk, dv);
  else run_bwd<float>(dout, q, k, v, out, lse, grad_lse, causal, scale, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CPU, m) {
  m.impl("attention_cpp_fwd", &attention_fwd);
  m.impl("attention_cpp_bwd", &attention_bwd);
}

}  // namespace genkern
