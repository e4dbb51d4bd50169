// Fused softmax in CUDA: softmax(scale * x) over rows, optional causal mask, float32 math.
//
// One thread block per row, one lane of reference.lane_sum per thread: thread t handles
// elements t, t + lanes, t + 2*lanes, ... in ascending order, then the block folds the lanes in
// halves. The lane count comes from the row length only (fusedtx/ops/softmax.py,
// native_cuda_lanes), so a row's bits never depend on the batch. When a row fits in
// kPerThread elements per thread it is kept in registers (one read of x); otherwise each pass
// re-reads x, mostly from L2.
#include "common.cuh"

namespace fusedtx::cuda {
namespace {

constexpr int kPerThread = 8;

__device__ __forceinline__ int64_t causal_valid(int64_t row, int64_t cols, int64_t n_queries, bool causal) {
  if (!causal) return cols;
  const int64_t n = row % n_queries + (cols - n_queries) + 1;
  return n < 0 ? 0 : (n > cols ? cols : n);
}

template <typename T, bool kCached>
__global__ void softmax_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t cols, float scale,
                                   bool causal, int64_t n_queries) {
  float* scratch = shared_memory();
  const int64_t row = blockIdx.x;
  const int t = threadIdx.x, lanes = blockDim.x;
  const T* x_row = x + row * cols;
  T* y_row = y + row * cols;
  const int64_t n_valid = causal_valid(row, cols, n_queries, causal);

  float z[kCached ? kPerThread : 1];
  float m = -INFINITY;
  if constexpr (kCached) {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t j = t + static_cast<int64_t>(k) * lanes;
      z[k] = j < n_valid ? __fmul_rn(load_f32(x_row + j), scale) : -INFINITY;
      m = fmaxf(m, z[k]);
    }
  } else {
    for (int64_t j = t; j < n_valid; j += lanes) m = fmaxf(m, __fmul_rn(load_f32(x_row + j), scale));
  }
  // fmaxf skips NaN, unlike the reference's amax: harmless, a NaN still turns the sum (and so
  // the whole row) into NaN.
  m = block_max(m, scratch);

  float acc = 0.0f;
  if constexpr (kCached) {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t j = t + static_cast<int64_t>(k) * lanes;
      z[k] = j < n_valid ? exp_f32(__fsub_rn(z[k], m)) : 0.0f;
      acc = __fadd_rn(acc, z[k]);
    }
  } else {
    for (int64_t j = t; j < n_valid; j += lanes) acc = __fadd_rn(acc, exp_f32(__fsub_rn(__fmul_rn(load_f32(x_row + j), scale), m)));
  }
  const float s = block_fold_lanes(acc, scratch);

  if constexpr (kCached) {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t j = t + static_cast<int64_t>(k) * lanes;
      if (j < cols) store_f32(y_row + j, j < n_valid ? __fdiv_rn(z[k], s) : 0.0f);
    }
  } else {
    for (int64_t j = t; j < cols; j += lanes) {
      const float e = j < n_valid ? exp_f32(__fsub_rn(__fmul_rn(load_f32(x_row + j), scale), m)) : 0.0f;
      store_f32(y_row + j, j < n_valid ? __fdiv_rn(e, s) : 0.0f);
    }
  }
}

template <typename T>
__global__ void softmax_bwd_kernel(const T* __restrict__ grad_y, const T* __restrict__ y, T* __restrict__ grad_x,
                                   int64_t cols, float scale) {
  float* scratch = shared_memory();
  const int64_t row = blockIdx.x;
  const int t = threadIdx.x, lanes = blockDim.x;
  const T* dy_row = grad_y + row * cols;
  const T* y_row = y + row * cols;
  T* dx_row = grad_x + row * cols;
  float acc = 0.0f;
  for (int64_t j = t; j < cols; j += lanes) acc = __fadd_rn(acc, __fmul_rn(load_f32(dy_row + j), load_f32(y_row + j)));
  const float dot = block_fold_lanes(acc, scratch);
  for (int64_t j = t; j < cols; j += lanes) {
    const float yj = load_f32(y_row + j);
    store_f32(dx_row + j, __fmul_rn(__fmul_rn(yj, __fsub_rn(load_f32(dy_row + j), dot)), scale));
  }
}

bool valid_lanes(int lanes) { return lanes >= 32 && lanes <= 1024 && (lanes & (lanes - 1)) == 0; }

template <typename T>
cudaError_t launch_forward(const void* x, void* y, int64_t rows, int64_t cols, float scale, bool causal,
                           int64_t n_queries, int lanes, cudaStream_t stream) {
  const size_t smem = lanes * sizeof(float);
  if (cols <= static_cast<int64_t>(lanes) * kPerThread) {
    softmax_fwd_kernel<T, true><<<rows, lanes, smem, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), cols, scale, causal, n_queries);
  } else {
    softmax_fwd_kernel<T, false><<<rows, lanes, smem, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), cols, scale, causal, n_queries);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const void* grad_y, const void* y, void* grad_x, int64_t rows, int64_t cols, float scale,
                            int lanes, cudaStream_t stream) {
  softmax_bwd_kernel<T><<<rows, lanes, lanes * sizeof(float), stream>>>(
      static_cast<const T*>(grad_y), static_cast<const T*>(y), static_cast<T*>(grad_x), cols, scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t softmax_forward(const void* x, void* y, int64_t rows, int64_t cols, float scale, bool causal,
                            int64_t n_queries, int lanes, DType dtype, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (!valid_lanes(lanes) || rows > INT32_MAX || (causal && n_queries <= 0)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return launch_forward<float>(x, y, rows, cols, scale, causal, n_queries, lanes, stream);
    case DType::kFloat16: return launch_forward<__half>(x, y, rows, cols, scale, causal, n_queries, lanes, stream);
    case DType::kBFloat16: return launch_forward<__nv_bfloat16>(x, y, rows, cols, scale, causal, n_queries, lanes, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t softmax_backward(const void* grad_y, const void* y, void* grad_x, int64_t rows, int64_t cols,
                             float scale, int lanes, DType dtype, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (!valid_lanes(lanes) || rows > INT32_MAX) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return launch_backward<float>(grad_y, y, grad_x, rows, cols, scale, lanes, stream);
    case DType::kFloat16: return launch_backward<__half>(grad_y, y, grad_x, rows, cols, scale, lanes, stream);
    case DType::kBFloat16: return launch_backward<__nv_bfloat16>(grad_y, y, grad_x, rows, cols, scale, lanes, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fusedtx::cuda
