// Rotary position embeddings on CPU (rotate-half layout), as reference.rope_forward / rope_backward.
//
// Elementwise: each (batch, head, token) row of D = 2h elements is rotated with the table row of
// its token's position, y[i] = x[i] c - x[i+h] s and y[i+h] = x[i+h] c + x[i] s (the backward,
// transposed: the signs of the s terms swapped), products rounded, then the sum (-ffp-contract=off:
// no FMA). 16-float vectors over i (common.h), lane-wise IEEE arithmetic: the same bits as the
// scalar spec. Rows spread over threads; no row's arithmetic depends on another's, so neither
// the batch nor the thread count can change bits.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "common.h"

namespace fusedtx::cpu {
namespace {

// The rotation of one pair of vectors (or scalars) of the compute type.
template <bool kTransposed, typename V>
inline void rotate(V x1, V x2, V c, V s, V& y1, V& y2) {
  if constexpr (kTransposed) {
    y1 = x1 * c + x2 * s;
    y2 = x2 * c - x1 * s;
  } else {
    y1 = x1 * c - x2 * s;
    y2 = x2 * c + x1 * s;
  }
}

// kVecLen<A> elements of T as a vector of A, and back (rounding to nearest even). float16 and
// bfloat16 go through the AVX-512 conversions where there are any (common.h: the same roundings
// as the scalar casts; only a NaN's payload may differ, which the contract leaves open).
template <typename A, typename T>
inline Vec<A> load_row(const T* p) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<A, float> && sizeof(T) == 2) return reinterpret_cast<vfloat>(load16<T>(p));
#endif
  return load_as<A>(p);
}
template <typename T, typename A>
inline void store_row(T* p, Vec<A> v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<A, float> && sizeof(T) == 2) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow16<T>(reinterpret_cast<__m512>(v)));
    return;
  }
#endif
  store_as<T, A>(p, v);
}

// One row of h pairs: x and y rows of T, c and s table rows of float; A the compute type.
template <typename T, typename A, bool kTransposed>
void rotate_row(const T* x, T* y, const float* c, const float* s, int64_t h) {
  constexpr int kLen = kVecLen<A>;
  int64_t i = 0;
  for (; i + kLen <= h; i += kLen) {
    Vec<A> y1, y2;
    rotate<kTransposed>(load_row<A>(x + i), load_row<A>(x + h + i), load_as<A>(c + i), load_as<A>(s + i), y1, y2);
    store_row<T, A>(y + i, y1);
    store_row<T, A>(y + h + i, y2);
  }
  for (; i < h; ++i) {
    A y1, y2;
    rotate<kTransposed>(static_cast<A>(x[i]), static_cast<A>(x[h + i]), static_cast<A>(c[i]), static_cast<A>(s[i]), y1,
                        y2);
    y[i] = static_cast<T>(y1);
    y[h + i] = static_cast<T>(y2);
  }
}

void check_rope_args(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                     const char* op) {
  check_device(x, at::kCPU, op, "x");
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0 && (x.size(3) <= 1 || x.stride(3) == 1), op,
              ": x must be 4-D (batch, heads, tokens, head_dim) with an even, contiguous head dim, got sizes ",
              x.sizes(), " strides ", x.strides());
  check_device(positions, at::kCPU, op, "positions");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.dim() == 2 &&
                  positions.size(0) == x.size(0) && positions.size(1) == x.size(2),
              op, ": positions must be a contiguous int64 (batch, tokens) tensor matching x, got ", positions.sizes());
  for (const at::Tensor* t : {&cos, &sin}) {
    check_rows(*t, at::kCPU, op, t == &cos ? "cos" : "sin");
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->size(1) * 2 == x.size(3) && t->sizes() == cos.sizes(), op,
                ": cos and sin must be float32 (max_positions, head_dim / 2), got ", t->scalar_type(), " ", t->sizes());
  }
}

template <bool kTransposed>
at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                    const char* op) {
  check_rope_args(x, positions, cos, sin, op);
  const int64_t batch = x.size(0), heads = x.size(1), tokens = x.size(2), h = x.size(3) / 2;
  const int64_t n_positions = cos.size(0);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t rows = batch * heads * tokens;
  if (rows == 0 || h == 0) return y;
  const int64_t sb = x.stride(0), sh = x.stride(1), st = x.stride(2);
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  const float* cp = cos.const_data_ptr<float>();
  const float* sp = sin.const_data_ptr<float>();
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    at::parallel_for(0, rows, row_grain(2 * h), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / (heads * tokens), head = (r / tokens) % heads, t = r % tokens;
        const int64_t p = pos[b * tokens + t];
        T* out = yp + r * 2 * h;
        if (p < 0 || p >= n_positions) {  // never read outside the table: a NaN row
          for (int64_t i = 0; i < 2 * h; ++i) out[i] = static_cast<T>(std::numeric_limits<A>::quiet_NaN());
          continue;
        }
        rotate_row<T, A, kTransposed>(xp + b * sb + head * sh + t * st, out, cp + p * h, sp + p * h, h);
      }
    });
  };
  if (x.scalar_type() == at::kDouble) {
    run(double{});
  } else {
    dispatch_float_types(x.scalar_type(), op, run);
  }
  return y;
}

at::Tensor rope_forward_cpu(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos,
                            const at::Tensor& sin) {
  return rope_cpu<false>(x, positions, cos, sin, "rope_forward");
}

at::Tensor rope_backward_cpu(const at::Tensor& grad_y, const at::Tensor& positions, const at::Tensor& cos,
                             const at::Tensor& sin) {
  return rope_cpu<true>(grad_y, positions, cos, sin, "rope_backward");
}

}  // namespace
}  // namespace fusedtx::cpu

TORCH_LIBRARY_IMPL(fusedtx_native, CPU, m) {
  m.impl("rope_forward", &fusedtx::cpu::rope_forward_cpu);
  m.impl("rope_backward", &fusedtx::cpu::rope_backward_cpu);
}
