// RMSNorm on CPU: forward, and a backward with a deterministic weight gradient. The arithmetic is
// reference.rms_norm_forward / rms_norm_backward with 64 lanes, operation for operation (float32
// compute for float32/float16/bfloat16 inputs, float64 for float64), written with
// register-wide vectors (common.h, RVec).
//
// Forward: rows spread over threads, one row per task step, two passes over a row that stays in
// cache (the compensated sum of squares; normalise). Backward: row_norm.h's, shared with
// LayerNorm, without the mean: fixed row groups (policy.ROW_GROUPS) of dx and dweight partials,
// summed per column in group order. Nothing depends on the thread count
// (docs/design.md, "Lane sums" and "Row groups").
#include <torch/library.h>

#include "row_norm.h"

namespace fusedtx::cpu {
namespace {

using row_norm::kLanes;

// x: a row of T, the weight of P, arithmetic in A; next: see row_norm::write_normalized.
template <typename T, typename P, typename A>
void rms_norm_row(const T* x, T* y, const P* w, int64_t n, A eps, A* rstd_out, const T* next) {
  constexpr int L = kRVecLen<A>;
  CompensatedLaneSum<A, kLanes, RVec<A>> sq;
  int64_t blk = 0;
  for (; blk + kLanes <= n; blk += kLanes) {
    for (int v = 0; v < kLanes / L; ++v) {
      const RVec<A> e = rload_as<A>(x + blk + v * L);
      sq.add(v, e * e);
    }
  }
  sq.add_partial_block(n - blk, [&](int64_t l) {
    const A e = static_cast<A>(x[blk + l]);
    return e * e;
  });
  const A rstd = A(1) / std::sqrt(sq.fold() / static_cast<A>(n) + eps);
  row_norm::write_normalized<A>(x, y, w, static_cast<const P*>(nullptr), n, next, [&](auto v) { return v * rstd; });
  *rstd_out = rstd;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                        double eps, int64_t lanes) {
  using namespace row_norm;
  constexpr const char* op = "rms_norm_forward";
  check_rows(x, at::kCPU, op, "x");
  check_lanes(lanes, op);
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(n > 0, op, ": rows must have at least one element");
  const at::Tensor* w = check_param(weight, n, op, "weight");
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, x.options().dtype(compute_type(x)));
  dispatch_x_and_params(x.scalar_type(), w ? w->scalar_type() : x.scalar_type(), op, [&](auto t_tag, auto p_tag) {
    using T = decltype(t_tag);
    using P = decltype(p_tag);
    using A = compute_t<T>;
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    A* rp = rstd.mutable_data_ptr<A>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        rms_norm_row<T, P, A>(xp + r * n, yp + r * n, param_ptr<P>(w), n, static_cast<A>(eps), rp + r,
                              r + 1 < end ? xp + (r + 1) * n : nullptr);
      }
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                         const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                                                         bool need_param_grads, int64_t lanes, int64_t groups) {
  auto [dx, dweight, unused] = row_norm::backward<false>(grad_y, x, at::Tensor(), rstd, weight, need_param_grads,
                                                         lanes, groups, "rms_norm_backward");
  return {dx, dweight};
}

}  // namespace
}  // namespace fusedtx::cpu

TORCH_LIBRARY_IMPL(fusedtx_native, CPU, m) {
  m.impl("rms_norm_forward", &fusedtx::cpu::rms_norm_forward_cpu);
  m.impl("rms_norm_backward", &fusedtx::cpu::rms_norm_backward_cpu);
}
