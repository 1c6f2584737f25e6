// CPU kernels of packed (variable-length) attention: sequence b holds the query rows
// cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q (total_q, H, D) and the key rows
// cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1 of k, v (total_k, Hkv, D).
//
// The pack is one B = 1 problem seen through strides, q as (1, H, total_q, D) (no copy),
// whose rows' spans lie in packed key coordinates, [cu_k[b] + lo, cu_k[b] + hi) with lo, hi
// those of the sequence's own (T_b, S_b) problem. The kernels tile each sequence on its own
// (no block of queries or keys crosses a sequence's end), so a pack of short sequences
// costs what its sequences cost, and no block ever computes another sequence's keys.
#include <tuple>
#include <vector>

#include "attention.h"
#include "attention_lowp.h"

namespace genkern::attn {
namespace {

void check_3d(const at::Tensor& t, const char* name, const char* dims) {
  check_cpu(t, name);
  check_float(t, name);
  GENKERN_CHECK_VALUE(t.dim() == 3, name, " must be 3-d ", dims, ", got shape ", t.sizes());
}

void check_packed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t left, int64_t right) {
  check_3d(q, "q", "(total_q, H, D)");
  check_3d(k, "k", "(total_k, Hkv, D)");
  check_3d(v, "v", "(total_k, Hkv, D)");
  GENKERN_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "k has dtype ", k.scalar_type(), " but q has ",
                     q.scalar_type());
  check_same(v, k, "v", "k");
  const int64_t H = q.size(1), Hkv = k.size(1);
  GENKERN_CHECK_VALUE(k.size(2) == q.size(2), "k's head dim D=", k.size(2), " must match q's D=", q.size(2));
  GENKERN_CHECK_VALUE(Hkv > 0 ? H % Hkv == 0 : H == 0, "q's heads H=", H, " must be a multiple of k's heads Hkv=", Hkv);
  GENKERN_CHECK_VALUE(q.size(2) >= 1 && q.size(2) <= INT32_MAX, "the head dim D must be in [1, 2^31), got q of shape ",
                      q.sizes());
  GENKERN_CHECK_VALUE(left >= -1, "window_left must be >= -1 (-1: no limit), got ", left);
  GENKERN_CHECK_VALUE(right >= -1, "window_right must be >= -1 (-1: no limit), got ", right);
}

// The sequences' bounds of cu (int32 (B + 1,)), checked before anything reads memory through them.
std::vector<int64_t> bounds(const at::Tensor& cu, const char* name, int64_t total, int64_t max_len,
                            const char* max_name) {
  check_cpu(cu, name);
  GENKERN_CHECK_TYPE(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.scalar_type());
  GENKERN_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 2, name, " must have shape (B + 1,) with B >= 1, got ",
                      cu.sizes());
  const at::Tensor c = cu.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  std::vector<int64_t> out(p, p + c.size(0));
  GENKERN_CHECK_VALUE(out[0] == 0, name, " must start at 0, got ", out[0]);
  for (size_t b = 0; b + 1 < out.size(); ++b) {
    const int64_t len = out[b + 1] - out[b];
    GENKERN_CHECK_VALUE(len >= 0, name, " must be non-decreasing, got ", out[b], " then ", out[b + 1]);
    GENKERN_CHECK_VALUE(len <= max_len, name, " holds a sequence of length ", len, " but ", max_name, "=", max_len);
  }
  GENKERN_CHECK_VALUE(out.back() == total, name, " ends at ", out.back(), " but the packed tensor holds ", total,
                      " rows");
  return out;
}

Visibility packed_visibility(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q, const at::Tensor& cu_k,
                             int64_t max_q, int64_t max_k, bool causal, int64_t left, int64_t right) {
  Visibility vis;
  vis.cu_q = bounds(cu_q, "cu_seqlens_q", q.size(0), max_q, "max_seqlen_q");
  vis.cu_k = bounds(cu_k, "cu_seqlens_k", k.size(0), max_k, "max_seqlen_k");
  GENKERN_CHECK_VALUE(vis.cu_q.size() == vis.cu_k.size(),
                      "cu_seqlens_q and cu_seqlens_k must have one length B + 1, "
                      "got ",
                      vis.cu_q.size(), " and ", vis.cu_k.size());
  vis.lo.resize(q.size(0)), vis.hi.resize(q.size(0));
  for (size_t s = 0; s + 1 < vis.cu_q.size(); ++s) {
    const int64_t r0 = vis.cu_q[s], T = vis.cu_q[s + 1] - r0, k0 = vis.cu_k[s], S = vis.cu_k[s + 1] - k0;
    for (int64_t i = 0; i < T; ++i) {
      auto [lo, hi] = window_span(i, T, S, causal, left, right);
      vis.lo[r0 + i] = k0 + lo, vis.hi[r0 + i] = k0 + hi;
    }
  }
  return vis;
}

// (total, H, D) as the (1, H, total, D) rows of the B = 1 problem.
at::Tensor heads_first(const at::Tensor& t) { return t.transpose(0, 1).unsqueeze(0); }
at::Tensor rows(const at::Tensor& t) { return as_rows(heads_first(t)); }

bool is_low_precision(at::ScalarType s) { return s == at::kHalf || s == at::kBFloat16; }
at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat); }

std::tuple<at::Tensor, at::Tensor> varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                                              int64_t max_k, bool causal, double scale, int64_t left, int64_t right) {
  check_packed(q, k, v, left, right);
  const Visibility vis = packed_visibility(q, k, cu_q, cu_k, max_q, max_k, causal, left, right);
  const auto dt = q.scalar_type();
  if (is_low_precision(dt) && !lowp::usable(dt, q.size(2))) {  // no matrix instructions: widen to float32
    auto [o, lse] = varlen_fwd(f32(q), f32(k), f32(v), cu_q, cu_k, max_q, max_k, causal, scale, left, right);
    return {o.to(dt), lse};
  }
  auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty(q.sizes(), opts);                                 // (total_q, H, D)
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, opts.dtype(at::kFloat));  // (H, total_q)
  if (out.numel() == 0) return {out, lse};
  forward(rows(q), rows(k), rows(v), scale, vis, heads_first(out), lse);
  return {out, lse};
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  check_cpu(t, name);
  check_same(t, ref, name, ref_name);
}

void check_lse(const at::Tensor& t, const at::Tensor& q, const char* name) {
  check_cpu(t, name);
  GENKERN_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  GENKERN_CHECK_VALUE(t.dim() == 2 && t.size(0) == q.size(1) && t.size(1) == q.size(0), name,
                      " must have shape (H, total_q) = (", q.size(1), ", ", q.size(0), "), got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& cu_q, const at::Tensor& cu_k,
    int64_t max_q, int64_t max_k, bool causal, double scale, int64_t left, int64_t right) {
  check_packed(q, k, v, left, right);
  check_like(grad_out, q, "grad_out", "q");
  check_like(out, q, "out", "q");
  check_lse(lse, q, "lse");
  if (grad_lse.has_value()) check_lse(*grad_lse, q, "grad_lse");
  const Visibility vis = packed_visibility(q, k, cu_q, cu_k, max_q, max_k, causal, left, right);
  const auto dt = q.scalar_type();
  if (is_low_precision(dt) && !lowp::usable(dt, q.size(2))) {  // no matrix instructions: widen to float32
    auto [dq, dk, dv] = varlen_bwd(f32(grad_out), f32(q), f32(k), f32(v), f32(out), lse, grad_lse, cu_q, cu_k, max_q,
                                   max_k, causal, scale, left, right);
    return {dq.to(dt), dk.to(dt), dv.to(dt)};
  }
  auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::zeros(q.sizes(), opts), dk = at::zeros(k.sizes(), opts), dv = at::zeros(v.sizes(), opts);
  if (dq.numel() == 0 || dk.numel() == 0) return {dq, dk, dv};
  backward(rows(grad_out), rows(q), rows(k), rows(v), rows(out), lse.contiguous(), grad_lse, scale, vis,
           heads_first(dq), heads_first(dk), heads_first(dv));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CPU, m) {
  m.impl("attention_varlen_cpp_fwd", &varlen_fwd);
  m.impl("attention_varlen_cpp_bwd", &varlen_bwd);
}

}  // namespace genkern::attn
