// Host entry points of the CUDA kernels: raw pointers and a cudaStream_t, no torch types, so
// that the .cu files compile with nvcc alone (the torch glue lives in <op>_glue.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fusedtx::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// softmax(scale * x) over each row of a contiguous (rows, cols) tensor; `lanes` threads per
// row (a power of two in [32, 1024]) are the lanes of reference.lane_sum. Causal: row r is
// query r % n_queries and sees keys j <= r % n_queries + cols - n_queries.
cudaError_t softmax_forward(const void* x, void* y, int64_t rows, int64_t cols, float scale, bool causal,
                            int64_t n_queries, int lanes, DType dtype, cudaStream_t stream);

// dx = scale * y * (dy - sum(dy * y)) per row.
cudaError_t softmax_backward(const void* grad_y, const void* y, void* grad_x, int64_t rows, int64_t cols,
                             float scale, int lanes, DType dtype, cudaStream_t stream);

}  // namespace fusedtx::cuda
