// Packing and entry points of the bfloat16/float16 attention on the matrix instructions
// (see attention_lowp.h).
#include "attention_lowp.h"

#include <ATen/native/CPUBlas.h>

#include <cstdlib>
#include <cstring>

namespace genkern::attn::lowp {

bool usable(at::ScalarType dt, int64_t D) {
  const char* env = std::getenv("GENKERN_ATTN_LOWP");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  return D % 2 == 0 && at::native::cpublas::could_pack(dt);
}

namespace {

// 1 when the n rows from r of head (b, h) are finite (x * 0 is 0 only for finite x).
template <typename T>
bool rows_finite_lp(const Mat<const T>& m, int64_t b, int64_t h, int64_t r, int64_t n, int64_t D) {
  float acc = 0;
  for (int64_t j = r; j < r + n; ++j) {
    const T* x = m.row(b, h, j);
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) acc += static_cast<float>(x[d]) * 0.f;
  }
  return acc == 0.f;
}

// The 64-row panel c of head (b, h): T-pack (D x 64, rows transposed) and N-pack (64 x 64
// per column panel), zero beyond the rows and columns.
template <typename T>
void pack_panel(const Mat<const T>& m, Packed<T>& pk, int64_t L, int64_t b, int64_t h, int64_t c, T* stage) {
  const auto dt = c10::CppTypeToScalarType<T>::value;
  const int64_t D = pk.D, r0 = c * kPanel, n = std::min(kPanel, L - r0);
  if (pk.has_t) {
    std::fill(stage, stage + D * kPanel, T(0));
    for (int64_t j = 0; j < n; ++j) {
      const T* x = m.row(b, h, r0 + j);
      for (int64_t d = 0; d < D; ++d) stage[d * kPanel + j] = x[d];
    }
    at::native::cpublas::pack(D, kPanel, kPanel, kPanel, dt, dt, stage, const_cast<T*>(pk.tpanel(b, h, c)));
  }
  if (!pk.has_n) return;
  for (int64_t dc = 0; dc < pk.Dp / kPanel; ++dc) {
    const int64_t d0 = dc * kPanel, w = std::min(kPanel, D - d0);
    std::fill(stage, stage + kPanel * kPanel, T(0));
    for (int64_t j = 0; j < n; ++j)
      std::copy(m.row(b, h, r0 + j) + d0, m.row(b, h, r0 + j) + d0 + w, stage + j * kPanel);
    at::native::cpublas::pack(kPanel, kPanel, kPanel, kPanel, dt, dt, stage, const_cast<T*>(pk.npanel(b, h, dc, r0)));
  }
}

}  // namespace

template <typename T>
Packed<T> pack_rows(const Mat<const T>& m, int64_t B, int64_t Hx, int64_t L, int64_t D, bool t_pack, bool n_pack) {
  Packed<T> pk;
  pk.Hx = Hx, pk.Lp = ceil_div(L, kPanel) * kPanel, pk.D = D, pk.Dp = ceil_div(D, kPanel) * kPanel;
  pk.has_t = t_pack, pk.has_n = n_pack;
  pk.buf = at::empty({B * Hx * pk.per_head()}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  const int64_t np = pk.Lp / kPanel;
  pk.finite.assign(B * Hx * np, 1);
  at::parallel_for(0, B * Hx * np, 1, [&](int64_t u0, int64_t u1) {
    std::vector<T> stage(std::max(D, kPanel) * kPanel);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / np / Hx, h = u / np % Hx, c = u % np;
      pk.finite[u] = rows_finite_lp(m, b, h, c * kPanel, std::min(kPanel, L - c * kPanel), D);
      pack_panel(m, pk, L, b, h, c, stage.data());
    }
  });
  return pk;
}

template Packed<at::BFloat16> pack_rows(const Mat<const at::BFloat16>&, int64_t, int64_t, int64_t, int64_t, bool, bool);
template Packed<at::Half> pack_rows(const Mat<const at::Half>&, int64_t, int64_t, int64_t, int64_t, bool, bool);

namespace {

Problem<float> spans_problem(const at::Tensor& q, const at::Tensor& k, double scale, const Visibility& vis) {
  Problem<float> P;
  P.B = q.size(0), P.H = q.size(1), P.T = q.size(2), P.D = q.size(3);
  P.Hkv = k.size(1), P.S = k.size(2), P.G = P.H / P.Hkv;
  P.scale = static_cast<float>(scale);
  P.lo = vis.lo.data(), P.hi = vis.hi.data(), P.span_sb = vis.span_sb;
  if (!vis.cu_q.empty()) P.cu_q = vis.cu_q.data(), P.cu_k = vis.cu_k.data(), P.nseq = int64_t(vis.cu_q.size()) - 1;
  return P;
}

template <typename T>
void forward_as(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, const Visibility& vis,
                const at::Tensor& out, const at::Tensor& lse) {
  fwd_kernel<T>(spans_problem(q, k, scale, vis), mat<const T>(q), mat<const T>(k), mat<const T>(v), mat<T>(out),
                lse.data_ptr<float>());
}

template <typename T>
void backward_as(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_lse, double scale,
                 const Visibility& vis, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  BwdArgs<T> a;
  a.q = mat<const T>(q), a.k = mat<const T>(k), a.v = mat<const T>(v), a.dout = mat<const T>(dout);
  a.out = mat<const T>(out), a.lse = lse.data_ptr<float>();
  a.grad_lse = grad_lse.defined() ? grad_lse.data_ptr<float>() : nullptr;
  a.dq = mat<T>(dq), a.dk = mat<T>(dk), a.dv = mat<T>(dv);
  bwd_kernel<T>(spans_problem(q, k, scale, vis), a);
}

}  // namespace

void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, const Visibility& vis,
             const at::Tensor& out, const at::Tensor& lse) {
  if (q.scalar_type() == at::kBFloat16) forward_as<at::BFloat16>(q, k, v, scale, vis, out, lse);
  else forward_as<at::Half>(q, k, v, scale, vis, out, lse);
}

void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse, double scale,
              const Visibility& vis, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  const at::Tensor gl = grad_lse.has_value() ? grad_lse->contiguous() : at::Tensor();
  if (q.scalar_type() == at::kBFloat16) backward_as<at::BFloat16>(dout, q, k, v, out, lse, gl, scale, vis, dq, dk, dv);
  else backward_as<at::Half>(dout, q, k, v, out, lse, gl, scale, vis, dq, dk, dv);
}

}  // namespace genkern::attn::lowp
