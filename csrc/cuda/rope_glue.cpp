// Torch glue for csrc/cuda/rope.cu: checks, allocation, stream, and the CUDA registrations of
// fusedtx_native::rope_forward / rope_backward (schemas in csrc/registration.cpp).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "glue.h"

namespace fusedtx::cuda {
namespace {

using Launcher = decltype(&rope_forward);

at::Tensor rope_cuda(Launcher launch, const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos,
                     const at::Tensor& sin, const char* op) {
  check_device(x, at::kCUDA, op, "x");
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0 && (x.size(3) <= 1 || x.stride(3) == 1), op,
              ": x must be 4-D (batch, heads, tokens, head_dim) with an even, contiguous head dim, got sizes ",
              x.sizes(), " strides ", x.strides());
  for (auto [t, name] : {std::pair{&positions, "positions"}, {&cos, "cos"}, {&sin, "sin"}}) {
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
                t->device());
    TORCH_CHECK(t->dim() == 2 && t->is_contiguous(), op, ": ", name, " must be a contiguous 2-D tensor, got sizes ",
                t->sizes());
  }
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.size(0) == x.size(0) && positions.size(1) == x.size(2),
              op, ": positions must be int64 (batch, tokens) matching x, got ", positions.scalar_type(), " ",
              positions.sizes());
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.sizes() == sin.sizes() &&
                  cos.size(1) * 2 == x.size(3) && cos.size(0) >= 1,
              op, ": cos and sin must be float32 (max_positions, head_dim / 2), got ", cos.sizes(), " and ",
              sin.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t strides[3] = {x.stride(0), x.stride(1), x.stride(2)};
  check_launch(launch(x.const_data_ptr(), strides, positions.const_data_ptr<int64_t>(), cos.const_data_ptr<float>(),
                    sin.const_data_ptr<float>(), y.mutable_data_ptr(), x.size(0), x.size(1), x.size(2), x.size(3),
                    cos.size(0), dtype_of(x, op, /*allow_float64=*/true),
                    c10::cuda::getCurrentCUDAStream()),
               op);
  return y;
}

at::Tensor rope_forward_cuda(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos,
                             const at::Tensor& sin) {
  return rope_cuda(rope_forward, x, positions, cos, sin, "rope_forward");
}

at::Tensor rope_backward_cuda(const at::Tensor& grad_y, const at::Tensor& positions, const at::Tensor& cos,
                              const at::Tensor& sin) {
  return rope_cuda(rope_backward, grad_y, positions, cos, sin, "rope_backward");
}

}  // namespace
}  // namespace fusedtx::cuda

TORCH_LIBRARY_IMPL(fusedtx_native, CUDA, m) {
  m.impl("rope_forward", &fusedtx::cuda::rope_forward_cuda);
  m.impl("rope_backward", &fusedtx::cuda::rope_backward_cuda);
}
