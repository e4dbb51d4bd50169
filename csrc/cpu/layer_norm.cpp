// LayerNorm on CPU: forward with corrected two-pass statistics, backward with deterministic weight and
// bias gradients. The arithmetic is reference.layer_norm_forward / layer_norm_backward with 64
// lanes, operation for operation (float32 compute for float32/float16/bfloat16 inputs, float64
// for float64), written with register-wide vectors (common.h, RVec).
//
// Forward: rows spread over threads, one row per task step, three passes over a row that stays
// in cache (the sum; the sums of the deviations and of their squares; normalise). Backward
// (row_norm.h, shared with RMSNorm): the rows are cut into a fixed number of row groups
// (policy.ROW_GROUPS); threads take whole groups, each group computes its rows' dx and adds
// dy * xhat and dy into its own row of a partial buffer; the partials are then summed per
// column in group order. Nothing depends on the thread count (docs/design.md, "Lane sums" and
// "Row groups").
#include <torch/library.h>

#include "row_norm.h"

namespace fusedtx::cpu {
namespace {

using row_norm::kLanes;

// x: a row of T; params of P; arithmetic in A.
template <typename T, typename P, typename A>
struct LayerNormRow {
  static constexpr int L = kRVecLen<A>;
  static constexpr int kVecs = kLanes / L;

  // next: the row to be normalised after this one (nullptr if none; row_norm::write_normalized).
  static void forward(const T* x, T* y, const P* w, const P* b, int64_t n, A eps, A* mean_out, A* rstd_out,
                      const T* next) {
    LaneSum<A, kLanes, RVec<A>> sum;
    int64_t blk = 0;
    for (; blk + kLanes <= n; blk += kLanes) {
      for (int v = 0; v < kVecs; ++v) sum.add(v, rload_as<A>(x + blk + v * L));
    }
    sum.add_partial_block(n - blk, [&](int64_t l) { return static_cast<A>(x[blk + l]); });
    const A mean0 = sum.fold() / static_cast<A>(n);

    // One pass for both sums of d0 = x - mean0: its plain sum (the mean's correction) and its
    // compensated sum of squares.
    LaneSum<A, kLanes, RVec<A>> dev;
    CompensatedLaneSum<A, kLanes, RVec<A>> sq;
    for (blk = 0; blk + kLanes <= n; blk += kLanes) {
      for (int v = 0; v < kVecs; ++v) {
        const RVec<A> d = rload_as<A>(x + blk + v * L) - mean0;
        dev.add(v, d);
        sq.add(v, d * d);
      }
    }
    dev.add_partial_block(n - blk, [&](int64_t l) { return static_cast<A>(x[blk + l]) - mean0; });
    sq.add_partial_block(n - blk, [&](int64_t l) {
      const A d = static_cast<A>(x[blk + l]) - mean0;
      return d * d;
    });
    const A c = dev.fold() / static_cast<A>(n);
    A var = sq.fold() / static_cast<A>(n) - c * c;
    if (var < A(0)) var = A(0);  // rounding only; NaN stays NaN
    const A rstd = A(1) / std::sqrt(var + eps);
    row_norm::write_normalized<A>(x, y, w, b, n, next, [&](auto v) { return ((v - mean0) - c) * rstd; });
    *mean_out = mean0 + c;
    *rstd_out = rstd;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                                     const std::optional<at::Tensor>& bias, double eps, int64_t lanes) {
  using namespace row_norm;
  check_rows(x, at::kCPU, "layer_norm_forward", "x");
  check_lanes(lanes, "layer_norm_forward");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(n > 0, "layer_norm_forward: rows must have at least one element");
  const at::Tensor* w = check_param(weight, n, "layer_norm_forward", "weight");
  const at::Tensor* b = check_param(bias, n, "layer_norm_forward", "bias");
  TORCH_CHECK(!(w && b) || w->scalar_type() == b->scalar_type(), "layer_norm_forward: weight and bias must share a dtype");
  const at::ScalarType p_type = w ? w->scalar_type() : b ? b->scalar_type() : x.scalar_type();
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(compute_type(x)));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(compute_type(x)));
  dispatch_x_and_params(x.scalar_type(), p_type, "layer_norm_forward", [&](auto t_tag, auto p_tag) {
    using T = decltype(t_tag);
    using P = decltype(p_tag);
    using A = compute_t<T>;
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    const P* wp = param_ptr<P>(w);
    const P* bp = param_ptr<P>(b);
    A* mp = mean.mutable_data_ptr<A>();
    A* rp = rstd.mutable_data_ptr<A>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        LayerNormRow<T, P, A>::forward(xp + r * n, yp + r * n, wp, bp, n, static_cast<A>(eps), mp + r, rp + r,
                                       r + 1 < end ? xp + (r + 1) * n : nullptr);
      }
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, bool need_param_grads, int64_t lanes, int64_t groups) {
  return row_norm::backward<true>(grad_y, x, mean, rstd, weight, need_param_grads, lanes, groups, "layer_norm_backward");
}

}  // namespace
}  // namespace fusedtx::cpu

TORCH_LIBRARY_IMPL(fusedtx_native, CPU, m) {
  m.impl("layer_norm_forward", &fusedtx::cpu::layer_norm_forward_cpu);
  m.impl("layer_norm_backward", &fusedtx::cpu::layer_norm_backward_cpu);
}
