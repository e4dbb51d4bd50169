// Fused log_softmax in CUDA over rows, float32 math.
//
// softmax.cu's layout: one thread block per row, one lane of reference.lane_sum per thread
// (thread t handles elements t, t + lanes, ... in ascending order, then the block folds the
// lanes in halves); the lane count comes from the row length only (policy.cuda_lanes), so a
// row's bits never depend on the batch. A row of at most kPerThread elements per thread is kept
// in registers (one read of x); a longer one is re-read by each pass, mostly from L2.
#include "common.cuh"

namespace fusedtx::cuda {
namespace {

constexpr int kPerThread = 8;

// y = (x - m) - log_f32(lane_sum(exp_f32(x - m))), m the row max.
template <typename T, bool kCached>
__global__ void log_softmax_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t cols) {
  float* scratch = shared_memory();
  const int t = threadIdx.x, lanes = blockDim.x;
  const T* x_row = x + blockIdx.x * cols;
  T* y_row = y + blockIdx.x * cols;

  float d[kCached ? kPerThread : 1];  // x, then x - m
  float m = -INFINITY;
  if constexpr (kCached) {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t j = t + static_cast<int64_t>(k) * lanes;
      d[k] = j < cols ? load_f32(x_row + j) : -INFINITY;
      m = fmaxf(m, d[k]);
    }
  } else {
    for (int64_t j = t; j < cols; j += lanes) m = fmaxf(m, load_f32(x_row + j));
  }
  // fmaxf skips NaN, unlike the reference's amax: harmless, a NaN still turns the sum (and so
  // the whole row) into NaN.
  m = block_max(m, scratch);

  float acc = 0.0f;
  if constexpr (kCached) {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t j = t + static_cast<int64_t>(k) * lanes;
      d[k] = __fsub_rn(d[k], m);
      if (j < cols) acc = __fadd_rn(acc, exp_f32(d[k]));
    }
  } else {
    for (int64_t j = t; j < cols; j += lanes) acc = __fadd_rn(acc, exp_f32(__fsub_rn(load_f32(x_row + j), m)));
  }
  const float lse = log_f32(block_fold_lanes(acc, scratch));

  if constexpr (kCached) {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t j = t + static_cast<int64_t>(k) * lanes;
      if (j < cols) store_f32(y_row + j, __fsub_rn(d[k], lse));
    }
  } else {
    for (int64_t j = t; j < cols; j += lanes) store_f32(y_row + j, __fsub_rn(__fsub_rn(load_f32(x_row + j), m), lse));
  }
}

// dx = dy - exp_f32(y) * lane_sum(dy).
template <typename T>
__global__ void log_softmax_bwd_kernel(const T* __restrict__ grad_y, const T* __restrict__ y, T* __restrict__ grad_x,
                                       int64_t cols) {
  float* scratch = shared_memory();
  const int t = threadIdx.x, lanes = blockDim.x;
  const T* dy_row = grad_y + blockIdx.x * cols;
  const T* y_row = y + blockIdx.x * cols;
  T* dx_row = grad_x + blockIdx.x * cols;
  float acc = 0.0f;
  for (int64_t j = t; j < cols; j += lanes) acc = __fadd_rn(acc, load_f32(dy_row + j));
  const float total = block_fold_lanes(acc, scratch);
  for (int64_t j = t; j < cols; j += lanes) {
    store_f32(dx_row + j, __fsub_rn(load_f32(dy_row + j), __fmul_rn(exp_f32(load_f32(y_row + j)), total)));
  }
}

bool valid_launch(int64_t rows, int lanes) {
  return lanes >= 32 && lanes <= 1024 && (lanes & (lanes - 1)) == 0 && rows <= INT32_MAX;
}

template <typename T>
cudaError_t launch_forward(const void* x, void* y, int64_t rows, int64_t cols, int lanes, cudaStream_t stream) {
  const size_t smem = lanes * sizeof(float);
  if (cols <= static_cast<int64_t>(lanes) * kPerThread) {
    log_softmax_fwd_kernel<T, true><<<rows, lanes, smem, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), cols);
  } else {
    log_softmax_fwd_kernel<T, false><<<rows, lanes, smem, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), cols);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const void* grad_y, const void* y, void* grad_x, int64_t rows, int64_t cols, int lanes,
                            cudaStream_t stream) {
  log_softmax_bwd_kernel<T><<<rows, lanes, lanes * sizeof(float), stream>>>(
      static_cast<const T*>(grad_y), static_cast<const T*>(y), static_cast<T*>(grad_x), cols);
  return cudaGetLastError();
}

}  // namespace

cudaError_t log_softmax_forward(const void* x, void* y, int64_t rows, int64_t cols, int lanes, DType dtype,
                                cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (!valid_launch(rows, lanes)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return launch_forward<float>(x, y, rows, cols, lanes, stream);
    case DType::kFloat16: return launch_forward<__half>(x, y, rows, cols, lanes, stream);
    case DType::kBFloat16: return launch_forward<__nv_bfloat16>(x, y, rows, cols, lanes, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t log_softmax_backward(const void* grad_y, const void* y, void* grad_x, int64_t rows, int64_t cols,
                                 int lanes, DType dtype, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (!valid_launch(rows, lanes)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return launch_backward<float>(grad_y, y, grad_x, rows, cols, lanes, stream);
    case DType::kFloat16: return launch_backward<__half>(grad_y, y, grad_x, rows, cols, lanes, stream);
    case DType::kBFloat16: return launch_backward<__nv_bfloat16>(grad_y, y, grad_x, rows, cols, lanes, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fusedtx::cuda
