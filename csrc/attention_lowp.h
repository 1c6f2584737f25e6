// bfloat16/float16 attention on the CPU's matrix instructions (AMX): the block products run
// in the input dtype with float32 accumulation (at::native::cpublas::brgemm, oneDNN's
// ukernels, as torch's own CPU flash-attention), the softmax and the accumulators stay in
// float32, and P (and dS in the backward) are rounded to the input dtype for their products.
//
// brgemm takes its B operand in the VNNI layout (pairs of rows interleaved), made by
// cpublas::pack in panels of 64 columns. Every operand that serves as a B is packed once per
// call, per (batch, head), before the kernels run (a copy as large as the input):
//   rows-as-B   ("N" pack, for P V, dS K, P^T dO, dS^T Q): the (L x D) rows, D cut in
//                panels of 64 columns, each panel (Lp x 64) packed, Lp = L rounded up to 64;
//   rows^T-as-B ("T" pack, for Q K^T, dO V^T): 64 rows at a time transposed (D x 64), packed.
// Padding rows and columns hold zeros, so a product may always run over whole 64-row panels.
#pragma once

#include <cstring>

#include "attention.h"

namespace genkern::attn::lowp {

constexpr int64_t kPanel = 64;

// x rounded to nearest even. bfloat16 by its bits, so that loops over it vectorise (c10's
// conversion tests for NaN per value). Finite values and inf round correctly; NaN stays NaN
// where its payload has a bit in the upper mantissa, as exp() and arithmetic give.
inline void put(at::BFloat16* d, int64_t c, float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  reinterpret_cast<uint16_t*>(d)[c] = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline void put(at::Half* d, int64_t c, float x) { d[c] = static_cast<at::Half>(x); }

// True when the matrix-instruction path runs this dtype and head dim here: the CPU packs
// it (AMX), the head dim is even (VNNI pairs) and GENKERN_ATTN_LOWP is not "0".
bool usable(at::ScalarType dt, int64_t D);

// The packed copies of one (B, Hx, L, D) input, each (b, h) at its own offset.
template <typename T>
struct Packed {
  at::Tensor buf;  // T-pack then N-pack of every (b, h), either may be absent
  int64_t Hx = 0, Lp = 0, D = 0, Dp = 0;
  bool has_t = false, has_n = false;
  std::vector<uint8_t> finite;  // per (b, h, 64-row panel): every value finite
  int64_t per_head() const { return (has_t ? Lp * D : 0) + (has_n ? Lp * Dp : 0); }
  const T* base(int64_t b, int64_t h) const { return buf.data_ptr<T>() + (b * Hx + h) * per_head(); }
  // The T-pack panel of rows [64 c, 64 c + 64): B of (x . rows^T), K = D, N = 64.
  const T* tpanel(int64_t b, int64_t h, int64_t c) const { return base(b, h) + c * D * kPanel; }
  // The N-pack of columns [64 dc, 64 dc + 64) from row j (even): B of (x . rows), N = 64.
  const T* npanel(int64_t b, int64_t h, int64_t dc, int64_t j) const {
    return base(b, h) + (has_t ? Lp * D : 0) + dc * Lp * kPanel + j * kPanel;
  }
  bool panel_finite(int64_t b, int64_t h, int64_t c) const { return finite[(b * Hx + h) * (Lp / kPanel) + c] != 0; }
};

// Packs the rows of m (B x Hx heads of L rows of D values).
template <typename T>
Packed<T> pack_rows(const Mat<const T>& m, int64_t B, int64_t Hx, int64_t L, int64_t D, bool t_pack, bool n_pack);

// Forward of a bfloat16/float16 problem: out (laid out like q) in the input dtype, lse
// (B, H, T) float32. P carries the spans and the scale (its q, k, v are unused).
template <typename T>
void fwd_kernel(const Problem<float>& P, const Mat<const T>& q, const Mat<const T>& k, const Mat<const T>& v,
                const Mat<T>& out, float* lse);

// Gradients of a bfloat16/float16 problem into dq, dk, dv (laid out like q, k, v, input
// dtype) from the forward's lse (B, H, T) and grad_lse (nullptr: none), both float32.
template <typename T>
struct BwdArgs {
  Mat<const T> q, k, v, dout, out;
  const float *lse, *grad_lse;
  Mat<T> dq, dk, dv;
};

template <typename T>
void bwd_kernel(const Problem<float>& P, const BwdArgs<T>& a);

// Entry points over tensors (4-d row views, as attn::forward / attn::backward).
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, const Visibility& vis,
             const at::Tensor& out, const at::Tensor& lse);
void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse, double scale,
              const Visibility& vis, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv);

}  // namespace genkern::attn::lowp
