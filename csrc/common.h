// Shared helpers of the CPU kernels: argument checks, the op handle, build facts, and (through
// the headers below) the vectorised math, Philox noise and staging in the accumulation type.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "philox.h"
#include "staging.h"
#include "vec_math.h"

namespace genkern {

// Checks raise c10::ValueError / c10::TypeError, which reach Python as
// ValueError / TypeError, so a bad argument never gets near memory.
#define GENKERN_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
#define GENKERN_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, __VA_ARGS__)

inline void check_cpu(const at::Tensor& t, const char* name) {
  GENKERN_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the C++ kernels, got ", t.device());
}

inline void check_float(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  GENKERN_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, name,
                     " must be float16, bfloat16, float32 or float64, got ", s);
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  GENKERN_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
                     " has ", ref.scalar_type());
  GENKERN_CHECK_VALUE(t.sizes() == ref.sizes(), name, " has shape ", t.sizes(), " but ", ref_name, " has ",
                      ref.sizes());
}

// ceil(a / b) for a >= 0, b > 0.
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A typed handle to a genkern op, looked up once per call site (cache it in a
// function-local static): calling through it skips boxing the arguments.
template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>();
}

inline std::string build_info() {
  std::string s = "compiler=";
#if defined(__clang__)
  s += "clang " __clang_version__;
#elif defined(__GNUC__)
  s += "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__);
#else
  s += "unknown";
#endif
  s += "; simd=";
#if defined(__AVX512F__)
  s += "avx512";
#elif defined(__AVX2__)
  s += "avx2";
#elif defined(__ARM_NEON)
  s += "neon";
#else
  s += "scalar";
#endif
  s += "; openmp=";
#if defined(_OPENMP)
  s += "on";
#else
  s += "off";
#endif
  return s;
}

}  // namespace genkern
