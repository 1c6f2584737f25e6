// CPU kernel of gan_loss: the loss and its gradient w.r.t. the logits in one pass (the
// autograd of gan_loss_cpp / gan_loss_triton is csrc/gan_loss_autograd.cpp).
//
// Every per-element term of genkern/reference/gan_loss.py is one of four shapes,
// evaluated with its derivative by `eval` below (x a logit; sp softplus, sg sigmoid):
//
//   kSoftplus  scale * sp(sign (x - shift)) + c1 x   d = scale sign sg(sign (x - shift)) + c1
//   kRelu      relu(shift + sign x)                  d = sign where shift + sign x > 0, else 0
//   kLinear    sign x                                d = sign
//   kSquare    (x - shift)^2 / 2                     d = x - shift
//
// (c1 = 1 - real_label gives the label-smoothed real term: l sp(-x) + (1 - l) sp(x) =
// sp(-x) + (1 - l) x.) A loss is one or two "sides" (tensor + term); "mean" scales each
// side's gradient by 1/N of its own tensor. kLinear sides (the wasserstein terms, the
// hinge generator term) have one derivative for every logit: their gradient is returned
// 0-d and expanded by the backward, never written per element (see gan_loss_fwd).
//
// Relativistic average: with x the tensor of the sp(-(x - mean(y))) term (real for D,
// fake for G) and y the other, a_i = sg(my - x_i), b_j = sg(y_j - mx), A = sum a,
// B = sum b, the mean loss has
//   dL/dx_k = -a_k / Nx - B / (Nx Ny),   dL/dy_k = b_k / Ny + A / (Nx Ny)
// and the sum loss dL/dx_k = -a_k - B / Nx, dL/dy_k = b_k + A / Ny: a first pass finds
// the means, a second the sums A and B (and the loss), a third writes the gradients.
// With "none" the kernel returns the per-element partials (-a_k, b_k) and the autograd
// backward adds the terms through the means: with incoming gradient g,
//   grad_x = g gx - mean(g gy),   grad_y = g gy - mean(g gx).
//
// Layout: tensors are flattened; fixed blocks of kBlock elements are spread over threads
// and each block's sums are kept apart and added in block order, so results do not depend
// on the thread count. Inside a block, tiles of kTile elements are summed in acc_t by a
// vectorised loop and the tile sums added in double (1M-element means stay accurate).
//
// Files: gan_loss_passes.h (element math, passes); this file maps a loss to its sides,
// checks the arguments and registers the kernel.
#include "gan_loss.h"

#include <ATen/Dispatch.h>

#include <tuple>
#include <type_traits>

#include "common.h"
#include "gan_loss_passes.h"

namespace genkern {
namespace gan {
namespace {

// --- the loss as sides ----------------------------------------------------------------
// x is the first side (real for D, fake for G), y the second (fake for D, real for the
// relativistic G; absent for the other G kinds).
template <typename scalar_t>
struct Side {
  const scalar_t* x = nullptr;
  scalar_t* grad = nullptr;
  int64_t n = 0;
  Term<at::opmath_type<scalar_t>> term;
};

template <int kShape, typename scalar_t>
double run_shape(Side<scalar_t> s0, Side<scalar_t> s1, int64_t reduction, bool relativistic, scalar_t* loss) {
  using acc_t = at::opmath_type<scalar_t>;
  if (reduction == kNone) {
    none_pass<kShape>(s0.n, s0.x, s0.term, s0.grad, s1.x, s1.term, s1.grad, loss);
    return 0;
  }
  bool mean = reduction == kMean;
  if (relativistic) {
    // The cross terms need A and B (sums of the derivatives) before any gradient is written.
    double n0 = static_cast<double>(s0.n), n1 = static_cast<double>(s1.n);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      // Side 1 first, its raw derivatives b_k written; side 0 then writes its final
      // gradients (B known); side 1's are fixed up by one affine pass once A is known.
      Sums b = side_pass<kShape>(s1.x, s1.n, s1.term, acc_t(1), acc_t(0), s1.grad);
      double B = b.deriv;
      Sums a = side_pass<kShape>(s0.x, s0.n, s0.term, acc_t(mean ? 1 / n0 : 1), acc_t(mean ? -B / (n0 * n1) : -B / n0),
                                 s0.grad);
      double A = -a.deriv;
      affine_pass(s1.grad, s1.n, acc_t(mean ? 1 / n1 : 1), acc_t(mean ? A / (n0 * n1) : A / n1));
      return mean ? a.term / n0 + b.term / n1 : a.term + b.term;
    }
    Sums a = side_pass<kShape>(s0.x, s0.n, s0.term, acc_t(0), acc_t(0), static_cast<scalar_t*>(nullptr));
    Sums b = side_pass<kShape>(s1.x, s1.n, s1.term, acc_t(0), acc_t(0), static_cast<scalar_t*>(nullptr));
    double A = -a.deriv, B = b.deriv;  // the derivatives of side 0 are -a_i
    side_pass<kShape>(s0.x, s0.n, s0.term, acc_t(mean ? 1 / n0 : 1), acc_t(mean ? -B / (n0 * n1) : -B / n0), s0.grad);
    side_pass<kShape>(s1.x, s1.n, s1.term, acc_t(mean ? 1 / n1 : 1), acc_t(mean ? A / (n0 * n1) : A / n1), s1.grad);
    return mean ? a.term / n0 + b.term / n1 : a.term + b.term;
  }
  double total = 0;
  for (const Side<scalar_t>* s : {&s0, &s1}) {
    if (!s->x) continue;
    double inv = mean ? 1.0 / static_cast<double>(s->n) : 1.0;
    total += side_pass<kShape>(s->x, s->n, s->term, acc_t(inv), acc_t(0), s->grad).term * inv;
  }
  return total;
}

template <typename scalar_t>
void run(const at::Tensor& r, const at::Tensor& f, at::Tensor& gr, at::Tensor& gf, at::Tensor& loss, int64_t kind,
         int64_t reduction, double real_label, bool generator) {
  using acc_t = at::opmath_type<scalar_t>;
  using T = Term<acc_t>;
  int shape = kSoftplus;
  if (kind != kRelativistic) {
    int linear = generator ? kind == kHinge || kind == kWasserstein : kind == kWasserstein;
    shape = linear ? kLinear : kind == kLeastSquares ? kSquare : kind == kHinge ? kRelu : kSoftplus;
  }
  // Linear terms have constant gradients (0-d, filled by gan_loss_fwd): nothing to write.
  auto side = [&](const at::Tensor& t, at::Tensor& g, T term) {
    return Side<scalar_t>{t.data_ptr<scalar_t>(), shape == kLinear ? nullptr : g.data_ptr<scalar_t>(), t.numel(), term};
  };
  Side<scalar_t> s0, s1;
  if (kind == kRelativistic) {  // x_side: sp(-(x - my)), y side: sp(y - mx)
    const at::Tensor &x = generator ? f : r, &y = generator ? r : f;
    at::Tensor &gx = generator ? gf : gr, &gy = generator ? gr : gf;
    acc_t mx = static_cast<acc_t>(mean_of(x.data_ptr<scalar_t>(), x.numel()));
    acc_t my = static_cast<acc_t>(mean_of(y.data_ptr<scalar_t>(), y.numel()));
    s0 = side(x, gx, T{-1, my, 1, 0});
    s1 = side(y, gy, T{1, mx, 1, 0});
  } else if (generator) {
    s0 = side(f, gf,
              kind == kNonsaturating  ? T{-1, 0, 1, 0}
              : kind == kMinimax      ? T{1, 0, -1, 0}
              : kind == kLeastSquares ? T{1, 1, 1, 0}
                                      : T{-1, 0, 1, 0});
  } else {
    acc_t c1 = static_cast<acc_t>(1.0 - real_label);
    bool sq = kind == kLeastSquares, hinge = kind == kHinge;
    s0 = side(r, gr, T{-1, acc_t(sq || hinge ? 1 : 0), 1, shape == kSoftplus ? c1 : acc_t(0)});
    s1 = side(f, gf, T{1, acc_t(hinge ? 1 : 0), 1, 0});
  }
  scalar_t* lp = loss.data_ptr<scalar_t>();
  double v = 0;
  switch (shape) {
    case kSoftplus: v = run_shape<kSoftplus>(s0, s1, reduction, kind == kRelativistic, lp); break;
    case kRelu: v = run_shape<kRelu>(s0, s1, reduction, false, lp); break;
    case kLinear: v = run_shape<kLinear>(s0, s1, reduction, false, lp); break;
    default: v = run_shape<kSquare>(s0, s1, reduction, false, lp); break;
  }
  if (reduction != kNone) *lp = static_cast<scalar_t>(static_cast<acc_t>(v));
}

}  // namespace
}  // namespace gan

// Terms whose derivative is one constant for every logit: the wasserstein terms (D and G),
// the hinge generator term, and real logits that a non-relativistic generator loss does not
// read (0). Their gradient is returned 0-d (below), so no per-element gradient is written.
bool const_grad_real(int64_t kind, bool generator) { return generator ? kind != kRelativistic : kind == kWasserstein; }
bool const_grad_fake(int64_t kind, bool generator) { return kind == kWasserstein || (generator && kind == kHinge); }

// That constant: the term's sign, over the tensor's size for "mean".
double const_grad_value(bool real, int64_t kind, int64_t reduction, bool generator, int64_t numel) {
  if (real && generator) return 0.0;
  double sign = real || generator ? -1.0 : 1.0;
  return reduction == kMean ? sign / static_cast<double>(numel) : sign;
}

namespace {

void check_args(const c10::optional<at::Tensor>& real, const at::Tensor& fake, int64_t kind, int64_t reduction,
                double real_label, bool generator) {
  GENKERN_CHECK_VALUE(kind >= 0 && kind < kNumKinds, "kind must be a code in [0, ", int64_t(kNumKinds),
                      ") (nonsaturating, minimax, hinge, wasserstein, least_squares, relativistic), got ", kind);
  GENKERN_CHECK_VALUE(reduction >= 0 && reduction < kNumReductions,
                      "reduction must be a code in [0, 3) (mean, sum, none), got ", reduction);
  check_float(fake, "fake_logits");
  check_cpu(fake, "fake_logits");
  GENKERN_CHECK_VALUE(fake.numel() > 0, "fake_logits is empty; a GAN loss needs at least one logit");
  bool uses_real = !generator || kind == kRelativistic;
  GENKERN_CHECK_VALUE(!uses_real || real.has_value(), "real_logits is required by the ",
                      generator ? "relativistic generator" : "discriminator", " loss, got None");
  GENKERN_CHECK_VALUE(generator || real_label == 1.0 || kind == kNonsaturating || kind == kMinimax,
                      "real_label only applies to the nonsaturating and minimax kinds, got real_label=", real_label,
                      " for kind code ", kind);
  if (!real.has_value()) return;
  GENKERN_CHECK_TYPE(real->scalar_type() == fake.scalar_type(), "real_logits has dtype ", real->scalar_type(),
                     " but fake_logits has ", fake.scalar_type());
  GENKERN_CHECK_VALUE(real->device() == fake.device(), "real_logits is on ", real->device(), " but fake_logits is on ",
                      fake.device());
  GENKERN_CHECK_VALUE(real->numel() > 0, "real_logits is empty; a GAN loss needs at least one logit");
  GENKERN_CHECK_VALUE(!uses_real || reduction != kNone || real->sizes() == fake.sizes(),
                      "reduction none needs real_logits and fake_logits of one shape, got ", real->sizes(), " and ",
                      fake.sizes());
}

}  // namespace

// (loss, grad_real, grad_fake), the schema of csrc/genkern.cpp, in the logits' dtype:
//   loss       0-d (mean, sum) or fake_logits' shape (none)
//   grad_real  real_logits' shape, contiguous; 0-d where const_grad_real (the constant
//              derivative, 1/N-scaled for mean); (0,) when real_logits is None
//   grad_fake  fake_logits' shape, contiguous; 0-d where const_grad_fake
// A 0-d gradient stands for that value at every element (broadcast it to the logits' shape);
// the autograd backward below returns it expanded, never materialised. The Triton launcher
// (genkern/triton/gan_loss.py) and the fake kernel (genkern/ops/gan_loss.py) follow the same
// contract.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gan_loss_fwd(const c10::optional<at::Tensor>& real,
                                                            const at::Tensor& fake, int64_t kind, int64_t reduction,
                                                            double real_label, bool generator) {
  check_args(real, fake, kind, reduction, real_label, generator);
  bool uses_real = !generator || kind == kRelativistic;
  bool cr = real.has_value() && const_grad_real(kind, generator), cf = const_grad_fake(kind, generator);
  auto opts = fake.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor f = fake.contiguous(), r = uses_real ? real->contiguous() : at::Tensor();
  at::Tensor loss = reduction == kNone ? at::empty(fake.sizes(), opts) : at::empty({}, opts);
  at::Tensor gf = cf ? at::empty({}, opts) : at::empty(fake.sizes(), opts);
  at::Tensor gr = !real.has_value() ? at::empty({0}, opts) : cr ? at::empty({}, opts) : at::empty(real->sizes(), opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fake.scalar_type(), "gan_loss_cpp_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gan::run<scalar_t>(r, f, gr, gf, loss, kind, reduction, real_label, generator);
    if (cr)
      *gr.data_ptr<scalar_t>() =
          static_cast<scalar_t>(static_cast<acc_t>(const_grad_value(true, kind, reduction, generator, real->numel())));
    if (cf)
      *gf.data_ptr<scalar_t>() =
          static_cast<scalar_t>(static_cast<acc_t>(const_grad_value(false, kind, reduction, generator, fake.numel())));
  });
  return {loss, gr, gf};
}

TORCH_LIBRARY_IMPL(genkern, CPU, m) { m.impl("gan_loss_cpp_fwd", &gan_loss_fwd); }

}  // namespace genkern
