// CPU kernels of attention: out = softmax(scale * q k^T [causal mask]) v, flash-attention
// style (FlashAttention-2): the (T, S) score matrix never exists, only tiles of it.
//
// Forward (attention_fwd.cpp): online softmax over key blocks, lse = m + log l. Backward
// (attention_bwd.cpp): from lse, recomputing P tile by tile.
//
// A key block's dK/dV sums over every query head of its KV group, so each is owned by
// one task: either a task per (batch, kv head) that also owns those query heads' dQ
// (five GEMMs per tile, race-free), or, when there are too few (batch, kv head) pairs to
// keep the threads busy, a dK/dV pass per (batch, kv head, key block) and a dQ pass per
// (batch, head, query block) (seven GEMMs per tile, but all threads busy).
//
// Every query row sees one span [lo, hi) of keys: causal (bottom-right: j < i + 1 + S - T)
// and the sliding window in closed form, intersected with the caller's key_lo/key_hi. Key
// blocks outside the hull of a query block's spans are skipped (and in the backward,
// query blocks that see none of a key block), the rest are masked row by row.
//
// Tile products run on the BLAS behind at::native::cpublas::gemm (column-major). A row-major
// (r x c, ld) matrix is the column-major (c x r, ld) matrix, so row-major C = A B is
// computed as column-major C^T = B^T A^T: the operands swap and keep their flags.
//
// Files: attention.h (tile products, the problem), attention_fwd.cpp, attention_bwd.cpp;
// attention_varlen.cpp (packed sequences); this file checks the arguments, builds the spans
// and registers the dense entry points.
#include "attention.h"

#include <tuple>

#include "attention_lowp.h"

namespace genkern::attn {
namespace {

// --- arguments ----------------------------------------------------------------------
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
  GENKERN_CHECK_VALUE(Hkv > 0 ? H % Hkv == 0 : H == 0, "q's heads H=", H, " must be a multiple of k's heads Hkv=", Hkv);
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
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                        const Visibility& vis) {
  Problem<T> P;
  P.B = q.size(0), P.H = q.size(1), P.T = q.size(2), P.D = q.size(3);
  P.Hkv = k.size(1), P.S = k.size(2), P.G = P.H / P.Hkv;
  P.scale = static_cast<T>(scale);
  P.q = mat<const T>(q), P.k = mat<const T>(k), P.v = mat<const T>(v);
  P.lo = vis.lo.data(), P.hi = vis.hi.data(), P.span_sb = vis.span_sb;
  if (!vis.cu_q.empty()) P.cu_q = vis.cu_q.data(), P.cu_k = vis.cu_k.data(), P.nseq = int64_t(vis.cu_q.size()) - 1;
  return P;
}

bool is_low_precision(at::ScalarType s) { return s == at::kHalf || s == at::kBFloat16; }

void check_spans(const at::Tensor& q, int64_t window_left, int64_t window_right, const c10::optional<at::Tensor>& lo,
                 const c10::optional<at::Tensor>& hi) {
  GENKERN_CHECK_VALUE(window_left >= -1, "window_left must be >= -1 (-1: no limit), got ", window_left);
  GENKERN_CHECK_VALUE(window_right >= -1, "window_right must be >= -1 (-1: no limit), got ", window_right);
  GENKERN_CHECK_VALUE(lo.has_value() == hi.has_value(), "key_lo and key_hi must be given together (or both None)");
  if (!lo.has_value()) return;
  auto want = q.sizes().slice(0, 1).vec();
  want.push_back(q.size(2));
  for (auto [t, name] : {std::pair{&*lo, "key_lo"}, std::pair{&*hi, "key_hi"}}) {
    check_cpu(*t, name);
    GENKERN_CHECK_TYPE(t->scalar_type() == at::kInt, name, " must be int32, got ", t->scalar_type());
    GENKERN_CHECK_VALUE(t->sizes() == at::IntArrayRef(want), name, " must have shape (B, T) = ", want, ", got ",
                        t->sizes());
  }
}

// Each row's span: causal and the window in closed form, within [key_lo, key_hi) when given.
Visibility dense_visibility(const at::Tensor& q, const at::Tensor& k, bool causal, int64_t window_left,
                            int64_t window_right, const c10::optional<at::Tensor>& key_lo,
                            const c10::optional<at::Tensor>& key_hi) {
  const int64_t B = q.size(0), T = q.size(2), S = k.size(2);
  Visibility vis;
  vis.span_sb = key_lo.has_value() ? T : 0;
  const int64_t rows = key_lo.has_value() ? B * T : T;
  vis.lo.resize(rows), vis.hi.resize(rows);
  at::Tensor lo_t = key_lo.has_value() ? key_lo->contiguous() : at::Tensor();
  at::Tensor hi_t = key_hi.has_value() ? key_hi->contiguous() : at::Tensor();
  for (int64_t r = 0; r < rows; ++r) {
    auto [lo, hi] = window_span(r % T, T, S, causal, window_left, window_right);
    if (lo_t.defined()) {
      lo = std::max<int64_t>(lo, std::clamp<int64_t>(lo_t.data_ptr<int32_t>()[r], 0, S));
      hi = std::min<int64_t>(hi, std::clamp<int64_t>(hi_t.data_ptr<int32_t>()[r], 0, S));
    }
    vis.lo[r] = lo, vis.hi[r] = std::max(hi, lo);
  }
  return vis;
}

}  // namespace

void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, const Visibility& vis,
             const at::Tensor& out, const at::Tensor& lse) {
  if (q.scalar_type() == at::kDouble)
    fwd_kernel(make_problem<double>(q, k, v, scale, vis), mat<double>(out), lse.data_ptr<float>());
  else if (is_low_precision(q.scalar_type())) lowp::forward(q, k, v, scale, vis, out, lse);
  else fwd_kernel(make_problem<float>(q, k, v, scale, vis), mat<float>(out), lse.data_ptr<float>());
}

namespace {

template <typename T>
void run_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse, double scale,
             const Visibility& vis, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  Problem<T> P = make_problem<T>(q, k, v, scale, vis);
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
    fwd_kernel<T, T>(P, Mat<T>{}, lse_acc.data_ptr<T>());
  }
  Grads<T> g;
  g.dout = mat<const T>(dout), g.lse = lse_acc.data_ptr<T>(), g.delta = delta.data_ptr<T>();
  g.dq = mat<T>(dq), g.dk = mat<T>(dk), g.dv = mat<T>(dv);
  bwd_kernel(P, g);
}

}  // namespace

void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse, double scale,
              const Visibility& vis, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  if (is_low_precision(q.scalar_type())) lowp::backward(dout, q, k, v, out, lse, grad_lse, scale, vis, dq, dk, dv);
  else if (q.scalar_type() == at::kDouble) run_bwd<double>(dout, q, k, v, out, lse, grad_lse, scale, vis, dq, dk, dv);
  else run_bwd<float>(dout, q, k, v, out, lse, grad_lse, scale, vis, dq, dk, dv);
}

namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                 bool causal, double scale, int64_t window_left, int64_t window_right,
                                                 const c10::optional<at::Tensor>& key_lo,
                                                 const c10::optional<at::Tensor>& key_hi) {
  check_qkv(q_, k_, v_);
  check_spans(q_, window_left, window_right, key_lo, key_hi);
  const auto dt = q_.scalar_type();
  if (is_low_precision(dt) && !lowp::usable(dt, q_.size(3))) {  // no matrix instructions: widen to float32
    auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
    auto [o, lse] = attention_fwd(f(q_), f(k_), f(v_), causal, scale, window_left, window_right, key_lo, key_hi);
    return {o.to(dt), lse};
  }
  auto opts = q_.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty(q_.sizes(), opts);
  at::Tensor lse = at::empty(q_.sizes().slice(0, 3), opts.dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const Visibility vis = dense_visibility(q_, k_, causal, window_left, window_right, key_lo, key_hi);
  forward(as_rows(q_), as_rows(k_), as_rows(v_), scale, vis, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& grad_out, const at::Tensor& q_,
                                                             const at::Tensor& k_, const at::Tensor& v_,
                                                             const at::Tensor& out_, const at::Tensor& lse_,
                                                             const c10::optional<at::Tensor>& grad_lse, bool causal,
                                                             double scale, int64_t window_left, int64_t window_right,
                                                             const c10::optional<at::Tensor>& key_lo,
                                                             const c10::optional<at::Tensor>& key_hi) {
  check_qkv(q_, k_, v_);
  check_spans(q_, window_left, window_right, key_lo, key_hi);
  check_cpu(grad_out, "grad_out");
  check_same(grad_out, q_, "grad_out", "q");
  check_cpu(out_, "out");
  check_same(out_, q_, "out", "q");
  check_rows_f32(lse_, q_, "lse");
  if (grad_lse.has_value()) check_rows_f32(*grad_lse, q_, "grad_lse");
  const auto dt = q_.scalar_type();
  if (is_low_precision(dt) && !lowp::usable(dt, q_.size(3))) {  // no matrix instructions: widen to float32
    auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
    auto [dq, dk, dv] = attention_bwd(f(grad_out), f(q_), f(k_), f(v_), f(out_), lse_, grad_lse, causal, scale,
                                      window_left, window_right, key_lo, key_hi);
    return {dq.to(dt), dk.to(dt), dv.to(dt)};
  }
  auto opts = q_.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::zeros(q_.sizes(), opts), dk = at::zeros(k_.sizes(), opts), dv = at::zeros(v_.sizes(), opts);
  if (dq.numel() == 0) return {dq, dk, dv};
  const Visibility vis = dense_visibility(q_, k_, causal, window_left, window_right, key_lo, key_hi);
  backward(as_rows(grad_out), as_rows(q_), as_rows(k_), as_rows(v_), as_rows(out_), lse_.contiguous(), grad_lse, scale,
           vis, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CPU, m) {
  m.impl("attention_cpp_fwd", &attention_fwd);
  m.impl("attention_cpp_bwd", &attention_bwd);
}

}  // namespace genkern::attn
