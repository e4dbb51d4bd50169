// Torch glue for csrc/cuda/linear.cu: checks, allocation, stream, and the CUDA registrations of
// fusedtx_native::linear_matmul / linear_bias_act_backward (schemas in csrc/registration.cpp).
//
// linear_matmul takes a and b with any strides (the kernel reads them through their strides: no copy
// for weight.t() or grad.t()); y and the pre-activation are contiguous in the operands' dtype.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "glue.h"

namespace fusedtx::cuda {
namespace {

void check_activation(int64_t activation, const char* op) {
  TORCH_CHECK(activation >= 0 && activation <= 3, op,
              ": activation must be 0 (none), 1 (gelu), 2 (gelu_tanh) or 3 (swiglu), got ", activation);
}

// A 2-D CUDA operand of a matmul, any strides.
void check_operand(const at::Tensor& t, const char* op, const char* name) {
  check_device(t, at::kCUDA, op, name);
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got sizes ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> linear_matmul_cuda(const at::Tensor& a, const at::Tensor& b_arg,
                                                      const std::optional<at::Tensor>& bias, int64_t activation,
                                                      bool save_preact, int64_t k_block,
                                                      const std::optional<at::Tensor>& b_odd, int64_t pair_dim) {
  constexpr const char* op = "linear_matmul";
  TORCH_CHECK(k_block == kLinearKBlock, op, ": the CUDA kernel sums K in blocks of ", kLinearKBlock, ", asked for ", k_block);
  check_operand(a, op, "a");
  check_operand(b_arg, op, "b");
  at::Tensor b = b_arg;
  if (b_odd.has_value() && b_odd->defined()) {
    // The kernel reads one operand: the pair is interleaved first (a copy of b's size twice,
    // reference.interleave_pair), rows 2i / 2i + 1 (pair_dim 0) or columns (1), in the layout of
    // a packed weight: columns contiguous when b's are (b = weight.t()).
    check_operand(*b_odd, op, "b_odd");
    TORCH_CHECK(pair_dim == 0 || pair_dim == 1, op, ": pair_dim must be 0 or 1, got ", pair_dim);
    TORCH_CHECK(b_odd->sizes() == b_arg.sizes() && b_odd->scalar_type() == b_arg.scalar_type() &&
                    b_odd->device() == b_arg.device(),
                op, ": b_odd must have b's sizes, dtype and device, got ", b_odd->sizes(), " ", b_odd->scalar_type(),
                " on ", b_odd->device());
    if (b_arg.stride(0) == 1 && b_arg.stride(1) != 1) {
      const int64_t d = 1 - pair_dim;
      b = at::stack({b_arg.t(), b_odd->t()}, d + 1).flatten(d, d + 1).t();
    } else {
      b = at::stack({b_arg, *b_odd}, pair_dim + 1).flatten(pair_dim, pair_dim + 1);
    }
  }
  const DType dtype = dtype_of(a, op);
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": b must have a's dtype ", a.scalar_type(), ", got ",
              b.scalar_type());
  TORCH_CHECK(b.device() == a.device(), op, ": b must be on a's device ", a.device(), ", got ", b.device());
  TORCH_CHECK(a.size(1) == b.size(0), op, ": a's columns (", a.size(1), ") must equal b's rows (", b.size(0),
              "); a is ", a.sizes(), ", b is ", b.sizes());
  check_activation(activation, op);
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  TORCH_CHECK(activation != 3 || n % 2 == 0, op, ": the SwiGLU epilogue takes gate/up pairs: b must have an even "
              "number of columns, got ", n);
  at::Tensor bias_c;  // contiguous (n,), or undefined
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device() == a.device(), op, ": bias must be on a's device ", a.device(), ", got ",
                bias->device());
    TORCH_CHECK(bias->scalar_type() == a.scalar_type(), op, ": bias must have a's dtype ", a.scalar_type(), ", got ",
                bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must have shape (", n,
                ",) (b's columns), got ", bias->sizes());
    bias_c = bias->contiguous();
  }
  // One thread block per 128 x 128 output tile, in a 1-D grid.
  TORCH_CHECK((m + 127) / 128 <= INT32_MAX / std::max<int64_t>((n + 127) / 128, 1), op,
              ": output too large for one launch (", m, " x ", n, ")");

  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor y = at::empty({m, activation == 3 ? n / 2 : n}, a.options());
  at::Tensor preact = save_preact && activation != 0 ? at::empty({m, n}, a.options()) : at::empty({0}, a.options());
  check_launch(linear_matmul(a.const_data_ptr(), a.stride(0), a.stride(1), b.const_data_ptr(), b.stride(0), b.stride(1),
                      bias_c.defined() ? bias_c.const_data_ptr() : nullptr, y.mutable_data_ptr(),
                      preact.numel() > 0 ? preact.mutable_data_ptr() : nullptr, m, n, k, static_cast<int>(activation),
                      dtype, c10::cuda::getCurrentCUDAStream()),
               op);
  return {y, preact};
}

std::tuple<at::Tensor, at::Tensor> linear_bias_act_backward_cuda(const at::Tensor& grad_y,
                                                          const std::optional<at::Tensor>& preact,
                                                          int64_t activation, bool need_bias_grad, int64_t groups) {
  constexpr const char* op = "linear_bias_act_backward";
  check_rows(grad_y, at::kCUDA, op, "grad_y");
  const DType dtype = dtype_of(grad_y, op);
  check_activation(activation, op);
  TORCH_CHECK(groups >= 1 && groups <= INT32_MAX, op, ": groups must be in [1, 2^31 - 1], got ", groups);
  const bool has_preact = preact.has_value() && preact->defined();
  TORCH_CHECK(activation == 0 || has_preact, op, ": preact is required with an activation (", activation, ")");
  // n: preact's and grad_preact's columns, twice grad_y's for SwiGLU's gate/up pairs.
  const int64_t rows = grad_y.size(0), n = activation == 3 ? 2 * grad_y.size(1) : grad_y.size(1);
  if (activation != 0) {
    const at::Tensor& h = *preact;
    TORCH_CHECK(h.dim() == 2 && h.size(0) == rows && h.size(1) == n && h.scalar_type() == grad_y.scalar_type() &&
                    h.device() == grad_y.device(),
                op, ": preact must be (", rows, ", ", n, ") in grad_y's dtype and device: grad_y is ", grad_y.sizes(),
                " ", grad_y.scalar_type(), " on ", grad_y.device(), ", preact is ", h.sizes(), " ", h.scalar_type(),
                " on ", h.device());
    TORCH_CHECK(h.is_contiguous(), op, ": preact must be contiguous");
  }

  const c10::cuda::CUDAGuard guard(grad_y.device());
  const at::TensorOptions f32 = grad_y.options().dtype(at::kFloat);
  // Without an activation grad_preact is grad_y itself: the caller uses grad_y.
  at::Tensor grad_preact = activation != 0 ? at::empty({rows, n}, grad_y.options()) : at::empty({0}, grad_y.options());
  // The launcher fills grad_bias (zeros for rows == 0), or leaves it empty.
  at::Tensor grad_bias = at::empty({need_bias_grad ? n : 0}, f32);
  // The (groups, N) partials: a fixed size, so a fixed summation order.
  at::Tensor workspace;
  if (need_bias_grad && rows > 0) workspace = at::empty({linear_bias_act_backward_workspace_elems(n, groups)}, f32);
  check_launch(linear_bias_act_backward(grad_y.const_data_ptr(), activation != 0 ? preact->const_data_ptr() : nullptr,
                                 activation != 0 ? grad_preact.mutable_data_ptr() : nullptr,
                                 need_bias_grad ? grad_bias.mutable_data_ptr() : nullptr,
                                 workspace.defined() ? workspace.mutable_data_ptr() : nullptr, rows, n,
                                 static_cast<int>(activation), need_bias_grad, static_cast<int>(groups), dtype,
                                 c10::cuda::getCurrentCUDAStream()),
               op);
  return {grad_preact, grad_bias};
}

}  // namespace
}  // namespace fusedtx::cuda

TORCH_LIBRARY_IMPL(fusedtx_native, CUDA, m) {
  m.impl("linear_matmul", &fusedtx::cuda::linear_matmul_cuda);
  m.impl("linear_bias_act_backward", &fusedtx::cuda::linear_bias_act_backward_cuda);
}
