// Fused softmax on CPU: softmax(scale * x) over the last dim, optional causal mask, float32 math.
//
// One row at a time, rows spread over threads (never a row split between threads, so the
// thread count cannot change bits). Each row makes three passes over data that stays in cache:
// scale + max, exp + lane sums (exponentials kept in the output row), divide. Written with
// register-wide vectors (common.h, RVec), lane-wise IEEE arithmetic: the same bits as the
// scalar spec. The arithmetic is reference.softmax_forward / softmax_backward with 64 lanes,
// operation for operation (docs/design.md, "Lane sums").
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "softmax_rows.h"

namespace fusedtx::cpu {
namespace {

using namespace softmax_rows;  // kLanes, kLen, V, scaled_max, row_lane_sum, exp_lane_sum

// One row of reference.softmax_forward. `e` holds the exponentials between the passes (y
// itself for float32 rows).
template <typename T>
void forward_row(const T* x, T* y, float* e, int64_t n_cols, int64_t n_valid, float scale) {
  for (int64_t j = n_valid; j < n_cols; ++j) y[j] = from_float<T>(0.0f);
  if (n_valid == 0) return;
  const float m = scaled_max(x, n_valid, scale);
  const float s = exp_lane_sum<true>(x, n_valid, scale, m, e);
  int64_t j = 0;
  for (; j + kLen <= n_valid; j += kLen) rstore_as<T, float>(y + j, rload_as<float>(e + j) / s);
  for (; j < n_valid; ++j) y[j] = from_float<T>(e[j] / s);
}

// One row of reference.softmax_backward: dx = (y * (dy - sum(dy * y))) * scale.
template <typename T>
void backward_row(const T* dy, const T* y, T* dx, int64_t n, float scale) {
  const float dot = row_lane_sum(
      n, [&](int64_t j) { return rload_as<float>(dy + j) * rload_as<float>(y + j); },
      [&](int64_t j) { return to_float(dy[j]) * to_float(y[j]); });
  int64_t j = 0;
  for (; j + kLen <= n; j += kLen) {
    const V yv = rload_as<float>(y + j);
    rstore_as<T, float>(dx + j, (yv * (rload_as<float>(dy + j) - dot)) * scale);
  }
  for (; j < n; ++j) dx[j] = from_float<T>((to_float(y[j]) * (to_float(dy[j]) - dot)) * scale);
}

at::Tensor softmax_forward_cpu(const at::Tensor& x, double scale, bool causal, int64_t n_queries, int64_t lanes) {
  check_rows(x, at::kCPU, "softmax_forward", "x");
  TORCH_CHECK(lanes == kLanes, "softmax_forward: the CPU kernel sums with ", kLanes, " lanes, asked for ", lanes);
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK(!causal || n_queries > 0, "softmax_forward: n_queries must be positive when causal");
  at::Tensor y = at::empty_like(x);
  const float scale_f = static_cast<float>(scale);
  dispatch_float_types(x.scalar_type(), "softmax_forward", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(std::is_same_v<T, float> ? 0 : cols);
      for (int64_t r = begin; r < end; ++r) {
        // Row r is query r % n_queries; bottom-right aligned causal mask (reference.causal_valid_counts).
        const int64_t n_valid = causal ? std::clamp<int64_t>(r % n_queries + (cols - n_queries) + 1, 0, cols) : cols;
        float* e = std::is_same_v<T, float> ? reinterpret_cast<float*>(yp + r * cols) : buf.data();
        forward_row<T>(xp + r * cols, yp + r * cols, e, cols, n_valid, scale_f);
      }
    });
  });
  return y;
}

at::Tensor softmax_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y, double scale, int64_t lanes) {
  check_rows(grad_y, at::kCPU, "softmax_backward", "grad_y");
  check_rows(y, at::kCPU, "softmax_backward", "y");
  TORCH_CHECK(grad_y.sizes() == y.sizes() && grad_y.scalar_type() == y.scalar_type(),
              "softmax_backward: grad_y and y must match in shape and dtype");
  TORCH_CHECK(lanes == kLanes, "softmax_backward: the CPU kernel sums with ", kLanes, " lanes, asked for ", lanes);
  const int64_t rows = y.size(0), cols = y.size(1);
  at::Tensor dx = at::empty_like(y);
  const float scale_f = static_cast<float>(scale);
  dispatch_float_types(y.scalar_type(), "softmax_backward", [&](auto tag) {
    using T = decltype(tag);
    const T* dyp = grad_y.const_data_ptr<T>();
    const T* yp = y.const_data_ptr<T>();
    T* dxp = dx.mutable_data_ptr<T>();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) backward_row<T>(dyp + r * cols, yp + r * cols, dxp + r * cols, cols, scale_f);
    });
  });
  return dx;
}

}  // namespace
}  // namespace fusedtx::cpu

TORCH_LIBRARY_IMPL(fusedtx_native, CPU, m) {
  m.impl("softmax_forward", &fusedtx::cpu::softmax_forward_cpu);
  m.impl("softmax_backward", &fusedtx::cpu::softmax_backward_cpu);
}
