// The Linear op on CPU: y = act(a @ b + bias) with the bias + activation epilogue fused
// (linear_matmul), and the elementwise part of its backward (linear_bias_act_backward).
//
// linear_matmul is reference.linear_matmul bit for bit: per output element, one float32 FMA
// chain from +0 over each block of kKBlock = 128 k's in ascending order, the block sums added in
// order from +0 (docs/design.md, "Matmul K blocks"); then h = sum + bias[j]; then the activation
// (activations.h; SwiGLU's writes one output per gate/up column pair, at half the offset),
// operation for operation as in the reference (the extension is compiled with
// -ffp-contract=off, so only the explicit FMA instructions fuse). BLIS-style: for each packed K
// block of kKCMax k's (whole 128-k chains), a task packs its kKCMax x kNCMax block of b once and
// sweeps it with the micro-kernels of linear_gemm.h, a kMCMax-row block of packed a at a time; a
// task wider than kNCMax columns takes them in sub-blocks that share one packed a.
// Between K blocks an element's float32 total is stored and reloaded (exact), so the blocking
// never changes its arithmetic; after the last K block the epilogue runs on the tile while it is
// in L1. Threads share out (row range, column block) tasks and never split K. With at most
// kSmallMMax rows (decode) b is not packed but streamed once (linear_gemm_small_m.h). Whichever
// path or tile runs, an element's bits depend on a[i, :] and b[:, j] alone -- not on M, the
// tiling or the thread count (docs/design.md, "The contract", point 4).
//
// linear_bias_act_backward is reference.linear_bias_act_backward bit for bit: grad_preact =
// grad_y * act'(preact) (one float32 product, rounded to grad_y's dtype; SwiGLU's pair gradients,
// reference.swiglu_grad_preact) and grad_bias =
// row_group_sum(grad_preact as stored) in float32 (docs/design.md, "Row groups"). Rows are
// streamed whole; each of the fixed row groups adds its rows into its own float32 partial row,
// and the partials are then summed per column in group order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <memory>
#include <utility>
#include <vector>

#include "activations.h"
#include "common.h"
#include "linear_gemm.h"
#include "linear_gemm_small_m.h"

namespace fusedtx::cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// linear_matmul: the task plan and K-block loop around the kernels of linear_gemm*.h.
// ---------------------------------------------------------------------------------------------
// Grows, never shrinks: one per thread and purpose, so a decode step allocates nothing.
struct Workspace {
  float* ptr = nullptr;
  size_t cap = 0;
  float* get(size_t n) {
    if (n > cap) {
      std::free(ptr);
      cap = std::max<size_t>(n, 2 * cap);
      ptr = static_cast<float*>(std::aligned_alloc(64, (cap * sizeof(float) + 63) / 64 * 64));
      TORCH_CHECK(ptr != nullptr, "linear_matmul: out of memory for a packing buffer of ", cap, " floats");
    }
    return ptr;
  }
  ~Workspace() { std::free(ptr); }
};

using MicroKernel = void (*)(int64_t, const float*, const float*, int64_t, const float*, int64_t, float*, int64_t);
template <int NP, int... Is>
constexpr std::array<MicroKernel, sizeof...(Is)> micro_kernels(std::integer_sequence<int, Is...>) {
  return {&micro_kernel<Is + 1, NP == 0 ? panels_for_rows(Is + 1) : NP>...};
}
// [rows - 1]: the kernel for a row panel of that many rows, over panels_for_rows(rows) column
// panels, and over one.
constexpr auto kWideKernels = micro_kernels<0>(std::make_integer_sequence<int, kMR>{});
constexpr auto kOneKernels = micro_kernels<1>(std::make_integer_sequence<int, kMR>{});

// Per-thread buffers: packed a block, packed b block, float32 partials between K blocks.
thread_local Workspace tl_pack_a, tl_pack_b, tl_partial;

// A task whose columns take several sub-blocks packs its a (all its rows, all K) once and keeps
// it across them; plan_tasks gives such tasks at most this many floats of a (per thread).
constexpr int64_t kKeepPackedAMax = int64_t{1} << 21;  // 8 MB

// Up to this many k's a row-major b is not packed either (the few-k path of gemm).
constexpr int64_t kFewKMax = 32;

// One task: rows [i_begin, i_end) x columns [j_begin, j_end), all of K, in column sub-blocks of
// at most kNCMax. Per sub-block and K block, the b block is packed once and serves every
// kMCMax-row block of a. a is packed once: with several sub-blocks, into a buffer of rows_pad x K
// floats (K block kb's row block at i0 starts at rows_pad * k0 + (i0 - i_begin) * kc).
template <typename T, int kAct>
void gemm_task(const Problem<T>& p, int64_t i_begin, int64_t i_end, int64_t j_begin, int64_t j_end,
               int64_t kc_max) {
  const int64_t rows_pad = round_up(i_end - i_begin, kMR);
  const int64_t sub_blocks = ceil_div(j_end - j_begin, kNCMax);
  const int64_t sub = round_up(ceil_div(j_end - j_begin, sub_blocks), kNR);
  const int64_t k_blocks = std::max<int64_t>(1, ceil_div(p.K, kc_max));
  const int64_t mc_max = std::min(round_up(kMCMax, kMR), rows_pad);
  const bool keep_a = sub_blocks > 1;
  TORCH_CHECK(!keep_a || rows_pad * p.K <= kKeepPackedAMax, "linear_matmul: internal error, a task of ", rows_pad,
              " rows x K = ", p.K, " in ", sub_blocks, " column sub-blocks");
  float* a_all = tl_pack_a.get(keep_a ? rows_pad * p.K : mc_max * kc_max);
  float* bp = tl_pack_b.get(round_up(sub, kNR) * kc_max);
  // The float32 partials of all the task's rows between K blocks, for one sub-block.
  float* part = k_blocks > 1 ? tl_partial.get(rows_pad * round_up(sub, kNR)) : nullptr;
  alignas(64) float tile[kMR * kTileLd];
  for (int64_t j0 = j_begin; j0 < j_end; j0 += sub) {
    const int64_t nc = std::min(sub, j_end - j0), nc_pad = round_up(nc, kNR);
    const bool pack_a_now = !keep_a || j0 == j_begin;
    for (int64_t kb = 0; kb < k_blocks; ++kb) {
      const int64_t k0 = kb * kc_max;
      const int64_t kc = std::min(kc_max, p.K - k0);
      const bool first = kb == 0, last = kb == k_blocks - 1;
      const int64_t b_stride = kc * kNR;
      pack_b(p, k0, kc, j0, nc, bp);
      for (int64_t i0 = i_begin; i0 < i_end; i0 += mc_max) {
        const int64_t mc = std::min(mc_max, i_end - i0);
        float* ap = keep_a ? a_all + rows_pad * k0 + (i0 - i_begin) * kc : a_all;
        if (pack_a_now) pack_a(p, i0, mc, k0, kc, ap);
        // One micro-tile: the row panel at ir (rows rows) against np column panels from jr.
        auto tile_at = [&](int64_t ir, int rows, int64_t jr, int np, MicroKernel kernel) {
          const float* a_panel = ap + (ir / kMR) * kc * kMR;
          const float* b_panel = bp + (jr / kNR) * b_stride;
          float* c = part ? part + (i0 - i_begin + ir) * nc_pad + jr : nullptr;
          if (!last) {
            kernel(kc, a_panel, b_panel, b_stride, first ? nullptr : c, nc_pad, c, nc_pad);
          } else {
            kernel(kc, a_panel, b_panel, b_stride, first ? nullptr : c, nc_pad, tile, kTileLd);
            const int64_t off = (i0 + ir) * p.N + j0 + jr;
            epilogue<T, kAct>(tile, rows, std::min<int64_t>(np * kNR, nc - jr), p.bias ? p.bias + j0 + jr : nullptr,
                              p.y + out_offset<kAct>(off), p.preact ? p.preact + off : nullptr, p.N);
          }
        };
        int64_t full_rows = 0;  // the whole kMR-row panels, taken column panel by column panel
        if constexpr (kColumnPanelOuter) {
          full_rows = mc / kMR * kMR;
          static_assert(panels_for_rows(kMR) == 1);
          for (int64_t jr = 0; jr < nc; jr += kNR) {
            for (int64_t ir = 0; ir < full_rows; ir += kMR) tile_at(ir, kMR, jr, 1, kOneKernels[kMR - 1]);
          }
        }
        for (int64_t ir = full_rows; ir < mc; ir += kMR) {
          const int rows = static_cast<int>(std::min<int64_t>(kMR, mc - ir));
          const int wide = panels_for_rows(rows);
          for (int64_t jr = 0; jr < nc;) {
            const int np = ceil_div(nc - jr, kNR) >= wide ? wide : 1;
            tile_at(ir, rows, jr, np, np == wide ? kWideKernels[rows - 1] : kOneKernels[rows - 1]);
            jr += np * kNR;
          }
        }
      }
    }
  }
}

// How the output is cut into tasks: row_groups x col_blocks, task = cb * row_groups + rg, which
// at::parallel_for deals out to the threads in contiguous ranges. Chosen by a cost model: a
// task's FMAs plus kPackCost per element it packs (its a rows and b columns once each), the
// plan's cost that of its busiest thread. Wide column blocks pack a fewer times, more row groups
// pack b more times. A task wider than kNCMax keeps its packed a, so its rows x K must fit
// kKeepPackedAMax; column blocks of at most kNCMax always qualify. Any cut gives the same bits.
struct TaskPlan {
  int64_t rows, cols, row_groups, col_blocks;
};

constexpr double kPackCost = 24.0;  // FMAs' time per packed element (measured: AVX2, L3-resident)

TaskPlan task_shape(int64_t M, int64_t N, int64_t row_groups, int64_t col_blocks) {
  TaskPlan t;
  t.cols = round_up(ceil_div(N, col_blocks), kNR);
  t.col_blocks = ceil_div(N, t.cols);
  t.rows = round_up(ceil_div(M, row_groups), kMR);
  t.row_groups = ceil_div(M, t.rows);
  return t;
}

double plan_cost(const TaskPlan& t, int64_t M, int64_t N, int64_t K, int64_t threads) {
  const int64_t tasks = t.row_groups * t.col_blocks;
  const int64_t used = std::min(threads, tasks), chunk = ceil_div(tasks, used);  // at::parallel_for's split
  double busiest = 0.0;
  for (int64_t th = 0; th < used; ++th) {
    double load = 0.0;
    for (int64_t task = th * chunk; task < std::min(tasks, (th + 1) * chunk); ++task) {
      const int64_t rg = task % t.row_groups, cb = task / t.row_groups;
      const double rows = static_cast<double>(std::min(t.rows, M - rg * t.rows));
      const double cols = static_cast<double>(std::min(t.cols, N - cb * t.cols));
      load += rows * cols * static_cast<double>(K) + kPackCost * static_cast<double>(K) * (rows + cols);
    }
    busiest = std::max(busiest, load);
  }
  return busiest;
}

TaskPlan plan_tasks(int64_t M, int64_t N, int64_t K, int64_t threads) {
  const int64_t r_min = ceil_div(M, kTaskRowsMax);
  const int64_t r_max = std::max(r_min, std::min(ceil_div(M, kMR), 8 * threads));
  const int64_t c_max = std::min(ceil_div(N, kNR), 8 * threads);
  TaskPlan best = task_shape(M, N, r_min, ceil_div(N, kNCMax));  // always allowed
  double best_cost = plan_cost(best, M, N, K, threads);
  for (int64_t r = r_min; r <= r_max; ++r) {
    for (int64_t c = 1; c <= c_max; ++c) {
      const TaskPlan t = task_shape(M, N, r, c);
      if (t.cols > kNCMax && t.rows * K > kKeepPackedAMax) continue;
      const double cost = plan_cost(t, M, N, K, threads);
      if (cost < best_cost * (1.0 - 1e-9)) {
        best = t;
        best_cost = cost;
      }
    }
  }
  return best;
}

#if defined(FUSEDTX_AVX512) || defined(FUSEDTX_AVX2)
// a as float32 rows for the unpacked paths: a itself when it is float32 with unit-stride rows,
// else converted into `storage`. Returns (rows, floats between rows).
template <typename T>
std::pair<const float*, int64_t> float_rows(const Problem<T>& p, std::vector<float>& storage) {
  if constexpr (std::is_same_v<T, float>) {
    if (p.sa1 == 1) return {p.a, p.sa0};
  }
  storage.resize(static_cast<size_t>(p.M * p.K));
  for (int64_t i = 0; i < p.M; ++i) {
    for (int64_t k = 0; k < p.K; ++k) storage[i * p.K + k] = to_float(p.a[i * p.sa0 + k * p.sa1]);
  }
  return {storage.data(), p.K};
}

// Rows [0, p.M) (at most kSmallMMax) of the few-rows kernels, columns [j0, j1).
template <typename T, int kAct>
void few_rows(const Problem<T>& p, const float* a, int64_t lda, int64_t j0, int64_t j1) {
  switch (p.M) {
    case 1: small_m_columns<T, kAct, 1>(p, a, lda, j0, j1); break;
    case 2: small_m_columns<T, kAct, 2>(p, a, lda, j0, j1); break;
    case 3: small_m_columns<T, kAct, 3>(p, a, lda, j0, j1); break;
    case 4: small_m_columns<T, kAct, 4>(p, a, lda, j0, j1); break;
    case 5: small_m_columns<T, kAct, 5>(p, a, lda, j0, j1); break;
    case 6: small_m_columns<T, kAct, 6>(p, a, lda, j0, j1); break;
    case 7: small_m_columns<T, kAct, 7>(p, a, lda, j0, j1); break;
    case 8: small_m_columns<T, kAct, 8>(p, a, lda, j0, j1); break;
    default: TORCH_CHECK(false, "linear_matmul: internal error, no few-rows kernel for ", p.M, " rows");
  }
}
#endif

template <typename T, int kAct>
void gemm(const Problem<T>& p) {
  if (p.M == 0 || p.N == 0) return;
#if defined(FUSEDTX_AVX512) || defined(FUSEDTX_AVX2)
  if (p.M <= kSmallMMax && (b_columns_contiguous(p) || b_rows_contiguous(p))) {
    std::vector<float> storage;
    const auto [a, lda] = float_rows(p, storage);
    // Column chunks of equal width (a multiple of 32), as many as a multiple of the thread count,
    // so that no thread gets one chunk more than another (with 576 columns, chunks of 128 would
    // give two threads 384 and 192): for b = weight.t() chunks of at most kSmallMChunk; for a
    // row-major b one per thread, which then sweeps b's rows as few times as it can. Each
    // column's arithmetic is the same in any chunk, so the partition changes no bits.
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t n_chunks = b_columns_contiguous(p) ? round_up(ceil_div(p.N, kSmallMChunk), threads) : threads;
    const int64_t chunk = round_up(ceil_div(p.N, n_chunks), 32);
    at::parallel_for(0, ceil_div(p.N, chunk), 1, [&](int64_t begin, int64_t end) {
      few_rows<T, kAct>(p, a, lda, begin * chunk, std::min(p.N, end * chunk));
    });
    return;
  }
  if (p.K <= kFewKMax && b_rows_contiguous(p)) {
    // Few k's (the weight gradient of a few-row batch, K = its rows): packing would cost more
    // than the multiply. The few-rows kernels run on groups of kSmallMMax rows, b's rows read
    // where they are; each element's arithmetic is the packed path's, in any group.
    std::vector<float> storage;
    const auto [a, lda] = float_rows(p, storage);
    const int64_t y_ld = kAct == kActSwiglu ? p.N / 2 : p.N;
    at::parallel_for(0, ceil_div(p.M, kSmallMMax), 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int64_t i0 = g * kSmallMMax;
        Problem<T> rows = p;
        rows.M = std::min(kSmallMMax, p.M - i0);
        rows.y = p.y + i0 * y_ld;
        rows.preact = p.preact ? p.preact + i0 * p.N : nullptr;
        few_rows<T, kAct>(rows, a + i0 * lda, lda, 0, p.N);
      }
    });
    return;
  }
#endif
  // Packed K blocks start at multiples of kKCMax, itself a multiple of kKBlock: every chain
  // lies inside one packed block.
  static_assert(kKCMax % kKBlock == 0);
  const int64_t kc_max = std::clamp<int64_t>(p.K, 1, kKCMax);
  const TaskPlan t = plan_tasks(p.M, p.N, p.K, at::get_num_threads());
  at::parallel_for(0, t.row_groups * t.col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rg = task % t.row_groups, cb = task / t.row_groups;
      const int64_t i0 = rg * t.rows, j0 = cb * t.cols;
      gemm_task<T, kAct>(p, i0, std::min(p.M, i0 + t.rows), j0, std::min(p.N, j0 + t.cols), kc_max);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> linear_matmul_cpu(const at::Tensor& a, const at::Tensor& b,
                                                     const std::optional<at::Tensor>& bias, int64_t activation,
                                                     bool save_preact, int64_t k_block,
                                                     const std::optional<at::Tensor>& b_odd, int64_t pair_dim) {
  constexpr const char* op = "linear_matmul";
  TORCH_CHECK(k_block == kKBlock, op, ": the CPU kernel sums K in blocks of ", kKBlock, ", asked for ", k_block);
  check_device(a, at::kCPU, op, "a");
  check_device(b, at::kCPU, op, "b");
  TORCH_CHECK(a.dim() == 2, op, ": a must be 2-D (M, K), got sizes ", a.sizes());
  TORCH_CHECK(b.dim() == 2, op, ": b must be 2-D (K, N), got sizes ", b.sizes());
  const bool paired = b_odd.has_value() && b_odd->defined();
  if (paired) {
    check_device(*b_odd, at::kCPU, op, "b_odd");
    TORCH_CHECK(pair_dim == 0 || pair_dim == 1, op, ": pair_dim must be 0 or 1, got ", pair_dim);
    // The kernel steps through both halves with b's strides: they must agree wherever a step is
    // taken (a dim of size 1 is never stepped along).
    bool same_layout = b_odd->sizes() == b.sizes();
    for (int d = 0; same_layout && d < 2; ++d) same_layout = b.size(d) == 1 || b_odd->stride(d) == b.stride(d);
    TORCH_CHECK(same_layout, op, ": b_odd must have b's sizes and strides, got ", b_odd->sizes(), " / ",
                b_odd->strides(), " and ", b.sizes(), " / ", b.strides());
    TORCH_CHECK(b_odd->scalar_type() == b.scalar_type(), op, ": b_odd must have b's dtype ", b.scalar_type(),
                ", got ", b_odd->scalar_type());
  }
  // The operand b: (K, N), or b and b_odd interleaved along pair_dim.
  const int64_t b_rows = b.size(0) * (paired && pair_dim == 0 ? 2 : 1);
  const int64_t b_cols = b.size(1) * (paired && pair_dim == 1 ? 2 : 1);
  TORCH_CHECK(a.size(1) == b_rows, op, ": a (M, K) and b (K, N) must agree in K, got a ", a.sizes(), " and b ",
              b.sizes(), paired ? " (paired)" : "");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": a and b must share a dtype, got ", a.scalar_type(), " and ",
              b.scalar_type());
  const int64_t M = a.size(0), K = a.size(1), N = b_cols;
  if (bias.has_value()) {
    check_device(*bias, at::kCPU, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == a.scalar_type(), op, ": bias must have a's dtype ", a.scalar_type(), ", got ",
                bias->scalar_type());
  }
  TORCH_CHECK(activation != kActSwiglu || N % 2 == 0, op, ": the SwiGLU epilogue takes gate/up pairs: b must have "
              "an even number of columns, got ", N);
  at::Tensor y, preact;
  dispatch_activation(activation, op, [&](auto act_tag) {
    constexpr int kAct = decltype(act_tag)::value;
    dispatch_float_types(a.scalar_type(), op, [&](auto t_tag) {
      using T = decltype(t_tag);
      y = at::empty({M, kAct == kActSwiglu ? N / 2 : N}, a.options());
      preact = save_preact && kAct != kActNone ? at::empty({M, N}, a.options()) : at::empty({0}, a.options());
      std::vector<float> bias_f;
      if (bias.has_value()) {
        bias_f.assign(round_up(N, kNR), 0.0f);
        const T* bp = bias->const_data_ptr<T>();
        const int64_t sb = bias->stride(0);
        for (int64_t j = 0; j < N; ++j) bias_f[j] = to_float(bp[j * sb]);
      }
      Problem<T> p{M,
                   N,
                   K,
                   a.const_data_ptr<T>(),
                   a.stride(0),
                   a.stride(1),
                   b.const_data_ptr<T>(),
                   b.stride(0),
                   b.stride(1),
                   paired ? b_odd->const_data_ptr<T>() : nullptr,
                   static_cast<int>(pair_dim),
                   bias.has_value() ? bias_f.data() : nullptr,
                   y.mutable_data_ptr<T>(),
                   preact.numel() > 0 ? preact.mutable_data_ptr<T>() : nullptr};
      gemm<T, kAct>(p);
    });
  });
  return {y, preact};
}

// ---------------------------------------------------------------------------------------------
// linear_bias_act_backward: grad_preact = grad_y * act'(preact), grad_bias = row_group_sum(grad_preact).
// ---------------------------------------------------------------------------------------------
// One row: grad_preact = grad_y * act'(preact) (when kAct) and, with part, part += grad_preact
// as stored (grad_y when no activation). Rows are streamed whole: the partial row (N floats)
// stays in cache while grad_y and preact come from memory once.
// SwiGLU's row: gy has N columns, pre, gp and part 2N (gate/up pairs): gp = swiglu_grads of
// each pair, part += gp as stored.
template <typename T>
void swiglu_grad_row(const T* gy, const T* pre, T* gp, float* part, int64_t N) {
#if defined(FUSEDTX_AVX512)
  for (int64_t c = 0; c < N; c += 16) {
    const int64_t n = std::min<int64_t>(16, N - c);
    const mask16 m = first_lanes(n), m0 = first_lanes(std::min<int64_t>(16, 2 * n)),
                    m1 = first_lanes(std::max<int64_t>(0, 2 * n - 16));
    __m512 g, u, lo, hi;
    deinterleave(load16(pre + 2 * c, m0), load16(pre + 2 * c + 16, m1), &g, &u);
    vfloat dg, du;
    swiglu_grads(reinterpret_cast<vfloat>(load16(gy + c, m)), reinterpret_cast<vfloat>(g),
                 reinterpret_cast<vfloat>(u), &dg, &du);
    interleave(reinterpret_cast<__m512>(dg), reinterpret_cast<__m512>(du), &lo, &hi);
    store16(gp + 2 * c, lo, m0);
    store16(gp + 2 * c + 16, hi, m1);
    if (part) {
      float* p0 = part + 2 * c;
      _mm512_mask_storeu_ps(p0, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, p0), round_trip<T>(lo)));
      _mm512_mask_storeu_ps(p0 + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, p0 + 16), round_trip<T>(hi)));
    }
  }
#elif defined(FUSEDTX_AVX2)
  for (int64_t c = 0; c < N; c += 8) {
    const int64_t n = std::min<int64_t>(8, N - c);  // pairs
    __m256 g, u, lo, hi;
    deinterleave(load8(pre + 2 * c, 2 * n), load8(pre + 2 * c + 8, 2 * n - 8), &g, &u);
    R8 dg, du;
    swiglu_grads(r8(load8(gy + c, n)), r8(g), r8(u), &dg, &du);
    interleave(m256(dg), m256(du), &lo, &hi);
    const __m256 out[2] = {lo, hi};
    for (int q = 0; q < 2; ++q) {
      const int64_t nq = 2 * n - 8 * q;
      if (nq <= 0) break;
      store8(gp + 2 * c + 8 * q, out[q], nq);
      if (part) {
        float* pq = part + 2 * c + 8 * q;
        store8(pq, _mm256_add_ps(load8(pq, nq), round_trip8<T>(out[q])), nq);
      }
    }
  }
#else
  for (int64_t c = 0; c < N; ++c) {
    float dg, du;
    swiglu_grads(to_float(gy[c]), to_float(pre[2 * c]), to_float(pre[2 * c + 1]), &dg, &du);
    store1(gp + 2 * c, dg);
    store1(gp + 2 * c + 1, du);
    if (part) {
      part[2 * c] = part[2 * c] + to_float(gp[2 * c]);
      part[2 * c + 1] = part[2 * c + 1] + to_float(gp[2 * c + 1]);
    }
  }
#endif
}

template <typename T, int kAct>
void bias_act_row(const T* gy, const T* pre, T* gp, float* part, int64_t N) {
  if constexpr (kAct == kActSwiglu) {
    swiglu_grad_row(gy, pre, gp, part, N);
    return;
  }
#if defined(FUSEDTX_AVX512)
  int64_t c = 0;
  if constexpr (kAct != kActNone) {
    for (; c + 64 <= N; c += 64) {
      vfloat h0 = reinterpret_cast<vfloat>(load16(pre + c)), h1 = reinterpret_cast<vfloat>(load16(pre + c + 16));
      vfloat h2 = reinterpret_cast<vfloat>(load16(pre + c + 32)), h3 = reinterpret_cast<vfloat>(load16(pre + c + 48));
      const vfloat d0 = activation_derivative<kAct>(h0), d1 = activation_derivative<kAct>(h1);
      const vfloat d2 = activation_derivative<kAct>(h2), d3 = activation_derivative<kAct>(h3);
      const __m512 d[4] = {reinterpret_cast<__m512>(d0), reinterpret_cast<__m512>(d1), reinterpret_cast<__m512>(d2),
                           reinterpret_cast<__m512>(d3)};
      for (int v = 0; v < 4; ++v) {
        __m512 g = _mm512_mul_ps(load16(gy + c + 16 * v), d[v]);
        store16(gp + c + 16 * v, g, 0xFFFF);
        g = round_trip<T>(g);
        if (part) _mm512_storeu_ps(part + c + 16 * v, _mm512_add_ps(_mm512_loadu_ps(part + c + 16 * v), g));
      }
    }
  }
  for (; c < N; c += 16) {
    const mask16 m = first_lanes(N - c);
    __m512 g = load16(gy + c, m);
    if constexpr (kAct != kActNone) {
      const __m512 h = load16(pre + c, m);
      g = _mm512_mul_ps(g, reinterpret_cast<__m512>(activation_derivative<kAct>(reinterpret_cast<vfloat>(h))));
      store16(gp + c, g, m);
      g = round_trip<T>(g);
    }
    if (part) _mm512_mask_storeu_ps(part + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, part + c), g));
  }
#elif defined(FUSEDTX_AVX2)
  for (int64_t c = 0; c < N; c += 8) {
    const int64_t n = std::min<int64_t>(8, N - c);
    __m256 g = load_upto8(gy + c, n);
    if constexpr (kAct != kActNone) {
      g = _mm256_mul_ps(g, m256(activation_derivative<kAct>(r8(load_upto8(pre + c, n)))));
      store8(gp + c, g, n);
      g = round_trip8<T>(g);
    }
    if (part) store8(part + c, _mm256_add_ps(load8(part + c, n), g), n);
  }
#else
  for (int64_t c = 0; c < N; ++c) {
    float g = to_float(gy[c]);
    if constexpr (kAct != kActNone) {
      store1(gp + c, g * activation_derivative<kAct>(to_float(pre[c])));
      g = to_float(gp[c]);
    }
    if (part) part[c] = part[c] + g;
  }
#endif
}

std::tuple<at::Tensor, at::Tensor> linear_bias_act_backward_cpu(const at::Tensor& grad_y, const std::optional<at::Tensor>& preact,
                                                         int64_t activation, bool need_bias_grad, int64_t groups) {
  constexpr const char* op = "linear_bias_act_backward";
  check_rows(grad_y, at::kCPU, op, "grad_y");
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  // N: grad_y's columns; W: grad_preact's (and preact's), 2N for SwiGLU's gate/up pairs.
  const int64_t M = grad_y.size(0), N = grad_y.size(1), W = activation == kActSwiglu ? 2 * N : N;
  if (activation != kActNone) {
    TORCH_CHECK(preact.has_value(), op, ": preact is required when activation is ", activation);
    check_device(*preact, at::kCPU, op, "preact");
    TORCH_CHECK(preact->dim() == 2 && preact->size(0) == M && preact->size(1) == W && preact->is_contiguous(), op,
                ": preact must be contiguous of shape (", M, ", ", W, "), got ", preact->sizes());
    TORCH_CHECK(preact->scalar_type() == grad_y.scalar_type(), op, ": preact must have grad_y's dtype ",
                grad_y.scalar_type(), ", got ", preact->scalar_type());
  }
  at::Tensor grad_preact, grad_bias;
  dispatch_activation(activation, op, [&](auto act_tag) {
    constexpr int kAct = decltype(act_tag)::value;
    dispatch_float_types(grad_y.scalar_type(), op, [&](auto t_tag) {
      using T = decltype(t_tag);
      grad_preact = kAct != kActNone ? at::empty({M, W}, grad_y.options()) : at::empty({0}, grad_y.options());
      grad_bias = need_bias_grad ? at::empty({W}, grad_y.options().dtype(at::kFloat))
                                 : at::empty({0}, grad_y.options().dtype(at::kFloat));
      if (M == 0 || N == 0) {
        if (need_bias_grad) grad_bias.zero_();
        return;
      }
      if (kAct == kActNone && !need_bias_grad) return;
      const T* gy = grad_y.const_data_ptr<T>();
      const T* pre = kAct != kActNone ? preact->const_data_ptr<T>() : nullptr;
      T* gp = kAct != kActNone ? grad_preact.mutable_data_ptr<T>() : nullptr;
      if (!need_bias_grad) {
        at::parallel_for(0, M, std::max<int64_t>(1, 16384 / N), [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) bias_act_row<T, kAct>(gy + r * N, pre ? pre + r * W : nullptr, gp ? gp + r * W : nullptr, nullptr, N);
        });
        return;
      }
      // reference.row_group_sum: groups of ceil(M / groups) rows, each group's float32 partial
      // from +0 adding its rows in order, then the partials added in group order from +0. The
      // empty groups at the end (partials +0) are skipped: the total is never -0, so adding +0
      // cannot change it.
      const int64_t per_group = std::max<int64_t>(1, ceil_div(M, groups));
      const int64_t used_groups = ceil_div(M, per_group);
      std::unique_ptr<float[]> partials(new float[used_groups * W]);
      at::parallel_for(0, used_groups, 1, [&](int64_t g_begin, int64_t g_end) {
        for (int64_t g = g_begin; g < g_end; ++g) {
          float* part = partials.get() + g * W;
          std::fill(part, part + W, 0.0f);
          for (int64_t r = g * per_group; r < std::min(M, (g + 1) * per_group); ++r) {
            bias_act_row<T, kAct>(gy + r * N, pre ? pre + r * W : nullptr, gp ? gp + r * W : nullptr, part, N);
          }
        }
      });
      float* gb = grad_bias.mutable_data_ptr<float>();
      constexpr int64_t kCols = 256;
      at::parallel_for(0, ceil_div(W, kCols), 1, [&](int64_t b_begin, int64_t b_end) {
        for (int64_t cb = b_begin; cb < b_end; ++cb) {
          const int64_t c0 = cb * kCols, width = std::min(kCols, W - c0);
          float sum[kCols] = {};
          for (int64_t g = 0; g < used_groups; ++g) {
            const float* part = partials.get() + g * W + c0;
            for (int64_t c = 0; c < width; ++c) sum[c] = sum[c] + part[c];
          }
          std::copy(sum, sum + width, gb + c0);
        }
      });
    });
  });
  return {grad_preact, grad_bias};
}

}  // namespace
}  // namespace fusedtx::cpu

TORCH_LIBRARY_IMPL(fusedtx_native, CPU, m) {
  m.impl("linear_matmul", &fusedtx::cpu::linear_matmul_cpu);
  m.impl("linear_bias_act_backward", &fusedtx::cpu::linear_bias_act_backward_cpu);
}
