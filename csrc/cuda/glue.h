// Torch-side helpers for the CUDA glue files (compiled by the host compiler, never by nvcc); the
// argument checks they share with the CPU ops are in ../checks.h.
#pragma once

#include <ATen/ATen.h>

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

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace fusedtx::cuda
