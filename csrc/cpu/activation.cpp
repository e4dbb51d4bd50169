// The activation op on CPU: y = act(x) and dx = dy * act'(x), elementwise, float32 math, as
// reference.activation_forward / activation_backward (GELU, GELU-tanh, SiLU).
//
// Every element runs the same operations (activations.h, no fused multiply-add): the vector
// body and the scalar tail give the same bits, so neither the tensor's size nor how its range is
// cut between threads can change an element's result -- the property PyTorch's own silu / gelu
// lack on CPU (their tails use other formulas).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "activations.h"
#include "common.h"

namespace fusedtx::cpu {
namespace {

constexpr int kLen = kRVecLen<float>;
constexpr int64_t kGrain = 32768;  // elements per parallel task: enough to amortise scheduling

template <typename Fn>
void dispatch_elementwise(int64_t act, const char* op, Fn&& fn) {
  switch (act) {
    case kActGelu: fn(std::integral_constant<int, kActGelu>{}); break;
    case kActGeluTanh: fn(std::integral_constant<int, kActGeluTanh>{}); break;
    case kActSilu: fn(std::integral_constant<int, kActSilu>{}); break;
    default: TORCH_CHECK(false, op, ": unknown activation code ", act, " (expected 1 gelu, 2 gelu_tanh, 4 silu)");
  }
}

at::Tensor activation_forward_cpu(const at::Tensor& x, int64_t activation) {
  check_flat(x, at::kCPU, "activation_forward", "x");
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  dispatch_float_types(x.scalar_type(), "activation_forward", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    dispatch_elementwise(activation, "activation_forward", [&](auto act) {
      constexpr int kAct = decltype(act)::value;
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        int64_t i = begin;
        for (; i + kLen <= end; i += kLen) rstore_as<T, float>(yp + i, activation_forward<kAct>(rload_as<float>(xp + i)));
        for (; i < end; ++i) yp[i] = from_float<T>(activation_forward<kAct>(to_float(xp[i])));
      });
    });
  });
  return y;
}

at::Tensor activation_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, int64_t activation) {
  check_flat(grad_y, at::kCPU, "activation_backward", "grad_y");
  check_flat(x, at::kCPU, "activation_backward", "x");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "activation_backward: grad_y and x must match in shape and dtype, got ", grad_y.sizes(), " ",
              grad_y.scalar_type(), " and ", x.sizes(), " ", x.scalar_type());
  at::Tensor dx = at::empty_like(x);
  const int64_t n = x.numel();
  dispatch_float_types(x.scalar_type(), "activation_backward", [&](auto tag) {
    using T = decltype(tag);
    const T* dyp = grad_y.const_data_ptr<T>();
    const T* xp = x.const_data_ptr<T>();
    T* dxp = dx.mutable_data_ptr<T>();
    dispatch_elementwise(activation, "activation_backward", [&](auto act) {
      constexpr int kAct = decltype(act)::value;
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        int64_t i = begin;
        for (; i + kLen <= end; i += kLen) {
          rstore_as<T, float>(dxp + i, rload_as<float>(dyp + i) * activation_derivative<kAct>(rload_as<float>(xp + i)));
        }
        for (; i < end; ++i) dxp[i] = from_float<T>(to_float(dyp[i]) * activation_derivative<kAct>(to_float(xp[i])));
      });
    });
  });
  return dx;
}

}  // namespace
}  // namespace fusedtx::cpu

TORCH_LIBRARY_IMPL(fusedtx_native, CPU, m) {
  m.impl("activation_forward", &fusedtx::cpu::activation_forward_cpu);
  m.impl("activation_backward", &fusedtx::cpu::activation_backward_cpu);
}
