// Rotary position embeddings in CUDA (rotate-half layout), as reference.rope_forward / rope_backward.
//
// One thread per pair (i, i + h) of a (batch, head, token) row: it reads the token's position,
// the table's c and s, and x[i], x[i + h], and writes y[i] = x[i] c - x[i+h] s and
// y[i+h] = x[i+h] c + x[i] s (the backward, transposed: the signs of the s terms swapped), each
// product rounded, then the sum (__fmul_rn / __fadd_rn: no FMA). Nothing is summed across
// elements, so no bit depends on the launch shape or the batch. A position outside the table
// reads nothing and gives a NaN pair.
#include <cmath>

#include "common.cuh"

namespace fusedtx::cuda {
namespace {

// The rotation of one pair in the compute type C (float, or double for float64 tensors).
template <bool kTransposed, typename C>
__device__ __forceinline__ void rotate(C x1, C x2, C c, C s, C& y1, C& y2) {
  if constexpr (kTransposed) {
    y1 = add_rn(mul_rn(x1, c), mul_rn(x2, s));
    y2 = sub_rn(mul_rn(x2, c), mul_rn(x1, s));
  } else {
    y1 = sub_rn(mul_rn(x1, c), mul_rn(x2, s));
    y2 = add_rn(mul_rn(x2, c), mul_rn(x1, s));
  }
}

template <typename T, typename C, bool kTransposed>
__global__ void rope_kernel(const T* __restrict__ x, const int64_t* __restrict__ positions,
                            const float* __restrict__ cos, const float* __restrict__ sin, T* __restrict__ y,
                            int64_t heads, int64_t tokens, int64_t half, int64_t n_positions, int64_t stride_b,
                            int64_t stride_h, int64_t stride_t, int64_t n_pairs) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pair >= n_pairs) return;
  const int64_t i = pair % half, row = pair / half;  // row = (b * heads + head) * tokens + t
  const int64_t t = row % tokens, head = (row / tokens) % heads, b = row / (tokens * heads);
  const int64_t p = positions[b * tokens + t];
  T* out = y + row * 2 * half + i;
  if (p < 0 || p >= n_positions) {  // never read outside the table
    store_rn(out, static_cast<C>(NAN));
    store_rn(out + half, static_cast<C>(NAN));
    return;
  }
  const T* in = x + b * stride_b + head * stride_h + t * stride_t + i;
  C y1, y2;
  rotate<kTransposed>(load_as<C>(in), load_as<C>(in + half), static_cast<C>(cos[p * half + i]),
                      static_cast<C>(sin[p * half + i]), y1, y2);
  store_rn(out, y1);
  store_rn(out + half, y2);
}

template <typename T, typename C>
cudaError_t launch(const void* x, const int64_t* strides, const int64_t* positions, const float* cos, const float* sin,
                   void* y, int64_t batch, int64_t heads, int64_t tokens, int64_t dim, int64_t n_positions,
                   bool transposed, cudaStream_t stream) {
  const int64_t half = dim / 2, n_pairs = batch * heads * tokens * half;
  const int64_t blocks = (n_pairs + kRopeThreads - 1) / kRopeThreads;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  const auto args = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(blocks), kRopeThreads, 0, stream>>>(
        static_cast<const T*>(x), positions, cos, sin, static_cast<T*>(y), heads, tokens, half, n_positions,
        strides[0], strides[1], strides[2], n_pairs);
  };
  if (transposed) {
    args(rope_kernel<T, C, true>);
  } else {
    args(rope_kernel<T, C, false>);
  }
  return cudaGetLastError();
}

cudaError_t rope(const void* x, const int64_t* x_strides, const int64_t* positions, const float* cos, const float* sin,
                 void* y, int64_t batch, int64_t heads, int64_t tokens, int64_t dim, int64_t n_positions,
                 bool transposed, DType dtype, cudaStream_t stream) {
  if (batch == 0 || heads == 0 || tokens == 0 || dim == 0) return cudaSuccess;
  if (dim % 2 || n_positions < 1) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return launch<float, float>(x, x_strides, positions, cos, sin, y, batch, heads, tokens, dim, n_positions,
                                  transposed, stream);
    case DType::kFloat16:
      return launch<__half, float>(x, x_strides, positions, cos, sin, y, batch, heads, tokens, dim, n_positions,
                                   transposed, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16, float>(x, x_strides, positions, cos, sin, y, batch, heads, tokens, dim,
                                          n_positions, transposed, stream);
    case DType::kFloat64:
      return launch<double, double>(x, x_strides, positions, cos, sin, y, batch, heads, tokens, dim, n_positions,
                                    transposed, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t rope_forward(const void* x, const int64_t* x_strides, const int64_t* positions, const float* cos,
                         const float* sin, void* y, int64_t batch, int64_t heads, int64_t tokens, int64_t dim,
                         int64_t n_positions, DType dtype, cudaStream_t stream) {
  return rope(x, x_strides, positions, cos, sin, y, batch, heads, tokens, dim, n_positions, false, dtype, stream);
}

cudaError_t rope_backward(const void* grad_y, const int64_t* strides, const int64_t* positions, const float* cos,
                          const float* sin, void* grad_x, int64_t batch, int64_t heads, int64_t tokens, int64_t dim,
                          int64_t n_positions, DType dtype, cudaStream_t stream) {
  return rope(grad_y, strides, positions, cos, sin, grad_x, batch, heads, tokens, dim, n_positions, true, dtype,
              stream);
}

}  // namespace fusedtx::cuda
