// Building blocks shared by the CPU kernels: fusedtx's exp, the fixed-order lane sum, dtype
// dispatch. Each mirrors a function of fusedtx/reference.py operation for operation; the
// extension is compiled with -ffp-contract=off so no multiply-add is fused behind our back.
// Loops over a fixed number of lanes are written plainly: the compiler vectorises them, and
// lane-wise IEEE arithmetic gives the same bits vectorised or not.
#pragma once

#include <ATen/ATen.h>

#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>

namespace fusedtx::cpu {

// reference.exp_f32: Cody-Waite reduction, degree-6 polynomial, 2**n from the exponent bits.
inline float exp_f32(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.0f;
  constexpr float kMinArg = -87.0f;
  const float t = x * kLog2e;
  const float shifted = t + kRoundMagic;
  const float n = shifted - kRoundMagic;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = (p * (r * r) + r) + 1.0f;
  const int32_t n_int = std::bit_cast<int32_t>(shifted) - 0x4B400000;
  const float pow2n = std::bit_cast<float>(static_cast<uint32_t>(n_int + 127) << 23);
  y = y * pow2n;
  return x < kMinArg ? 0.0f : y;
}

// reference.lane_sum's final step: fold kLanes accumulators in halves.
template <int kLanes>
inline float fold_lanes(float* acc) {
  for (int width = kLanes / 2; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) acc[l] = acc[l] + acc[l + width];
  }
  return acc[0];
}

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }
template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }  // c10::Half/BFloat16 round to nearest even

// Calls fn(T{}) with T the C++ type of `dtype` (float, at::Half, at::BFloat16).
template <typename Fn>
void dispatch_float_types(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype, " (expected float32, float16 or bfloat16)");
  }
}

// Rows per parallel task: enough work per task (~32K elements) to amortise scheduling. Rows
// are never split, so the thread count cannot change any row's arithmetic.
inline int64_t row_grain(int64_t n_cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n_cols)); }

}  // namespace fusedtx::cpu
