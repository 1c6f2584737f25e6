// The Python module genkern._C: build facts and typed entry points to the ops.
//
// The op schemas are declared in Python (genkern/ops/_library.py), so that the Triton impl
// does not depend on this extension; the C++ files only register kernels against them
// (TORCH_LIBRARY_IMPL): csrc/<stem>.cpp the CPU kernels, csrc/<stem>_autograd.cpp the C++
// autograd of the ops whose per-call cost a benchmark showed it matters for.
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "common.h"

namespace genkern {
namespace {

// Eager entry points: the same ops as torch.ops.genkern.*, called through a typed
// dispatcher handle. This skips torch.ops' per-call parsing of the arguments against
// the schema (a few microseconds, which matter at the sizes GANs and VAEs train with).
// torch.compile traces the torch.ops path instead (genkern/ops/_common.py). The handles
// are looked up on first use, after genkern/ops/_library.py has declared the schemas.
using OptTensor = std::optional<at::Tensor>;

// gan_loss_<family>_fwd's loss alone (what the public functions return): the saved gradients
// stay with the autograd node, and two tensors fewer cross into Python per call.
at::Tensor gan_loss(const OptTensor& real, const at::Tensor& fake, int64_t kind, int64_t reduction, double label,
                    bool generator, bool triton) {
  using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const OptTensor&, const at::Tensor&, int64_t, int64_t,
                                                             double, bool);
  static const auto cpp = typed_op<Sig>("genkern::gan_loss_cpp_fwd");
  static const auto tri = typed_op<Sig>("genkern::gan_loss_triton_fwd");
  return std::get<0>((triton ? tri : cpp).call(real, fake, kind, reduction, label, generator));
}

std::tuple<at::Tensor, at::Tensor> reparam_kl(const at::Tensor& mu, const at::Tensor& logvar, const OptTensor& eps,
                                              const OptTensor& prior_mu, const OptTensor& prior_logvar,
                                              const OptTensor& seed, bool triton) {
  using Sig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                 const OptTensor&, const OptTensor&, const OptTensor&);
  static const auto cpp = typed_op<Sig>("genkern::reparam_kl_cpp_fwd");
  static const auto tri = typed_op<Sig>("genkern::reparam_kl_triton_fwd");
  return (triton ? tri : cpp).call(mu, logvar, eps, prior_mu, prior_logvar, seed);
}

}  // namespace
}  // namespace genkern

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "genkern C++ CPU kernels (ops are reached through torch.ops.genkern)";
  m.def("build_info", &genkern::build_info, "Compiler, vector ISA and OpenMP state of this build");
  m.def("gan_loss", &genkern::gan_loss,
        "torch.ops.genkern.gan_loss_<cpp|triton>_fwd(...)[0] without torch.ops' overhead");
  m.def("reparam_kl", &genkern::reparam_kl,
        "torch.ops.genkern.reparam_kl_<cpp|triton>_fwd without torch.ops' overhead");
}
