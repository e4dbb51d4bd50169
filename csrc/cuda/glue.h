// Torch-side helpers for the CUDA glue files (compiled by the host compiler, never by nvcc); the
// argument checks they share with the CPU ops are in ../checks.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../checks.h"
#include "launchers.h"

namespace fusedtx::cuda {

// allow_float64: for ops that also take float64 tensors (and then compute in double).
inline DType dtype_of(const at::Tensor& t, const char* op, bool allow_float64 = false) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble:
      if (allow_float64) return DType::kFloat64;
      [[fallthrough]];
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(), " (expected float32, float16 or bfloat16",
                  allow_float64 ? " or float64)" : ")");
  }
}

// The row kernels run `lanes` threads per block, one per lane of reference.lane_sum.
inline void check_lanes(int64_t lanes, const char* op) {
  TORCH_CHECK(lanes >= 32 && lanes <= 1024 && (lanes & (lanes - 1)) == 0, op,
              ": lanes must be a power of two in [32, 1024], got ", lanes);
}

// The row normalisations' (layer_norm, rms_norm) compute dtype: float64 for float64 x, else float32.
inline at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A row normalisation's weight / bias: absent, or a contiguous (N,) tensor on x's device of x's
// dtype or float32. Returns it, or nullptr when absent.
inline const at::Tensor* check_param(const std::optional<at::Tensor>& p, const at::Tensor& x, const char* op,
                                     const char* name) {
  if (!p.has_value() || !p->defined()) return nullptr;
  const at::Tensor& t = *p;
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name, " must have shape (", x.size(1),
              ",) to match x's last dim, got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, op, ": ", name, " must be ",
              x.scalar_type(), " (x's dtype) or float32, got ", t.scalar_type());
  return &t;
}

// A row normalisation's saved statistic (mean, rstd): a contiguous (rows,) tensor in the compute dtype.
inline void check_stat(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0) && t.is_contiguous(), op, ": ", name,
              " must be a contiguous tensor of shape (", x.size(0), ",) (one value per row of x), got sizes ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == compute_dtype(x), op, ": ", name, " must be ", compute_dtype(x), " for ",
              x.scalar_type(), " x, got ", t.scalar_type());
}

// A row normalisation's backward arguments but its statistics and weight: x and grad_y contiguous
// (rows, N) of one shape, dtype and device, the lanes, the row groups, one block per row without
// parameter gradients. Returns x's DType.
inline DType check_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, int64_t lanes, int64_t groups,
                                 bool need_param_grads, const char* op) {
  check_rows(x, at::kCUDA, op, "x");
  check_rows(grad_y, at::kCUDA, op, "grad_y");
  const DType dtype = dtype_of(x, op, /*allow_float64=*/true);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              op, ": grad_y must match x in shape, dtype and device: x is ", x.sizes(), " ", x.scalar_type(), " on ",
              x.device(), ", grad_y is ", grad_y.sizes(), " ", grad_y.scalar_type(), " on ", grad_y.device());
  check_lanes(lanes, op);
  TORCH_CHECK(groups >= 1 && groups <= INT32_MAX, op, ": groups must be in [1, 2^31 - 1], got ", groups);
  TORCH_CHECK(need_param_grads || x.size(0) <= INT32_MAX, op,
              ": x may have at most 2^31 - 1 rows (one thread block each), got ", x.size(0));
  return dtype;
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace fusedtx::cuda
