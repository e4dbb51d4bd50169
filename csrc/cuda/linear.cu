// Linear in CUDA: y = act(a @ b + bias) with the bias + GELU (or SwiGLU) epilogue fused, and the
// elementwise part of its backward: reference.linear_matmul / reference.linear_bias_act_backward,
// bit for bit.
//
// Forward: a classic shared-memory tiled SGEMM. Each block computes one kBM x kBN tile of the
// output, 256 threads each holding a kTM x kTN register tile. reference.linear_matmul's order,
// K-blocked (docs/design.md, "Matmul K blocks"):
// K is cut into blocks of kKBlock = reference.MATMUL_K_BLOCK = 128 from k = 0 (k = 0..127,
// 128..255, ...; the last block may be short). Within a block, each element's partial is one
// float32 accumulator `acc` from +0 taking __fmaf_rn(a[i, k], b[k, j], acc) for k ascending
// (k-tiles ascending, and ascending within a tile). At the end of every block (every
// kTilesPerKBlock = 16 k-tiles, or at the last k-tile) the partial is added into a per-element
// float32 `total` (from +0; total = __fadd_rn(total, acc), one rounding, blocks ascending) and acc
// restarts at +0. (+0 + p == p bitwise: an FMA chain from +0 never yields -0, so the first add is
// exact, as in the reference's zeros + partial.) So an element's bits depend on a[i, :] and
// b[:, j] alone, never on M, on the tile it falls in, or on the GPU. K past the end is
// zero-filled: fma(0, 0, acc) = acc, since acc is never -0. The tile configuration is one
// constant (no split-K, nothing keyed on M). bfloat16 / float16 operands are widened to float32
// on their way to shared memory (their products are exact in float32). The epilogue computes
// h = total + bias (one rounding), runs the activation operation for operation as the reference
// writes it (_rn intrinsics, no FMA contraction), and stores y and, when asked, the
// pre-activation h in the operands' dtype.
//
// Both acc and total live in registers (2 x 64 floats per thread): __launch_bounds__(256) lets a
// thread use up to 255 registers, so one 256-thread block runs per SM, without spills
// (tests/test_build.py checks ptxas). Totals in shared memory would need 64 KB per block on top of
// the 16.5 KB of tiles (past the 48 KB default); an 8x4 thread tile would cut the FMAs per
// shared-memory load from 4 to 2.7.
//
// a and b have any strides (the forward passes weight.t(), the backward weight and grad.t()):
// each thread loads its share of a k-tile along whichever of the tile's axes is contiguous in
// memory, which changes only the coalescing, never the arithmetic.
//
// Backward: grad_preact = grad_y * act'(preact) elementwise, and grad_bias = row_group_sum of it
// (as stored, widened to float32): one thread per (group, column) walks its group's rows in
// ascending order into a (groups, N) partial buffer, then one thread per column adds the
// partials in ascending group order from +0, as layer_norm.cu does for dweight / dbias. No atomics.
#include <type_traits>

#include "activations.cuh"
#include "common.cuh"

namespace fusedtx::cuda {
namespace {

// The one tile configuration. 16 x 16 threads; thread (ty, tx) owns rows ty*4 + {0..3} and
// 64 + ty*4 + {0..3} of the tile and columns tx*4 + {0..3} and 64 + tx*4 + {0..3}, so its
// fragments are two float4 reads per operand from shared memory, conflict-free.
constexpr int kBM = 128, kBN = 128, kBK = 8;
constexpr int kTM = 8, kTN = 8;
constexpr int kKBlock = static_cast<int>(kLinearKBlock);  // launchers.h
constexpr int kTilesPerKBlock = kKBlock / kBK;         // 16 k-tiles per K block
static_assert(kKBlock % kBK == 0, "a K block is a whole number of k-tiles");
constexpr int kThreads = (kBM / kTM) * (kBN / kTN);  // 256
constexpr int kLoads = kBM * kBK / kThreads;         // elements of A (and of B) each thread loads per k-tile
// Shared rows are k-major (As[k][m], Bs[k][n]); 4 floats of padding keep float4 alignment and make
// the k-fastest tile loads (a row-major A, b = weight.t()) hit 32 distinct banks.
constexpr int kSmemStride = kBM + 4;
constexpr int kTileFloats = kBK * kSmemStride;       // one operand's k-tile
constexpr size_t kMatmulSmem = 2 * 2 * kTileFloats * sizeof(float);  // double-buffered A and B
constexpr int kEltThreads = 256;                     // threads per block of the backward kernels
static_assert(kBM == kBN && kThreads == 256 && kLoads * kThreads == kBK * kBN, "tile shape");

// reference.swiglu_forward on one gate/up pair: (g s) u, s = sigmoid_of_neg(-g).
__device__ __forceinline__ float swiglu_forward(float g, float u) {
  float e;
  const float s = sigmoid_of_neg(-g, e);
  return __fmul_rn(__fmul_rn(g, s), u);
}

// reference.swiglu_grad_preact on one pair: dg = (dy u)(s + (g s)(e s)), du = dy (g s).
__device__ __forceinline__ void swiglu_grads(float dy, float g, float u, float& dg, float& du) {
  float e;
  const float s = sigmoid_of_neg(-g, e);
  const float gs = __fmul_rn(g, s);
  dg = __fmul_rn(__fmul_rn(dy, u), __fadd_rn(s, __fmul_rn(gs, __fmul_rn(e, s))));
  du = __fmul_rn(dy, gs);
}

// v rounded to T and widened back: the value a T tensor holding v reads as.
template <typename T>
__device__ __forceinline__ float as_stored(float v) {
  T t;
  store_f32(&t, v);
  return load_f32(&t);
}

// Which tile element (row/col `major`, k `minor`) load i of this thread fetches: major + i * d_major,
// minor + i * d_minor. Consecutive threads take consecutive elements along the tile's axis that is
// contiguous in memory (k for a row-major A, m for a column-major one; likewise n or k for B).
struct LoadPlan {
  int major, minor, d_major, d_minor;
};
__device__ __forceinline__ LoadPlan load_plan(bool major_fast, int tid) {
  if (major_fast) return {tid % kBM, tid / kBM, 0, kThreads / kBM};
  return {tid / kBK, tid % kBK, kThreads / kBK, 0};
}

// One output tile per block (blockIdx.x = tile_m * tiles_n + tile_n). a (m, k) with strides
// (sam, sak), b (k, n) with strides (sbk, sbn); y and preact (nullable) contiguous (m, n); bias
// (n,) contiguous or nullptr. a_m_fast / b_k_fast: load the A tile along m / the B tile along k.
template <typename T, int kAct>
__global__ void __launch_bounds__(kThreads)
    matmul_kernel(const T* __restrict__ a, int64_t sam, int64_t sak, const T* __restrict__ b, int64_t sbk,
                  int64_t sbn, const T* __restrict__ bias, T* __restrict__ y, T* __restrict__ preact, int64_t m,
                  int64_t n, int64_t k, int64_t tiles_n, bool a_m_fast, bool b_k_fast) {
  float* smem = shared_memory();  // [buffer][A tile, B tile], each kBK rows of kSmemStride
  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) / tiles_n * kBM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) % tiles_n * kBN;

  // This thread's loads: A element (row0 + am + i*adm, k0 + ak + i*adk), B element
  // (k0 + bk + i*bdk, col0 + bn + i*bdn), i < kLoads. 64-bit offsets throughout.
  const LoadPlan pa = load_plan(a_m_fast, tid);
  const LoadPlan pb = load_plan(!b_k_fast, tid);
  const int64_t a_row = row0 + pa.major;
  const int64_t b_col = col0 + pb.major;
  const int64_t a_step = pa.d_major * sam + pa.d_minor * sak;
  const int64_t b_step = pb.d_major * sbn + pb.d_minor * sbk;
  int64_t a_off = a_row * sam + pa.minor * sak;  // advances kBK * sak per k-tile
  int64_t b_off = b_col * sbn + pb.minor * sbk;  // advances kBK * sbk per k-tile
  float ra[kLoads], rb[kLoads];

  // Global -> registers for the k-tile starting at k0; zero outside the matrices.
  const auto load_tile = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const bool a_in = a_row + i * pa.d_major < m && k0 + pa.minor + i * pa.d_minor < k;
      const bool b_in = b_col + i * pb.d_major < n && k0 + pb.minor + i * pb.d_minor < k;
      ra[i] = a_in ? load_f32(a + a_off + i * a_step) : 0.0f;
      rb[i] = b_in ? load_f32(b + b_off + i * b_step) : 0.0f;
    }
    a_off += kBK * sak;
    b_off += kBK * sbk;
  };
  // Registers -> shared buffer `buf` (k-major).
  const auto store_tile = [&](int buf) {
    float* as = smem + buf * 2 * kTileFloats;
    float* bs = as + kTileFloats;
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      as[(pa.minor + i * pa.d_minor) * kSmemStride + pa.major + i * pa.d_major] = ra[i];
      bs[(pb.minor + i * pb.d_minor) * kSmemStride + pb.major + i * pb.d_major] = rb[i];
    }
  };

  const int ty = tid / (kBN / kTN), tx = tid % (kBN / kTN);
  float acc[kTM][kTN];    // the current K block's partials, from +0
  float total[kTM][kTN];  // the finished blocks' sum, from +0
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
#pragma unroll
    for (int j = 0; j < kTN; ++j) acc[i][j] = total[i][j] = 0.0f;
  }

  // Double-buffered k loop, one barrier per k-tile: tile t+1 is fetched into registers while tile
  // t is multiplied, then stored into the other buffer (whose last readers finished before the
  // previous barrier). The outer loop walks the K blocks (kTilesPerKBlock k-tiles each, the last
  // one possibly short); the pipeline runs straight across block boundaries, since the fold at a
  // boundary touches registers only.
  const int64_t k_tiles = (k + kBK - 1) / kBK;
  if (k_tiles > 0) {
    load_tile(0);
    store_tile(0);
    __syncthreads();
  }
  for (int64_t t0 = 0; t0 < k_tiles; t0 += kTilesPerKBlock) {  // K blocks ascending
    const int64_t t_end = t0 + kTilesPerKBlock < k_tiles ? t0 + kTilesPerKBlock : k_tiles;
    for (int64_t t = t0; t < t_end; ++t) {
      const int buf = static_cast<int>(t & 1);
      const bool has_next = t + 1 < k_tiles;
      if (has_next) load_tile((t + 1) * kBK);
      const float* as = smem + buf * 2 * kTileFloats;
      const float* bs = as + kTileFloats;
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {  // k ascending
        const float4 a0 = *reinterpret_cast<const float4*>(as + kk * kSmemStride + ty * 4);
        const float4 a1 = *reinterpret_cast<const float4*>(as + kk * kSmemStride + kBM / 2 + ty * 4);
        const float4 b0 = *reinterpret_cast<const float4*>(bs + kk * kSmemStride + tx * 4);
        const float4 b1 = *reinterpret_cast<const float4*>(bs + kk * kSmemStride + kBN / 2 + tx * 4);
        const float av[kTM] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float bv[kTN] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
#pragma unroll
          for (int j = 0; j < kTN; ++j) acc[i][j] = __fmaf_rn(av[i], bv[j], acc[i][j]);
        }
      }
      if (has_next) store_tile(buf ^ 1);
      __syncthreads();
    }
    // End of a K block: total += partial (one rounding), and the next block's chain restarts at +0.
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        total[i][j] = __fadd_rn(total[i][j], acc[i][j]);
        acc[i][j] = 0.0f;
      }
    }
  }

  // Epilogue: h = total + bias (one rounding), y = act(h), both rounded to T on the store.
  float bias_v[kTN];
#pragma unroll
  for (int j = 0; j < kTN; ++j) {
    const int64_t c = col0 + (j < 4 ? tx * 4 + j : kBN / 2 + tx * 4 + (j - 4));
    bias_v[j] = bias != nullptr && c < n ? load_f32(bias + c) : 0.0f;
  }
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int64_t r = row0 + (i < 4 ? ty * 4 + i : kBM / 2 + ty * 4 + (i - 4));
    if (r >= m) continue;
    if constexpr (kAct == kActSwiglu) {
      // SwiGLU: the thread's columns come in gate/up pairs (j, j + 1), j even (n is even, so a
      // pair is inside the matrix or outside it whole); y[r, c / 2] of an (m, n / 2) y.
#pragma unroll
      for (int j = 0; j < kTN; j += 2) {
        const int64_t c = col0 + (j < 4 ? tx * 4 + j : kBN / 2 + tx * 4 + (j - 4));
        if (c >= n) continue;
        const float g = bias != nullptr ? __fadd_rn(total[i][j], bias_v[j]) : total[i][j];
        const float u = bias != nullptr ? __fadd_rn(total[i][j + 1], bias_v[j + 1]) : total[i][j + 1];
        store_f32(y + r * (n / 2) + c / 2, swiglu_forward(g, u));
        if (preact != nullptr) {
          store_f32(preact + r * n + c, g);
          store_f32(preact + r * n + c + 1, u);
        }
      }
      continue;
    }
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t c = col0 + (j < 4 ? tx * 4 + j : kBN / 2 + tx * 4 + (j - 4));
      if (c >= n) continue;
      const float h = bias != nullptr ? __fadd_rn(total[i][j], bias_v[j]) : total[i][j];
      store_f32(y + r * n + c, activation_forward<kAct>(h));
      if (kAct != 0 && preact != nullptr) store_f32(preact + r * n + c, h);
    }
  }
}

// Thread idx = g * n + j handles column j of rows [g * rows_per_group, (g + 1) * rows_per_group)
// in ascending order, g < n_groups. With an activation it writes grad_preact = grad_y * act'(preact)
// (float32 product, rounded to T); kPartials: it also sums the rows' grad_preact as stored (or
// grad_y without an activation) from +0 into partials[g * n + j] (+0 for an empty group).
// SwiGLU: n is preact's width (gate/up pairs); the thread reads its column's pair and grad_y's
// column j / 2 (n / 2 a row) and writes the pair gradient of its own parity.
template <typename T, int kAct, bool kPartials>
__global__ void __launch_bounds__(kEltThreads)
    bias_act_bwd_kernel(const T* __restrict__ grad_y, const T* __restrict__ preact, T* __restrict__ grad_preact,
                        float* __restrict__ partials, int64_t rows, int64_t n, int64_t rows_per_group,
                        int64_t n_groups) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_groups * n) return;
  const int64_t g = idx / n, j = idx % n;
  const int64_t row_begin = g * rows_per_group;
  const int64_t row_end = row_begin + rows_per_group < rows ? row_begin + rows_per_group : rows;
  float sum = 0.0f;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t off = r * n + j;
    float v;
    if constexpr (kAct == kActSwiglu) {
      const int64_t pair = r * n + (j & ~int64_t{1});
      float dg, du;
      swiglu_grads(load_f32(grad_y + r * (n / 2) + j / 2), load_f32(preact + pair), load_f32(preact + pair + 1), dg,
                   du);
      store_f32(grad_preact + off, (j & 1) ? du : dg);
      v = as_stored<T>((j & 1) ? du : dg);
    } else if constexpr (kAct != 0) {
      const float d = __fmul_rn(load_f32(grad_y + off), activation_derivative<kAct>(load_f32(preact + off)));
      store_f32(grad_preact + off, d);
      v = as_stored<T>(d);
    } else {
      v = load_f32(grad_y + off);
    }
    if constexpr (kPartials) sum = __fadd_rn(sum, v);
  }
  if constexpr (kPartials) partials[g * n + j] = sum;
}

// grad_bias[j] = sum over groups g = 0, 1, ... of partials[g][j], starting at +0: row_group_sum's
// last step. One thread per column; adjacent threads read adjacent columns.
__global__ void __launch_bounds__(kEltThreads)
    bias_grad_sum_kernel(const float* __restrict__ partials, float* __restrict__ grad_bias, int64_t n, int groups) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  float s = 0.0f;
#pragma unroll 4
  for (int g = 0; g < groups; ++g) s = __fadd_rn(s, partials[g * n + j]);
  grad_bias[j] = s;
}

template <typename T>
struct Type {
  using type = T;
};
template <int A>
using Act = std::integral_constant<int, A>;

// Calls f(Type<T>{}, Act<activation>{}) for the storage type T of `dtype`.
template <typename F>
cudaError_t dispatch(DType dtype, int activation, F&& f) {
  const auto with_act = [&](auto t) -> cudaError_t {
    switch (activation) {
      case 0: return f(t, Act<0>{});
      case 1: return f(t, Act<1>{});
      case 2: return f(t, Act<2>{});
      case 3: return f(t, Act<3>{});
    }
    return cudaErrorInvalidValue;
  };
  switch (dtype) {
    case DType::kFloat32: return with_act(Type<float>{});
    case DType::kFloat16: return with_act(Type<__half>{});
    case DType::kBFloat16: return with_act(Type<__nv_bfloat16>{});
    case DType::kFloat64: break;  // float64 runs the reference (torch's float64 matmul)
  }
  return cudaErrorInvalidValue;
}

template <typename T, int kAct>
cudaError_t launch_matmul(const void* a, int64_t sam, int64_t sak, const void* b, int64_t sbk, int64_t sbn,
                          const void* bias, void* y, void* preact, int64_t m, int64_t n, int64_t k, int64_t tiles,
                          int64_t tiles_n, cudaStream_t stream) {
  // Load along the contiguous axis of each tile (bits do not depend on it).
  const bool a_m_fast = sam == 1 && sak != 1;
  const bool b_k_fast = sbk == 1 && sbn != 1;
  matmul_kernel<T, kAct><<<static_cast<unsigned>(tiles), kThreads, kMatmulSmem, stream>>>(
      static_cast<const T*>(a), sam, sak, static_cast<const T*>(b), sbk, sbn, static_cast<const T*>(bias),
      static_cast<T*>(y), static_cast<T*>(preact), m, n, k, tiles_n, a_m_fast, b_k_fast);
  return cudaGetLastError();
}

template <typename T, int kAct>
cudaError_t launch_bias_act_backward(const void* grad_y, const void* preact, void* grad_preact, void* grad_bias,
                                     void* workspace, int64_t rows, int64_t n, bool need_bias_grad, int groups,
                                     cudaStream_t stream) {
  const auto blocks_for = [](int64_t threads) { return (threads + kEltThreads - 1) / kEltThreads; };
  const auto run = [&](auto kernel, int64_t rows_per_group, int64_t n_groups) {
    kernel<<<static_cast<unsigned>(blocks_for(n_groups * n)), kEltThreads, 0, stream>>>(
        static_cast<const T*>(grad_y), static_cast<const T*>(preact), static_cast<T*>(grad_preact),
        static_cast<float*>(workspace), rows, n, rows_per_group, n_groups);
  };
  if (!need_bias_grad) {
    if constexpr (kAct != 0) {
      // Elementwise only: any row split gives the same bits; chunks of rows keep the grid in range.
      const int64_t rows_per_chunk = (rows * n + (int64_t{1} << 30) - 1) >> 30;  // >= 1
      const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
      if (blocks_for(chunks * n) > INT32_MAX) return cudaErrorInvalidValue;
      run(bias_act_bwd_kernel<T, kAct, false>, rows_per_chunk, chunks);
    }
    return cudaGetLastError();  // without an activation grad_preact is grad_y: nothing to do
  }
  // reference.row_group_sum's groups: ceil(rows / groups) rows each, the last ones short or empty.
  if (blocks_for(static_cast<int64_t>(groups) * n) > INT32_MAX) return cudaErrorInvalidValue;
  run(bias_act_bwd_kernel<T, kAct, true>, (rows + groups - 1) / groups, groups);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  bias_grad_sum_kernel<<<static_cast<unsigned>(blocks_for(n)), kEltThreads, 0, stream>>>(
      static_cast<const float*>(workspace), static_cast<float*>(grad_bias), n, groups);
  return cudaGetLastError();
}

}  // namespace

cudaError_t linear_matmul(const void* a, int64_t a_stride_m, int64_t a_stride_k, const void* b, int64_t b_stride_k,
                          int64_t b_stride_n, const void* bias, void* y, void* preact, int64_t m, int64_t n, int64_t k,
                          int activation, DType dtype, cudaStream_t stream) {
  if (m < 0 || n < 0 || k < 0 || activation < 0 || activation > 3) return cudaErrorInvalidValue;
  if (activation == 3 && n % 2 != 0) return cudaErrorInvalidValue;  // SwiGLU: gate/up column pairs
  if (m == 0 || n == 0) return cudaSuccess;  // no element to write
  const int64_t tiles_m = (m + kBM - 1) / kBM, tiles_n = (n + kBN - 1) / kBN;
  if (tiles_m > INT32_MAX / tiles_n) return cudaErrorInvalidValue;  // one block per tile, 1-D grid
  if (activation == 0) preact = nullptr;
  return dispatch(dtype, activation, [&](auto t, auto act) {
    return launch_matmul<typename decltype(t)::type, decltype(act)::value>(
        a, a_stride_m, a_stride_k, b, b_stride_k, b_stride_n, bias, y, preact, m, n, k, tiles_m * tiles_n, tiles_n,
        stream);
  });
}

cudaError_t linear_bias_act_backward(const void* grad_y, const void* preact, void* grad_preact, void* grad_bias,
                                     void* workspace, int64_t rows, int64_t n, int activation, bool need_bias_grad,
                                     int groups, DType dtype, cudaStream_t stream) {
  if (rows < 0 || n < 0 || groups < 1 || activation < 0 || activation > 3) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;  // no element to write anywhere
  if (need_bias_grad && grad_bias == nullptr) return cudaErrorInvalidValue;
  if (rows == 0) {
    // A sum over no rows: +0 (all-zero bits).
    return need_bias_grad ? cudaMemsetAsync(grad_bias, 0, static_cast<size_t>(n) * sizeof(float), stream)
                          : cudaSuccess;
  }
  if (activation == 0 && !need_bias_grad) return cudaSuccess;  // grad_preact is grad_y itself
  if (activation != 0 && (preact == nullptr || grad_preact == nullptr)) return cudaErrorInvalidValue;
  if (need_bias_grad && workspace == nullptr) return cudaErrorInvalidValue;
  return dispatch(dtype, activation, [&](auto t, auto act) {
    return launch_bias_act_backward<typename decltype(t)::type, decltype(act)::value>(
        grad_y, preact, grad_preact, grad_bias, workspace, rows, n, need_bias_grad, groups, stream);
  });
}

}  // namespace fusedtx::cuda
