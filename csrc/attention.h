// Internals of the CPU attention kernels (overview in attention.cpp), shared by
// attention.cpp (checks, entry points), attention_fwd.cpp and attention_bwd.cpp: block
// sizes, the BLAS tile products, the problem and the kernels' entry points.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"

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

namespace genkern::attn {

// Block sizes (queries x keys per tile), tuned at D = 64 on AVX-512: tall tiles pack and
// stream each K/V block fewer times (a 256 x 512 score tile, 512 KiB in float32, stays in
// L2); short ones waste less of the causal diagonal. The forward shrinks its query block
// when there would be too few tasks to balance the threads (see fwd_rows).
constexpr int64_t kFwdBq = 256, kFwdBk = 512;
constexpr int64_t kBwdBq = 128, kBwdBk = 128;

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
void gemm_abt(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
              int64_t ldc) {
  col_gemm<T>(true, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// Row-major C (m x n) = alpha * A (m x k) B (k x n) + beta * C
template <typename T>
void gemm_ab(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
             int64_t ldc) {
  col_gemm<T>(false, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// Row-major C (m x n) = alpha * A^T (A is k x m) B (k x n) + beta * C
template <typename T>
void gemm_atb(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
              int64_t ldc) {
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
inline at::Tensor as_rows(const at::Tensor& t) {
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

// Which keys each query row sees: one span [lo, hi) per row (hi <= lo: none), from causal
// and the window in closed form, intersected with the caller's key spans (attention.cpp).
template <typename F>
struct Problem {
  int64_t B, H, Hkv, G, T, S, D;  // packed sequences: B = 1, T = total_q, S = total_k
  F scale;
  Mat<const F> q, k, v;
  const int64_t *lo, *hi;  // row i of batch b: entry b * span_sb + i
  int64_t span_sb;         // 0 when the spans do not depend on the batch
  // Packed sequences: sequence s holds the query rows [cu_q[s], cu_q[s + 1]) and keys [cu_k[s],
  // cu_k[s + 1]) of batch 0. Dense (cu_q == nullptr): batch b is one sequence of T rows, S keys.
  const int64_t *cu_q = nullptr, *cu_k = nullptr;
  int64_t nseq = 0;
  int64_t row_lo(int64_t b, int64_t i) const { return lo[b * span_sb + i]; }
  int64_t row_hi(int64_t b, int64_t i) const { return hi[b * span_sb + i]; }
  int64_t sequences() const { return cu_q != nullptr ? nseq : B; }
};

// Rows [i0, i0 + n) of batch b, all of one sequence (seq), and the hull [lo, hi) of the
// spans of those of its rows that see a key (lo >= hi: none does); a block of keys alike.
struct Block {
  int64_t b, seq, i0, n, lo, hi;
};

// Blocks of at most `rows` query rows (keys: `rows` keys) that never cross a sequence's
// end, in order; first[s] .. first[s + 1] - 1 index sequence s's blocks.
struct Tiling {
  std::vector<Block> blk;
  std::vector<int64_t> first;
};

template <typename F>
Tiling tile_queries(const Problem<F>& P, int64_t rows) {
  Tiling t;
  const int64_t ns = P.sequences();
  for (int64_t s = 0; s < ns; ++s) {
    t.first.push_back(int64_t(t.blk.size()));
    const int64_t b = P.cu_q ? 0 : s, r0 = P.cu_q ? P.cu_q[s] : 0, r1 = P.cu_q ? P.cu_q[s + 1] : P.T;
    for (int64_t i0 = r0; i0 < r1; i0 += rows) {
      Block k{b, s, i0, std::min(rows, r1 - i0), INT64_MAX, INT64_MIN};
      for (int64_t i = i0; i < i0 + k.n; ++i) {
        const int64_t lo = P.row_lo(b, i), hi = P.row_hi(b, i);
        if (lo < hi) k.lo = std::min(k.lo, lo), k.hi = std::max(k.hi, hi);
      }
      t.blk.push_back(k);
    }
  }
  t.first.push_back(int64_t(t.blk.size()));
  return t;
}

template <typename F>
Tiling tile_keys(const Problem<F>& P, int64_t cols) {
  Tiling t;
  const int64_t ns = P.sequences();
  for (int64_t s = 0; s < ns; ++s) {
    t.first.push_back(int64_t(t.blk.size()));
    const int64_t b = P.cu_k ? 0 : s, j1 = P.cu_k ? P.cu_k[s + 1] : P.S;
    for (int64_t j0 = P.cu_k ? P.cu_k[s] : 0; j0 < j1; j0 += cols) {
      const int64_t n = std::min(cols, j1 - j0);
      t.blk.push_back(Block{b, s, j0, n, j0, j0 + n});
    }
  }
  t.first.push_back(int64_t(t.blk.size()));
  return t;
}

// Query rows per forward task (float32 and bfloat16 forwards): the largest of 256, 128, .. 32 that still gives every
// thread several tasks, so that the causal blocks' unequal costs even out.
template <typename T>
int64_t fwd_rows(const Problem<T>& P) {
  auto blocks = [&](int64_t bq) {
    if (P.cu_q == nullptr) return P.B * ceil_div(P.T, bq);
    int64_t n = 0;
    for (int64_t s = 0; s < P.nseq; ++s) n += ceil_div(P.cu_q[s + 1] - P.cu_q[s], bq);
    return n;
  };
  int64_t bq = kFwdBq;
  while (bq > 32 && P.H * blocks(bq) < 4 * at::get_num_threads()) bq /= 2;
  return bq;
}

// True when rows [j0, j0 + n) of head h of m are finite: x * 0 is 0 for finite x and NaN
// for inf or NaN (not folded away: no -ffast-math), one vectorised multiply-add per value.
template <typename T>
bool rows_finite(const Mat<const T>& m, int64_t b, int64_t h, int64_t j0, int64_t n, int64_t D) {
  T acc = 0;
  for (int64_t j = j0; j < j0 + n; ++j) {
    const T* r = m.row(b, h, j);
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) acc += r[d] * T(0);
  }
  return acc == T(0);
}

// C (bq x D, ld ldc) = alpha A X + beta C, X the key rows [j0, j0 + bk) of head kvh of m, A
// (bq x bk, ld lda, bk when lda = 0) zero outside each row's span (queries i0 .. i0 + bq - 1). A key a row
// does not see may hold anything (padding, garbage), and 0 * inf or NaN is NaN: BLAS
// multiplies every column, so where the columns some row does not see hold a non-finite
// value, the product takes only the columns every row sees and each row adds its other
// visible ones. The scan costs ~1/bq of the product.
template <typename T>
void masked_ab(const Problem<T>& P, const Mat<const T>& m, int64_t b, int64_t kvh, int64_t i0, int64_t bq, int64_t j0,
               int64_t bk, T alpha, const T* a, T beta, T* c, int64_t ldc, int64_t lda = 0) {
  const int64_t D = P.D;
  if (lda == 0) lda = bk;
  int64_t c0 = 0, c1 = bk;  // columns seen by every row (c0 >= c1: none)
  for (int64_t r = 0; r < bq; ++r) {
    c0 = std::max(c0, P.row_lo(b, i0 + r) - j0);
    c1 = std::min(c1, P.row_hi(b, i0 + r) - j0);
  }
  c0 = std::min(c0, bk), c1 = std::max(c1, c0);
  const bool finite = rows_finite(m, b, kvh, j0, c0, D) && rows_finite(m, b, kvh, j0 + c1, bk - c1, D);
  if ((c0 == 0 && c1 == bk) || finite) {
    gemm_ab<T>(bq, D, bk, alpha, a, lda, m.row(b, kvh, j0), m.sl, beta, c, ldc);
    return;
  }
  if (c1 > c0) gemm_ab<T>(bq, D, c1 - c0, alpha, a + c0, lda, m.row(b, kvh, j0 + c0), m.sl, beta, c, ldc);
  else if (beta == T(0))
    for (int64_t r = 0; r < bq; ++r) std::fill(c + r * ldc, c + r * ldc + D, T(0));
  auto add = [&](T* cr, const T* ar, int64_t from, int64_t to) {
    for (int64_t j = from; j < to; ++j) {
      const T w = alpha * ar[j];
      const T* x = m.row(b, kvh, j0 + j);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) cr[d] += w * x[d];
    }
  };
  for (int64_t r = 0; r < bq; ++r) {
    const int64_t lo = std::clamp<int64_t>(P.row_lo(b, i0 + r) - j0, 0, bk);
    const int64_t hi = std::clamp<int64_t>(P.row_hi(b, i0 + r) - j0, 0, bk);
    add(c + r * ldc, a + r * lda, lo, std::min(hi, c0));  // the columns left and right of the product's
    add(c + r * ldc, a + r * lda, std::max(lo, c1), hi);
  }
}

// Spreads the causal triangle's uneven blocks over at::parallel_for's contiguous
// chunks: block order 0, n-1, 1, n-2, ... pairs a short block with a long one.
inline int64_t zigzag(int64_t u, int64_t n) { return (u & 1) ? n - 1 - (u >> 1) : (u >> 1); }

// Inputs and accumulators of the backward.
template <typename T>
struct Grads {
  Mat<const T> dout;
  const T* lse;       // (B, H, T)
  const T* delta;     // (B, H, T)
  Mat<T> dq, dk, dv;  // accumulators, zero-initialised, laid out like q, k, v
};

// Forward into out (laid out like q; out.p == nullptr: lse only) and lse (B, H, T).
template <typename T, typename L>
void fwd_kernel(const Problem<T>& P, const Mat<T>& out, L* lse);

// dQ, dK, dV of g from lse and delta (see delta_kernel).
template <typename T>
void bwd_kernel(const Problem<T>& P, const Grads<T>& g);

// delta_i = rowsum(dO_i * O_i) - grad_lse_i, in the accumulation type.
template <typename T>
void delta_kernel(const Problem<T>& P, const Mat<const T>& dout, const Mat<const T>& out, const float* grad_lse,
                  T* delta);

// The keys [lo, hi) query i of a problem of T queries and S keys sees under causal and the
// window (-1: no limit on that side; causal means right = 0), clamped to [0, S]; hi <= lo: none.
inline std::pair<int64_t, int64_t> window_span(int64_t i, int64_t T, int64_t S, bool causal, int64_t left,
                                               int64_t right) {
  const int64_t diag = i + S - T;  // the key aligned with query i (bottom-right)
  if (causal) right = 0;
  const int64_t lo = left >= 0 ? std::clamp<int64_t>(diag - left, 0, S) : 0;
  const int64_t hi = right >= 0 ? std::clamp<int64_t>(diag + right + 1, 0, S) : S;
  return {lo, std::max(hi, lo)};
}

// The spans of every row (Problem::lo/hi) and, for packed sequences, the sequences'
// bounds, owned for as long as the kernels run.
struct Visibility {
  std::vector<int64_t> lo, hi, cu_q, cu_k;  // cu_q, cu_k empty: dense
  int64_t span_sb = 0;
};

// out (laid out like q, 4-d views (B, H, T, D)) and lse (B, H, T) float32 of a float32 or
// float64 problem.
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, const Visibility& vis,
             const at::Tensor& out, const at::Tensor& lse);

// dq, dk, dv (zero-initialised, laid out like q, k, v) of a float32 or float64 problem.
void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse, double scale,
              const Visibility& vis, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv);

}  // namespace genkern::attn
