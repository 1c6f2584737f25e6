// Backward of the bfloat16/float16 attention on the matrix instructions (see
// attention_lowp.h), the float32 backward's algebra (attention_bwd.cpp) with the block
// products on brgemm: S = Q K^T and dP = dO V^T in float32, P = exp(scale S - lse) and
// dS = P (dP - delta) in float32, rounded to the input dtype for dV += P^T dO, dK += dS^T Q
// and dQ += dS K, accumulated in float32 and scaled and rounded once at the end.
//
// Blocks are 64-aligned in every (batch, head)'s rows (packed sequences included: a block
// may hold rows of two sequences, whose spans keep them apart), so that each block starts
// a panel of the packed operands. P^T and dS^T, the A operands of dV and dK, are the
// tile's transposes.
#include <ATen/native/CPUBlas.h>

#include <vector>

#include "attention_lowp.h"

namespace genkern::attn::lowp {
namespace {

using at::native::cpublas::brgemm;

constexpr int64_t kBq = 128, kBk = 128;  // multiples of kPanel

template <typename T>
struct BwdCtx {
  const Problem<float>& P;
  const BwdArgs<T>& a;
  const Packed<T>& kp;  // K: T-pack (S = Q K^T) and N-pack (dQ = dS K)
  const Packed<T>& vp;  // V: T-pack (dP = dO V^T)
  const Packed<T>& qp;  // Q: N-pack (dK = dS^T Q)
  const Packed<T>& op;  // dO: N-pack (dV = P^T dO)
  const float* delta;   // (B, H, T)
  float *dq, *dk, *dv;  // float32 accumulators (B, H, Tp, Dp), (B, Hkv, Sp, Dp)
  int64_t Tp, Sp, Dp;
  float* dq_at(int64_t b, int64_t h, int64_t i) const { return dq + ((b * P.H + h) * Tp + i) * Dp; }
  float* dk_at(int64_t b, int64_t h, int64_t j) const { return dk + ((b * P.Hkv + h) * Sp + j) * Dp; }
  float* dv_at(int64_t b, int64_t h, int64_t j) const { return dv + ((b * P.Hkv + h) * Sp + j) * Dp; }
};

// One thread's tile buffers: s, dp (kBq x kBk) float32; p, ds the same in T; pt, dst their
// transposes (kBk x kBq).
template <typename T>
struct Scratch {
  std::vector<float> s = std::vector<float>(kBq * kBk), dp = std::vector<float>(kBq * kBk);
  std::vector<T> p = std::vector<T>(kBq * kBk), ds = std::vector<T>(kBq * kBk);
  std::vector<T> pt = std::vector<T>(kBq * kBk), dst = std::vector<T>(kBq * kBk);
};

// t (cols x ldt) = a^T of a (rows x cols, ld lda), zero in columns [rows, ldt) of t.
template <typename T>
void transpose(const T* a, int64_t rows, int64_t cols, int64_t lda, T* t, int64_t ldt) {
  const auto* x = reinterpret_cast<const uint16_t*>(a);
  auto* y = reinterpret_cast<uint16_t*>(t);
  constexpr int64_t kB = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kB)
    for (int64_t c0 = 0; c0 < cols; c0 += kB)
      for (int64_t c = c0; c < std::min(c0 + kB, cols); ++c)
        for (int64_t r = r0; r < std::min(r0 + kB, rows); ++r) y[c * ldt + r] = x[r * lda + c];
  for (int64_t c = 0; c < cols; ++c) std::fill(y + c * ldt + rows, y + c * ldt + ldt, uint16_t(0));
}

// P and dS of rows [i0, i0 + bq) against keys [j0, j0 + bkp) into w.p, w.ds (zero outside
// each row's span: the scores of keys a row does not see may be NaN and are never read).
template <typename T>
void p_ds(const BwdCtx<T>& c, Scratch<T>& w, const Block& qb, int64_t h, int64_t j0, int64_t bk, int64_t bkp) {
  const Problem<float>& P = c.P;
  const int64_t b = qb.b, i0 = qb.i0, kvh = h / P.G;
  for (int64_t x = 0; x < bkp / kPanel; ++x) {
    brgemm(qb.n, kPanel, P.D, c.a.q.sl, kPanel, bkp, false, c.a.q.row(b, h, i0), c.kp.tpanel(b, kvh, j0 / kPanel + x),
           w.s.data() + x * kPanel, true);
    brgemm(qb.n, kPanel, P.D, c.a.dout.sl, kPanel, bkp, false, c.a.dout.row(b, h, i0),
           c.vp.tpanel(b, kvh, j0 / kPanel + x), w.dp.data() + x * kPanel, true);
  }
  const float* lse = c.a.lse + (b * P.H + h) * P.T + i0;
  const float* delta = c.delta + (b * P.H + h) * P.T + i0;
  const float scale = P.scale;
  for (int64_t r = 0; r < qb.n; ++r) {
    const float* sr = w.s.data() + r * bkp;
    const float* dr = w.dp.data() + r * bkp;
    T* pr = w.p.data() + r * bkp;
    T* dsr = w.ds.data() + r * bkp;
    const int64_t lo = std::clamp<int64_t>(P.row_lo(b, i0 + r) - j0, 0, bk);
    const int64_t hi = std::clamp<int64_t>(P.row_hi(b, i0 + r) - j0, lo, bk);
    const float l = lse[r], dl = delta[r];
#pragma omp simd
    for (int64_t x = lo; x < hi; ++x) {
      const float e = exp_(sr[x] * scale - l);
      put(pr, x, e);
      put(dsr, x, e * (dr[x] - dl));
    }
    std::fill(pr, pr + lo, T(0)), std::fill(dsr, dsr + lo, T(0));
    std::fill(pr + hi, pr + bkp, T(0)), std::fill(dsr + hi, dsr + bkp, T(0));
  }
}

// dQ += dS K over keys [j0, j0 + bkp). As the forward's P V: where a panel holds a
// non-finite key that some row does not see, each row adds its own span's keys.
template <typename T>
void dq_product(const BwdCtx<T>& c, const Scratch<T>& w, const Block& qb, int64_t h, int64_t j0, int64_t bk,
                int64_t bkp) {
  const Problem<float>& P = c.P;
  const int64_t b = qb.b, kvh = h / P.G, bq = qb.n;
  float* acc = c.dq_at(b, h, qb.i0);
  bool finite = true, all_see = true;
  for (int64_t x = j0 / kPanel; x < (j0 + bkp) / kPanel; ++x) finite = finite && c.kp.panel_finite(b, kvh, x);
  for (int64_t r = 0; r < bq && !finite; ++r)
    all_see = all_see && P.row_lo(b, qb.i0 + r) <= j0 && P.row_hi(b, qb.i0 + r) >= j0 + bkp;
  if (finite || all_see) {
    for (int64_t dc = 0; dc < c.Dp / kPanel; ++dc)
      brgemm(bq, kPanel, bkp, bkp, kPanel, c.Dp, true, w.ds.data(), c.kp.npanel(b, kvh, dc, j0), acc + dc * kPanel,
             true);
    return;
  }
  for (int64_t r = 0; r < bq; ++r) {
    const int64_t lo = std::clamp<int64_t>(P.row_lo(b, qb.i0 + r) - j0, 0, bk);
    const int64_t hi = std::clamp<int64_t>(P.row_hi(b, qb.i0 + r) - j0, lo, bk);
    for (int64_t j = lo; j < hi; ++j) {
      const float g = static_cast<float>(w.ds[r * bkp + j]);
      const T* x = c.a.k.row(b, kvh, j0 + j);
      for (int64_t d = 0; d < P.D; ++d) acc[r * c.Dp + d] += g * static_cast<float>(x[d]);
    }
  }
}

// One tile: the query block qb of head h against the key block kb.
template <typename T>
void bwd_tile(const BwdCtx<T>& c, Scratch<T>& w, const Block& qb, int64_t h, const Block& kb, bool want_dkdv,
              bool want_dq) {
  const int64_t b = qb.b, kvh = h / c.P.G, j0 = kb.i0, bk = kb.n;
  const int64_t bkp = ceil_div(bk, kPanel) * kPanel, bqp = ceil_div(qb.n, kPanel) * kPanel;
  p_ds(c, w, qb, h, j0, bk, bkp);
  if (want_dkdv) {
    transpose(w.p.data(), qb.n, bk, bkp, w.pt.data(), bqp);
    transpose(w.ds.data(), qb.n, bk, bkp, w.dst.data(), bqp);
    for (int64_t dc = 0; dc < c.Dp / kPanel; ++dc)
      brgemm(bk, kPanel, bqp, bqp, kPanel, c.Dp, true, w.pt.data(), c.op.npanel(b, h, dc, qb.i0),
             c.dv_at(b, kvh, j0) + dc * kPanel, true);
    for (int64_t dc = 0; dc < c.Dp / kPanel; ++dc)
      brgemm(bk, kPanel, bqp, bqp, kPanel, c.Dp, true, w.dst.data(), c.qp.npanel(b, h, dc, qb.i0),
             c.dk_at(b, kvh, j0) + dc * kPanel, true);
  }
  if (want_dq) dq_product(c, w, qb, h, j0, bk, bkp);
}

bool sees(const Block& qb, const Block& kb) { return qb.lo < kb.hi && kb.lo < qb.hi; }

// The tasks, as the float32 backward's: one per (batch, kv head) owning its group's dQ
// when they balance over the threads, else a dK/dV pass per key block and a dQ pass per
// query block. tq, tk: 64-aligned blocks, first[b] .. first[b + 1] - 1 those of batch b.
template <typename T>
void run_tiles(const BwdCtx<T>& c, const Tiling& tq, const Tiling& tk) {
  const Problem<float>& P = c.P;
  const int64_t groups = P.B * P.Hkv, nt = at::get_num_threads();
  auto dkdv = [&](Scratch<T>& w, int64_t b, int64_t kvh, int64_t x, bool want_dq) {
    for (int64_t h = kvh * P.G; h < (kvh + 1) * P.G; ++h)
      for (int64_t y = tq.first[b]; y < tq.first[b + 1]; ++y)
        if (sees(tq.blk[y], tk.blk[x])) bwd_tile(c, w, tq.blk[y], h, tk.blk[x], true, want_dq);
  };
  if (groups % nt == 0 || groups >= 4 * nt) {
    at::parallel_for(0, groups, 1, [&](int64_t u0, int64_t u1) {
      Scratch<T> w;
      for (int64_t u = u0; u < u1; ++u)
        for (int64_t x = tk.first[u / P.Hkv]; x < tk.first[u / P.Hkv + 1]; ++x) dkdv(w, u / P.Hkv, u % P.Hkv, x, true);
      at::native::cpublas::brgemm_release(true);
    });
    return;
  }
  const int64_t nkb = int64_t(tk.blk.size()), nqb = int64_t(tq.blk.size());
  at::parallel_for(0, P.Hkv * nkb, 1, [&](int64_t u0, int64_t u1) {
    Scratch<T> w;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t x = zigzag(u % nkb, nkb);
      dkdv(w, tk.blk[x].b, u / nkb, x, false);
    }
    at::native::cpublas::brgemm_release(true);
  });
  at::parallel_for(0, P.H * nqb, 1, [&](int64_t u0, int64_t u1) {
    Scratch<T> w;
    for (int64_t u = u0; u < u1; ++u) {
      const Block& qb = tq.blk[zigzag(u % nqb, nqb)];
      for (int64_t x = tk.first[qb.b]; x < tk.first[qb.b + 1]; ++x)
        if (sees(qb, tk.blk[x])) bwd_tile(c, w, qb, u / nqb, tk.blk[x], false, true);
    }
    at::native::cpublas::brgemm_release(true);
  });
}

// delta_i = rowsum(dO_i O_i) - grad_lse_i in float32.
template <typename T>
at::Tensor deltas(const Problem<float>& P, const BwdArgs<T>& a) {
  at::Tensor delta = at::empty({P.B * P.H * P.T}, at::TensorOptions().dtype(at::kFloat));
  float* out = delta.data_ptr<float>();
  at::parallel_for(0, P.B * P.H * P.T, 2048, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % P.T, b = r / P.T / P.H, h = r / P.T % P.H;
      const T* x = a.dout.row(b, h, i);
      const T* o = a.out.row(b, h, i);
      float acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < P.D; ++d) acc += static_cast<float>(x[d]) * static_cast<float>(o[d]);
      out[r] = acc - (a.grad_lse ? a.grad_lse[r] : 0.f);
    }
  });
  return delta;
}

// out (B, Hx, L rows of D) = alpha acc (B, Hx, Lp, Dp), rounded to T.
template <typename T>
void store(const float* acc, int64_t B, int64_t Hx, int64_t L, int64_t Lp, int64_t D, int64_t Dp, float alpha,
           const Mat<T>& out) {
  at::parallel_for(0, B * Hx * L, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % L, h = r / L % Hx, b = r / L / Hx;
      const float* x = acc + ((b * Hx + h) * Lp + i) * Dp;
      T* y = out.row(b, h, i);
      for (int64_t d = 0; d < D; ++d) y[d] = static_cast<T>(alpha * x[d]);
    }
  });
}

}  // namespace

template <typename T>
void bwd_kernel(const Problem<float>& P, const BwdArgs<T>& a) {
  const Packed<T> kp = pack_rows(a.k, P.B, P.Hkv, P.S, P.D, true, true);
  const Packed<T> vp = pack_rows(a.v, P.B, P.Hkv, P.S, P.D, true, false);
  const Packed<T> qp = pack_rows(a.q, P.B, P.H, P.T, P.D, false, true);
  const Packed<T> op = pack_rows(a.dout, P.B, P.H, P.T, P.D, false, true);
  const at::Tensor delta = deltas(P, a);
  const int64_t Tp = qp.Lp, Sp = kp.Lp, Dp = kp.Dp;
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor dq = at::zeros({P.B * P.H * Tp * Dp}, f32), dk = at::zeros({P.B * P.Hkv * Sp * Dp}, f32);
  at::Tensor dv = at::zeros({P.B * P.Hkv * Sp * Dp}, f32);
  const BwdCtx<T> c{
      P,  a,  kp, vp, qp, op, delta.data_ptr<float>(), dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
      Tp, Sp, Dp};
  Problem<float> aligned = P;  // packed sequences tiled as one: blocks stay 64-aligned, spans keep rows apart
  aligned.cu_q = aligned.cu_k = nullptr, aligned.nseq = 0;
  run_tiles(c, tile_queries(aligned, kBq), tile_keys(aligned, kBk));
  store(dq.data_ptr<float>(), P.B, P.H, P.T, Tp, P.D, Dp, P.scale, a.dq);
  store(dk.data_ptr<float>(), P.B, P.Hkv, P.S, Sp, P.D, Dp, P.scale, a.dk);
  store(dv.data_ptr<float>(), P.B, P.Hkv, P.S, Sp, P.D, Dp, 1.f, a.dv);
}

template void bwd_kernel<at::BFloat16>(const Problem<float>&, const BwdArgs<at::BFloat16>&);
template void bwd_kernel<at::Half>(const Problem<float>&, const BwdArgs<at::Half>&);

}  // namespace genkern::attn::lowp
