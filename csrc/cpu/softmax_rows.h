// The row passes softmax.cpp and log_softmax.cpp share: the row maximum and the lane sum of the
// exponentials, with reference.lane_sum's 64 lanes in register-wide vectors (common.h, RVec),
// lane-wise IEEE arithmetic: the same bits as the scalar spec (docs/design.md, "Lane sums").
#pragma once

#include "common.h"

namespace fusedtx::cpu::softmax_rows {

constexpr int kLanes = 64;  // policy.CPU_LANES
constexpr int kLen = kRVecLen<float>;
constexpr int kVecsPerBlock = kLanes / kLen;
using V = RVec<float>;
using RowSum = LaneSum<float, kLanes, V>;

// max_j scale * x[j] over j < n. Max is exact, so any order will do. A NaN may be skipped
// here (the reference's amax keeps it), but it still makes the row sum, so the row, NaN.
template <typename T>
float scaled_max(const T* x, int64_t n, float scale) {
  V m = V{} + kNegInf;
  int64_t j = 0;
  for (; j + kLen <= n; j += kLen) m = vmax(m, rload_as<float>(x + j) * scale);
  float out = kNegInf;
  for (int l = 0; l < kLen; ++l) out = m[l] > out ? m[l] : out;
  for (; j < n; ++j) {
    const float z = to_float(x[j]) * scale;
    out = z > out ? z : out;
  }
  return out;
}

// lane_sum over j < n of the float32 terms vec(j) (a V of the terms j ... j + kLen - 1, for the
// whole blocks of kLanes) and one(j) (a single term, for the last, partial block).
template <typename VecTerms, typename OneTerm>
float row_lane_sum(int64_t n, VecTerms&& vec, OneTerm&& one) {
  RowSum sum;
  int64_t b = 0;
  for (; b + kLanes <= n; b += kLanes) {
    for (int v = 0; v < kVecsPerBlock; ++v) sum.add(v, vec(b + v * kLen));
  }
  sum.add_partial_block(n - b, [&](int64_t l) { return one(b + l); });
  return sum.fold();
}

// lane_sum over j < n of exp_f32(scale * x[j] - m); with kStore each exponential is also
// written to e[j]. scale = 1 computes exp_f32(x[j] - m): x * 1 is x.
template <bool kStore, typename T>
float exp_lane_sum(const T* x, int64_t n, float scale, float m, float* e) {
  return row_lane_sum(
      n,
      [&](int64_t j) {
        const V ev = exp_f32(rload_as<float>(x + j) * scale - m);
        if constexpr (kStore) rstore_as<float, float>(e + j, ev);
        return ev;
      },
      [&](int64_t j) {
        const float ej = exp_f32(to_float(x[j]) * scale - m);
        if constexpr (kStore) e[j] = ej;
        return ej;
      });
}

}  // namespace fusedtx::cpu::softmax_rows
