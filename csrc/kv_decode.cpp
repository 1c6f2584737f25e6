// CPU kernel of kv_decode: attention of the Tnew newest queries of each batch row
// against a preallocated KV cache (split-K/V "flash decoding").
//
// Row b holds n_b visible positions; query i sees the positions j < n_b with
// j <= i + n_b - Tnew, and, with a window, j >= i + n_b - Tnew - window_left, and with
// key_lo, j >= key_lo[b]. Positions >= n_b are stale (they may hold NaN or inf) and are
// never loaded, so no mask has to neutralise them. The positions before the first one any
// query of a row sees are skipped: the row's work starts there (a long cache read through a
// small window costs the window); within a block, the positions a row does not see are
// masked out of its weights and never enter its P V.
//
// Work items are (batch row, KV head, chunk of positions, tile of query rows). The
// query rows of a KV head are its G = H / Hkv query heads times the Tnew queries
// (row r = g * Tnew + i), so each K/V row of a chunk is loaded from memory once for
// all of them: with Tnew = 1 streaming the cache is the whole cost. Within an item,
// blocks of kBlk positions run the online softmax of every query row: block scores,
// block max, running sum and accumulator rescaled by exp(m_old - m_new), then P V.
//
// An item leaves (acc, m, l) unnormalised; the combine pass merges the chunks of a
// query row with M = max_c m_c (log-sum-exp rescaling: no exp overflows):
//   out = sum_c exp(m_c - M) acc_c / sum_c exp(m_c - M) l_c.
// Rows are only split when there are too few items to feed the threads, into chunks
// of at least kMinChunk positions so that the partials stay a small fraction of the
// K/V traffic; unsplit items normalise and write out themselves. Items are handed
// out dynamically, so ragged lengths do not leave a thread idle.
//
// Every cache is read in place and in its own type: float16/bfloat16 rows are widened to
// float32 in registers (kv_decode_lowp.h), half the bytes of a float32 cache, with scores,
// softmax and accumulators in float32. Without AVX-512 (BW, VL) or AVX2 with F16C they are
// widened a block at a time into the thread's scratch instead (the cache is never copied).

// GCC 12 reports its own AVX-512 intrinsics (their _mm512_undefined_* sources) as
// maybe-uninitialized once inlined, a false positive; the pragma must precede the headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "kv_decode_blocks.h"
#include "kv_decode_lowp.h"

namespace genkern::kvd {
namespace {

// --- the problem --------------------------------------------------------------------
template <typename scalar_t>
struct Problem {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *q, *k, *v;
  int64_t qs[3], ks[3], vs[3];  // element strides of q (b, h, t) and of the caches (b, hkv, s)
  const int32_t* lens;          // L_b
  int64_t Hkv, G, T, D, Dp;     // Dp: D rounded up to a cache line of acc_t
  int64_t added;                // Tnew with k_new (n_b = L_b + Tnew), else 0
  int64_t left;                 // window_left (-1: none)
  const int32_t* key_lo;        // (B,) or nullptr
  int64_t rows, tiles, chunk, nchunks;
  acc_t scale;
  scalar_t* out;        // (B, H, Tnew, D) contiguous = (B * Hkv * rows, D)
  acc_t *po, *pm, *pl;  // partials (nchunks > 1): (B * Hkv * nchunks * rows) x (D | 1)

  int64_t slot_size() const { return 2 * kMaxRows * Dp + kMaxRows * kBlk + kBlk * Dp; }
  // The first position query i of a row with n positions (and key_lo kl) may see; the
  // row's first query (i = 0) gives the row's first visible position.
  int64_t first_pos(int64_t b, int64_t i, int64_t n) const {
    int64_t f = key_lo != nullptr ? std::clamp<int64_t>(key_lo[b], 0, n) : 0;
    if (left >= 0) f = std::max(f, i + n - T - left);
    return std::min(f, n);
  }
};

// One work item; `ws` is the calling thread's scratch of slot_size() elements.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void run_item(const Problem<scalar_t>& p, int64_t item, acc_t* ws) {
  const int64_t tile = item % p.tiles, c = (item / p.tiles) % p.nchunks, bk = item / (p.tiles * p.nchunks);
  const int64_t b = bk / p.Hkv, kvh = bk % p.Hkv, D = p.D, Dp = p.Dp, T = p.T;
  const int64_t n = int64_t(p.lens[b]) + p.added;
  const int64_t r0 = tile * kMaxRows, nr = std::min(kMaxRows, p.rows - r0);
  const int64_t c0 = p.first_pos(b, 0, n) + c * p.chunk, c1 = std::max(c0, std::min(c0 + p.chunk, n));
  acc_t *Q = ws, *acc = Q + kMaxRows * Dp, *S = acc + kMaxRows * Dp, *rowbuf = S + kMaxRows * kBlk;
  acc_t m[kMaxRows], l[kMaxRows];
  int64_t first[kMaxRows], lim[kMaxRows];  // query row rr sees positions [first[rr], lim[rr])
  int64_t lo = c1, hi = c0;                // no query row of the tile sees positions outside [lo, hi) in this chunk
  for (int64_t rr = 0; rr < nr; ++rr) {
    const int64_t g = (r0 + rr) / T, i = (r0 + rr) % T;
    lim[rr] = std::clamp(i + n - T + 1, int64_t(0), n);
    first[rr] = p.first_pos(b, i, n);
    if (first[rr] < lim[rr]) {
      hi = std::max(hi, std::min(c1, lim[rr]));
      lo = std::min(lo, std::max(c0, first[rr]));
    }
    m[rr] = -std::numeric_limits<acc_t>::infinity(), l[rr] = 0;
    const scalar_t* qr = p.q + b * p.qs[0] + (kvh * p.G + g) * p.qs[1] + i * p.qs[2];
    stage_query(qr, D, p.scale, Q + rr * Dp);
    std::fill(acc + rr * Dp, acc + rr * Dp + D, acc_t(0));
  }
  const scalar_t* kb = p.k + b * p.ks[0] + kvh * p.ks[1];
  const scalar_t* vb = p.v + b * p.vs[0] + kvh * p.vs[1];
  const row_t<scalar_t, acc_t>* rp[kBlk];  // the block's K (then V) rows (kv_decode_lowp.h)
  Ahead ahead;
  ahead.bytes = D * int64_t(sizeof(scalar_t));
  for (int64_t j0 = lo; j0 < hi; j0 += kBlk) {
    const int64_t nb = std::min(kBlk, hi - j0);
    ahead.n = nb;  // this block's V rows
    for (int64_t j = 0; j < nb; ++j) {
      rp[j] = load_row(kb + (j0 + j) * p.ks[2], D, rowbuf + j * Dp);
      ahead.row[j] = reinterpret_cast<const char*>(vb + (j0 + j) * p.vs[2]);
    }
    block_scores(Q, nr, rp, nb, D, Dp, S, ahead);
    scale_scores<scalar_t>(S, nr, nb, p.scale);
    int64_t from[kMaxRows], to[kMaxRows];  // positions of the block row rr sees
    for (int64_t rr = 0; rr < nr; ++rr) {
      from[rr] = std::clamp(first[rr] - j0, int64_t(0), nb);
      to[rr] = std::clamp(lim[rr] - j0, from[rr], nb);
      softmax_block(S + rr * kBlk, nb, from[rr], to[rr], m[rr], l[rr], acc + rr * Dp, D);
    }
    ahead.n = std::clamp(hi - j0 - kBlk, int64_t(0), kBlk);  // the next block's K rows
    for (int64_t j = 0; j < ahead.n; ++j) ahead.row[j] = reinterpret_cast<const char*>(kb + (j0 + kBlk + j) * p.ks[2]);
    for (int64_t j = 0; j < nb; ++j) rp[j] = load_row(vb + (j0 + j) * p.vs[2], D, rowbuf + j * Dp);
    block_pv(S, nr, rp, nb, from, to, D, Dp, acc, ahead);
  }
  for (int64_t rr = 0; rr < nr; ++rr) {
    const acc_t* a = acc + rr * Dp;
    if (p.nchunks == 1) {
      const acc_t inv = l[rr] > 0 ? acc_t(1) / l[rr] : acc_t(0);  // a row that sees nothing gives zeros
      scalar_t* o = p.out + (bk * p.rows + r0 + rr) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(a[d] * inv);
    } else {
      const int64_t x = (bk * p.nchunks + c) * p.rows + r0 + rr;
      p.pm[x] = m[rr], p.pl[x] = l[rr];
      std::copy(a, a + D, p.po + x * D);
    }
  }
}

// Merges the chunks of the query rows [x0, x1) (x = bk * rows + r, the output row).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void combine(const Problem<scalar_t>& p, int64_t x0, int64_t x1) {
  std::vector<acc_t> o(p.D);
  for (int64_t x = x0; x < x1; ++x) {
    const int64_t bk = x / p.rows, r = x % p.rows;
    const int64_t first = bk * p.nchunks * p.rows + r;  // partial of chunk c: first + c * rows
    const acc_t none = -std::numeric_limits<acc_t>::infinity();
    acc_t M = none, L = 0;
    for (int64_t c = 0; c < p.nchunks; ++c) M = std::max(M, p.pm[first + c * p.rows]);
    std::fill(o.begin(), o.end(), acc_t(0));
    for (int64_t c = 0; c < p.nchunks; ++c) {
      const int64_t y = first + c * p.rows;
      if (p.pm[y] == none) continue;  // saw nothing: weight 0 (and -inf - M is NaN if M = -inf)
      const acc_t w = exp_(p.pm[y] - M);
      L += w * p.pl[y];
      axpy(w, p.po + y * p.D, o.data(), p.D);
    }
    const acc_t inv = L > 0 ? acc_t(1) / L : acc_t(0);
    scalar_t* out = p.out + x * p.D;
    for (int64_t d = 0; d < p.D; ++d) out[d] = static_cast<scalar_t>(o[d] * inv);
  }
}

// Writes k_new/v_new at positions L_b .. L_b + Tnew - 1 (bounds checked by the caller).
template <typename scalar_t>
void write_new(const at::Tensor& cache, const at::Tensor& src, const int32_t* lens) {
  const int64_t B = src.size(0), Hkv = src.size(1), T = src.size(2), D = src.size(3);
  scalar_t* c = cache.data_ptr<scalar_t>();
  const scalar_t* s = src.data_ptr<scalar_t>();  // unit last-dim stride
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * Hkv * T, grain, [&](int64_t a, int64_t e) {
    for (int64_t x = a; x < e; ++x) {
      const int64_t t = x % T, kvh = (x / T) % Hkv, b = x / (T * Hkv);
      scalar_t* dst = c + b * cache.stride(0) + kvh * cache.stride(1) + (lens[b] + t) * cache.stride(2);
      std::memmove(dst, s + b * src.stride(0) + kvh * src.stride(1) + t * src.stride(2), D * sizeof(scalar_t));
    }
  });
}

template <typename scalar_t>
void run(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const int32_t* lens, bool has_new,
         double scale, int64_t left, const int32_t* key_lo, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = kc.size(1);
  constexpr int64_t line = 64 / sizeof(acc_t);
  Problem<scalar_t> p{q.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>()};
  for (int i = 0; i < 3; ++i) p.qs[i] = q.stride(i), p.ks[i] = kc.stride(i), p.vs[i] = vc.stride(i);
  p.Hkv = Hkv, p.G = H / Hkv, p.T = T, p.D = D, p.Dp = (D + line - 1) / line * line;
  p.lens = lens, p.added = has_new ? T : 0, p.rows = p.G * T, p.tiles = (p.rows + kMaxRows - 1) / kMaxRows;
  p.scale = static_cast<acc_t>(scale), p.out = out.data_ptr<scalar_t>();
  p.left = left, p.key_lo = key_lo;

  int64_t max_n = 0, total_n = 0;  // positions from each row's first visible one
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = int64_t(lens[b]) + p.added, span = n - p.first_pos(b, 0, n);
    max_n = std::max(max_n, span);
    total_n += span;
  }
  const int64_t work = 4 * total_n * Hkv * p.rows * D;  // flops: QK^T and PV
  const int64_t threads = work < kSerialWork ? 1 : at::get_num_threads();
  const int64_t base = B * Hkv * p.tiles, want = kItemsPerThread * threads;
  int64_t nchunks = 1;
  if (base < want && max_n > kMinChunk)
    nchunks = std::min((want + base - 1) / base, (max_n + kMinChunk - 1) / kMinChunk);
  const int64_t per = (max_n + nchunks - 1) / nchunks;
  p.chunk = std::max<int64_t>(kBlk, (per + kBlk - 1) / kBlk * kBlk);  // whole blocks
  p.nchunks = std::max<int64_t>(1, (max_n + p.chunk - 1) / p.chunk);

  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor part;
  if (p.nchunks > 1) {
    const int64_t np = B * Hkv * p.nchunks * p.rows;
    part = at::empty({np * (D + 2)}, q.options().dtype(acc_type));
    p.po = part.data_ptr<acc_t>(), p.pm = p.po + np * D, p.pl = p.pm + np;
  }
  const int64_t items = base * p.nchunks, slots = std::min(threads, items);
  at::Tensor scratch = at::empty({slots, p.slot_size()}, q.options().dtype(acc_type));
  std::atomic<int64_t> next{0};
  // One call per thread, each pulling items until none are left (grain 1: slot = begin).
  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t) {
    acc_t* ws = scratch.data_ptr<acc_t>() + s0 * p.slot_size();
    for (int64_t it = next++; it < items; it = next++) run_item(p, it, ws);
  });
  if (p.nchunks > 1) {
    const int64_t grain = std::max<int64_t>(1, (1 << 14) / (p.nchunks * D));
    at::parallel_for(0, B * Hkv * p.rows, grain, [&](int64_t x0, int64_t x1) { combine(p, x0, x1); });
  }
}

// --- checks and entry point ------------------------------------------------------------
// Whether a and b may share elements: one storage and intersecting address ranges (strides
// are never negative). Conservative: interleaved views count as overlapping.
bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return false;
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const char* lo = static_cast<const char*>(t.data_ptr());
    return std::make_pair(lo, lo + (last + 1) * int64_t(t.element_size()));
  };
  auto [alo, ahi] = span(a);
  auto [blo, bhi] = span(b);
  return alo < bhi && blo < ahi;
}

// k_new (or v_new) as the rows to write, unit last-dim stride: copied first when it shares
// memory with a cache (k_new = k_cache[:, :, L - 1 : L - 1 + T]), since the rows are written
// in parallel and one row's write would change another's source.
at::Tensor source_rows(const at::Tensor& t, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  if (may_overlap(t, k_cache) || may_overlap(t, v_cache)) return t.clone(at::MemoryFormat::Contiguous);
  return t.stride(3) == 1 ? t : t.contiguous();
}

void check_new(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t Hkv) {
  check_cpu(t, name);
  GENKERN_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " has dtype ", t.scalar_type(), " but q has ",
                     q.scalar_type());
  GENKERN_CHECK_VALUE(
      t.dim() == 4 && t.size(0) == q.size(0) && t.size(1) == Hkv && t.size(2) == q.size(2) && t.size(3) == q.size(3),
      name, " must have shape (B, Hkv, Tnew, D) = (", q.size(0), ", ", Hkv, ", ", q.size(2), ", ", q.size(3), "), got ",
      t.sizes());
}

at::Tensor kv_decode(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& k_new,
                     const c10::optional<at::Tensor>& v_new, double scale, int64_t window_left,
                     const c10::optional<at::Tensor>& key_lo) {
  GENKERN_CHECK_VALUE(window_left >= -1, "window_left must be >= -1 (-1: no limit), got ", window_left);
  check_cpu(q_in, "q");
  check_float(q_in, "q");
  GENKERN_CHECK_VALUE(q_in.dim() == 4, "q must be 4-d (B, H, Tnew, D), got shape ", q_in.sizes());
  check_cpu(k_cache, "k_cache"), check_cpu(v_cache, "v_cache"), check_cpu(cache_seqlens, "cache_seqlens");
  GENKERN_CHECK_TYPE(k_cache.scalar_type() == q_in.scalar_type(), "k_cache has dtype ", k_cache.scalar_type(),
                     " but q has ", q_in.scalar_type());
  GENKERN_CHECK_VALUE(k_cache.dim() == 4, "k_cache must be 4-d (B, Hkv, Smax, D), got shape ", k_cache.sizes());
  check_same(v_cache, k_cache, "v_cache", "k_cache");
  const int64_t B = q_in.size(0), H = q_in.size(1), T = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_cache.size(1), Smax = k_cache.size(2);
  GENKERN_CHECK_VALUE(k_cache.size(0) == B && k_cache.size(3) == D, "k_cache must be (B=", B, ", Hkv, Smax, D=", D,
                      ") to match q of shape ", q_in.sizes(), ", got ", k_cache.sizes());
  GENKERN_CHECK_VALUE(Hkv >= 1 && H % Hkv == 0, "q's heads H=", H,
                      " must be a multiple of the cache's heads Hkv=", Hkv);
  GENKERN_CHECK_VALUE(k_cache.stride(3) == 1 || D <= 1, "k_cache must have a contiguous last dim");
  GENKERN_CHECK_VALUE(v_cache.stride(3) == 1 || D <= 1, "v_cache must have a contiguous last dim");
  GENKERN_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens must be an int32 tensor, got ",
                     cache_seqlens.scalar_type());
  GENKERN_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, "cache_seqlens must have shape (B,) = (",
                      B, ",), got ", cache_seqlens.sizes());
  GENKERN_CHECK_VALUE(k_new.has_value() == v_new.has_value(), "k_new and v_new must be given together (or both None)");
  const bool has_new = k_new.has_value();
  if (has_new) {
    check_new(*k_new, "k_new", q_in, Hkv);
    check_new(*v_new, "v_new", q_in, Hkv);
    // Overlapping rows (an expanded cache) would make the write below a race.
    GENKERN_CHECK_VALUE(at::has_internal_overlap(k_cache) != at::MemOverlap::Yes &&
                            at::has_internal_overlap(v_cache) != at::MemOverlap::Yes,
                        "k_cache and v_cache must not have overlapping elements (they are written in place)");
  }
  if (key_lo.has_value()) {
    check_cpu(*key_lo, "key_lo");
    GENKERN_CHECK_TYPE(key_lo->scalar_type() == at::kInt, "key_lo must be an int32 tensor, got ",
                       key_lo->scalar_type());
    GENKERN_CHECK_VALUE(key_lo->dim() == 1 && key_lo->size(0) == B, "key_lo must have shape (B,) = (", B, ",), got ",
                        key_lo->sizes());
  }
  const at::Tensor lo_t = key_lo.has_value() ? key_lo->contiguous() : at::Tensor();
  const int32_t* lo = lo_t.defined() ? lo_t.data_ptr<int32_t>() : nullptr;
  const at::Tensor lens_t = cache_seqlens.contiguous();
  const int32_t* lens = lens_t.data_ptr<int32_t>();
  const int64_t added = has_new ? T : 0;
  for (int64_t b = 0; b < B; ++b) {  // every row, before anything is written or read
    GENKERN_CHECK_VALUE(lens[b] >= 0, "cache_seqlens must be >= 0, got ", lens[b], " for row ", b);
    GENKERN_CHECK_VALUE(int64_t(lens[b]) + added <= Smax, "the KV cache is full: row ", b, " of length ", lens[b],
                        " plus ", added, " new tokens exceeds max_seq_len=", Smax);
  }

  at::Tensor out = at::empty({B, H, T, D}, q_in.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kv_decode_cpp", [&] {
    if (has_new && k_new->numel() > 0) {
      const at::Tensor kn = source_rows(*k_new, k_cache, v_cache), vn = source_rows(*v_new, k_cache, v_cache);
      write_new<scalar_t>(k_cache, kn, lens);
      write_new<scalar_t>(v_cache, vn, lens);
    }
    if (out.numel() > 0) run<scalar_t>(q, k_cache, v_cache, lens, has_new, scale, window_left, lo, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, CPU, m) { m.impl("kv_decode_cpp", &kv_decode); }

}  // namespace genkern::kvd
