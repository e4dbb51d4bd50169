// The activation op in CUDA: y = act(x) and dx = dy * act'(x), elementwise, float32 math, as
// reference.activation_forward / activation_backward bit for bit (activations.cuh: _rn
// intrinsics, fusedtx's exp_f32 and erf_f32). One thread per element: an element's arithmetic
// never depends on where it sits in the tensor.
#include "activations.cuh"
#include "common.cuh"
#include "launchers.h"

namespace fusedtx::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 2147483647;  // gridDim.x's limit

template <typename T, int kAct>
__global__ void activation_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) store_f32(y + i, activation_forward<kAct>(load_f32(x + i)));
}

template <typename T, int kAct>
__global__ void activation_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) store_f32(dx + i, __fmul_rn(load_f32(dy + i), activation_derivative<kAct>(load_f32(x + i))));
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

template <typename T>
cudaError_t launch(const void* grad_y, const void* x, void* out, int64_t n, int activation, cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  T* op = static_cast<T*>(out);
  const T* dyp = static_cast<const T*>(grad_y);
  auto go = [&](auto act) {
    constexpr int kAct = decltype(act)::value;
    if (grad_y == nullptr) {
      activation_fwd_kernel<T, kAct><<<blocks_for(n), kThreads, 0, stream>>>(xp, op, n);
    } else {
      activation_bwd_kernel<T, kAct><<<blocks_for(n), kThreads, 0, stream>>>(dyp, xp, op, n);
    }
    return cudaGetLastError();
  };
  switch (activation) {
    case kActGelu: return go(std::integral_constant<int, kActGelu>{});
    case kActGeluTanh: return go(std::integral_constant<int, kActGeluTanh>{});
    case kActSilu: return go(std::integral_constant<int, kActSilu>{});
  }
  return cudaErrorInvalidValue;
}

cudaError_t dispatch(const void* grad_y, const void* x, void* out, int64_t n, int activation, DType dtype,
                     cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if ((n + kThreads - 1) / kThreads > kMaxBlocks) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return launch<float>(grad_y, x, out, n, activation, stream);
    case DType::kFloat16: return launch<__half>(grad_y, x, out, n, activation, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(grad_y, x, out, n, activation, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t activation_forward(const void* x, void* y, int64_t n, int activation, DType dtype, cudaStream_t stream) {
  return dispatch(nullptr, x, y, n, activation, dtype, stream);
}

cudaError_t activation_backward(const void* grad_y, const void* x, void* grad_x, int64_t n, int activation, DType dtype,
                                cudaStream_t stream) {
  if (grad_y == nullptr && n > 0) return cudaErrorInvalidValue;
  return dispatch(grad_y, x, grad_x, n, activation, dtype, stream);
}

}  // namespace fusedtx::cuda
