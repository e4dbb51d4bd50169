// What the LayerNorm (layer_norm.cu) and RMSNorm (rms_norm.cu) kernels share: the dtype dispatch,
// and the whole backward — reference.layer_norm_backward / rms_norm_backward, bit for bit.
// kCentered selects LayerNorm's formulas (xhat = (x - mean) * rstd; dx = (g - (xhat * mean_gx +
// mean_g)) * rstd; a bias gradient) or RMSNorm's (xhat = x * rstd; dx = (g - xhat * mean_gx) *
// rstd). Arithmetic is float32 (float64 for float64 tensors), every operation rounded on its own.
//
// dx needs the row sums of g * xhat (and of g, centred), computed as in the forward: one block
// per row, one lane of reference.lane_sum per thread. dweight (and dbias) are sums over rows,
// which must not depend on the number of blocks that happen to run: as reference.row_group_sum
// (docs/design.md, "Row groups"), the rows are cut into `groups` (a constant,
// policy.ROW_GROUPS) consecutive groups; block g walks its group's rows in ascending order and
// adds each row's dy*xhat (and dy) into per-column partials (registers for the thread's own
// columns, or the block's private row of a global (groups, n) buffer when they do not fit); a
// second kernel adds the partials in ascending group order, one thread per column. No atomics:
// every sum has one fixed order. Without parameter gradients, dx is per row, so the backward
// then runs one block per row, like the forward.
#pragma once

#include <type_traits>

#include "common.cuh"
#include "launchers.h"

namespace fusedtx::cuda::row_norm {

// The backward keeps five values per element in registers (xhat, g, the weight and the
// dweight/dbias partials). In double, even 4 elements spill under the 64 registers a 1024-thread
// block allows (ptxas, sm_80), so float64 caches 2 and its longer rows take the re-reading
// path. Which path a row takes never changes its bits.
template <typename C>
constexpr int kBwdPerThread = sizeof(C) == sizeof(double) ? 2 : 8;
constexpr int kMaxLanes = 1024;         // threads per block at most (lanes)
constexpr int kFinalizeThreads = 256;   // threads per block of the partial-sum kernel

// float64 tensors compute in double; float32, float16 and bfloat16 ones in float.
template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline bool valid_lanes(int lanes) { return lanes >= 32 && lanes <= kMaxLanes && (lanes & (lanes - 1)) == 0; }

inline size_t compute_size(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

template <typename T>
struct Type {
  using type = T;
};

// Calls f(Type<T>{}, Type<W>{}) for x's storage type T and the parameters' type W: x's own
// dtype, or float32 (float32 master parameters under mixed precision).
template <typename F>
cudaError_t dispatch(DType dtype, DType param_dtype, F&& f) {
  const bool float_params = param_dtype == DType::kFloat32;
  if (!float_params && param_dtype != dtype) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return f(Type<float>{}, Type<float>{});
    case DType::kFloat16: return float_params ? f(Type<__half>{}, Type<float>{}) : f(Type<__half>{}, Type<__half>{});
    case DType::kBFloat16:
      return float_params ? f(Type<__nv_bfloat16>{}, Type<float>{}) : f(Type<__nv_bfloat16>{}, Type<__nv_bfloat16>{});
    case DType::kFloat64: return float_params ? f(Type<double>{}, Type<float>{}) : f(Type<double>{}, Type<double>{});
  }
  return cudaErrorInvalidValue;
}

// fn(j, x[j]) for this thread's elements j = t, t + lanes, ... of a row in ascending order: from
// the registers xr (kPerThread of them, the row cached) or loaded from x_row.
template <bool kCached, int kPerThread, typename C, typename T, typename F>
__device__ __forceinline__ void for_own_elements(const C* xr, const T* x_row, int64_t n, F&& fn) {
  const int t = threadIdx.x, lanes = blockDim.x;
  if constexpr (kCached) {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int j = t + k * lanes;  // < 8192: cached rows are short
      if (j < n) fn(j, xr[k]);
    }
  } else {
    for (int64_t j = t; j < n; j += lanes) fn(j, load_as<C>(x_row + j));
  }
}

template <typename C, bool kCentered>
__device__ __forceinline__ C xhat_of(C x, C mean, C rstd) {
  if constexpr (kCentered) {
    return mul_rn(sub_rn(x, mean), rstd);
  } else {
    return mul_rn(x, rstd);
  }
}

template <typename C, bool kCentered>
__device__ __forceinline__ C dx_of(C g, C xh, C mean_g, C mean_gx, C rstd) {
  if constexpr (kCentered) {
    return mul_rn(sub_rn(g, add_rn(mul_rn(xh, mean_gx), mean_g)), rstd);
  } else {
    return mul_rn(sub_rn(g, mul_rn(xh, mean_gx)), rstd);
  }
}

// The row sums' lane fold: (sum_g, sum_gx) centred, sum_gx alone otherwise (sum_g stays 0).
template <typename C, bool kCentered>
__device__ __forceinline__ void fold_row_sums(C& sum_g, C& sum_gx, C* scratch) {
  if constexpr (kCentered) {
    block_fold_lanes2(sum_g, sum_gx, scratch);
  } else {
    sum_gx = block_fold_lanes(sum_gx, scratch);
  }
}

// Block b handles rows [b * rows_per_block, min((b + 1) * rows_per_block, rows)) in ascending
// order. kParamGrads: also accumulate the block's dweight (and, centred, dbias) partials
// (starting at +0, rows in ascending order) and write them to row b of part_dw / part_db,
// (gridDim.x, n) buffers that only this block touches. mean and part_db are unused unless
// kCentered. Every thread runs the same rows, so all reach every barrier.
template <typename T, typename W, typename C, bool kCentered, bool kCached, bool kParamGrads>
__global__ void __launch_bounds__(kMaxLanes)
    backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ x, const C* __restrict__ mean,
                    const C* __restrict__ rstd, const W* __restrict__ weight, T* __restrict__ grad_x,
                    C* __restrict__ part_dw, C* __restrict__ part_db, int64_t rows, int64_t n,
                    int64_t rows_per_block) {
  C* scratch = shared_memory<C>();
  const int t = threadIdx.x, lanes = blockDim.x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t row_end = row_begin + rows_per_block < rows ? row_begin + rows_per_block : rows;
  const C n_c = static_cast<C>(n);
  // This block's rows of the partial buffers (null without parameter gradients).
  C* block_dw = kParamGrads ? part_dw + static_cast<int64_t>(blockIdx.x) * n : nullptr;
  C* block_db = kParamGrads && kCentered ? part_db + static_cast<int64_t>(blockIdx.x) * n : nullptr;
  const bool has_weight = weight != nullptr;

  if constexpr (kCached) {
    // This thread's columns j = t + k * lanes are the same in every row: their weights and their
    // dweight/dbias partials stay in registers across the group's rows.
    C w[kBwdPerThread<C>];
    C dw[kParamGrads ? kBwdPerThread<C> : 1], db[kParamGrads && kCentered ? kBwdPerThread<C> : 1];
#pragma unroll
    for (int k = 0; k < kBwdPerThread<C>; ++k) {
      const int j = t + k * lanes;  // < 8192: cached rows are short
      w[k] = has_weight && j < n ? load_as<C>(weight + j) : C(1);
      if constexpr (kParamGrads) dw[k] = C(0);
      if constexpr (kParamGrads && kCentered) db[k] = C(0);
    }
    for (int64_t row = row_begin; row < row_end; ++row) {
      const T* dy_row = grad_y + row * n;
      const T* x_row = x + row * n;
      T* dx_row = grad_x + row * n;
      const C mu = kCentered ? mean[row] : C(0), rs = rstd[row];
      C xh[kBwdPerThread<C>], g[kBwdPerThread<C>];
      C sum_g = 0, sum_gx = 0;
#pragma unroll
      for (int k = 0; k < kBwdPerThread<C>; ++k) {
        const int j = t + k * lanes;  // < 8192: cached rows are short
        xh[k] = g[k] = C(0);
        if (j < n) {
          const C dy = load_as<C>(dy_row + j);
          xh[k] = xhat_of<C, kCentered>(load_as<C>(x_row + j), mu, rs);
          g[k] = has_weight ? mul_rn(dy, w[k]) : dy;
          if constexpr (kCentered) sum_g = add_rn(sum_g, g[k]);
          sum_gx = add_rn(sum_gx, mul_rn(g[k], xh[k]));
          if constexpr (kParamGrads) dw[k] = add_rn(dw[k], mul_rn(dy, xh[k]));
          if constexpr (kParamGrads && kCentered) db[k] = add_rn(db[k], dy);
        }
      }
      fold_row_sums<C, kCentered>(sum_g, sum_gx, scratch);
      const C mean_g = div_rn(sum_g, n_c), mean_gx = div_rn(sum_gx, n_c);
#pragma unroll
      for (int k = 0; k < kBwdPerThread<C>; ++k) {
        const int j = t + k * lanes;  // < 8192: cached rows are short
        if (j < n) store_rn(dx_row + j, dx_of<C, kCentered>(g[k], xh[k], mean_g, mean_gx, rs));
      }
    }
    if constexpr (kParamGrads) {
      // Also for an empty group (rows_per_block * b >= rows): its partials are +0.
#pragma unroll
      for (int k = 0; k < kBwdPerThread<C>; ++k) {
        const int j = t + k * lanes;  // < 8192: cached rows are short
        if (j < n) {
          block_dw[j] = dw[k];
          if constexpr (kCentered) block_db[j] = db[k];
        }
      }
    }
  } else {
    // Columns do not fit in registers: the partials live in the block's own rows of the global
    // buffers, each element read and written only by the thread that owns its column, so
    // program order alone orders the read-modify-writes.
    if constexpr (kParamGrads) {
      for (int64_t j = t; j < n; j += lanes) {
        block_dw[j] = C(0);
        if constexpr (kCentered) block_db[j] = C(0);
      }
    }
    for (int64_t row = row_begin; row < row_end; ++row) {
      const T* dy_row = grad_y + row * n;
      const T* x_row = x + row * n;
      T* dx_row = grad_x + row * n;
      const C mu = kCentered ? mean[row] : C(0), rs = rstd[row];
      C sum_g = 0, sum_gx = 0;
      for (int64_t j = t; j < n; j += lanes) {
        const C dy = load_as<C>(dy_row + j);
        const C xh = xhat_of<C, kCentered>(load_as<C>(x_row + j), mu, rs);
        const C g = has_weight ? mul_rn(dy, load_as<C>(weight + j)) : dy;
        if constexpr (kCentered) sum_g = add_rn(sum_g, g);
        sum_gx = add_rn(sum_gx, mul_rn(g, xh));
        if constexpr (kParamGrads) block_dw[j] = add_rn(block_dw[j], mul_rn(dy, xh));
        if constexpr (kParamGrads && kCentered) block_db[j] = add_rn(block_db[j], dy);
      }
      fold_row_sums<C, kCentered>(sum_g, sum_gx, scratch);
      const C mean_g = div_rn(sum_g, n_c), mean_gx = div_rn(sum_gx, n_c);
      // Recomputing xhat and g from a second read gives the same bits as the first pass.
      for (int64_t j = t; j < n; j += lanes) {
        const C dy = load_as<C>(dy_row + j);
        const C xh = xhat_of<C, kCentered>(load_as<C>(x_row + j), mu, rs);
        const C g = has_weight ? mul_rn(dy, load_as<C>(weight + j)) : dy;
        store_rn(dx_row + j, dx_of<C, kCentered>(g, xh, mean_g, mean_gx, rs));
      }
    }
  }
}

// dweight[j] = sum over groups g = 0, 1, ... of part_dw[g][j], starting at +0 (dbias alike, when
// kCentered): row_group_sum's last step. One thread per column; adjacent threads read adjacent
// columns.
template <typename C, bool kCentered>
__global__ void __launch_bounds__(kFinalizeThreads)
    param_grads_kernel(const C* __restrict__ part_dw, const C* __restrict__ part_db, C* __restrict__ dweight,
                       C* __restrict__ dbias, int64_t n, int groups) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  C dw = 0, db = 0;
#pragma unroll 4
  for (int g = 0; g < groups; ++g) {
    dw = add_rn(dw, part_dw[g * n + j]);
    if constexpr (kCentered) db = add_rn(db, part_db[g * n + j]);
  }
  dweight[j] = dw;
  if constexpr (kCentered) dbias[j] = db;
}

template <typename T, typename W, bool kCentered>
cudaError_t launch_backward(const void* grad_y, const void* x, const void* mean, const void* rstd, const void* weight,
                            void* grad_x, void* dweight, void* dbias, void* workspace, int64_t rows, int64_t n,
                            bool need_param_grads, int lanes, int groups, cudaStream_t stream) {
  using C = compute_t<T>;
  const size_t smem = 2 * lanes * sizeof(C);  // block_fold_lanes2
  const bool cached = n <= static_cast<int64_t>(lanes) * kBwdPerThread<C>;
  C* part_dw = static_cast<C*>(workspace);
  C* part_db = need_param_grads && kCentered ? part_dw + static_cast<int64_t>(groups) * n : nullptr;
  const auto run = [&](auto kernel, int64_t blocks, int64_t rows_per_block) {
    kernel<<<static_cast<unsigned>(blocks), lanes, smem, stream>>>(
        static_cast<const T*>(grad_y), static_cast<const T*>(x), static_cast<const C*>(mean),
        static_cast<const C*>(rstd), static_cast<const W*>(weight), static_cast<T*>(grad_x), part_dw, part_db, rows, n,
        rows_per_block);
  };
  if (need_param_grads) {
    // reference.row_group_sum's groups: ceil(rows / groups) rows each, the last ones short or empty.
    const int64_t rows_per_group = (rows + groups - 1) / groups;
    if (cached) {
      run(backward_kernel<T, W, C, kCentered, true, true>, groups, rows_per_group);
    } else {
      run(backward_kernel<T, W, C, kCentered, false, true>, groups, rows_per_group);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const int64_t blocks = (n + kFinalizeThreads - 1) / kFinalizeThreads;
    param_grads_kernel<C, kCentered><<<static_cast<unsigned>(blocks), kFinalizeThreads, 0, stream>>>(
        part_dw, part_db, static_cast<C*>(dweight), static_cast<C*>(dbias), n, groups);
  } else if (cached) {
    // dx alone is per row: one block per row, as the forward, for parallelism.
    run(backward_kernel<T, W, C, kCentered, true, false>, rows, 1);
  } else {
    run(backward_kernel<T, W, C, kCentered, false, false>, rows, 1);
  }
  return cudaGetLastError();
}

// The host entry of either backward (launchers.h): dbias, mean and the dbias half of the
// workspace are used only when kCentered.
template <bool kCentered>
cudaError_t backward(const void* grad_y, const void* x, const void* mean, const void* rstd, const void* weight,
                     void* grad_x, void* dweight, void* dbias, void* workspace, int64_t rows, int64_t n,
                     bool need_param_grads, int lanes, int groups, DType dtype, DType param_dtype, cudaStream_t stream) {
  if (!valid_lanes(lanes) || groups < 1 || rows < 0 || n < 0) return cudaErrorInvalidValue;
  if (!need_param_grads && rows > INT32_MAX) return cudaErrorInvalidValue;  // one block per row
  if (n == 0) return cudaSuccess;  // no element to write anywhere (and empty tensors may have no pointer)
  if (need_param_grads && (dweight == nullptr || (kCentered && dbias == nullptr))) return cudaErrorInvalidValue;
  if (rows == 0) {
    // Sums over no rows: +0 (all-zero bits).
    if (!need_param_grads) return cudaSuccess;
    const size_t bytes = static_cast<size_t>(n) * compute_size(dtype);
    const cudaError_t err = cudaMemsetAsync(dweight, 0, bytes, stream);
    return err != cudaSuccess || !kCentered ? err : cudaMemsetAsync(dbias, 0, bytes, stream);
  }
  if (need_param_grads && (workspace == nullptr || (n + kFinalizeThreads - 1) / kFinalizeThreads > INT32_MAX)) {
    return cudaErrorInvalidValue;
  }
  if (weight == nullptr) param_dtype = dtype;
  return dispatch(dtype, param_dtype, [&](auto xt, auto wt) {
    return launch_backward<typename decltype(xt)::type, typename decltype(wt)::type, kCentered>(
        grad_y, x, mean, rstd, weight, grad_x, dweight, dbias, workspace, rows, n, need_param_grads, lanes, groups,
        stream);
  });
}

}  // namespace fusedtx::cuda::row_norm
