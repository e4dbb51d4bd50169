// LayerNorm on CPU: forward with corrected two-pass statistics, backward with deterministic weight and
// bias gradients. The arithmetic is reference.layer_norm_forward / layer_norm_backward with 64
// lanes, operation for operation (float32 compute for float32/float16/bfloat16 inputs, float64
// for float64), written with 64-byte vectors (common.h).
//
// Forward: rows spread over threads, one row per task step, three passes over a row that stays
// in cache (the sum; the sums of the deviations and of their squares; normalise). Backward: the rows are cut into a fixed
// number of row groups (policy.ROW_GROUPS); threads take whole groups, each group
// computes its rows' dx and adds dy * xhat and dy into its own row of a partial buffer; the
// partials are then summed per column in group order. Nothing depends on the thread count
// (docs/design.md, "Lane sums" and "Row groups").
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"

namespace fusedtx::cpu {
namespace {

constexpr int kLanes = 64;  // policy.CPU_LANES

// x: a row of T; params of P; arithmetic in A.
template <typename T, typename P, typename A>
struct LayerNormRow {
  static constexpr int L = kVecLen<A>;
  static constexpr int kVecs = kLanes / L;

  // next: the row to be normalised after this one (nullptr if none), prefetched while this one is
  // written out, so that the memory system keeps working while the statistics of a row that
  // is already in L1 are computed.
  static void forward(const T* x, T* y, const P* w, const P* b, int64_t n, A eps, A* mean_out, A* rstd_out,
                      const T* next) {
    LaneSum<A, kLanes> sum;
    int64_t blk = 0;
    for (; blk + kLanes <= n; blk += kLanes) {
      for (int v = 0; v < kVecs; ++v) sum.add(v, load_as<A>(x + blk + v * L));
    }
    sum.add_partial_block(n - blk, [&](int64_t l) { return static_cast<A>(x[blk + l]); });
    const A mean0 = sum.fold() / static_cast<A>(n);

    // One pass for both sums of d0 = x - mean0: its plain sum (the mean's correction) and its
    // compensated sum of squares.
    LaneSum<A, kLanes> dev;
    CompensatedLaneSum<A, kLanes> sq;
    for (blk = 0; blk + kLanes <= n; blk += kLanes) {
      for (int v = 0; v < kVecs; ++v) {
        const Vec<A> d = load_as<A>(x + blk + v * L) - mean0;
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

    int64_t j = 0;
    for (; j + L <= n; j += L) {
      if (next) _mm_prefetch(reinterpret_cast<const char*>(next + j), _MM_HINT_T0);
      Vec<A> out = ((load_as<A>(x + j) - mean0) - c) * rstd;
      if (w) out = out * load_as<A>(w + j);
      if (b) out = out + load_as<A>(b + j);
      store_as<T, A>(y + j, out);
    }
    for (; j < n; ++j) {
      A out = ((static_cast<A>(x[j]) - mean0) - c) * rstd;
      if (w) out = out * static_cast<A>(w[j]);
      if (b) out = out + static_cast<A>(b[j]);
      y[j] = static_cast<T>(out);
    }
    *mean_out = mean0 + c;
    *rstd_out = rstd;
  }

  // The two row sums of the backward: mean of g and of g * xhat (g = dy * w, or dy).
  static void backward_stats(const T* dy, const T* x, const P* w, A mean, A rstd, int64_t n, A* mean_g, A* mean_gx) {
    LaneSum<A, kLanes> sum_g, sum_gx;
    int64_t blk = 0;
    for (; blk + kLanes <= n; blk += kLanes) {
      for (int v = 0; v < kVecs; ++v) {
        const int64_t j = blk + v * L;
        const Vec<A> g = w ? load_as<A>(dy + j) * load_as<A>(w + j) : load_as<A>(dy + j);
        sum_g.add(v, g);
        sum_gx.add(v, g * ((load_as<A>(x + j) - mean) * rstd));
      }
    }
    auto g_s = [&](int64_t j) { return w ? static_cast<A>(dy[j]) * static_cast<A>(w[j]) : static_cast<A>(dy[j]); };
    sum_g.add_partial_block(n - blk, [&](int64_t l) { return g_s(blk + l); });
    sum_gx.add_partial_block(n - blk, [&](int64_t l) { return g_s(blk + l) * ((static_cast<A>(x[blk + l]) - mean) * rstd); });
    *mean_g = sum_g.fold() / static_cast<A>(n);
    *mean_gx = sum_gx.fold() / static_cast<A>(n);
  }

  // Rows [r0, r1) of one row group (r1 > r0): dx of each row and, with dw/db (the group's partial
  // rows, written here from +0: their contents on entry are not read), dw += dy * xhat, db += dy
  // row after row. Rows go in chunks of kChunk: first each row's two
  // sums, then column by column across the chunk's rows, so the partials stay in registers for
  // a chunk instead of being re-read for every row. Per column the rows are still added in
  // ascending order.
  static void backward_group(const T* dy, const T* x, const P* w, const A* mean, const A* rstd, int64_t r0, int64_t r1,
                             int64_t n, T* dx, A* dw, A* db) {
    constexpr int kChunk = 8;
    A mean_g[kChunk], mean_gx[kChunk];
    for (int64_t c0 = r0; c0 < r1; c0 += kChunk) {
      const int rows = static_cast<int>(std::min<int64_t>(kChunk, r1 - c0));
      for (int i = 0; i < rows; ++i) {
        const int64_t r = c0 + i;
        backward_stats(dy + r * n, x + r * n, w, mean[r], rstd[r], n, &mean_g[i], &mean_gx[i]);
      }
      int64_t j = 0;
      for (; j + L <= n; j += L) {
        Vec<A> wj = {}, dw_acc = {}, db_acc = {};
        if (w) wj = load_as<A>(w + j);
        if (dw && c0 > r0) {  // the group's first chunk starts its partials at +0 (dw, db are not zeroed)
          dw_acc = vload(dw + j);
          db_acc = vload(db + j);
        }
        for (int i = 0; i < rows; ++i) {
          const int64_t off = (c0 + i) * n + j;
          const Vec<A> d = load_as<A>(dy + off);
          const Vec<A> xhat = (load_as<A>(x + off) - mean[c0 + i]) * rstd[c0 + i];
          const Vec<A> g = w ? d * wj : d;
          store_as<T, A>(dx + off, (g - (xhat * mean_gx[i] + mean_g[i])) * rstd[c0 + i]);
          dw_acc = dw_acc + d * xhat;
          db_acc = db_acc + d;
        }
        if (dw) {
          vstore(dw + j, dw_acc);
          vstore(db + j, db_acc);
        }
      }
      for (; j < n; ++j) {
        for (int i = 0; i < rows; ++i) {
          const int64_t off = (c0 + i) * n + j;
          const A d = static_cast<A>(dy[off]);
          const A xhat = (static_cast<A>(x[off]) - mean[c0 + i]) * rstd[c0 + i];
          const A g = w ? d * static_cast<A>(w[j]) : d;
          dx[off] = static_cast<T>((g - (xhat * mean_gx[i] + mean_g[i])) * rstd[c0 + i]);
          if (dw) {
            const bool starts = c0 == r0 && i == 0;
            dw[j] = (starts ? A(0) : dw[j]) + d * xhat;
            db[j] = (starts ? A(0) : db[j]) + d;
          }
        }
      }
    }
  }
};

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

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

const at::Tensor* check_param(const std::optional<at::Tensor>& p, int64_t n, const char* op, const char* name) {
  if (!p.has_value()) return nullptr;
  TORCH_CHECK(p->device().is_cpu() && p->dim() == 1 && p->size(0) == n && p->is_contiguous(), op, ": ", name,
              " must be a contiguous CPU tensor of shape (", n, "), got ", p->sizes());
  return &*p;
}

template <typename P>
const P* param_ptr(const at::Tensor* p) { return p ? p->const_data_ptr<P>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                                     const std::optional<at::Tensor>& bias, double eps, int64_t lanes) {
  check_rows(x, at::kCPU, "layer_norm_forward", "x");
  TORCH_CHECK(lanes == kLanes, "layer_norm_forward: the CPU kernel sums with ", kLanes, " lanes, asked for ", lanes);
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(n > 0, "layer_norm_forward: rows must have at least one element");
  const at::Tensor* w = check_param(weight, n, "layer_norm_forward", "weight");
  const at::Tensor* b = check_param(bias, n, "layer_norm_forward", "bias");
  TORCH_CHECK(!(w && b) || w->scalar_type() == b->scalar_type(), "layer_norm_forward: weight and bias must share a dtype");
  const at::ScalarType p_type = w ? w->scalar_type() : b ? b->scalar_type() : x.scalar_type();
  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(acc_type));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(acc_type));
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
  check_rows(grad_y, at::kCPU, "layer_norm_backward", "grad_y");
  check_rows(x, at::kCPU, "layer_norm_backward", "x");
  TORCH_CHECK(lanes == kLanes, "layer_norm_backward: the CPU kernel sums with ", kLanes, " lanes, asked for ", lanes);
  TORCH_CHECK(groups > 0, "layer_norm_backward: groups must be positive");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "layer_norm_backward: grad_y must match x in shape and dtype");
  const int64_t rows = x.size(0), n = x.size(1);
  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(mean.scalar_type() == acc_type && rstd.scalar_type() == acc_type && mean.numel() == rows &&
                  rstd.numel() == rows && mean.is_contiguous() && rstd.is_contiguous(),
              "layer_norm_backward: mean and rstd must be contiguous (rows,) tensors of ", acc_type);
  const at::Tensor* w = check_param(weight, n, "layer_norm_backward", "weight");
  at::Tensor dx = at::empty_like(x);
  // Rows are dealt to groups in runs of per_group, so the groups holding rows are a prefix
  // [0, filled) and the rest are empty (only when rows < groups * per_group). One partial row per
  // filled group, which its group writes from +0. The empty groups' +0 partials are left out of
  // the column totals: a total starts at +0 and so is never -0, and adding +0 to it changes
  // nothing. Storing, zeroing and reading them would dominate a small backward's time.
  const int64_t per_group = std::max<int64_t>(1, (rows + groups - 1) / groups);
  const int64_t filled = std::min(groups, (rows + per_group - 1) / per_group);
  at::Tensor partials = need_param_grads ? at::empty({2, filled, n}, x.options().dtype(acc_type)) : at::Tensor();
  at::Tensor dweight = need_param_grads ? at::empty({n}, x.options().dtype(acc_type)) : at::empty({0}, x.options().dtype(acc_type));
  at::Tensor dbias = need_param_grads ? at::empty({n}, x.options().dtype(acc_type)) : at::empty({0}, x.options().dtype(acc_type));
  dispatch_x_and_params(x.scalar_type(), w ? w->scalar_type() : x.scalar_type(), "layer_norm_backward", [&](auto t_tag, auto p_tag) {
    using T = decltype(t_tag);
    using P = decltype(p_tag);
    using A = compute_t<T>;
    const T* dyp = grad_y.const_data_ptr<T>();
    const T* xp = x.const_data_ptr<T>();
    const P* wp = param_ptr<P>(w);
    const A* mp = mean.const_data_ptr<A>();
    const A* rp = rstd.const_data_ptr<A>();
    T* dxp = dx.mutable_data_ptr<T>();
    A* dw_part = need_param_grads ? partials.mutable_data_ptr<A>() : nullptr;
    A* db_part = need_param_grads ? dw_part + filled * n : nullptr;
    at::parallel_for(0, filled, 1, [&](int64_t g_begin, int64_t g_end) {
      for (int64_t g = g_begin; g < g_end; ++g) {
        const int64_t r0 = std::min(rows, g * per_group), r1 = std::min(rows, (g + 1) * per_group);
        LayerNormRow<T, P, A>::backward_group(dyp, xp, wp, mp, rp, r0, r1, n, dxp, dw_part ? dw_part + g * n : nullptr,
                                              db_part ? db_part + g * n : nullptr);
      }
    });
    if (!need_param_grads) return;
    // reference.row_group_sum's last step: each column adds its group partials in group order,
    // starting at +0. Walk the partial rows in memory order (a block of columns at a time, all
    // groups): going down one column at a time strides by N and thrashes the cache.
    A* dwp = dweight.mutable_data_ptr<A>();
    A* dbp = dbias.mutable_data_ptr<A>();
    constexpr int64_t kCols = 256;
    at::parallel_for(0, (n + kCols - 1) / kCols, 1, [&](int64_t b_begin, int64_t b_end) {
      for (int64_t blk = b_begin; blk < b_end; ++blk) {
        const int64_t c0 = blk * kCols, width = std::min(kCols, n - c0);
        A sw[kCols] = {}, sb[kCols] = {};
        for (int64_t g = 0; g < filled; ++g) {
          const A* pw = dw_part + g * n + c0;
          const A* pb = db_part + g * n + c0;
          for (int64_t c = 0; c < width; ++c) {
            sw[c] = sw[c] + pw[c];
            sb[c] = sb[c] + pb[c];
          }
        }
        std::copy(sw, sw + width, dwp + c0);
        std::copy(sb, sb + width, dbp + c0);
      }
    });
  });
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace fusedtx::cpu

TORCH_LIBRARY_IMPL(fusedtx_native, CPU, m) {
  m.impl("layer_norm_forward", &fusedtx::cpu::layer_norm_forward_cpu);
  m.impl("layer_norm_backward", &fusedtx::cpu::layer_norm_backward_cpu);
}
