// Fused softmax on CPU: softmax(scale * x) over the last dim, optional causal mask, float32 math.
//
// One row at a time, rows spread over threads (never a row split between threads, so the
// thread count cannot change bits). Each row makes three passes over data that stays in cache:
// scale + max, exp + lane sums, divide. The arithmetic is reference.softmax_forward /
// softmax_backward with 64 lanes, operation for operation.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace fusedtx::cpu {
namespace {

constexpr int kLanes = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Sum of e[0..n) in the reference's lane order.
inline float lane_sum(const float* e, int64_t n) {
  alignas(64) float acc[kLanes] = {};
  int64_t b = 0;
  for (; b + kLanes <= n; b += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] = acc[l] + e[b + l];
  }
  for (int l = 0; b + l < n; ++l) acc[l] = acc[l] + e[b + l];
  return fold_lanes<kLanes>(acc);
}

// Max of z[0..n); NaN handling as in the reference's amax is not needed: a NaN anywhere makes
// the row sum, hence the whole row, NaN either way.
inline float row_max(const float* z, int64_t n) {
  alignas(64) float mx[16];
  for (int l = 0; l < 16; ++l) mx[l] = kNegInf;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int l = 0; l < 16; ++l) mx[l] = z[j + l] > mx[l] ? z[j + l] : mx[l];
  }
  for (; j < n; ++j) mx[0] = z[j] > mx[0] ? z[j] : mx[0];
  float m = kNegInf;
  for (int l = 0; l < 16; ++l) m = mx[l] > m ? mx[l] : m;
  return m;
}

template <typename T>
void forward_row(const T* x, T* y, float* buf, int64_t n_cols, int64_t n_valid, float scale) {
  for (int64_t j = n_valid; j < n_cols; ++j) y[j] = from_float<T>(0.0f);
  if (n_valid == 0) return;
  for (int64_t j = 0; j < n_valid; ++j) buf[j] = to_float(x[j]) * scale;
  const float m = row_max(buf, n_valid);
  for (int64_t j = 0; j < n_valid; ++j) buf[j] = exp_f32(buf[j] - m);
  const float s = lane_sum(buf, n_valid);
  for (int64_t j = 0; j < n_valid; ++j) y[j] = from_float<T>(buf[j] / s);
}

template <typename T>
void backward_row(const T* dy, const T* y, T* dx, float* buf, int64_t n_cols, float scale) {
  for (int64_t j = 0; j < n_cols; ++j) buf[j] = to_float(dy[j]) * to_float(y[j]);
  const float dot = lane_sum(buf, n_cols);
  for (int64_t j = 0; j < n_cols; ++j) dx[j] = from_float<T>((to_float(y[j]) * (to_float(dy[j]) - dot)) * scale);
}

void check_2d(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), op, ": ", name, " must be a contiguous 2-D tensor, got sizes ", t.sizes());
}

at::Tensor softmax_forward_cpu(const at::Tensor& x, double scale, bool causal, int64_t n_queries, int64_t lanes) {
  check_2d(x, "softmax_forward", "x");
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
      std::vector<float> buf(cols);
      for (int64_t r = begin; r < end; ++r) {
        // Row r is query r % n_queries; bottom-right aligned causal mask (reference.causal_valid_counts).
        const int64_t n_valid = causal ? std::clamp<int64_t>(r % n_queries + (cols - n_queries) + 1, 0, cols) : cols;
        forward_row<T>(xp + r * cols, yp + r * cols, buf.data(), cols, n_valid, scale_f);
      }
    });
  });
  return y;
}

at::Tensor softmax_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y, double scale, int64_t lanes) {
  check_2d(grad_y, "softmax_backward", "grad_y");
  check_2d(y, "softmax_backward", "y");
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
      std::vector<float> buf(cols);
      for (int64_t r = begin; r < end; ++r) backward_row<T>(dyp + r * cols, yp + r * cols, dxp + r * cols, buf.data(), cols, scale_f);
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
