// Fused LayerNorm in CUDA, forward and backward: reference.layer_norm_forward / _backward, bit
// for bit. Arithmetic is float32 (float64 for float64 tensors), every operation rounded on its
// own (no FMA contraction).
//
// Forward: one thread block per row, one lane of reference.lane_sum per thread: thread t handles
// elements t, t + lanes, t + 2*lanes, ... in ascending order, then the block folds the lanes in
// halves. Corrected two-pass statistics (a first mean; then the sum of the deviations from it,
// which corrects it, and the compensated sum of their squares), then y. The lane count comes
// from the row length only (fusedtx/ops: the threads-per-row rule), so a row's bits never depend
// on the batch. When a row fits in kPerThread<C> elements per thread it is kept in registers (one
// read of x); otherwise each pass re-reads x, mostly from L2.
//
// Backward: row_norm.cuh's, shared with RMSNorm (the row sums of g and g*xhat per row, dweight
// and dbias through fixed row groups, no atomics).
#include "row_norm.cuh"

namespace fusedtx::cuda {
namespace {

// Row elements per thread kept in registers by the forward. The compensated variance sum keeps
// three accumulators live beside the cached row: in double, 8 elements spill under the 64
// registers a 1024-thread block allows (ptxas, sm_90), so float64 caches 4.
template <typename C>
constexpr int kPerThread = sizeof(C) == sizeof(double) ? 4 : 8;
using row_norm::compute_t;
using row_norm::kMaxLanes;

// __launch_bounds__(kMaxLanes): any lanes up to 1024 must launch, which caps registers at 64 a
// thread (ptxas -v must report no spills).
template <typename T, typename W, typename C, bool kCached>
__global__ void __launch_bounds__(kMaxLanes)
    layer_norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ weight, const W* __restrict__ bias,
                          T* __restrict__ y, C* __restrict__ mean, C* __restrict__ rstd, int64_t n, C eps) {
  C* scratch = shared_memory<C>();
  const int64_t row = blockIdx.x;
  const int t = threadIdx.x, lanes = blockDim.x;
  const T* x_row = x + row * n;
  T* y_row = y + row * n;
  const C n_c = static_cast<C>(n);  // as PyTorch converts the int n of `lane_sum(x) / n`

  // Pass 1: the first mean. Columns past the end are skipped (or add +0): lane_sum's zero
  // padding, a no-op on accumulators that start at +0 and so are never -0.
  C xr[kCached ? kPerThread<C> : 1];
  C acc = 0;
  if constexpr (kCached) {
#pragma unroll
    for (int k = 0; k < kPerThread<C>; ++k) {
      const int j = t + k * lanes;  // < 8192: cached rows are short
      xr[k] = j < n ? load_as<C>(x_row + j) : C(0);
      acc = add_rn(acc, xr[k]);
    }
  } else {
    for (int64_t j = t; j < n; j += lanes) acc = add_rn(acc, load_as<C>(x_row + j));
  }
  const C mu0 = div_rn(block_fold_lanes(acc, scratch), n_c);

  // Pass 2: the deviations d0 = x - mu0, summed (the mean's correction) and squared into a
  // compensated sum (the variance), reference.layer_norm_forward's corrected two-pass formula.
  acc = 0;
  C sq = 0, sq_err = 0;
  const auto deviation = [&](C xj) {
    const C d = sub_rn(xj, mu0);
    acc = add_rn(acc, d);
    C r;
    sq = two_sum(sq, mul_rn(d, d), r);
    sq_err = add_rn(sq_err, r);
  };
  row_norm::for_own_elements<kCached, kPerThread<C>>(xr, x_row, n, [&](int64_t, C xj) { deviation(xj); });
  const C c = div_rn(block_fold_lanes(acc, scratch), n_c);
  C var = sub_rn(div_rn(block_fold_lanes_compensated(sq, sq_err, scratch), n_c), mul_rn(c, c));
  if (var < C(0)) var = C(0);  // rounding only; NaN stays NaN
  const C rs = div_rn(C(1), sqrt_rn(add_rn(var, eps)));
  if (t == 0) {
    mean[row] = add_rn(mu0, c);
    rstd[row] = rs;
  }

  // Pass 3: y = (((x - mu0) - c) * rstd) * w + b, in that order.
  const auto normalize = [&](int64_t j, C xj) {
    C v = mul_rn(sub_rn(sub_rn(xj, mu0), c), rs);
    if (weight != nullptr) v = mul_rn(v, load_as<C>(weight + j));
    if (bias != nullptr) v = add_rn(v, load_as<C>(bias + j));
    store_rn(y_row + j, v);
  };
  row_norm::for_own_elements<kCached, kPerThread<C>>(xr, x_row, n, normalize);
}

template <typename T, typename W>
cudaError_t launch_forward(const void* x, const void* weight, const void* bias, void* y, void* mean, void* rstd,
                           int64_t rows, int64_t n, double eps, int lanes, cudaStream_t stream) {
  using C = compute_t<T>;
  const size_t smem = 2 * lanes * sizeof(C);  // block_fold_lanes_compensated
  const C eps_c = static_cast<C>(eps);  // as torch.tensor(eps, dtype=compute dtype) rounds it
  const auto args = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(rows), lanes, smem, stream>>>(
        static_cast<const T*>(x), static_cast<const W*>(weight), static_cast<const W*>(bias), static_cast<T*>(y),
        static_cast<C*>(mean), static_cast<C*>(rstd), n, eps_c);
  };
  if (n <= static_cast<int64_t>(lanes) * kPerThread<C>) {
    args(layer_norm_fwd_kernel<T, W, C, true>);
  } else {
    args(layer_norm_fwd_kernel<T, W, C, false>);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t layer_norm_forward(const void* x, const void* weight, const void* bias, void* y, void* mean, void* rstd,
                               int64_t rows, int64_t n, double eps, int lanes, DType dtype, DType param_dtype,
                               cudaStream_t stream) {
  if (!row_norm::valid_lanes(lanes) || rows < 0 || rows > INT32_MAX || n < 0) return cudaErrorInvalidValue;
  // n == 0 still runs: the reference's statistics of an empty row are 0 / 0 = NaN.
  if (rows == 0) return cudaSuccess;
  if (weight == nullptr && bias == nullptr) param_dtype = dtype;
  return row_norm::dispatch(dtype, param_dtype, [&](auto xt, auto wt) {
    return launch_forward<typename decltype(xt)::type, typename decltype(wt)::type>(x, weight, bias, y, mean, rstd,
                                                                                    rows, n, eps, lanes, stream);
  });
}

cudaError_t layer_norm_backward(const void* grad_y, const void* x, const void* mean, const void* rstd,
                                const void* weight, void* grad_x, void* dweight, void* dbias, void* workspace,
                                int64_t rows, int64_t n, bool need_param_grads, int lanes, int groups, DType dtype,
                                DType param_dtype, cudaStream_t stream) {
  return row_norm::backward<true>(grad_y, x, mean, rstd, weight, grad_x, dweight, dbias, workspace, rows, n,
                                  need_param_grads, lanes, groups, dtype, param_dtype, stream);
}

}  // namespace fusedtx::cuda
