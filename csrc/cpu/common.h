// Building blocks shared by the CPU kernels: 16-float vectors, fusedtx's exp, dtype conversion
// and dispatch. Each mirrors a function of fusedtx/reference.py operation for operation; the
// extension is compiled with -ffp-contract=off so no multiply-add is fused behind our back.
#pragma once

#include <ATen/ATen.h>

#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fusedtx::cpu {

// Sixteen floats in a GCC/Clang vector: one AVX-512 register, or two AVX2 ones. Lane-wise
// IEEE arithmetic, so a vector computes exactly what the scalar code would, lane by lane.
constexpr int kVec = 16;
typedef float vfloat __attribute__((vector_size(kVec * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kVec * sizeof(int32_t))));
typedef uint32_t vuint __attribute__((vector_size(kVec * sizeof(uint32_t))));

inline vfloat vsplat(float v) { return vfloat{} + v; }
inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

// reference.exp_f32: Cody-Waite reduction, degree-6 polynomial, 2**n from the exponent bits.
// F is float or vfloat; both compute the same bits.
template <typename F>
inline F exp_f32(F x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.0f;
  constexpr float kMinArg = -87.0f;
  const F t = x * kLog2e;
  const F shifted = t + kRoundMagic;
  const F n = shifted - kRoundMagic;
  F r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  F p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  F y = (p * (r * r) + r) + 1.0f;
  if constexpr (std::is_same_v<F, float>) {
    const uint32_t n_bits = std::bit_cast<uint32_t>(shifted) - 0x4B400000u;
    y = y * std::bit_cast<float>((n_bits + 127u) << 23);
    return x < kMinArg ? 0.0f : y;
  } else {
    const vuint n_bits = __builtin_bit_cast(vuint, shifted) - 0x4B400000u;
    y = y * __builtin_bit_cast(vfloat, (n_bits + 127u) << 23);
    return x < kMinArg ? vsplat(0.0f) : y;
  }
}

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }
template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }  // c10::Half/BFloat16 round to nearest even

// kVec elements of T as floats, and back (rounding to nearest even, as from_float).
template <typename T>
inline vfloat load_vec(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return vload(p);
  } else {
    alignas(64) float tmp[kVec];
    for (int l = 0; l < kVec; ++l) tmp[l] = to_float(p[l]);
    return vload(tmp);
  }
}
template <typename T>
inline void store_vec(T* p, vfloat v) {
  if constexpr (std::is_same_v<T, float>) {
    vstore(p, v);
  } else {
    alignas(64) float tmp[kVec];
    vstore(tmp, v);
    for (int l = 0; l < kVec; ++l) p[l] = from_float<T>(tmp[l]);
  }
}

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
