// Fused RMSNorm in CUDA, forward and backward: reference.rms_norm_forward / _backward, bit for
// bit. Arithmetic is float32 (float64 for float64 tensors), every operation rounded on its own
// (no FMA contraction).
//
// Forward: one thread block per row, one lane of reference.lane_sum per thread: thread t handles
// elements t, t + lanes, t + 2*lanes, ... in ascending order, adding their squares into its
// compensated (sum, error) pair; the block folds the pairs in halves; then y = (x * rstd) * w.
// The lane count comes from the row length only (fusedtx/ops: the threads-per-row rule), so a
// row's bits never depend on the batch. When a row fits in kPerThread<C> elements per thread it
// is kept in registers (one read of x); otherwise the second pass re-reads x, mostly from L2.
//
// Backward: row_norm.cuh's, shared with LayerNorm, without the mean: the row sum of g*xhat per
// row, dweight through fixed row groups, no atomics.
#include "row_norm.cuh"

namespace fusedtx::cuda {
namespace {

using row_norm::compute_t;
using row_norm::kMaxLanes;

// Row elements per thread kept in registers by the forward, as layer_norm.cu's.
template <typename C>
constexpr int kPerThread = sizeof(C) == sizeof(double) ? 4 : 8;

// __launch_bounds__(kMaxLanes): any lanes up to 1024 must launch, which caps registers at 64 a
// thread (ptxas -v must report no spills).
template <typename T, typename W, typename C, bool kCached>
__global__ void __launch_bounds__(kMaxLanes)
    rms_norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ weight, T* __restrict__ y,
                        C* __restrict__ rstd, int64_t n, C eps) {
  C* scratch = shared_memory<C>();
  const int64_t row = blockIdx.x;
  const int t = threadIdx.x, lanes = blockDim.x;
  const T* x_row = x + row * n;
  T* y_row = y + row * n;
  const C n_c = static_cast<C>(n);  // as torch.tensor(N, dtype=compute dtype) rounds it

  // Pass 1: the compensated sum of squares. Columns past the end are skipped: lane_sum's +0
  // padding leaves a finite (sum, error) pair as it is, and a non-finite sum is the total.
  C xr[kCached ? kPerThread<C> : 1];
  C sq = 0, sq_err = 0;
  const auto square = [&](C xj) {
    C r;
    sq = two_sum(sq, mul_rn(xj, xj), r);
    sq_err = add_rn(sq_err, r);
  };
  if constexpr (kCached) {
#pragma unroll
    for (int k = 0; k < kPerThread<C>; ++k) {
      const int j = t + k * lanes;  // < 8192: cached rows are short
      xr[k] = j < n ? load_as<C>(x_row + j) : C(0);
      if (j < n) square(xr[k]);
    }
  } else {
    for (int64_t j = t; j < n; j += lanes) square(load_as<C>(x_row + j));
  }
  const C ms = div_rn(block_fold_lanes_compensated(sq, sq_err, scratch), n_c);
  const C rs = div_rn(C(1), sqrt_rn(add_rn(ms, eps)));
  if (t == 0) rstd[row] = rs;

  // Pass 2: y = (x * rstd) * w, in that order.
  const auto normalize = [&](int64_t j, C xj) {
    C v = mul_rn(xj, rs);
    if (weight != nullptr) v = mul_rn(v, load_as<C>(weight + j));
    store_rn(y_row + j, v);
  };
  row_norm::for_own_elements<kCached, kPerThread<C>>(xr, x_row, n, normalize);
}

template <typename T, typename W>
cudaError_t launch_forward(const void* x, const void* weight, void* y, void* rstd, int64_t rows, int64_t n,
                           double eps, int lanes, cudaStream_t stream) {
  using C = compute_t<T>;
  const size_t smem = 2 * lanes * sizeof(C);  // block_fold_lanes_compensated
  const C eps_c = static_cast<C>(eps);  // as torch.tensor(eps, dtype=compute dtype) rounds it
  const auto args = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(rows), lanes, smem, stream>>>(static_cast<const T*>(x), static_cast<const W*>(weight),
                                                                 static_cast<T*>(y), static_cast<C*>(rstd), n, eps_c);
  };
  if (n <= static_cast<int64_t>(lanes) * kPerThread<C>) {
    args(rms_norm_fwd_kernel<T, W, C, true>);
  } else {
    args(rms_norm_fwd_kernel<T, W, C, false>);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t rms_norm_forward(const void* x, const void* weight, void* y, void* rstd, int64_t rows, int64_t n,
                             double eps, int lanes, DType dtype, DType param_dtype, cudaStream_t stream) {
  if (!row_norm::valid_lanes(lanes) || rows < 0 || rows > INT32_MAX || n < 0) return cudaErrorInvalidValue;
  // n == 0 still runs: the reference's mean square of an empty row is 0 / 0 = NaN.
  if (rows == 0) return cudaSuccess;
  if (weight == nullptr) param_dtype = dtype;
  return row_norm::dispatch(dtype, param_dtype, [&](auto xt, auto wt) {
    return launch_forward<typename decltype(xt)::type, typename decltype(wt)::type>(x, weight, y, rstd, rows, n, eps,
                                                                                    lanes, stream);
  });
}

cudaError_t rms_norm_backward(const void* grad_y, const void* x, const void* rstd, const void* weight, void* grad_x,
                              void* dweight, void* workspace, int64_t rows, int64_t n, bool need_param_grads,
                              int lanes, int groups, DType dtype, DType param_dtype, cudaStream_t stream) {
  return row_norm::backward<false>(grad_y, x, nullptr, rstd, weight, grad_x, dweight, nullptr, workspace, rows, n,
                                   need_param_grads, lanes, groups, dtype, param_dtype, stream);
}

}  // namespace fusedtx::cuda
