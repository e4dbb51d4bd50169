// The elementwise activations in CUDA, as reference.erf_f32, activation_forward and
// activation_derivative operation for operation (docs/design.md, "exp, log and erf"):
// _rn intrinsics, so nvcc contracts nothing into an FMA. Used by linear.cu's epilogue and
// backward and by activation.cu. Its functions are in an unnamed namespace, local to each
// including file.
#pragma once

#include "common.cuh"

namespace fusedtx::cuda {
namespace {

constexpr int kActNone = 0, kActGelu = 1, kActGeluTanh = 2, kActSwiglu = 3, kActSilu = 4;  // reference.ACT_*

// The reference's Python constants, rounded to float32 as torch.tensor(c, dtype=float32) does
// (double -> float, round to nearest): a float literal could round differently from the decimal.
constexpr float f32(double c) { return static_cast<float>(c); }

// p * x + c with two roundings: one step of reference._horner.
__device__ __forceinline__ float horner_step(float p, float x, double c) { return __fadd_rn(__fmul_rn(p, x), f32(c)); }

// reference.erf_f32 (only the selected branch is evaluated: the same bits as computing both).
__device__ __forceinline__ float erf_f32(float t) {
  float a = fabsf(t);
  a = a > f32(4.0) ? f32(4.0) : a;  // written so that NaN stays NaN
  if (a < f32(0.9)) {
    const float x = __fmul_rn(t, t);
    float p = f32(-6.1112584e-04);
    p = horner_step(p, x, 5.0161984e-03);
    p = horner_step(p, x, -2.6781915e-02);
    p = horner_step(p, x, 1.1282228e-01);
    p = horner_step(p, x, -3.761253e-01);
    p = horner_step(p, x, 1.2837915e-01);
    return __fadd_rn(t, __fmul_rn(t, p));
  }
  float q = f32(-5.805502e-08);
  q = horner_step(q, a, 1.3905425e-06);
  q = horner_step(q, a, -1.3021138e-05);
  q = horner_step(q, a, 4.3403546e-05);
  q = horner_step(q, a, 2.4704504e-04);
  q = horner_step(q, a, -3.844943e-03);
  q = horner_step(q, a, 2.4801595e-02);
  q = horner_step(q, a, -1.0816315e-01);
  q = horner_step(q, a, -6.332778e-01);
  q = horner_step(q, a, -1.129598e+00);
  q = horner_step(q, a, 1.9802191e-04);
  return copysignf(__fsub_rn(1.0f, exp_f32(q)), t);
}

// reference._sigmoid_of_neg: e = exp(min(z, 88)), s = z > 88 ? +0 : 1 / (1 + e).
__device__ __forceinline__ float sigmoid_of_neg(float z, float& e) {
  const bool beyond = z > f32(88.0);  // false for NaN: NaN stays NaN
  e = exp_f32(beyond ? f32(88.0) : z);
  return beyond ? 0.0f : __fdiv_rn(1.0f, __fadd_rn(1.0f, e));
}

// reference._gelu_tanh_sigmoid: sigmoid_of_neg(z), z = -2 sqrt(2/pi) (h + 0.044715 h^3).
__device__ __forceinline__ float gelu_tanh_sigmoid(float h, float& e) {
  const float h3 = __fmul_rn(__fmul_rn(h, h), h);
  const float z = __fmul_rn(__fadd_rn(h, __fmul_rn(f32(0.044715), h3)), f32(-1.5957691216057308));
  return sigmoid_of_neg(z, e);
}

// reference.activation_forward on float32 h (kAct: reference.ACT_*).
template <int kAct>
__device__ __forceinline__ float activation_forward(float h) {
  if constexpr (kAct == kActGelu) {
    return __fmul_rn(__fmul_rn(0.5f, h), __fadd_rn(1.0f, erf_f32(__fmul_rn(h, f32(0.70710678118654752)))));
  } else if constexpr (kAct == kActGeluTanh) {
    float e;
    return __fmul_rn(h, gelu_tanh_sigmoid(h, e));
  } else if constexpr (kAct == kActSilu) {
    float e;
    return __fmul_rn(h, sigmoid_of_neg(-h, e));
  } else {
    return h;
  }
}

// reference.activation_derivative on float32 h (kAct gelu, gelu_tanh or silu).
template <int kAct>
__device__ __forceinline__ float activation_derivative(float h) {
  static_assert(kAct == kActGelu || kAct == kActGeluTanh || kAct == kActSilu, "an elementwise activation");
  if constexpr (kAct == kActGelu) {
    const float cdf = __fmul_rn(0.5f, __fadd_rn(1.0f, erf_f32(__fmul_rn(h, f32(0.70710678118654752)))));
    const float pdf = __fmul_rn(exp_f32(__fmul_rn(-0.5f, __fmul_rn(h, h))), f32(0.39894228040143268));
    return __fadd_rn(cdf, __fmul_rn(h, pdf));
  } else if constexpr (kAct == kActGeluTanh) {
    float e;
    const float s = gelu_tanh_sigmoid(h, e);
    const float slope = __fmul_rn(f32(1.5957691216057308), __fadd_rn(1.0f, __fmul_rn(f32(0.134145), __fmul_rn(h, h))));
    return __fadd_rn(s, __fmul_rn(__fmul_rn(__fmul_rn(h, s), __fmul_rn(e, s)), slope));
  } else {
    float e;
    const float s = sigmoid_of_neg(-h, e);
    return __fadd_rn(s, __fmul_rn(__fmul_rn(h, s), __fmul_rn(e, s)));
  }
}

}  // namespace
}  // namespace fusedtx::cuda
