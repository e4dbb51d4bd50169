// The activations on CPU, as reference.erf_f32, activation_forward, activation_derivative,
// swiglu_forward and swiglu_grad_preact operation for operation (docs/design.md, "exp, log and erf").
// F is float or a float vector (common.h); both compute the same bits. Used by the matmul's
// epilogue and the backward's elementwise part (linear.cpp) and by the activation op
// (activation.cpp). Its functions are in an unnamed namespace, local to each including file, so
// that GCC inlines them as file-local code.
#pragma once

#include <bit>
#include <cstdint>
#include <type_traits>

#include "common.h"

namespace fusedtx::cpu {
namespace {

constexpr int kActNone = 0, kActGelu = 1, kActGeluTanh = 2, kActSwiglu = 3, kActSilu = 4;  // reference.ACT_*

// Where an output element goes: at the pre-activation's offset, or, for SwiGLU (one output per
// gate/up pair, half the width), at half of it (an even offset: tiles hold whole pairs).
template <int kAct>
constexpr int64_t out_offset(int64_t preact_offset) {
  return kAct == kActSwiglu ? preact_offset / 2 : preact_offset;
}

// The reference's constants are Python floats (doubles) that torch rounds to float32.
constexpr float f32c(double c) { return static_cast<float>(c); }
constexpr float kErfSplit = f32c(0.9);
constexpr float kErfClamp = f32c(4.0);
constexpr float kErfSmallPoly[] = {f32c(-6.1112584e-04), f32c(5.0161984e-03), f32c(-2.6781915e-02),
                                   f32c(1.1282228e-01),  f32c(-3.761253e-01), f32c(1.2837915e-01)};
constexpr float kErfLargePoly[] = {f32c(-5.805502e-08), f32c(1.3905425e-06), f32c(-1.3021138e-05), f32c(4.3403546e-05),
                                   f32c(2.4704504e-04), f32c(-3.844943e-03), f32c(2.4801595e-02),  f32c(-1.0816315e-01),
                                   f32c(-6.332778e-01), f32c(-1.129598e+00), f32c(1.9802191e-04)};
constexpr float kSqrt1_2 = f32c(0.70710678118654752);
constexpr float kInvSqrt2Pi = f32c(0.39894228040143268);
constexpr float kTanhCubic = f32c(0.044715);
constexpr float kTanhCubic3 = f32c(0.134145);
constexpr float kTanhTwoK = f32c(1.5957691216057308);
constexpr float kMaxExpArg = f32c(88.0);

// The unsigned integer vector as wide as the float vector F.
template <typename F>
struct BitsOf {
  typedef uint32_t type __attribute__((vector_size(sizeof(F))));
};

template <typename F>
inline F sign_bits(F x, uint32_t mask) {
  if constexpr (std::is_same_v<F, float>) {
    return std::bit_cast<float>(std::bit_cast<uint32_t>(x) & mask);
  } else {
    using U = typename BitsOf<F>::type;
    return __builtin_bit_cast(F, __builtin_bit_cast(U, x) & mask);
  }
}
template <typename F>
inline F abs_f(F x) { return sign_bits(x, 0x7fffffffu); }
// torch.copysign(mag, sgn) for a non-negative, non-NaN mag.
template <typename F>
inline F copysign_f(F mag, F sgn) {
  if constexpr (std::is_same_v<F, float>) {
    return std::bit_cast<float>(std::bit_cast<uint32_t>(mag) | (std::bit_cast<uint32_t>(sgn) & 0x80000000u));
  } else {
    using U = typename BitsOf<F>::type;
    return __builtin_bit_cast(F, __builtin_bit_cast(U, mag) | (__builtin_bit_cast(U, sgn) & 0x80000000u));
  }
}
// x > c ? c : x -- a NaN x stays NaN.
template <typename F>
inline F clamp_above(F x, float c) { return x > c ? splat<F>(c) : x; }

template <typename F, size_t N>
inline F horner(const float (&coeffs)[N], F x) {
  F p = splat<F>(coeffs[0]);
  for (size_t i = 1; i < N; ++i) p = p * x + coeffs[i];
  return p;
}

template <typename F>
inline F erf_f32(F t) {
  const F a = clamp_above(abs_f(t), kErfClamp);
  const F small = t + t * horner(kErfSmallPoly, t * t);
  const F large = copysign_f(splat<F>(1.0f) - exp_f32(horner(kErfLargePoly, a)), t);
  return a < kErfSplit ? small : large;
}

// reference._sigmoid_of_neg: e = exp(min(z, 88)), s = z > 88 ? +0 : 1 / (1 + e).
template <typename F>
inline F sigmoid_of_neg(F z, F* e_out) {
  const F e = exp_f32(clamp_above(z, kMaxExpArg));
  *e_out = e;
  const F s = splat<F>(1.0f) / (splat<F>(1.0f) + e);
  return z > kMaxExpArg ? splat<F>(0.0f) : s;
}

// reference._gelu_tanh_sigmoid: sigmoid_of_neg(z), z = -2 sqrt(2/pi) (h + 0.044715 h^3).
template <typename F>
inline F gelu_tanh_sigmoid(F h, F* e_out) {
  const F h3 = (h * h) * h;
  const F z = (h + kTanhCubic * h3) * (-kTanhTwoK);
  return sigmoid_of_neg(z, e_out);
}

// reference.swiglu_forward on one gate/up pair: (g s) u, s = sigmoid_of_neg(-g).
template <typename F>
inline F swiglu_forward(F g, F u) {
  F e;
  const F s = sigmoid_of_neg(-g, &e);
  return (g * s) * u;
}

// reference.swiglu_grad_preact on one pair: dg = (dy u)(s + (g s)(e s)), du = dy (g s).
template <typename F>
inline void swiglu_grads(F dy, F g, F u, F* dg, F* du) {
  F e;
  const F s = sigmoid_of_neg(-g, &e);
  const F gs = g * s;
  *dg = (dy * u) * (s + gs * (e * s));
  *du = dy * gs;
}

template <int kAct, typename F>
inline F activation_forward(F h) {
  if constexpr (kAct == kActGelu) {
    return (0.5f * h) * (splat<F>(1.0f) + erf_f32(h * kSqrt1_2));
  } else if constexpr (kAct == kActGeluTanh) {
    F e;
    return h * gelu_tanh_sigmoid(h, &e);
  } else if constexpr (kAct == kActSilu) {
    F e;
    return h * sigmoid_of_neg(-h, &e);
  } else {
    return h;
  }
}

template <int kAct, typename F>
inline F activation_derivative(F h) {
  if constexpr (kAct == kActGelu) {
    const F cdf = 0.5f * (splat<F>(1.0f) + erf_f32(h * kSqrt1_2));
    const F pdf = exp_f32(-0.5f * (h * h)) * kInvSqrt2Pi;
    return cdf + h * pdf;
  } else if constexpr (kAct == kActGeluTanh) {
    F e;
    const F s = gelu_tanh_sigmoid(h, &e);
    const F slope = kTanhTwoK * (splat<F>(1.0f) + kTanhCubic3 * (h * h));
    return s + ((h * s) * (e * s)) * slope;
  } else if constexpr (kAct == kActSilu) {
    F e;
    const F s = sigmoid_of_neg(-h, &e);
    return s + (h * s) * (e * s);
  } else {
    return splat<F>(1.0f);
  }
}

template <typename Fn>
void dispatch_activation(int64_t act, const char* op, Fn&& fn) {
  switch (act) {
    case kActNone: fn(std::integral_constant<int, kActNone>{}); break;
    case kActGelu: fn(std::integral_constant<int, kActGelu>{}); break;
    case kActGeluTanh: fn(std::integral_constant<int, kActGeluTanh>{}); break;
    case kActSwiglu: fn(std::integral_constant<int, kActSwiglu>{}); break;
    default:
      TORCH_CHECK(false, op, ": unknown activation code ", act, " (expected 0 none, 1 gelu, 2 gelu_tanh, 3 swiglu)");
  }
}

}  // namespace
}  // namespace fusedtx::cpu
