// Torch glue for csrc/cuda/rms_norm.cu: checks, allocation, stream, and the CUDA registrations
// of fusedtx_native::rms_norm_forward / rms_norm_backward (schemas in csrc/registration.cpp).
//
// Tensors arrive as contiguous (rows, N) views; rstd and the weight gradient are in the compute
// dtype: float64 for float64 x, float32 otherwise.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "glue.h"

namespace fusedtx::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> rms_norm_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                         double eps, int64_t lanes) {
  constexpr const char* op = "rms_norm_forward";
  check_rows(x, at::kCUDA, op, "x");
  const DType dtype = dtype_of(x, op, /*allow_float64=*/true);
  check_lanes(lanes, op);
  TORCH_CHECK(x.size(0) <= INT32_MAX, op, ": x may have at most 2^31 - 1 rows (one thread block each), got ",
              x.size(0));
  const at::Tensor* w = check_param(weight, x, op, "weight");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(compute_dtype(x)));
  check_launch(rms_norm_forward(x.const_data_ptr(), w ? w->const_data_ptr() : nullptr, y.mutable_data_ptr(),
                                rstd.mutable_data_ptr(), x.size(0), x.size(1), eps, static_cast<int>(lanes), dtype,
                                w ? dtype_of(*w, op, true) : dtype, c10::cuda::getCurrentCUDAStream()),
               op);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                          const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                                                          bool need_param_grads, int64_t lanes, int64_t groups) {
  constexpr const char* op = "rms_norm_backward";
  const DType dtype = check_norm_backward(grad_y, x, lanes, groups, need_param_grads, op);
  check_stat(rstd, x, op, "rstd");
  const at::Tensor* w = check_param(weight, x, op, "weight");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor dx = at::empty_like(x);
  // The launcher fills dweight (zeros for rows == 0), or leaves it empty.
  at::Tensor dweight = at::empty({need_param_grads ? n : 0}, x.options().dtype(compute_dtype(x)));
  // The (groups, N) partials of dweight; a fixed size, so a fixed summation order.
  at::Tensor workspace;
  if (need_param_grads && rows > 0) {
    workspace = at::empty({rms_norm_backward_workspace_elems(n, groups)}, x.options().dtype(compute_dtype(x)));
  }
  check_launch(rms_norm_backward(grad_y.const_data_ptr(), x.const_data_ptr(), rstd.const_data_ptr(),
                                 w ? w->const_data_ptr() : nullptr, dx.mutable_data_ptr(), dweight.mutable_data_ptr(),
                                 workspace.defined() ? workspace.mutable_data_ptr() : nullptr, rows, n,
                                 need_param_grads, static_cast<int>(lanes), static_cast<int>(groups), dtype,
                                 w ? dtype_of(*w, op, true) : dtype, c10::cuda::getCurrentCUDAStream()),
               op);
  return {dx, dweight};
}

}  // namespace
}  // namespace fusedtx::cuda

TORCH_LIBRARY_IMPL(fusedtx_native, CUDA, m) {
  m.impl("rms_norm_forward", &fusedtx::cuda::rms_norm_forward_cuda);
  m.impl("rms_norm_backward", &fusedtx::cuda::rms_norm_backward_cuda);
}
