// Device building blocks shared by the CUDA kernels, each the twin of a fusedtx/reference/ function.
// Explicit _rn intrinsics keep every multiply and add separately rounded (nvcc would otherwise
// contract a*b+c into one FMA), so results match the reference bit for bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace fusedtx::cuda {

// The block's dynamic shared memory as an array of C. One untyped declaration serves every
// kernel: `extern __shared__` arrays of different element types in one translation unit clash.
template <typename C = float>
__device__ __forceinline__ C* shared_memory() {
  extern __shared__ __align__(16) unsigned char smem[];
  return reinterpret_cast<C*>(smem);
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// reference.exp_f32 (docs/design.md, "exp, log and erf")
__device__ __forceinline__ float exp_f32(float x) {
  const float t = __fmul_rn(x, 1.44269504088896341f);
  const float shifted = __fadd_rn(t, 12582912.0f);
  const float n = __fsub_rn(shifted, 12582912.0f);
  float r = __fsub_rn(x, __fmul_rn(n, 0.693359375f));
  r = __fsub_rn(r, __fmul_rn(n, -2.12194440e-4f));
  float p = __fadd_rn(__fmul_rn(1.9875691500e-4f, r), 1.3981999507e-3f);
  p = __fadd_rn(__fmul_rn(p, r), 8.3334519073e-3f);
  p = __fadd_rn(__fmul_rn(p, r), 4.1665795894e-2f);
  p = __fadd_rn(__fmul_rn(p, r), 1.6666665459e-1f);
  p = __fadd_rn(__fmul_rn(p, r), 5.0000001201e-1f);
  float y = __fadd_rn(__fadd_rn(__fmul_rn(p, __fmul_rn(r, r)), r), 1.0f);
  const int32_t n_int = __float_as_int(shifted) - 0x4B400000;
  const float pow2n = __int_as_float(static_cast<int32_t>(static_cast<uint32_t>(n_int + 127) << 23));
  y = __fmul_rn(y, pow2n);
  return x < -87.0f ? 0.0f : y;
}

// reference.log_f32 (docs/design.md, "exp, log and erf"): Cephes' logf from the exponent bits,
// integer operations only, then a degree-8 polynomial in f = m - 1, each operation rounded.
__device__ __forceinline__ float log_f32(float x) {
  const bool subnormal = x < 1.17549435e-38f;  // 2**-126: scaled by 2**23 (exact) first
  const uint32_t bits = static_cast<uint32_t>(__float_as_int(subnormal ? __fmul_rn(x, 8388608.0f) : x));
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xFFu) - 127 - (subnormal ? 23 : 0);
  float m = __int_as_float(static_cast<int32_t>((bits & 0x7FFFFFu) | 0x3F800000u));
  if (m > 1.41421356f) {
    m = __fmul_rn(m, 0.5f);
    e = e + 1;
  }
  const float fe = static_cast<float>(e);  // |e| <= 152: exact
  const float f = __fsub_rn(m, 1.0f);
  const float z = __fmul_rn(f, f);
  float p = 7.0376836292e-2f;
  p = __fadd_rn(__fmul_rn(p, f), -1.1514610310e-1f);
  p = __fadd_rn(__fmul_rn(p, f), 1.1676998740e-1f);
  p = __fadd_rn(__fmul_rn(p, f), -1.2420140846e-1f);
  p = __fadd_rn(__fmul_rn(p, f), 1.4249322787e-1f);
  p = __fadd_rn(__fmul_rn(p, f), -1.6668057665e-1f);
  p = __fadd_rn(__fmul_rn(p, f), 2.0000714765e-1f);
  p = __fadd_rn(__fmul_rn(p, f), -2.4999993993e-1f);
  p = __fadd_rn(__fmul_rn(p, f), 3.3333331174e-1f);
  float y = __fmul_rn(f, __fmul_rn(z, p));
  y = __fadd_rn(y, __fmul_rn(fe, -2.12194440e-4f));
  y = __fadd_rn(y, __fmul_rn(-0.5f, z));
  float r = __fadd_rn(f, y);
  r = __fadd_rn(r, __fmul_rn(fe, 0.693359375f));
  if (x != x || x == INFINITY) return x;  // NaN, +inf: as torch.log
  if (x < 0.0f) return __int_as_float(0x7FC00000);
  if (x == 0.0f) return -INFINITY;
  return r;
}

template <typename T>
__device__ __forceinline__ float load_f32(const T* p);
template <>
__device__ __forceinline__ float load_f32<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load_f32<__half>(const __half* p) { return __half2float(*p); }
template <>
__device__ __forceinline__ float load_f32<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename T>
__device__ __forceinline__ void store_f32(T* p, float v);
template <>
__device__ __forceinline__ void store_f32<float>(float* p, float v) { *p = v; }
template <>
__device__ __forceinline__ void store_f32<__half>(__half* p, float v) { *p = __float2half_rn(v); }
template <>
__device__ __forceinline__ void store_f32<__nv_bfloat16>(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Correctly rounded float / double arithmetic under one name, so that kernels templated on their
// compute type (float, or double for float64 tensors) spell each operation once.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }

// Widening to the compute type C (exact: every storage type fits in it) and rounding back to
// nearest-even, as PyTorch's .to(dtype) does. The pairs used: C = float with float, half or
// bfloat16 storage; C = double with double storage (or float parameters of float64 tensors).
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double widen(double v) { return v; }
template <typename C, typename T>
__device__ __forceinline__ C load_as(const T* p) { return static_cast<C>(widen(*p)); }

__device__ __forceinline__ void store_rn(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_rn(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_rn(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_rn(double* p, double v) { *p = v; }

// reference.lane_sum's last step across the block (docs/design.md, "Lane sums"): thread t holds
// lane t of blockDim.x (a power of two >= 32) lanes; fold in halves (a[l] += a[l + w], w = lanes/2
// ... 1) through shared memory, then warp shuffles for the last 32. Every thread gets the total.
// `scratch` has blockDim.x elements. T is float or double.
template <typename T>
__device__ __forceinline__ T block_fold_lanes(T v, T* scratch) {
  const int t = threadIdx.x;
  const int lanes = blockDim.x;
  scratch[t] = v;
  __syncthreads();
  for (int w = lanes / 2; w >= 32; w /= 2) {
    if (t < w) scratch[t] = add_rn(scratch[t], scratch[t + w]);
    __syncthreads();
  }
  if (t < 32) {
    T a = scratch[t];
    for (int w = 16; w >= 1; w /= 2) a = add_rn(a, __shfl_down_sync(0xffffffffu, a, w));
    if (t == 0) scratch[0] = a;
  }
  __syncthreads();
  const T total = scratch[0];
  __syncthreads();  // scratch may be reused right after
  return total;
}

// Two independent block_fold_lanes (same order for each) sharing their barriers: half the
// __syncthreads of two calls, for kernels that need two row sums at once. `scratch` has
// 2 * blockDim.x elements.
template <typename T>
__device__ __forceinline__ void block_fold_lanes2(T& a, T& b, T* scratch) {
  const int t = threadIdx.x;
  const int lanes = blockDim.x;
  T* sa = scratch;
  T* sb = scratch + lanes;
  sa[t] = a;
  sb[t] = b;
  __syncthreads();
  for (int w = lanes / 2; w >= 32; w /= 2) {
    if (t < w) {
      sa[t] = add_rn(sa[t], sa[t + w]);
      sb[t] = add_rn(sb[t], sb[t + w]);
    }
    __syncthreads();
  }
  if (t < 32) {
    T va = sa[t], vb = sb[t];
    for (int w = 16; w >= 1; w /= 2) {
      va = add_rn(va, __shfl_down_sync(0xffffffffu, va, w));
      vb = add_rn(vb, __shfl_down_sync(0xffffffffu, vb, w));
    }
    if (t == 0) {
      sa[0] = va;
      sb[0] = vb;
    }
  }
  __syncthreads();
  a = sa[0];
  b = sb[0];
  __syncthreads();  // scratch may be reused right after
}

// reference.two_sum: s = a + b rounded, err its exact rounding error (s + err == a + b).
template <typename T>
__device__ __forceinline__ T two_sum(T a, T b, T& err) {
  const T s = add_rn(a, b);
  const T b_virtual = sub_rn(s, a);
  err = add_rn(sub_rn(a, sub_rn(s, b_virtual)), sub_rn(b, b_virtual));
  return s;
}

// reference.lane_sum_compensated's fold and total across the block: thread t holds lane t's
// pair (s, e); block_fold_lanes's order, each step (s, r) = two_sum(s_l, s_{l+w}) and
// e = (e_l + e_{l+w}) + r; the total is s + e (s itself when it is inf or NaN). Every thread
// gets the total. `scratch` has 2 * blockDim.x elements.
template <typename T>
__device__ __forceinline__ T block_fold_lanes_compensated(T s, T e, T* scratch) {
  const int t = threadIdx.x;
  const int lanes = blockDim.x;
  T* ss = scratch;
  T* se = scratch + lanes;
  ss[t] = s;
  se[t] = e;
  __syncthreads();
  for (int w = lanes / 2; w >= 32; w /= 2) {
    if (t < w) {
      T r;
      const T sum = two_sum(ss[t], ss[t + w], r);
      se[t] = add_rn(add_rn(se[t], se[t + w]), r);
      ss[t] = sum;
    }
    __syncthreads();
  }
  if (t < 32) {
    T vs = ss[t], ve = se[t];
    for (int w = 16; w >= 1; w /= 2) {
      const T os = __shfl_down_sync(0xffffffffu, vs, w);
      const T oe = __shfl_down_sync(0xffffffffu, ve, w);
      T r;
      vs = two_sum(vs, os, r);
      ve = add_rn(add_rn(ve, oe), r);
    }
    if (t == 0) ss[0] = sub_rn(vs, vs) == T(0) ? add_rn(vs, ve) : vs;  // vs - vs: NaN unless finite
  }
  __syncthreads();
  const T total = ss[0];
  __syncthreads();  // scratch may be reused right after
  return total;
}

// Max over the block (order-free: max is exact). `scratch` has blockDim.x / 32 floats.
__device__ __forceinline__ float block_max(float v, float* scratch) {
  for (int w = 16; w >= 1; w /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, w));
  const int warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  if ((threadIdx.x & 31) == 0) scratch[warp] = v;
  __syncthreads();
  float m = scratch[0];
  for (int i = 1; i < n_warps; ++i) m = fmaxf(m, scratch[i]);
  __syncthreads();
  return m;
}

}  // namespace fusedtx::cuda
