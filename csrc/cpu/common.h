// Building blocks shared by the CPU kernels: 64-byte vectors, fusedtx's exp, the fixed-order lane
// sum, dtype conversion and dispatch. Each mirrors a function of fusedtx/reference.py operation for operation; the
// extension is compiled with -ffp-contract=off so no multiply-add is fused behind our back.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

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
using vfloat = Vec<float>;
typedef uint32_t vuint __attribute__((vector_size(64)));

template <typename A = float>
inline Vec<A> vsplat(A v) { return Vec<A>{} + v; }
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
inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

// reference.exp_f32: Cody-Waite reduction, degree-6 polynomial, 2**n from the exponent bits
// (docs/design.md, "exp and erf"). F is float or vfloat; both compute the same bits. Always
// inlined: it sits in the innermost loops, and in a large caller (the attention forward's task)
// GCC would otherwise make it an out-of-line call through the PLT.
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
    const vuint n_bits = __builtin_bit_cast(vuint, shifted) - 0x4B400000u;
    y = y * __builtin_bit_cast(vfloat, (n_bits + 127u) << 23);
    return x < kMinArg ? vsplat(0.0f) : y;
  }
}

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }
template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }  // c10::Half/BFloat16 round to nearest even

// float16 <-> float32 for a whole vector with the F16C/AVX-512 conversion instructions
// (round to nearest even, as c10::Half). Besides being faster, they sidestep GCC 12 -O3
// miscompiling a loop of c10::Half conversions once it vectorises the surrounding code
// (wrong dx in the LayerNorm backward; right at -O2 or with -fno-tree-vectorize).
inline vfloat half_to_float(const at::Half* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<vfloat>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#else
  alignas(64) float tmp[kVec];
  for (int l = 0; l < kVec; ++l) tmp[l] = c10::detail::fp16_ieee_to_fp32_value(p[l].x);
  return vload(tmp);
#endif
}
inline void float_to_half(at::Half* p, vfloat v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
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
template <typename T>
inline vfloat load_vec(const T* p) { return load_as<float>(p); }
template <typename T>
inline void store_vec(T* p, vfloat v) { store_as<T, float>(p, v); }

// The accumulators of reference.lane_sum (docs/design.md, "Lane sums"): kLanes lanes of A, lane l
// of a block of kLanes consecutive elements in vector l / kVecLen<A>, slot l % kVecLen<A>.
template <typename A, int kLanes = 64>
struct LaneSum {
  static constexpr int kVecs = kLanes / kVecLen<A>;
  Vec<A> acc[kVecs] = {};

  void add(int v, Vec<A> e) { acc[v] = acc[v] + e; }
  void add_block(const A* e) {
    for (int v = 0; v < kVecs; ++v) add(v, vload(e + v * kVecLen<A>));
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
    Vec<A> v[kVecs];
    for (int i = 0; i < kVecs; ++i) v[i] = acc[i];
    for (int w = kVecs / 2; w >= 1; w /= 2) {
      for (int i = 0; i < w; ++i) v[i] = v[i] + v[i + w];
    }
    Vec<A> x = v[0];
    if constexpr (kVecLen<A> >= 16) x = x + lanes_from<8>(x);
    if constexpr (kVecLen<A> >= 8) x = x + lanes_from<4>(x);
    x = x + lanes_from<2>(x);
    x = x + lanes_from<1>(x);
    return x[0];
  }

 private:
  // Lane l holds x[l + W] (wrapping around; only the lanes below W are used).
  template <int W, std::size_t... I>
  static Vec<A> lanes_from(Vec<A> x, std::index_sequence<I...>) {
    return __builtin_shufflevector(x, x, ((I + W) % sizeof...(I))...);
  }
  template <int W>
  static Vec<A> lanes_from(Vec<A> x) {
    return lanes_from<W>(x, std::make_index_sequence<kVecLen<A>>{});
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

// 16-lane helpers of the attention kernels: an explicit fused multiply-add (the one place
// where the spec fuses), a masked select, and the mask of the first n lanes.
inline vfloat vfma(vfloat a, vfloat b, vfloat c) {
#if defined(__AVX512F__)
  return reinterpret_cast<vfloat>(
      _mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b), reinterpret_cast<__m512>(c)));
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
inline vfloat vselect(__mmask16 mask, vfloat a, vfloat b) {
#if defined(__AVX512F__)
  return reinterpret_cast<vfloat>(_mm512_mask_mov_ps(reinterpret_cast<__m512>(b), mask, reinterpret_cast<__m512>(a)));
#else
  alignas(64) float x[kVec], y[kVec];
  vstore(x, a);
  vstore(y, b);
  for (int l = 0; l < kVec; ++l) y[l] = (mask >> l) & 1 ? x[l] : y[l];
  return vload(y);
#endif
}

// The first n lanes (n clamped to 0 ... 16).
inline __mmask16 first_lanes(int64_t n) {
  if (n <= 0) return 0;
  if (n >= kVec) return 0xFFFF;
  return static_cast<__mmask16>((1u << n) - 1u);
}

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
