// What LayerNorm (layer_norm.cpp) and RMSNorm (rms_norm.cpp) share on CPU: the dtype dispatch and
// parameter checks, the write-out of a normalised row, and the whole backward — per row the
// lane sums of g and g * xhat, dx, and dweight (and LayerNorm's dbias) through the fixed row
// groups of reference.row_group_sum. kCentered selects LayerNorm's formulas (xhat = (x - mean) *
// rstd, a mean of g in dx, a bias gradient) or RMSNorm's (xhat = x * rstd); the arithmetic is
// reference.layer_norm_backward / rms_norm_backward with 64 lanes, operation for operation
// (docs/design.md, "Lane sums" and "Row groups"). Nothing depends on the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "common.h"

namespace fusedtx::cpu::row_norm {

constexpr int kLanes = 64;  // policy.CPU_LANES

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline at::ScalarType compute_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Calls fn(T{}, P{}) for x's dtype T and the parameters' dtype P (x's, or float32 beside a
// float16/bfloat16 x, as under autocast).
template <typename Fn>
void dispatch_x_and_params(at::ScalarType x_type, at::ScalarType p_type, const char* op, Fn&& fn) {
  const bool same = p_type == x_type;
  TORCH_CHECK(same || (p_type == at::kFloat && x_type != at::kDouble), op, ": weight/bias dtype ", p_type,
              " does not go with x dtype ", x_type, " (expected x's dtype, or float32 beside float16/bfloat16)");
  switch (x_type) {
    case at::kFloat: fn(float{}, float{}); break;
    case at::kDouble: fn(double{}, double{}); break;
    case at::kHalf: same ? fn(at::Half{}, at::Half{}) : fn(at::Half{}, float{}); break;
    case at::kBFloat16: same ? fn(at::BFloat16{}, at::BFloat16{}) : fn(at::BFloat16{}, float{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", x_type);
  }
}

inline const at::Tensor* check_param(const std::optional<at::Tensor>& p, int64_t n, const char* op, const char* name) {
  if (!p.has_value()) return nullptr;
  TORCH_CHECK(p->device().is_cpu() && p->dim() == 1 && p->size(0) == n && p->is_contiguous(), op, ": ", name,
              " must be a contiguous CPU tensor of shape (", n, "), got ", p->sizes());
  return &*p;
}

template <typename P>
const P* param_ptr(const at::Tensor* p) { return p ? p->const_data_ptr<P>() : nullptr; }

inline void check_lanes(int64_t lanes, const char* op) {
  TORCH_CHECK(lanes == kLanes, op, ": the CPU kernel sums with ", kLanes, " lanes, asked for ", lanes);
}

// y = ((pre(x) * w) + b) for each element of a row, w and b optional: pre is the normalisation
// (a callable taking RVec<A> or A). next: the row to be normalised after this one (nullptr if
// none), prefetched while this one is written out, so that the memory system keeps working
// while the statistics of a row that is already in L1 are computed.
template <typename A, typename T, typename P, typename Pre>
inline void write_normalized(const T* x, T* y, const P* w, const P* b, int64_t n, const T* next, Pre&& pre) {
  constexpr int L = kRVecLen<A>;
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    if (next) __builtin_prefetch(next + j, 0, 3);  // read, keep in every cache level (T0)
    RVec<A> out = pre(rload_as<A>(x + j));
    if (w) out = out * rload_as<A>(w + j);
    if (b) out = out + rload_as<A>(b + j);
    rstore_as<T, A>(y + j, out);
  }
  for (; j < n; ++j) {
    A out = pre(static_cast<A>(x[j]));
    if (w) out = out * static_cast<A>(w[j]);
    if (b) out = out + static_cast<A>(b[j]);
    y[j] = static_cast<T>(out);
  }
}

// The backward of one normalised row layout: x a row of T, the weight of P, arithmetic in A.
template <typename T, typename P, typename A, bool kCentered>
struct Backward {
  static constexpr int L = kRVecLen<A>;
  static constexpr int kVecs = kLanes / L;

  template <typename V>
  static V xhat(V x, A mean, A rstd) {
    if constexpr (kCentered) {
      return (x - mean) * rstd;
    } else {
      return x * rstd;
    }
  }
  // dx = (g - (xhat * mean_gx + mean_g)) * rstd, or (g - xhat * mean_gx) * rstd.
  template <typename V>
  static V dx(V g, V xh, A mean_g, A mean_gx, A rstd) {
    if constexpr (kCentered) {
      return (g - (xh * mean_gx + mean_g)) * rstd;
    } else {
      return (g - xh * mean_gx) * rstd;
    }
  }

  // The row sums of the backward: the mean of g (kCentered only) and of g * xhat (g = dy * w, or dy).
  static void stats(const T* dy, const T* x, const P* w, A mean, A rstd, int64_t n, A* mean_g, A* mean_gx) {
    LaneSum<A, kLanes, RVec<A>> sum_g, sum_gx;
    int64_t blk = 0;
    for (; blk + kLanes <= n; blk += kLanes) {
      for (int v = 0; v < kVecs; ++v) {
        const int64_t j = blk + v * L;
        const RVec<A> g = w ? rload_as<A>(dy + j) * rload_as<A>(w + j) : rload_as<A>(dy + j);
        if constexpr (kCentered) sum_g.add(v, g);
        sum_gx.add(v, g * xhat(rload_as<A>(x + j), mean, rstd));
      }
    }
    auto g_s = [&](int64_t j) { return w ? static_cast<A>(dy[j]) * static_cast<A>(w[j]) : static_cast<A>(dy[j]); };
    if constexpr (kCentered) sum_g.add_partial_block(n - blk, [&](int64_t l) { return g_s(blk + l); });
    sum_gx.add_partial_block(n - blk, [&](int64_t l) { return g_s(blk + l) * xhat(static_cast<A>(x[blk + l]), mean, rstd); });
    *mean_g = kCentered ? sum_g.fold() / static_cast<A>(n) : A(0);
    *mean_gx = sum_gx.fold() / static_cast<A>(n);
  }

  // Rows [r0, r1) of one row group (r1 > r0): dx of each row and, with dw (and db: the group's
  // partial rows, written here from +0: their contents on entry are not read), dw += dy * xhat,
  // db += dy row after row. mean is nullptr unless kCentered. Rows go in chunks of kChunk: first
  // each row's sums, then column by column across the chunk's rows, so the partials stay in
  // registers for a chunk instead of being re-read for every row. Per column the rows are
  // still added in ascending order.
  static void group(const T* dy, const T* x, const P* w, const A* mean, const A* rstd, int64_t r0, int64_t r1,
                    int64_t n, T* dx_out, A* dw, A* db) {
    constexpr int kChunk = 8;
    A mean_g[kChunk], mean_gx[kChunk];
    const auto mean_of = [&](int64_t r) { return kCentered ? mean[r] : A(0); };
    for (int64_t c0 = r0; c0 < r1; c0 += kChunk) {
      const int rows = static_cast<int>(std::min<int64_t>(kChunk, r1 - c0));
      for (int i = 0; i < rows; ++i) {
        const int64_t r = c0 + i;
        stats(dy + r * n, x + r * n, w, mean_of(r), rstd[r], n, &mean_g[i], &mean_gx[i]);
      }
      int64_t j = 0;
      for (; j + L <= n; j += L) {
        RVec<A> wj = {}, dw_acc = {}, db_acc = {};
        if (w) wj = rload_as<A>(w + j);
        if (dw && c0 > r0) {  // the group's first chunk starts its partials at +0 (dw, db are not zeroed)
          dw_acc = rload_as<A>(dw + j);
          if constexpr (kCentered) db_acc = rload_as<A>(db + j);
        }
        for (int i = 0; i < rows; ++i) {
          const int64_t r = c0 + i, off = r * n + j;
          const RVec<A> d = rload_as<A>(dy + off);
          const RVec<A> xh = xhat(rload_as<A>(x + off), mean_of(r), rstd[r]);
          const RVec<A> g = w ? d * wj : d;
          rstore_as<T, A>(dx_out + off, dx(g, xh, mean_g[i], mean_gx[i], rstd[r]));
          dw_acc = dw_acc + d * xh;
          if constexpr (kCentered) db_acc = db_acc + d;
        }
        if (dw) {
          rstore_as<A, A>(dw + j, dw_acc);
          if constexpr (kCentered) rstore_as<A, A>(db + j, db_acc);
        }
      }
      for (; j < n; ++j) {
        for (int i = 0; i < rows; ++i) {
          const int64_t r = c0 + i, off = r * n + j;
          const A d = static_cast<A>(dy[off]);
          const A xh = xhat(static_cast<A>(x[off]), mean_of(r), rstd[r]);
          const A g = w ? d * static_cast<A>(w[j]) : d;
          dx_out[off] = static_cast<T>(dx(g, xh, mean_g[i], mean_gx[i], rstd[r]));
          if (dw) {
            const bool starts = c0 == r0 && i == 0;
            dw[j] = (starts ? A(0) : dw[j]) + d * xh;
            if constexpr (kCentered) db[j] = (starts ? A(0) : db[j]) + d;
          }
        }
      }
    }
  }
};

// The statistic a forward saved for the backward (mean, rstd): a contiguous (rows,) tensor of
// the compute dtype.
inline void check_stat(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == compute_type(x) && t.dim() == 1 && t.numel() == x.size(0) &&
                  t.is_contiguous(),
              op, ": ", name, " must be a contiguous CPU tensor of shape (", x.size(0), ") and dtype ",
              compute_type(x), ", got ", t.sizes(), " ", t.scalar_type());
}

// The whole backward: (dx, dweight, dbias), dweight and dbias in the compute dtype, empty unless
// need_param_grads; dbias always empty unless kCentered. mean: an undefined tensor unless
// kCentered.
template <bool kCentered>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                        const at::Tensor& mean, const at::Tensor& rstd,
                                                        const std::optional<at::Tensor>& weight, bool need_param_grads,
                                                        int64_t lanes, int64_t groups, const char* op) {
  check_rows(grad_y, at::kCPU, op, "grad_y");
  check_rows(x, at::kCPU, op, "x");
  check_lanes(lanes, op);
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(), op,
              ": grad_y must match x in shape and dtype: x is ", x.sizes(), " ", x.scalar_type(), ", grad_y is ",
              grad_y.sizes(), " ", grad_y.scalar_type());
  if constexpr (kCentered) check_stat(mean, x, op, "mean");
  check_stat(rstd, x, op, "rstd");
  const int64_t rows = x.size(0), n = x.size(1);
  const at::ScalarType acc_type = compute_type(x);
  const at::Tensor* w = check_param(weight, n, op, "weight");
  at::Tensor dx = at::empty_like(x);
  // Rows are dealt to groups in runs of per_group, so the groups holding rows are a prefix
  // [0, filled) and the rest are empty (only when rows < groups * per_group). One partial row per
  // filled group and buffer (dweight's, LayerNorm's dbias'), which its group writes from +0. The
  // empty groups' +0 partials are left out of the column totals: a total starts at +0 and so is
  // never -0, and adding +0 to it changes nothing. Storing, zeroing and reading them would
  // dominate a small backward's time.
  constexpr int kBuffers = kCentered ? 2 : 1;
  const int64_t per_group = std::max<int64_t>(1, (rows + groups - 1) / groups);
  const int64_t filled = std::min(groups, (rows + per_group - 1) / per_group);
  const auto grads = [&](bool present) { return at::empty({present ? n : 0}, x.options().dtype(acc_type)); };
  at::Tensor partials = need_param_grads ? at::empty({kBuffers, filled, n}, x.options().dtype(acc_type)) : at::Tensor();
  at::Tensor dweight = grads(need_param_grads), dbias = grads(need_param_grads && kCentered);
  dispatch_x_and_params(x.scalar_type(), w ? w->scalar_type() : x.scalar_type(), op, [&](auto t_tag, auto p_tag) {
    using T = decltype(t_tag);
    using P = decltype(p_tag);
    using A = compute_t<T>;
    const A* mp = kCentered ? mean.const_data_ptr<A>() : nullptr;
    A* dw_part = need_param_grads ? partials.mutable_data_ptr<A>() : nullptr;
    A* db_part = need_param_grads && kCentered ? dw_part + filled * n : nullptr;
    at::parallel_for(0, filled, 1, [&](int64_t g_begin, int64_t g_end) {
      for (int64_t g = g_begin; g < g_end; ++g) {
        const int64_t r0 = std::min(rows, g * per_group), r1 = std::min(rows, (g + 1) * per_group);
        Backward<T, P, A, kCentered>::group(grad_y.const_data_ptr<T>(), x.const_data_ptr<T>(), param_ptr<P>(w), mp,
                                            rstd.const_data_ptr<A>(), r0, r1, n, dx.mutable_data_ptr<T>(),
                                            dw_part ? dw_part + g * n : nullptr, db_part ? db_part + g * n : nullptr);
      }
    });
    if (!need_param_grads) return;
    // reference.row_group_sum's last step: each column adds its group partials in group order,
    // starting at +0. Walk the partial rows in memory order (a block of columns at a time, all
    // groups): going down one column at a time strides by N and thrashes the cache.
    A* totals[kBuffers];
    totals[0] = dweight.mutable_data_ptr<A>();
    if constexpr (kCentered) totals[1] = dbias.mutable_data_ptr<A>();
    constexpr int64_t kCols = 256;
    at::parallel_for(0, (n + kCols - 1) / kCols, 1, [&](int64_t b_begin, int64_t b_end) {
      for (int64_t blk = b_begin; blk < b_end; ++blk) {
        const int64_t c0 = blk * kCols, width = std::min(kCols, n - c0);
        A sums[kBuffers][kCols] = {};
        for (int64_t g = 0; g < filled; ++g) {
          for (int k = 0; k < kBuffers; ++k) {
            const A* p = dw_part + (k * filled + g) * n + c0;
            for (int64_t c = 0; c < width; ++c) sums[k][c] = sums[k][c] + p[c];
          }
        }
        for (int k = 0; k < kBuffers; ++k) std::copy(sums[k], sums[k] + width, totals[k] + c0);
      }
    });
  });
  return {dx, dweight, dbias};
}

}  // namespace fusedtx::cpu::row_norm
