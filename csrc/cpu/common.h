// Building blocks shared by the CPU kernels: 64-byte vectors, fusedtx's exp, dtype conversions,
// the fixed-order lane sum, dispatch (argument checks: ../checks.h) and the lane-dot kernels of
// attention. Each arithmetic helper mirrors a function of fusedtx/reference/common.py
// operation for operation; the extension is compiled with -ffp-contract=off, so no multiply-add
// is fused behind our back.
#pragma once

#include <ATen/ATen.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // used only behind the ISA guards of isa.h and __F16C__ / __AVX512F__
#endif

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "../checks.h"

// FUSEDTX_AVX512 / FUSEDTX_AVX2: the instruction set the kernels are compiled for (isa.h).
#include "isa.h"

namespace fusedtx::cpu {

// 64 bytes of A (16 floats or 8 doubles) in a GCC/Clang vector: one AVX-512 register, or two
// AVX2 ones. Lane-wise IEEE arithmetic, so a vector computes exactly what scalar code would.
template <typename A>
struct VecOf {
  typedef A type __attribute__((vector_size(64)));
};
template <typename A>
using Vec = typename VecOf<A>::type;
template <typename A>
constexpr int kVecLen = 64 / sizeof(A);

constexpr int kVec = kVecLen<float>;
// One bit per lane of a 16-lane vector (the type of AVX-512's __mmask16, on every target).
using mask16 = uint16_t;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
using vfloat = Vec<float>;
typedef uint32_t vuint __attribute__((vector_size(64)));

// The widest vector one register holds: 64 bytes with AVX-512, 32 with AVX, 16 otherwise. GCC
// has no machine mode for a vector wider than that, keeps it in memory and splits every
// operation, so code whose values must stay in registers across a loop (the row norms' lane
// sums) uses RVec. How many lanes share a register changes no lane's arithmetic.
#if defined(__AVX512F__)
constexpr int kRegBytes = 64;
#elif defined(__AVX__)
constexpr int kRegBytes = 32;
#else
constexpr int kRegBytes = 16;
#endif
template <typename A>
struct RVecOf {
  typedef A type __attribute__((vector_size(kRegBytes)));
};
template <typename A>
using RVec = std::conditional_t<kRegBytes == 64, Vec<A>, typename RVecOf<A>::type>;
template <typename A>
constexpr int kRVecLen = kRegBytes / sizeof(A);

template <typename A = float>
inline Vec<A> vsplat(A v) { return Vec<A>{} + v; }
// c as an F, for code written once for float and float vectors (vfloat, RVec<float>).
template <typename F>
inline F splat(float c) {
  if constexpr (std::is_same_v<F, float>) {
    return c;
  } else {
    return F{} + c;
  }
}
// x in every lane, -0 kept. vsplat(x) is 0 + x: an add per use (the compiler must turn -0 into
// +0) and a register broadcast, where this one lets an FMA take its broadcast operand straight
// from memory. Use it for factors entering FMA chains that start at +0: such a chain never holds
// -0, so a -0 factor adds exactly what +0 would, and the bits are vsplat's.
inline vfloat vbroadcast(float x) { return vfloat{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
template <typename A>
inline Vec<A> vload(const A* p) {
  Vec<A> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename A>
inline void vstore(A* p, Vec<A> v) { std::memcpy(p, &v, sizeof v); }
template <typename V>
inline V vmax(V a, V b) { return a > b ? a : b; }

// reference.exp_f32: Cody-Waite reduction, degree-6 polynomial, 2**n from the exponent bits
// (docs/design.md, "exp, log and erf"). F is float or a float vector (vfloat, RVec<float>); all
// compute the same bits. Always inlined: it sits in the innermost loops, and in a large caller
// (the attention forward's task) GCC would otherwise make it an out-of-line call through the PLT.
template <typename F>
[[gnu::always_inline]] inline F exp_f32(F x) {
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
    typedef uint32_t U __attribute__((vector_size(sizeof(F))));
    const U n_bits = __builtin_bit_cast(U, shifted) - 0x4B400000u;
    y = y * __builtin_bit_cast(F, (n_bits + 127u) << 23);
    return x < kMinArg ? F{} : y;
  }
}

// reference.log_f32: Cephes' logf from the exponent bits and a degree-8 polynomial in f = m - 1,
// every operation separately rounded (docs/design.md, "exp, log and erf"). Scalar: log_softmax
// takes one log per row. Special values as torch.log: -inf at +-0, NaN below 0, x itself at +inf
// and NaN.
inline float log_f32(float x) {
  constexpr float kMinNormal = 1.17549435e-38f;  // 2**-126
  constexpr float kSubnormalScale = 8388608.0f;  // 2**23
  constexpr float kSqrt2 = 1.41421356f;
  const bool subnormal = x < kMinNormal;
  const uint32_t bits = std::bit_cast<uint32_t>(subnormal ? x * kSubnormalScale : x);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xFFu) - 127 - (subnormal ? 23 : 0);
  float m = std::bit_cast<float>((bits & 0x7FFFFFu) | 0x3F800000u);
  if (m > kSqrt2) {
    m = m * 0.5f;
    e = e + 1;
  }
  const float fe = static_cast<float>(e);  // |e| <= 152: exact
  const float f = m - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f + -1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f + -1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f + -1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f + -2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float y = f * (z * p);
  y = y + fe * -2.12194440e-4f;
  y = y + -0.5f * z;
  float r = f + y;
  r = r + fe * 0.693359375f;
  if (x != x || x == std::numeric_limits<float>::infinity()) return x;
  if (x < 0.0f) return std::numeric_limits<float>::quiet_NaN();
  if (x == 0.0f) return kNegInf;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Conversions. float16/bfloat16 -> float32 is exact. float32 -> T rounds to nearest even; the
// two families differ only in the bfloat16 NaN they write: from_float and store_as cast as c10
// does (0x7FC0), store1, store16 and narrow16 write what torch's vectorised CPU .to(dtype) does
// (0xFFFF), which the Linear kernels reproduce.
// ---------------------------------------------------------------------------------------------
template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }
template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }  // c10::Half/BFloat16 round to nearest even

inline uint16_t float_to_bf16_bits(float v) {
  if (v != v) return 0xFFFF;
  const uint32_t u = std::bit_cast<uint32_t>(v);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <typename T>
inline void store1(T* p, float v) {
  if constexpr (std::is_same_v<T, float>) {
    *p = v;
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    p->x = float_to_bf16_bits(v);
  } else {
#if defined(__F16C__)
    p->x = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    p->x = c10::detail::fp16_ieee_from_fp32_value(v);
#endif
  }
}

// The first n lanes (n clamped to 0 ... 16).
inline mask16 first_lanes(int64_t n) {
  if (n <= 0) return 0;
  if (n >= kVec) return 0xFFFF;
  return static_cast<mask16>((1u << n) - 1u);
}

#if defined(__AVX512F__)
// 16 floats of T (float16/bfloat16 bits in a __m256i) as float32, and back.
template <typename T>
inline __m512 widen16(__m256i raw) {
  if constexpr (std::is_same_v<T, at::Half>) {
    return _mm512_cvtph_ps(raw);
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
}
template <typename T>
inline __m256i narrow16(__m512 v) {
  if constexpr (std::is_same_v<T, at::Half>) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), _mm512_set1_epi32(0xFFFF), r);
    return _mm512_cvtepi32_epi16(r);
  }
}

// 16 elements of T as float32.
template <typename T>
inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    return widen16<T>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

// r[i] (i < 16) <- column i of the 16 x 16 matrix whose rows are r[0..15].
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
    r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xDD);
  }
}
#endif  // __AVX512F__

#if defined(FUSEDTX_AVX512)
// 16 elements of T (lanes off the mask read nothing and are +0) as float32.
template <typename T>
inline __m512 load16(const T* p, mask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    return widen16<T>(_mm256_maskz_loadu_epi16(m, p));
  }
}
template <typename T>
inline void store16(T* p, __m512 v, mask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, m, v);
  } else {
    _mm256_mask_storeu_epi16(p, m, narrow16<T>(v));
  }
}
// v rounded to T and back (what a store then a load would give).
template <typename T>
inline __m512 round_trip(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return widen16<T>(narrow16<T>(v));
  }
}
#endif  // FUSEDTX_AVX512

#if defined(FUSEDTX_AVX2)
// The 8-lane (ymm) counterparts of load16 / store16 / round_trip / transpose16, for the kernels'
// AVX2 paths: float16 through F16C, bfloat16 by shifts, rounding as store1 does (to nearest
// even; a bfloat16 NaN is 0xFFFF).
template <typename T>
inline __m256 widen8(__m128i raw) {
  if constexpr (std::is_same_v<T, at::Half>) {
    return _mm256_cvtph_ps(raw);
  } else {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
}
template <typename T>
inline __m128i narrow8(__m256 v) {
  if constexpr (std::is_same_v<T, at::Half>) {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    // Every lane is in [0, 0xFFFF]: the unsigned-saturating pack keeps it.
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
}

// All-ones in the first n lanes (n clamped to 0 ... 8).
inline __m256i first_lanes8(int64_t n) {
  const int m = static_cast<int>(std::clamp<int64_t>(n, 0, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 elements of T as float32.
template <typename T>
inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    return widen8<T>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}
// The first n elements (n clamped to 0 ... 8; the others are not read and are +0).
template <typename T>
inline __m256 load8(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_maskload_ps(p, first_lanes8(n));
  } else {
    alignas(16) uint16_t raw[8] = {};
    std::memcpy(raw, p, static_cast<size_t>(std::clamp<int64_t>(n, 0, 8)) * sizeof(T));
    return widen8<T>(_mm_load_si128(reinterpret_cast<const __m128i*>(raw)));
  }
}
// v's first n lanes (n clamped to 0 ... 8) to p as T.
template <typename T>
inline void store8(T* p, __m256 v, int64_t n = 8) {
  if constexpr (std::is_same_v<T, float>) {
    if (n >= 8) {
      _mm256_storeu_ps(p, v);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, v);
      std::memcpy(p, tmp, static_cast<size_t>(std::max<int64_t>(n, 0)) * sizeof(float));
    }
  } else {
    const __m128i raw = narrow8<T>(v);
    if (n >= 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), raw);
    } else {
      alignas(16) uint16_t tmp[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), raw);
      std::memcpy(p, tmp, static_cast<size_t>(std::max<int64_t>(n, 0)) * sizeof(T));
    }
  }
}
// v rounded to T and back (what a store then a load would give).
template <typename T>
inline __m256 round_trip8(__m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return widen8<T>(narrow8<T>(v));
  }
}

// r[i] (i < 8) <- column i of the 8 x 8 matrix whose rows are r[0..7]. Always inlined: out of
// line, the eight rows make a round trip through memory.
[[gnu::always_inline]] inline void transpose8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4 h + c] (c < 4): columns c | c + 4 of rows 4 h ... 4 h + 3.
  for (int h = 0; h < 2; ++h) {
    r[4 * h] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
    r[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
    r[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    r[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm256_permute2f128_ps(r[c], r[4 + c], 0x20);
    t[4 + c] = _mm256_permute2f128_ps(r[c], r[4 + c], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}
#endif  // FUSEDTX_AVX2

// float16 <-> float32 for a whole vector with the F16C/AVX-512 conversion instructions
// (round to nearest even, as c10::Half). Besides being faster, they sidestep GCC 12 -O3
// miscompiling a loop of c10::Half conversions once it vectorises the surrounding code
// (wrong dx in the LayerNorm backward; right at -O2 or with -fno-tree-vectorize).
inline vfloat half_to_float(const at::Half* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<vfloat>(load16(p));
#else
  alignas(64) float tmp[kVec];
  for (int l = 0; l < kVec; ++l) tmp[l] = c10::detail::fp16_ieee_to_fp32_value(p[l].x);
  return vload(tmp);
#endif
}
inline void float_to_half(at::Half* p, vfloat v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow16<at::Half>(reinterpret_cast<__m512>(v)));
#else
  alignas(64) float tmp[kVec];
  vstore(tmp, v);
  for (int l = 0; l < kVec; ++l) p[l] = at::Half(c10::detail::fp16_ieee_from_fp32_value(tmp[l]), at::Half::from_bits());
#endif
}

// kVecLen<A> elements of T as a vector of A, and back (rounding to nearest even, as from_float).
template <typename A, typename T>
inline Vec<A> load_as(const T* p) {
  if constexpr (std::is_same_v<T, A>) {
    return vload(p);
  } else if constexpr (std::is_same_v<T, at::Half> && std::is_same_v<A, float>) {
    return half_to_float(p);
  } else {
    alignas(64) A tmp[kVecLen<A>];
    for (int l = 0; l < kVecLen<A>; ++l) tmp[l] = static_cast<A>(p[l]);
    return vload<A>(tmp);
  }
}
template <typename T, typename A>
inline void store_as(T* p, Vec<A> v) {
  if constexpr (std::is_same_v<T, A>) {
    vstore(p, v);
  } else if constexpr (std::is_same_v<T, at::Half> && std::is_same_v<A, float>) {
    float_to_half(p, v);
  } else {
    alignas(64) A tmp[kVecLen<A>];
    vstore<A>(tmp, v);
    for (int l = 0; l < kVecLen<A>; ++l) p[l] = static_cast<T>(tmp[l]);
  }
}
// load_as / store_as for register-wide vectors (RVec), with the same conversions.
template <typename A, typename T>
inline RVec<A> rload_as(const T* p) {
  if constexpr (kRegBytes == 64) {
    return load_as<A>(p);
  } else if constexpr (std::is_same_v<T, A>) {
    RVec<A> v;
    std::memcpy(&v, p, sizeof v);
    return v;
#if defined(FUSEDTX_AVX2)
  } else if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<A, float>) {
    return __builtin_bit_cast(RVec<float>, load8(p));  // exact, as static_cast
#endif
  } else {
    alignas(64) A tmp[kRVecLen<A>];
    for (int l = 0; l < kRVecLen<A>; ++l) {
      if constexpr (std::is_same_v<T, at::Half>) {
        tmp[l] = c10::detail::fp16_ieee_to_fp32_value(p[l].x);  // as half_to_float
      } else {
        tmp[l] = static_cast<A>(p[l]);
      }
    }
    RVec<A> v;
    std::memcpy(&v, tmp, sizeof v);
    return v;
  }
}
template <typename T, typename A>
inline void rstore_as(T* p, RVec<A> v) {
  if constexpr (kRegBytes == 64) {
    store_as<T, A>(p, v);
  } else if constexpr (std::is_same_v<T, A>) {
    std::memcpy(p, &v, sizeof v);
  } else {
    alignas(64) A tmp[kRVecLen<A>];
    std::memcpy(tmp, &v, sizeof v);
    for (int l = 0; l < kRVecLen<A>; ++l) {
      if constexpr (std::is_same_v<T, at::Half>) {
        p[l] = at::Half(c10::detail::fp16_ieee_from_fp32_value(tmp[l]), at::Half::from_bits());  // as float_to_half
      } else {
        p[l] = static_cast<T>(tmp[l]);
      }
    }
  }
}
template <typename T>
inline vfloat load_vec(const T* p) { return load_as<float>(p); }
template <typename T>
inline void store_vec(T* p, vfloat v) { store_as<T, float>(p, v); }

// Lane l of the result holds x[l + W] (wrapping around; the folds below use the lanes below W).
template <int W, typename V, std::size_t... I>
inline V lanes_from(V x, std::index_sequence<I...>) {
  return __builtin_shufflevector(x, x, ((I + W) % sizeof...(I))...);
}
template <int W, typename V>
inline V lanes_from(V x) {
  return lanes_from<W>(x, std::make_index_sequence<sizeof(V) / sizeof(x[0])>{});
}

// The accumulators of reference.lane_sum (docs/design.md, "Lane sums"): kLanes lanes of A in
// vectors V (Vec<A> or RVec<A>), lane l of a block of kLanes consecutive elements in vector
// l / kLen, slot l % kLen.
template <typename A, int kLanes = 64, typename V = Vec<A>>
struct LaneSum {
  static constexpr int kLen = sizeof(V) / sizeof(A);
  static constexpr int kVecs = kLanes / kLen;
  V acc[kVecs] = {};

  void add(int v, V e) { acc[v] = acc[v] + e; }
  void add_block(const A* e) {
    for (int v = 0; v < kVecs; ++v) {
      V x;
      std::memcpy(&x, e + v * kLen, sizeof x);
      add(v, x);
    }
  }
  // Elements [0, n) of a last, partial block; the missing ones count as +0, as in the reference.
  template <typename F>
  void add_partial_block(int64_t n, F&& element) {
    if (n <= 0) return;
    alignas(64) A block[kLanes] = {};
    for (int64_t l = 0; l < n; ++l) block[l] = element(l);
    add_block(block);
  }
  // Halves fold: whole vectors first (a[l] += a[l + w] for w >= one vector), then within the
  // last vector, in registers: lane l < w of x + lanes_from<w>(x) is a[l] + a[l + w], the same
  // adds as a scalar loop over a stored copy, which would stall on store forwarding (it stores
  // halves and reloads whole vectors).
  A fold() const {
    V v[kVecs];
    for (int i = 0; i < kVecs; ++i) v[i] = acc[i];
    for (int w = kVecs / 2; w >= 1; w /= 2) {
      for (int i = 0; i < w; ++i) v[i] = v[i] + v[i + w];
    }
    V x = v[0];
    if constexpr (kLen >= 16) x = x + lanes_from<8>(x);
    if constexpr (kLen >= 8) x = x + lanes_from<4>(x);
    if constexpr (kLen >= 4) x = x + lanes_from<2>(x);
    x = x + lanes_from<1>(x);
    return x[0];
  }
};

// reference.two_sum: s = a + b rounded, err its rounding error (s + err == a + b exactly). Six
// separately rounded operations: the build never reassociates (no -ffast-math) or contracts.
template <typename V>
inline V two_sum(V a, V b, V& err) {
  const V s = a + b;
  const V b_virtual = s - a;
  err = (a - (s - b_virtual)) + (b - b_virtual);
  return s;
}

// The accumulators of reference.lane_sum_compensated: LaneSum's lanes and order, each lane a
// pair (sum, error) updated by two_sum, folded pairwise.
template <typename A, int kLanes = 64, typename V = Vec<A>>
struct CompensatedLaneSum {
  static constexpr int kLen = sizeof(V) / sizeof(A);
  static constexpr int kVecs = kLanes / kLen;
  V sum[kVecs] = {}, err[kVecs] = {};

  void add(int v, V e) {
    V r;
    sum[v] = two_sum(sum[v], e, r);
    err[v] = err[v] + r;
  }
  void add_block(const A* e) {
    for (int v = 0; v < kVecs; ++v) {
      V x;
      std::memcpy(&x, e + v * kLen, sizeof x);
      add(v, x);
    }
  }
  template <typename F>
  void add_partial_block(int64_t n, F&& element) {
    if (n <= 0) return;
    alignas(64) A block[kLanes] = {};
    for (int64_t l = 0; l < n; ++l) block[l] = element(l);
    add_block(block);
  }
  // LaneSum::fold's order on pairs: (s, r) = two_sum(s_l, s_{l+w}), e = (e_l + e_{l+w}) + r.
  A fold() const {
    V s[kVecs], e[kVecs];
    for (int i = 0; i < kVecs; ++i) {
      s[i] = sum[i];
      e[i] = err[i];
    }
    for (int w = kVecs / 2; w >= 1; w /= 2) {
      for (int i = 0; i < w; ++i) {
        V r;
        s[i] = two_sum(s[i], s[i + w], r);
        e[i] = (e[i] + e[i + w]) + r;
      }
    }
    V x = s[0], y = e[0];
    const auto step = [&](auto w) {
      V r;
      x = two_sum(x, lanes_from<decltype(w)::value>(x), r);
      y = (y + lanes_from<decltype(w)::value>(y)) + r;
    };
    if constexpr (kLen >= 16) step(std::integral_constant<int, 8>{});
    if constexpr (kLen >= 8) step(std::integral_constant<int, 4>{});
    if constexpr (kLen >= 4) step(std::integral_constant<int, 2>{});
    step(std::integral_constant<int, 1>{});
    // An overflowed sum stays inf (its error term is inf - inf = NaN).
    return std::isfinite(x[0]) ? x[0] + y[0] : x[0];
  }
};

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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// 16-lane helpers of the attention kernels: an explicit fused multiply-add (the one place
// where the spec fuses) and a masked select.
inline vfloat vfma(vfloat a, vfloat b, vfloat c) {
#if defined(__AVX512F__)
  return reinterpret_cast<vfloat>(
      _mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b), reinterpret_cast<__m512>(c)));
#elif defined(FUSEDTX_AVX2)
  // Two ymm FMAs on the halves (an FMA rounds once however it is issued).
  typedef float half_t __attribute__((vector_size(32)));
  const auto lo = [](vfloat v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); };
  const auto hi = [](vfloat v) { return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15); };
  const half_t r_lo = reinterpret_cast<half_t>(_mm256_fmadd_ps(reinterpret_cast<__m256>(lo(a)),
                                                               reinterpret_cast<__m256>(lo(b)), reinterpret_cast<__m256>(lo(c))));
  const half_t r_hi = reinterpret_cast<half_t>(_mm256_fmadd_ps(reinterpret_cast<__m256>(hi(a)),
                                                               reinterpret_cast<__m256>(hi(b)), reinterpret_cast<__m256>(hi(c))));
  return __builtin_shufflevector(r_lo, r_hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  alignas(64) float x[kVec], y[kVec], z[kVec];
  vstore(x, a);
  vstore(y, b);
  vstore(z, c);
  for (int l = 0; l < kVec; ++l) z[l] = std::fma(x[l], y[l], z[l]);
  return vload(z);
#endif
}

// Lanes where `mask` is set take a, the others b.
inline vfloat vselect(mask16 mask, vfloat a, vfloat b) {
#if defined(__AVX512F__)
  return reinterpret_cast<vfloat>(_mm512_mask_mov_ps(reinterpret_cast<__m512>(b), mask, reinterpret_cast<__m512>(a)));
#else
  // Lane l's bit of the mask, spread to a lane-wise condition: a vector select (vblendvps on
  // AVX2, bsl on NEON) instead of a trip through memory, lane by lane, in the attention loops.
  const vuint bit = {1u << 0, 1u << 1, 1u << 2, 1u << 3, 1u << 4, 1u << 5, 1u << 6, 1u << 7,
                     1u << 8, 1u << 9, 1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15};
  return ((vuint{} + static_cast<uint32_t>(mask)) & bit) != 0 ? a : b;
#endif
}

#if defined(FUSEDTX_AVX2)
// One ymm of floats (RVec<float>) for the AVX2 loops whose 16-lane values must stay in
// registers: GCC keeps a 16-lane vfloat in memory without AVX-512.
inline RVec<float> r8_load(const float* p) { return __builtin_bit_cast(RVec<float>, _mm256_loadu_ps(p)); }
inline void r8_store(float* p, RVec<float> v) { _mm256_storeu_ps(p, __builtin_bit_cast(__m256, v)); }
inline RVec<float> r8_fma(RVec<float> a, RVec<float> b, RVec<float> c) {
  return __builtin_bit_cast(RVec<float>, _mm256_fmadd_ps(__builtin_bit_cast(__m256, a), __builtin_bit_cast(__m256, b),
                                                         __builtin_bit_cast(__m256, c)));
}
// Lanes whose bit of `bits` (bit l for lane l) is set take a, the others b.
inline RVec<float> r8_select(uint32_t bits, RVec<float> a, RVec<float> b) {
  typedef uint32_t u8x __attribute__((vector_size(32)));
  const u8x bit = {1u << 0, 1u << 1, 1u << 2, 1u << 3, 1u << 4, 1u << 5, 1u << 6, 1u << 7};
  return ((u8x{} + bits) & bit) != 0 ? a : b;
}
#endif

// The attention kernels' tasks: kLaneBlock rows (queries, or keys in the backward's second
// pass) in the lanes of kLaneGroups 16-lane vectors, group g holding rows 16 g ... 16 g + 15.
constexpr int kLaneBlock = 32;
constexpr int kLaneGroups = kLaneBlock / kVec;

// out[g * N + r] (lanes) = FMA chain over d < dim ascending from +0 of x[r][d] * xt[d][16 g + lane],
// for N rows of x (row stride ld) and NG lane groups of xt (dim rows of kLaneBlock lanes; pass
// xt + 16 g0 to start at group g0). Each broadcast x[r][d] feeds NG FMAs: with two groups 10
// vector loads per 16 FMAs instead of 9 per 8. Not inlined: inlined into the attention
// forward's task, the N row pointers get spilled and reloaded on every d.
template <int N, int NG>
[[gnu::noinline]] void lane_dots(const float* xt, const float* x, int64_t ld, int64_t dim, vfloat* out) {
#if defined(FUSEDTX_AVX2)
  // AVX2 has 16 ymm registers, too few for N x NG x 2 accumulators: passes of RB rows x HB
  // 8-lane halves (at most 8 accumulators; each xt vector loaded once per d for RB rows), each
  // lane's chain unchanged (FMAs over d ascending from +0).
  constexpr int RB = N < 4 ? N : 4;
  constexpr int HB = N <= 2 ? 2 * NG : 2;
  static_assert(N % RB == 0 && (2 * NG) % HB == 0, "lane_dots: rows in passes of RB, halves of HB");
  float* out_f = reinterpret_cast<float*>(out);
  for (int h0 = 0; h0 < 2 * NG; h0 += HB) {
    for (int r0 = 0; r0 < N; r0 += RB) {
      __m256 acc[RB][HB];
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
        for (int hb = 0; hb < HB; ++hb) acc[r][hb] = _mm256_setzero_ps();
      const float* xs = xt + h0 * 8;
      const float* xr = x + r0 * ld;
      for (int64_t d = 0; d < dim; ++d) {
        __m256 xd[HB];
#pragma GCC unroll 4
        for (int hb = 0; hb < HB; ++hb) {
          xd[hb] = _mm256_loadu_ps(xs + d * kLaneBlock + hb * 8);
          asm("" : "+x"(xd[hb]));  // one load into a register, not one folded into each FMA
        }
#pragma GCC unroll 4
        for (int r = 0; r < RB; ++r) {
          const __m256 b = _mm256_broadcast_ss(xr + r * ld + d);
#pragma GCC unroll 4
          for (int hb = 0; hb < HB; ++hb) acc[r][hb] = _mm256_fmadd_ps(b, xd[hb], acc[r][hb]);
        }
      }
      // out[g * N + r] holds group g = h / 2; half h fills its lanes 8 (h % 2) ...
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
        for (int hb = 0; hb < HB; ++hb) {
          const int h = h0 + hb;
          _mm256_storeu_ps(out_f + ((h / 2) * N + r0 + r) * kVec + (h % 2) * 8, acc[r][hb]);
        }
    }
  }
#else
  vfloat acc[NG][N];
  const float* rows[N];
  for (int r = 0; r < N; ++r) {
    for (int g = 0; g < NG; ++g) acc[g][r] = vsplat(0.0f);
    rows[r] = x + r * ld;
  }
  for (int64_t d = 0; d < dim; ++d) {
    vfloat xd[NG];
    for (int g = 0; g < NG; ++g) xd[g] = vload(xt + d * kLaneBlock + g * kVec);
    for (int r = 0; r < N; ++r) {
      const vfloat xr = vbroadcast(rows[r][d]);
      for (int g = 0; g < NG; ++g) acc[g][r] = vfma(xr, xd[g], acc[g][r]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int r = 0; r < N; ++r) out[g * N + r] = acc[g][r];
#endif
}

// lane_dots for ng (1 or 2) groups.
template <int N>
inline void lane_dots_groups(int ng, const float* xt, const float* x, int64_t ld, int64_t dim, vfloat* out) {
  static_assert(kLaneGroups == 2);
  if (ng == 1) {
    lane_dots<N, 1>(xt, x, ld, dim, out);
  } else {
    lane_dots<N, 2>(xt, x, ld, dim, out);
  }
}

}  // namespace fusedtx::cpu
