// Internals of the CPU attention kernels (overview in attention.cpp), shared by
// attention.cpp (checks, entry points), attention_fwd.cpp and attention_bwd.cpp: block
// sizes, the BLAS tile products, the problem and the kernels' entry points.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

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

// C (bq x D, ld D) = alpha A X + beta C, X the key rows [j0, j0 + bk) of head kvh of m, A
// (bq x bk, ld bk) zero past each row's visible keys (queries i0 .. i0 + bq - 1). A key a
// row does not see may hold anything (padding, garbage), and 0 * inf or NaN is NaN: BLAS
// multiplies every column, so where the partly visible columns of a diagonal tile hold a
// non-finite value, each row takes only its visible ones. The scan costs ~1/bq of the product.
template <typename T>
void masked_ab(const Problem<T>& P, const Mat<const T>& m, int64_t b, int64_t kvh, int64_t i0, int64_t bq, int64_t j0,
               int64_t bk, T alpha, const T* a, T beta, T* c) {
  const int64_t D = P.D, common = std::clamp<int64_t>(P.key_end(i0) - j0, 0, bk);  // seen by every row
  if (common == bk || rows_finite(m, b, kvh, j0 + common, bk - common, D)) {
    gemm_ab<T>(bq, D, bk, alpha, a, bk, m.row(b, kvh, j0), m.sl, beta, c, D);
    return;
  }
  if (common > 0) gemm_ab<T>(bq, D, common, alpha, a, bk, m.row(b, kvh, j0), m.sl, beta, c, D);
  else if (beta == T(0)) std::fill(c, c + bq * D, T(0));
  for (int64_t r = 0; r < bq; ++r) {
    T* cr = c + r * D;
    const int64_t lim = std::clamp<int64_t>(P.key_end(i0 + r) - j0, 0, bk);
    for (int64_t j = common; j < lim; ++j) {
      const T w = alpha * a[r * bk + j];
      const T* x = m.row(b, kvh, j0 + j);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) cr[d] += w * x[d];
    }
  }
}

// Spreads the causal triangle's uneven blocks over at::parallel_for's contiguous
// chunks: block order 0, n-1, 1, n-2, ... pairs a short block with a long one.
inline int64_t zigzag(int64_t u, int64_t n) { return (u & 1) ? n - 1 - (u >> 1) : (u >> 1); }

// Inputs and accumulators of the backward.
template <typename T>
struct Grads {
  Mat<const T> dout;
  const T* lse;     // (B, H, T)
  const T* delta;   // (B, H, T)
  T *dq, *dk, *dv;  // contiguous accumulators, zero-initialised
};

// Forward into out (contiguous (B, H, T, D); nullptr: lse only) and lse (B, H, T).
template <typename T, typename L>
void fwd_kernel(const Problem<T>& P, T* out, L* lse);

// dQ, dK, dV of g from lse and delta (see delta_kernel).
template <typename T>
void bwd_kernel(const Problem<T>& P, const Grads<T>& g);

// delta_i = rowsum(dO_i * O_i) - grad_lse_i, in the accumulation type.
template <typename T>
void delta_kernel(const Problem<T>& P, const Mat<const T>& dout, const Mat<const T>& out, const float* grad_lse,
                  T* delta);

}  // namespace genkern::attn
