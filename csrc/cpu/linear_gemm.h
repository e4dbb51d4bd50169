// The packed path of the Linear matmul on CPU (linear.cpp drives it): packing, the
// register-blocked micro-kernels and the bias + activation epilogue, in AVX-512, in AVX2 + FMA
// and in portable scalar code (isa.h picks one at compile time), all with the same bits.
//
// Every output element is one float32 FMA chain from +0 per block of kKBlock k's, k ascending,
// the block sums added in order (reference.linear_matmul; docs/design.md, "Matmul K blocks").
// b is packed into panels of kNR columns (float32, zero-padded columns), a into panels of kMR
// rows, k-major; k is never padded. The tile shape is the instruction set's; an element's
// arithmetic is the same in every one:
//   AVX-512 (and the scalar code, with the same layouts): 14 x 32, 28 zmm accumulators.
//   AVX2: 6 x 16, 12 of the 16 ymm registers accumulate, 2 hold b and 1 a broadcast of a.
// The micro-kernel broadcasts one element of a per row and k; short row panels take 2 or 4
// column panels per call so that enough accumulators hide the FMA latency. Any strides:
// packing reads a and b where they are (in-register transposes, 16 x 16 or 8 x 8, where k is
// the contiguous axis, e.g. b = weight.t()) and converts bfloat16/float16 to float32 on the way.
//
// A part of linear.cpp, included there only: like activations.h, it keeps its functions in an
// unnamed namespace, so that they are local to that file (GCC inlines and clones them as it
// would file-local code, and no call goes through the PLT).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <utility>

#include "activations.h"
#include "common.h"

namespace fusedtx::cpu {
namespace {

#if defined(FUSEDTX_AVX2)
constexpr int kLanes = 8;          // floats per vector register (ymm)
constexpr int kMR = 6;             // rows of a micro-tile
#else
constexpr int kLanes = 16;         // floats per vector register (zmm; the scalar code's layouts)
constexpr int kMR = 14;            // rows of a micro-tile
#endif
constexpr int kNV = 2;             // vectors across a micro-tile
constexpr int kNR = kLanes * kNV;  // columns of a micro-tile
// Cache blocking, sized for a core with 48 KB of L1d and 1 MB of L2 (Zen 5): a kMR x kKCMax
// panel of packed a (21 KB) stays in L1 while it sweeps the kKCMax x kNCMax block of packed b
// (384 KB) in L2. The b block is packed once per K block and task and serves all the task's rows.
constexpr int64_t kKBlock = 128;       // reference.MATMUL_K_BLOCK: k's per FMA chain
#if defined(FUSEDTX_AVX2)
// AVX2 (32 KB L1d on the hosts measured): a kKCMax x kNR panel of packed b (16 KB) stays in L1
// while the row panels of the packed a block (96 KB, in L2) stream past it, column panel outer.
constexpr int64_t kKCMax = 2 * kKBlock; // k per packed block (whole chains only)
constexpr bool kColumnPanelOuter = true;
#else
constexpr int64_t kKCMax = 3 * kKBlock; // k per packed block (whole chains only)
constexpr bool kColumnPanelOuter = false;
#endif
constexpr int64_t kMCMax = 16 * kMR;   // rows of a per packed block
constexpr int64_t kNCMax = 256;        // columns per packed b block (a task's column sub-block)
constexpr int64_t kTaskRowsMax = 1024; // rows per task: bounds the per-thread partials buffer

constexpr int kMaxPanels = 4;
constexpr int64_t kTileLd = kMaxPanels * kNR;  // floats per row of the epilogue's tile
// Column panels per micro-kernel call for a row panel of `rows` rows: at least ~8 accumulators
// (and, for AVX2, at most 12, which leave registers for b and a).
#if defined(FUSEDTX_AVX2)
constexpr int panels_for_rows(int rows) { return rows <= 1 ? 4 : rows <= 2 ? 2 : 1; }
#else
constexpr int panels_for_rows(int rows) { return rows <= 3 ? 4 : rows <= 7 ? 2 : 1; }
#endif

template <typename T>
struct Problem {
  int64_t M, N, K;
  const T* a;
  int64_t sa0, sa1;
  const T* b;
  int64_t sb0, sb1;
  // nullptr, or b is two tensors of one shape and strides interleaved along pair_dim: the
  // operand's row k is b's row k / 2 for even k and b_odd's for odd k (pair_dim 0), or its column
  // j is b's or b_odd's column j / 2 by j's parity (pair_dim 1). sb0 and sb1 are both halves'.
  const T* b_odd;
  int pair_dim;
  const float* bias;  // float32, padded to a multiple of kNR, or nullptr
  T* y;               // (M, N) contiguous; (M, N / 2) for SwiGLU
  T* preact;          // (M, N) contiguous, or nullptr
};

// The address of the operand b's element (k, j).
template <typename T>
inline const T* b_at(const Problem<T>& p, int64_t k, int64_t j) {
  if (p.b_odd == nullptr) return p.b + k * p.sb0 + j * p.sb1;
  if (p.pair_dim == 0) return ((k & 1) ? p.b_odd : p.b) + (k >> 1) * p.sb0 + j * p.sb1;
  return ((j & 1) ? p.b_odd : p.b) + k * p.sb0 + (j >> 1) * p.sb1;
}
// The columns j + i of the operand b from row k on, for an even j: column j + i starts at
// at(i), one base pointer for the even i's and one for the odd ones, a fixed step apart (b's
// columns two apart, or, for a pair, b's and b_odd's consecutive ones). With i a compile-time
// constant, at(i) is one address computation: no array of column pointers for GCC to spill.
template <typename T>
struct Columns {
  const T* even;
  const T* odd;
  int64_t step;
  const T* at(int i) const { return ((i & 1) ? odd : even) + (i >> 1) * step; }
};
template <typename T>
inline Columns<T> columns_at(const Problem<T>& p, int64_t k, int64_t j) {
  return {b_at(p, k, j), b_at(p, k, j + 1), (p.b_odd != nullptr && p.pair_dim == 1 ? 1 : 2) * p.sb1};
}

// Whether each row (k) of the operand b is contiguous in j, or each column (j) in k.
template <typename T>
inline bool b_rows_contiguous(const Problem<T>& p) {
  return p.sb1 == 1 && (p.b_odd == nullptr || p.pair_dim == 0);
}
template <typename T>
inline bool b_columns_contiguous(const Problem<T>& p) {
  return p.sb0 == 1 && (p.b_odd == nullptr || p.pair_dim == 1);
}

#if defined(FUSEDTX_AVX512)

// a[i0 : i0 + mc, k0 : k0 + kc] -> ap: panels of kMR rows, each kc x kMR (k-major), rows past
// mc zero.
template <typename T>
void pack_a(const Problem<T>& p, int64_t i0, int64_t mc, int64_t k0, int64_t kc, float* ap) {
  constexpr mask16 kPanelMask = (1u << kMR) - 1u;
  if (p.sa0 == 1 && p.sa1 != 1) {  // rows contiguous (a = dy.t() in a weight gradient): row k of the block
    // at a time, one sequential read, into every panel (a panel at a time would read kc rows
    // far apart for kMR floats each: a TLB miss per k).
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = p.a + i0 + (k0 + k) * p.sa1;
      for (int64_t ir = 0; ir < mc; ir += kMR) {
        const __m512 v = load16(src + ir, first_lanes(std::min<int64_t>(kMR, mc - ir)));
        _mm512_mask_storeu_ps(ap + (ir / kMR) * kc * kMR + k * kMR, kPanelMask, v);
      }
    }
    return;
  }
  for (int64_t ir = 0; ir < mc; ir += kMR) {
    const int rows = static_cast<int>(std::min<int64_t>(kMR, mc - ir));
    float* dst = ap + (ir / kMR) * kc * kMR;
    const T* src = p.a + (i0 + ir) * p.sa0 + k0 * p.sa1;
    if (p.sa1 == 1) {  // k contiguous: 16 x 16 transposes
      for (int64_t k = 0; k < kc; k += 16) {
        const int64_t kn = std::min<int64_t>(16, kc - k);
        const mask16 km = first_lanes(kn);
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = i < rows ? load16(src + i * p.sa0 + k, km) : _mm512_setzero_ps();
        transpose16(r);
        for (int64_t kk = 0; kk < kn; ++kk) _mm512_mask_storeu_ps(dst + (k + kk) * kMR, kPanelMask, r[kk]);
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        for (int r = 0; r < kMR; ++r) dst[k * kMR + r] = r < rows ? to_float(src[r * p.sa0 + k * p.sa1]) : 0.0f;
      }
    }
  }
}

constexpr int64_t kPrefetchB = 64;  // elements ahead

// b[k0 : k0 + kc, j0 : j0 + nc] -> bp: panels of kNR columns, each kc x kNR, columns past nc zero.
template <typename T>
void pack_b(const Problem<T>& p, int64_t k0, int64_t kc, int64_t j0, int64_t nc, float* bp) {
  if (b_rows_contiguous(p)) {  // rows of b contiguous: copy, each row of the block in one sweep
    const int64_t vecs = round_up(nc, kNR) / 16;
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = b_at(p, k0 + k, j0);
      float* dst = bp + k * kNR;
      for (int64_t v = 0; v < vecs; ++v) {
        const __m512 x = v * 16 + 16 <= nc ? load16(src + v * 16) : load16(src + v * 16, first_lanes(nc - v * 16));
        _mm512_store_ps(dst + (v / kNV) * kc * kNR + (v % kNV) * 16, x);
      }
    }
    return;
  }
  for (int64_t jr = 0; jr < nc; jr += kNR) {
    const int64_t cols = std::min<int64_t>(kNR, nc - jr);
    float* dst = bp + (jr / kNR) * kc * kNR;
    if (b_columns_contiguous(p)) {  // columns of b contiguous (b = weight.t()): 16 x 16 transposes
      for (int v = 0; v < kNV; ++v) {
        const int64_t jn = std::clamp<int64_t>(cols - v * 16, 0, 16);
        const Columns<T> col = columns_at(p, k0, j0 + jr + v * 16);
        for (int64_t k = 0; k < kc; k += 16) {
          const int64_t kn = std::min<int64_t>(16, kc - k);
          const mask16 km = first_lanes(kn);
          __m512 r[16];
          for (int i = 0; i < 16; ++i) {
            if (i < jn) {
              // 16 row streams at once outrun the hardware prefetcher: fetch a few lines ahead.
              _mm_prefetch(reinterpret_cast<const char*>(col.at(i) + k + kPrefetchB), _MM_HINT_T0);
              r[i] = load16(col.at(i) + k, km);
            } else {
              r[i] = _mm512_setzero_ps();
            }
          }
          transpose16(r);
          for (int64_t kk = 0; kk < kn; ++kk) _mm512_store_ps(dst + (k + kk) * kNR + v * 16, r[kk]);
        }
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        for (int64_t j = 0; j < kNR; ++j) dst[k * kNR + j] = j < cols ? to_float(*b_at(p, k0 + k, j0 + jr + j)) : 0.0f;
      }
    }
  }
}

// The k's [k0, k0 + kc) of one packed K block, k0 a multiple of kKBlock: an MR x (NP * kNR)
// tile. Per block of kKBlock k's (reference.linear_matmul): acc from +0, acc = fma(a[k][r], b[k][j],
// acc) for k ascending, then total = total + acc -- total read from cin (nullptr: +0) for the
// first block and from cout after, and written to cout. a: a kMR-row panel (kMR floats per k);
// b: NP consecutive kNR-column panels, b_stride floats apart. Short row panels take several
// column panels at once, so that enough independent accumulators hide the FMA latency.
template <int MR, int NP>
void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b, int64_t b_stride, const float* cin,
                  int64_t ldcin, float* cout, int64_t ldcout) {
  constexpr int NV = NP * kNV;
  const float* total = cin;
  int64_t ld_total = ldcin;
  int64_t k = 0;
  do {
    const int64_t k_end = std::min(kc, k + kKBlock);
    __m512 acc[MR][NV];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    }
    for (; k < k_end; ++k) {
      __m512 bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = _mm512_load_ps(b + (v / kNV) * b_stride + (v % kNV) * 16);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
      }
      a += kMR;
      b += kNR;
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const __m512 t = total ? _mm512_loadu_ps(total + r * ld_total + v * 16) : _mm512_setzero_ps();
        _mm512_storeu_ps(cout + r * ldcout + v * 16, _mm512_add_ps(t, acc[r][v]));
      }
    }
    total = cout;
    ld_total = ldcout;
  } while (k < kc);
}

// Gate/up pairs: the even and odd elements of two vectors (32 consecutive columns), and back.
inline void deinterleave(__m512 lo, __m512 hi, __m512* even, __m512* odd) {
  const __m512i even_idx = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd_idx = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  *even = _mm512_permutex2var_ps(lo, even_idx, hi);
  *odd = _mm512_permutex2var_ps(lo, odd_idx, hi);
}
inline void interleave(__m512 even, __m512 odd, __m512* lo, __m512* hi) {
  const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  *lo = _mm512_permutex2var_ps(even, lo_idx, odd);
  *hi = _mm512_permutex2var_ps(even, hi_idx, odd);
}

// The SwiGLU epilogue of a rows x cols tile (cols even: whole gate/up pairs): h = acc (+ bias),
// preact = h (ld floats per row), y = swiglu(pairs) (ld / 2 per row), 16 pairs at a time.
template <typename T>
void swiglu_epilogue(const float* tile, int rows, int64_t cols, const float* bias, T* y, T* preact, int64_t ld) {
  for (int r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += 32) {
      const int64_t n = std::min<int64_t>(32, cols - c);
      const mask16 m0 = first_lanes(std::min<int64_t>(16, n)), m1 = first_lanes(std::max<int64_t>(0, n - 16));
      __m512 h0 = _mm512_maskz_loadu_ps(m0, tile + r * kTileLd + c);
      __m512 h1 = _mm512_maskz_loadu_ps(m1, tile + r * kTileLd + c + 16);
      if (bias) {
        h0 = _mm512_add_ps(h0, _mm512_maskz_loadu_ps(m0, bias + c));
        h1 = _mm512_add_ps(h1, _mm512_maskz_loadu_ps(m1, bias + c + 16));
      }
      if (preact) {
        store16(preact + r * ld + c, h0, m0);
        store16(preact + r * ld + c + 16, h1, m1);
      }
      __m512 g, u;
      deinterleave(h0, h1, &g, &u);
      const vfloat out = swiglu_forward(reinterpret_cast<vfloat>(g), reinterpret_cast<vfloat>(u));
      store16(y + r * (ld / 2) + c / 2, reinterpret_cast<__m512>(out), first_lanes(n / 2));
    }
  }
}

// The epilogue of a rows x cols tile (kTileLd floats per row): h = acc (+ bias), preact = h,
// y = act(h), in T (for SwiGLU, y at out_offset: swiglu_epilogue).
template <typename T, int kAct>
void epilogue(const float* tile, int rows, int64_t cols, const float* bias, T* y, T* preact, int64_t ld) {
  if constexpr (kAct == kActSwiglu) {
    swiglu_epilogue(tile, rows, cols, bias, y, preact, ld);
    return;
  }
  int r = 0;
  if constexpr (kAct != kActNone) {
    if (cols % 32 == 0) {
      // Two rows x two vectors at a time: four independent erf/exp chains in flight.
      for (; r + 2 <= rows; r += 2) {
        for (int v = 0; v * 16 < cols; v += 2) {
          __m512 h[4];
          for (int q = 0; q < 4; ++q) {
            h[q] = _mm512_load_ps(tile + (r + q / 2) * kTileLd + (v + q % 2) * 16);
            if (bias) h[q] = _mm512_add_ps(h[q], _mm512_loadu_ps(bias + (v + q % 2) * 16));
            if (preact) store16(preact + (r + q / 2) * ld + (v + q % 2) * 16, h[q], 0xFFFF);
          }
          const vfloat y0 = activation_forward<kAct>(reinterpret_cast<vfloat>(h[0]));
          const vfloat y1 = activation_forward<kAct>(reinterpret_cast<vfloat>(h[1]));
          const vfloat y2 = activation_forward<kAct>(reinterpret_cast<vfloat>(h[2]));
          const vfloat y3 = activation_forward<kAct>(reinterpret_cast<vfloat>(h[3]));
          store16(y + r * ld + v * 16, reinterpret_cast<__m512>(y0), 0xFFFF);
          store16(y + r * ld + (v + 1) * 16, reinterpret_cast<__m512>(y1), 0xFFFF);
          store16(y + (r + 1) * ld + v * 16, reinterpret_cast<__m512>(y2), 0xFFFF);
          store16(y + (r + 1) * ld + (v + 1) * 16, reinterpret_cast<__m512>(y3), 0xFFFF);
        }
      }
    }
  }
  for (; r < rows; ++r) {
    for (int v = 0; v * 16 < cols; ++v) {
      const mask16 m = first_lanes(cols - v * 16);
      __m512 h = _mm512_load_ps(tile + r * kTileLd + v * 16);
      if (bias) h = _mm512_add_ps(h, _mm512_loadu_ps(bias + v * 16));
      if (preact) store16(preact + r * ld + v * 16, h, m);
      if constexpr (kAct != kActNone) {
        h = reinterpret_cast<__m512>(activation_forward<kAct>(reinterpret_cast<vfloat>(h)));
      }
      store16(y + r * ld + v * 16, h, m);
    }
  }
}

#elif defined(FUSEDTX_AVX2)

static_assert(kMR <= 8, "pack_a keeps the first kMR rows of an 8 x 8 transpose");

// The first N floats of v to p (N <= 8: a packed a panel's kMR rows).
template <int N>
inline void store_first(float* p, __m256 v) {
  if constexpr (N == 8) {
    _mm256_storeu_ps(p, v);
  } else if constexpr (N == 4) {
    _mm_storeu_ps(p, _mm256_castps256_ps128(v));
  } else if constexpr (N == 6) {
    _mm_storeu_ps(p, _mm256_castps256_ps128(v));
    _mm_storel_pi(reinterpret_cast<__m64*>(p + 4), _mm256_extractf128_ps(v, 1));
  } else {
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (int i = 0; i < N; ++i) p[i] = t[i];
  }
}

// a[i0 : i0 + mc, k0 : k0 + kc] -> ap: panels of kMR rows, each kc x kMR (k-major), rows past
// mc zero.
template <typename T>
void pack_a(const Problem<T>& p, int64_t i0, int64_t mc, int64_t k0, int64_t kc, float* ap) {
  if (p.sa0 == 1 && p.sa1 != 1) {  // rows contiguous (a = dy.t() in a weight gradient): row k of the block
    // at a time, one sequential read, into every panel (a panel at a time would read kc rows
    // far apart for kMR floats each: a TLB miss per k).
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = p.a + i0 + (k0 + k) * p.sa1;
      for (int64_t ir = 0; ir < mc; ir += kMR) {
        const __m256 v = ir + 8 <= mc ? load8(src + ir) : load8(src + ir, mc - ir);
        store_first<kMR>(ap + (ir / kMR) * kc * kMR + k * kMR, v);
      }
    }
    return;
  }
  for (int64_t ir = 0; ir < mc; ir += kMR) {
    const int rows = static_cast<int>(std::min<int64_t>(kMR, mc - ir));
    float* dst = ap + (ir / kMR) * kc * kMR;
    const T* src = p.a + (i0 + ir) * p.sa0 + k0 * p.sa1;
    if (p.sa1 == 1) {  // k contiguous: 8 x 8 transposes (rows kMR ... 7 zero)
      int64_t k = 0;
      if (rows == kMR) {
        for (; k + 8 <= kc; k += 8) {
          __m256 r[8];
#pragma GCC unroll 8
          for (int i = 0; i < 8; ++i) r[i] = i < kMR ? load8(src + i * p.sa0 + k) : _mm256_setzero_ps();
          transpose8(r);
#pragma GCC unroll 8
          for (int kk = 0; kk < 8; ++kk) store_first<kMR>(dst + (k + kk) * kMR, r[kk]);
        }
      }
      for (; k < kc; k += 8) {
        const int64_t kn = std::min<int64_t>(8, kc - k);
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = i < rows ? load8(src + i * p.sa0 + k, kn) : _mm256_setzero_ps();
        transpose8(r);
        for (int64_t kk = 0; kk < kn; ++kk) store_first<kMR>(dst + (k + kk) * kMR, r[kk]);
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        for (int r = 0; r < kMR; ++r) dst[k * kMR + r] = r < rows ? to_float(src[r * p.sa0 + k * p.sa1]) : 0.0f;
      }
    }
  }
}

constexpr int64_t kPrefetchRows = 8;  // rows of b ahead

// b[k0 : k0 + kc, j0 : j0 + nc] -> bp: panels of kNR columns, each kc x kNR, columns past nc zero.
template <typename T>
void pack_b(const Problem<T>& p, int64_t k0, int64_t kc, int64_t j0, int64_t nc, float* bp) {
  if (b_rows_contiguous(p)) {  // rows of b contiguous: copy, each row of the block in one sweep
    const int64_t vecs = round_up(nc, kNR) / kLanes;
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = b_at(p, k0 + k, j0);
      float* dst = bp + k * kNR;
      // Rows far apart (b = a weight of many columns) defeat the hardware prefetcher: each
      // row's lines are fetched kPrefetchRows rows ahead.
      if (k + kPrefetchRows < kc) {
        const T* ahead = b_at(p, k0 + k + kPrefetchRows, j0);
        for (int64_t j = 0; j < nc; j += 64 / static_cast<int64_t>(sizeof(T)))
          _mm_prefetch(reinterpret_cast<const char*>(ahead + j), _MM_HINT_T0);
      }
      for (int64_t v = 0; v < vecs; ++v) {
        const int64_t j = v * kLanes;
        const __m256 x = j + kLanes <= nc ? load8(src + j) : load8(src + j, nc - j);
        _mm256_store_ps(dst + (v / kNV) * kc * kNR + (v % kNV) * kLanes, x);
      }
    }
    return;
  }
  for (int64_t jr = 0; jr < nc; jr += kNR) {
    const int64_t cols = std::min<int64_t>(kNR, nc - jr);
    float* dst = bp + (jr / kNR) * kc * kNR;
    if (b_columns_contiguous(p)) {  // columns of b contiguous (b = weight.t()): 8 x 8 transposes
      for (int v = 0; v < kNV; ++v) {
        const int64_t jn = std::clamp<int64_t>(cols - v * kLanes, 0, kLanes);
        const Columns<T> col = columns_at(p, k0, j0 + jr + v * kLanes);
        int64_t k = 0;
        if (jn == 8) {
          for (; k + 8 <= kc; k += 8) {
            __m256 r[8];
#pragma GCC unroll 8
            for (int i = 0; i < 8; ++i) r[i] = load8(col.at(i) + k);
            transpose8(r);
#pragma GCC unroll 8
            for (int kk = 0; kk < 8; ++kk) _mm256_store_ps(dst + (k + kk) * kNR + v * kLanes, r[kk]);
          }
        }
        for (; k < kc; k += 8) {
          const int64_t kn = std::min<int64_t>(8, kc - k);
          __m256 r[8];
          for (int i = 0; i < 8; ++i) r[i] = i < jn ? load8(col.at(i) + k, kn) : _mm256_setzero_ps();
          transpose8(r);
          for (int64_t kk = 0; kk < kn; ++kk) _mm256_store_ps(dst + (k + kk) * kNR + v * kLanes, r[kk]);
        }
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        for (int64_t j = 0; j < kNR; ++j) dst[k * kNR + j] = j < cols ? to_float(*b_at(p, k0 + k, j0 + jr + j)) : 0.0f;
      }
    }
  }
}

// The AVX-512 micro_kernel's contract and arithmetic on 8-lane vectors: the k's [k0, k0 + kc)
// of one packed K block, k0 a multiple of kKBlock, as an MR x (NP * kNR) tile; per block of
// kKBlock k's acc from +0, acc = fma(a[k][r], b[k][j], acc) for k ascending, then
// total = total + acc (total from cin, nullptr: +0, for the first block, from cout after),
// written to cout.
template <int MR, int NP>
void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b, int64_t b_stride, const float* cin,
                  int64_t ldcin, float* cout, int64_t ldcout) {
  constexpr int NV = NP * kNV;
  const float* total = cin;
  int64_t ld_total = ldcin;
  int64_t k = 0;
  do {
    const int64_t k_end = std::min(kc, k + kKBlock);
    __m256 acc[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
    }
#pragma GCC unroll 4
    for (; k < k_end; ++k) {
      __m256 bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = _mm256_load_ps(b + (v / kNV) * b_stride + (v % kNV) * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m256 av = _mm256_broadcast_ss(a + r);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
      }
      a += kMR;
      b += kNR;
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const __m256 t = total ? _mm256_loadu_ps(total + r * ld_total + v * kLanes) : _mm256_setzero_ps();
        _mm256_storeu_ps(cout + r * ldcout + v * kLanes, _mm256_add_ps(t, acc[r][v]));
      }
    }
    total = cout;
    ld_total = ldcout;
  } while (k < kc);
}

// The epilogues and the backward's rows work on RVec<float>: one ymm, 8 lanes (a 16-lane vfloat
// has no machine mode without AVX-512: GCC would keep it in memory). Each lane computes what
// any other vector width does: the same bits.
using R8 = RVec<float>;
static_assert(sizeof(R8) == sizeof(__m256));
inline R8 r8(__m256 v) { return __builtin_bit_cast(R8, v); }
inline __m256 m256(R8 v) { return __builtin_bit_cast(__m256, v); }

// The first n (<= 8) elements of T at p as float32, +0 beyond; nothing past p + n is read.
template <typename T>
inline __m256 load_upto8(const T* p, int64_t n) {
  return n >= 8 ? load8(p) : load8(p, n);
}

// Gate/up pairs: the even and odd elements of 16 consecutive columns (two ymm), and back.
inline void deinterleave(__m256 lo, __m256 hi, __m256* even, __m256* odd) {
  // shuffle: [x0 x2 y0 y2 | x4 x6 y4 y6]; the 64-bit permute puts the x pairs before the y ones.
  *even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0x88)), 0xD8));
  *odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0xDD)), 0xD8));
}
inline void interleave(__m256 even, __m256 odd, __m256* lo, __m256* hi) {
  const __m256 a = _mm256_unpacklo_ps(even, odd), b = _mm256_unpackhi_ps(even, odd);  // [e0 o0 e1 o1 | e4 o4 e5 o5]
  *lo = _mm256_permute2f128_ps(a, b, 0x20);
  *hi = _mm256_permute2f128_ps(a, b, 0x31);
}

// The SwiGLU epilogue of a rows x cols tile (cols even: whole gate/up pairs): h = acc (+ bias),
// preact = h (ld floats per row), y = swiglu(pairs) (ld / 2 per row), 8 pairs at a time.
template <typename T>
void swiglu_epilogue(const float* tile, int rows, int64_t cols, const float* bias, T* y, T* preact, int64_t ld) {
  for (int r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += 16) {
      const int64_t n = std::min<int64_t>(16, cols - c);
      __m256 h[2];
      for (int q = 0; q < 2; ++q) {
        const int64_t nq = n - 8 * q;
        h[q] = load_upto8(tile + r * kTileLd + c + 8 * q, nq);
        if (bias) h[q] = _mm256_add_ps(h[q], load_upto8(bias + c + 8 * q, nq));
        if (preact && nq > 0) store8(preact + r * ld + c + 8 * q, h[q], nq);
      }
      __m256 g, u;
      deinterleave(h[0], h[1], &g, &u);
      store8(y + r * (ld / 2) + c / 2, m256(swiglu_forward(r8(g), r8(u))), n / 2);
    }
  }
}

// The epilogue of a rows x cols tile (kTileLd floats per row): h = acc (+ bias), preact = h,
// y = act(h), in T (for SwiGLU, y at out_offset: swiglu_epilogue). Two ymm at a time where
// the activation has long erf/exp chains, so that two are in flight.
template <typename T, int kAct>
void epilogue(const float* tile, int rows, int64_t cols, const float* bias, T* y, T* preact, int64_t ld) {
  if constexpr (kAct == kActSwiglu) {
    swiglu_epilogue(tile, rows, cols, bias, y, preact, ld);
    return;
  }
  for (int r = 0; r < rows; ++r) {
    int64_t c = 0;
    if constexpr (kAct != kActNone) {
      for (; c + 16 <= cols; c += 16) {
        __m256 h0 = _mm256_load_ps(tile + r * kTileLd + c), h1 = _mm256_load_ps(tile + r * kTileLd + c + 8);
        if (bias) {
          h0 = _mm256_add_ps(h0, _mm256_loadu_ps(bias + c));
          h1 = _mm256_add_ps(h1, _mm256_loadu_ps(bias + c + 8));
        }
        if (preact) {
          store8(preact + r * ld + c, h0);
          store8(preact + r * ld + c + 8, h1);
        }
        const R8 y0 = activation_forward<kAct>(r8(h0)), y1 = activation_forward<kAct>(r8(h1));
        store8(y + r * ld + c, m256(y0));
        store8(y + r * ld + c + 8, m256(y1));
      }
    }
    for (; c < cols; c += 8) {
      const int64_t n = cols - c;
      __m256 h = _mm256_load_ps(tile + r * kTileLd + c);
      if (bias) h = _mm256_add_ps(h, load_upto8(bias + c, n));
      if (preact) store8(preact + r * ld + c, h, n);
      if constexpr (kAct != kActNone) h = m256(activation_forward<kAct>(r8(h)));
      store8(y + r * ld + c, h, n);
    }
  }
}

#else  // portable fallback: the same packed layouts, scalar std::fma

template <typename T>
void pack_a(const Problem<T>& p, int64_t i0, int64_t mc, int64_t k0, int64_t kc, float* ap) {
  for (int64_t ir = 0; ir < mc; ir += kMR) {
    const int rows = static_cast<int>(std::min<int64_t>(kMR, mc - ir));
    float* dst = ap + (ir / kMR) * kc * kMR;
    const T* src = p.a + (i0 + ir) * p.sa0 + k0 * p.sa1;
    for (int64_t k = 0; k < kc; ++k) {
      for (int r = 0; r < kMR; ++r) dst[k * kMR + r] = r < rows ? to_float(src[r * p.sa0 + k * p.sa1]) : 0.0f;
    }
  }
}

template <typename T>
void pack_b(const Problem<T>& p, int64_t k0, int64_t kc, int64_t j0, int64_t nc, float* bp) {
  for (int64_t jr = 0; jr < nc; jr += kNR) {
    const int64_t cols = std::min<int64_t>(kNR, nc - jr);
    float* dst = bp + (jr / kNR) * kc * kNR;
    for (int64_t k = 0; k < kc; ++k) {
      for (int64_t j = 0; j < kNR; ++j) dst[k * kNR + j] = j < cols ? to_float(*b_at(p, k0 + k, j0 + jr + j)) : 0.0f;
    }
  }
}

template <int MR, int NP>
void micro_kernel(int64_t kc, const float* a, const float* b, int64_t b_stride, const float* cin, int64_t ldcin,
                  float* cout, int64_t ldcout) {
  for (int p = 0; p < NP; ++p) {
    const float* total = cin ? cin + p * kNR : nullptr;
    int64_t ld_total = ldcin;
    int64_t k = 0;
    do {
      const int64_t k_end = std::min(kc, k + kKBlock);
      float acc[MR][kNR] = {};
      for (; k < k_end; ++k) {
        for (int r = 0; r < MR; ++r) {
          for (int j = 0; j < kNR; ++j) acc[r][j] = std::fma(a[k * kMR + r], b[p * b_stride + k * kNR + j], acc[r][j]);
        }
      }
      for (int r = 0; r < MR; ++r) {
        for (int j = 0; j < kNR; ++j) {
          const float t = total ? total[r * ld_total + j] : 0.0f;
          cout[r * ldcout + p * kNR + j] = t + acc[r][j];
        }
      }
      total = cout + p * kNR;
      ld_total = ldcout;
    } while (k < kc);
  }
}

template <typename T, int kAct>
void epilogue(const float* tile, int rows, int64_t cols, const float* bias, T* y, T* preact, int64_t ld) {
  if constexpr (kAct == kActSwiglu) {  // y (ld / 2 per row) at out_offset: one output per pair
    for (int r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; j += 2) {
        float g = tile[r * kTileLd + j], u = tile[r * kTileLd + j + 1];
        if (bias) {
          g = g + bias[j];
          u = u + bias[j + 1];
        }
        if (preact) {
          store1(preact + r * ld + j, g);
          store1(preact + r * ld + j + 1, u);
        }
        store1(y + r * (ld / 2) + j / 2, swiglu_forward(g, u));
      }
    }
    return;
  }
  for (int r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      float h = tile[r * kTileLd + j];
      if (bias) h = h + bias[j];
      if (preact) store1(preact + r * ld + j, h);
      store1(y + r * ld + j, activation_forward<kAct>(h));
    }
  }
}

#endif  // FUSEDTX_AVX512, FUSEDTX_AVX2

}  // namespace
}  // namespace fusedtx::cpu
