// Torch glue for csrc/cuda/softmax.cu: checks, allocation, stream, and the CUDA registrations of
// fusedtx_native::softmax_forward / softmax_backward (schemas in csrc/registration.cpp).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "glue.h"

namespace fusedtx::cuda {
namespace {

at::Tensor softmax_forward_cuda(const at::Tensor& x, double scale, bool causal, int64_t n_queries, int64_t lanes) {
  check_rows(x, at::kCUDA, "softmax_forward", "x");
  TORCH_CHECK(!causal || n_queries > 0, "softmax_forward: n_queries must be positive when causal");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  check_launch(softmax_forward(x.const_data_ptr(), y.mutable_data_ptr(), x.size(0), x.size(1), static_cast<float>(scale),
                               causal, n_queries, static_cast<int>(lanes), dtype_of(x, "softmax_forward"),
                               c10::cuda::getCurrentCUDAStream()),
               "softmax_forward");
  return y;
}

at::Tensor softmax_backward_cuda(const at::Tensor& grad_y, const at::Tensor& y, double scale, int64_t lanes) {
  check_rows(grad_y, at::kCUDA, "softmax_backward", "grad_y");
  check_rows(y, at::kCUDA, "softmax_backward", "y");
  TORCH_CHECK(grad_y.sizes() == y.sizes() && grad_y.scalar_type() == y.scalar_type(),
              "softmax_backward: grad_y and y must match in shape and dtype");
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor dx = at::empty_like(y);
  check_launch(softmax_backward(grad_y.const_data_ptr(), y.const_data_ptr(), dx.mutable_data_ptr(), y.size(0), y.size(1),
                                static_cast<float>(scale), static_cast<int>(lanes), dtype_of(y, "softmax_backward"),
                                c10::cuda::getCurrentCUDAStream()),
               "softmax_backward");
  return dx;
}

}  // namespace
}  // namespace fusedtx::cuda

TORCH_LIBRARY_IMPL(fusedtx_native, CUDA, m) {
  m.impl("softmax_forward", &fusedtx::cuda::softmax_forward_cuda);
  m.impl("softmax_backward", &fusedtx::cuda::softmax_backward_cuda);
}
