// Fused log_softmax on CPU over the last dim, float32 math.
//
// One row at a time, rows spread over threads (never a row split between threads, so the
// thread count cannot change bits). Each row makes three passes over data that stays in cache:
// max, exp + lane sums, then y = (x - m) - log_f32(sum). The passes are softmax's
// (softmax_rows.h: register-wide vectors, lane-wise IEEE arithmetic, the same bits as the scalar
// spec). The arithmetic is reference.log_softmax_forward / log_softmax_backward with 64 lanes,
// operation for operation (docs/design.md, "Lane sums"; log_f32: "exp, log and erf").
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "softmax_rows.h"

namespace fusedtx::cpu {
namespace {

using namespace softmax_rows;  // kLanes, kLen, V, scaled_max, row_lane_sum, exp_lane_sum

// One row of reference.log_softmax_forward: y = (x - m) - log_f32(lane_sum(exp_f32(x - m))).
template <typename T>
void forward_row(const T* x, T* y, int64_t n) {
  const float m = scaled_max(x, n, 1.0f);  // x * 1 is x
  const float lse = log_f32(exp_lane_sum<false>(x, n, 1.0f, m, nullptr));
  int64_t j = 0;
  for (; j + kLen <= n; j += kLen) rstore_as<T, float>(y + j, (rload_as<float>(x + j) - m) - lse);
  for (; j < n; ++j) y[j] = from_float<T>((to_float(x[j]) - m) - lse);
}

// One row of reference.log_softmax_backward: dx = dy - exp_f32(y) * lane_sum(dy).
template <typename T>
void backward_row(const T* dy, const T* y, T* dx, int64_t n) {
  const float total = row_lane_sum(n, [&](int64_t j) { return rload_as<float>(dy + j); },
                                   [&](int64_t j) { return to_float(dy[j]); });
  int64_t j = 0;
  for (; j + kLen <= n; j += kLen) {
    rstore_as<T, float>(dx + j, rload_as<float>(dy + j) - exp_f32(rload_as<float>(y + j)) * total);
  }
  for (; j < n; ++j) dx[j] = from_float<T>(to_float(dy[j]) - exp_f32(to_float(y[j])) * total);
}

void check_lanes(int64_t lanes, const char* op) {
  TORCH_CHECK(lanes == kLanes, op, ": the CPU kernel sums with ", kLanes, " lanes, asked for ", lanes);
}

at::Tensor log_softmax_forward_cpu(const at::Tensor& x, int64_t lanes) {
  check_rows(x, at::kCPU, "log_softmax_forward", "x");
  check_lanes(lanes, "log_softmax_forward");
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor y = at::empty_like(x);
  dispatch_float_types(x.scalar_type(), "log_softmax_forward", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) forward_row<T>(xp + r * cols, yp + r * cols, cols);
    });
  });
  return y;
}

at::Tensor log_softmax_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y, int64_t lanes) {
  check_rows(grad_y, at::kCPU, "log_softmax_backward", "grad_y");
  check_rows(y, at::kCPU, "log_softmax_backward", "y");
  TORCH_CHECK(grad_y.sizes() == y.sizes() && grad_y.scalar_type() == y.scalar_type(),
              "log_softmax_backward: grad_y and y must match in shape and dtype, got ", grad_y.sizes(), " ",
              grad_y.scalar_type(), " and ", y.sizes(), " ", y.scalar_type());
  check_lanes(lanes, "log_softmax_backward");
  const int64_t rows = y.size(0), cols = y.size(1);
  at::Tensor dx = at::empty_like(y);
  dispatch_float_types(y.scalar_type(), "log_softmax_backward", [&](auto tag) {
    using T = decltype(tag);
    const T* dyp = grad_y.const_data_ptr<T>();
    const T* yp = y.const_data_ptr<T>();
    T* dxp = dx.mutable_data_ptr<T>();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) backward_row<T>(dyp + r * cols, yp + r * cols, dxp + r * cols, cols);
    });
  });
  return dx;
}

}  // namespace
}  // namespace fusedtx::cpu

TORCH_LIBRARY_IMPL(fusedtx_native, CPU, m) {
  m.impl("log_softmax_forward", &fusedtx::cpu::log_softmax_forward_cpu);
  m.impl("log_softmax_backward", &fusedtx::cpu::log_softmax_backward_cpu);
}
