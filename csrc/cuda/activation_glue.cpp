// Torch glue for csrc/cuda/activation.cu: checks, allocation, stream, and the CUDA registrations
// of fusedtx_native::activation_forward / activation_backward (schemas in csrc/registration.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "glue.h"

namespace fusedtx::cuda {
namespace {

at::Tensor activation_forward_cuda(const at::Tensor& x, int64_t activation) {
  check_flat(x, at::kCUDA, "activation_forward", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  TORCH_CHECK(activation == 1 || activation == 2 || activation == 4, "activation_forward: unknown activation code ",
              activation, " (expected 1 gelu, 2 gelu_tanh, 4 silu)");
  check_launch(activation_forward(x.const_data_ptr(), y.mutable_data_ptr(), x.numel(), static_cast<int>(activation),
                                  dtype_of(x, "activation_forward"), c10::cuda::getCurrentCUDAStream()),
               "activation_forward");
  return y;
}

at::Tensor activation_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, int64_t activation) {
  check_flat(grad_y, at::kCUDA, "activation_backward", "grad_y");
  check_flat(x, at::kCUDA, "activation_backward", "x");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "activation_backward: grad_y and x must match in shape and dtype, got ", grad_y.sizes(), " ",
              grad_y.scalar_type(), " and ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(activation == 1 || activation == 2 || activation == 4, "activation_backward: unknown activation code ",
              activation, " (expected 1 gelu, 2 gelu_tanh, 4 silu)");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  check_launch(activation_backward(grad_y.const_data_ptr(), x.const_data_ptr(), dx.mutable_data_ptr(), x.numel(),
                                   static_cast<int>(activation), dtype_of(x, "activation_backward"),
                                   c10::cuda::getCurrentCUDAStream()),
               "activation_backward");
  return dx;
}

}  // namespace
}  // namespace fusedtx::cuda

TORCH_LIBRARY_IMPL(fusedtx_native, CUDA, m) {
  m.impl("activation_forward", &fusedtx::cuda::activation_forward_cuda);
  m.impl("activation_backward", &fusedtx::cuda::activation_backward_cuda);
}
