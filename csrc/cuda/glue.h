// Torch-side helpers for the CUDA glue files (compiled by the host compiler, never by nvcc).
#pragma once

#include <ATen/ATen.h>

#include "launchers.h"

namespace fusedtx::cuda {

inline DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(), " (expected float32, float16 or bfloat16)");
  }
}

inline void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), op, ": ", name, " must be a contiguous 2-D tensor, got sizes ", t.sizes());
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace fusedtx::cuda
