// Torch glue for csrc/cuda/log_softmax.cu: checks, allocation, stream, and the CUDA registrations
// of fusedtx_native::log_softmax_forward / log_softmax_backward (schemas in csrc/registration.cpp).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "glue.h"

namespace fusedtx::cuda {
namespace {

at::Tensor log_softmax_forward_cuda(const at::Tensor& x, int64_t lanes) {
  check_rows(x, at::kCUDA, "log_softmax_forward", "x");
  check_lanes(lanes, "log_softmax_forward");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  check_launch(log_softmax_forward(x.const_data_ptr(), y.mutable_data_ptr(), x.size(0), x.size(1),
                                   static_cast<int>(lanes), dtype_of(x, "log_softmax_forward"),
                                   c10::cuda::getCurrentCUDAStream()),
               "log_softmax_forward");
  return y;
}

at::Tensor log_softmax_backward_cuda(const at::Tensor& grad_y, const at::Tensor& y, int64_t lanes) {
  check_rows(grad_y, at::kCUDA, "log_softmax_backward", "grad_y");
  check_rows(y, at::kCUDA, "log_softmax_backward", "y");
  TORCH_CHECK(grad_y.sizes() == y.sizes() && grad_y.scalar_type() == y.scalar_type() && grad_y.device() == y.device(),
              "log_softmax_backward: grad_y must match y in shape, dtype and device: y is ", y.sizes(), " ",
              y.scalar_type(), " on ", y.device(), ", grad_y is ", grad_y.sizes(), " ", grad_y.scalar_type(), " on ",
              grad_y.device());
  check_lanes(lanes, "log_softmax_backward");
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor dx = at::empty_like(y);
  check_launch(log_softmax_backward(grad_y.const_data_ptr(), y.const_data_ptr(), dx.mutable_data_ptr(), y.size(0),
                                    y.size(1), static_cast<int>(lanes), dtype_of(y, "log_softmax_backward"),
                                    c10::cuda::getCurrentCUDAStream()),
               "log_softmax_backward");
  return dx;
}

}  // namespace
}  // namespace fusedtx::cuda

TORCH_LIBRARY_IMPL(fusedtx_native, CUDA, m) {
  m.impl("log_softmax_forward", &fusedtx::cuda::log_softmax_forward_cuda);
  m.impl("log_softmax_backward", &fusedtx::cuda::log_softmax_backward_cuda);
}
