// Linear on CPU: y = act(a @ b + bias) with the bias + GELU epilogue fused, and the elementwise
// part of its backward. The arithmetic is reference.linear_matmul / reference.linear_bias_act_backward, bit for
// bit: every output element is one float32 accumulator that starts at +0 and takes
// fma(a[i, k], b[k, j], acc) for k ascending; then h = acc + bias[j]; then the activation,
// written operation for operation as in the reference (the extension is compiled with
// -ffp-contract=off, so only the explicit FMA instructions fuse).
//
// The matmul is BLIS-style. b is packed, kKCMax rows x kNCMax columns at a time, into panels of
// kNR = 32 columns (float32, zero-padded columns); a into panels of kMR = 14 rows, k-major. A
// 14 x 32 register-blocked AVX-512 micro-kernel (28 zmm accumulators, one broadcast of a per
// row and k) sweeps the packed block; short row panels take 2 or 4 column panels per call so
// that enough accumulators hide the FMA latency. Between K blocks an element's float32 partial
// is stored and reloaded (exact), so the blocking never changes its arithmetic; after the last
// K block the epilogue runs on the tile while it is in L1. Any strides: packing reads a and b
// where they are (16 x 16 in-register transposes where k is the contiguous axis, e.g. b =
// weight.t()) and converts bfloat16/float16 to float32 on the way; k is never padded. Threads
// share out (row range, column block) tasks and never split K. With at most kSmallMMax rows
// (decode) b is not packed: it is streamed once, transposed in registers where needed.
// Whichever path or tile runs, an element's bits depend on a[i, :] and b[:, j] alone -- not on
// M, the tiling or the thread count.
//
// linear_bias_act_backward streams grad_y / preact row by row: grad_preact = grad_y * act'(preact),
// and each of the fixed row groups adds its rows (as stored) into its own float32 partial row;
// the partials are then summed per column in group order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <utility>
#include <vector>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__FMA__)
#define FUSEDTX_LINEAR_AVX512 1
#endif

namespace fusedtx::cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// The activation (reference.erf_f32, activation_forward, activation_derivative). F is float or
// vfloat; both compute the same bits.
// ---------------------------------------------------------------------------------------------
constexpr int kActNone = 0, kActGelu = 1, kActGeluTanh = 2;  // reference.ACT_*

// The reference's constants are Python floats (doubles) that torch rounds to float32.
constexpr float f32c(double c) { return static_cast<float>(c); }
constexpr float kErfSplit = f32c(0.9);
constexpr float kErfClamp = f32c(4.0);
constexpr float kErfSmallPoly[] = {f32c(-6.1112584e-04), f32c(5.0161984e-03), f32c(-2.6781915e-02),
                                   f32c(1.1282228e-01),  f32c(-3.761253e-01), f32c(1.2837915e-01)};
constexpr float kErfLargePoly[] = {f32c(-5.805502e-08), f32c(1.3905425e-06), f32c(-1.3021138e-05), f32c(4.3403546e-05),
                                   f32c(2.4704504e-04), f32c(-3.844943e-03), f32c(2.4801595e-02),  f32c(-1.0816315e-01),
                                   f32c(-6.332778e-01), f32c(-1.129598e+00), f32c(1.9802191e-04)};
constexpr float kSqrt1_2 = f32c(0.70710678118654752);
constexpr float kInvSqrt2Pi = f32c(0.39894228040143268);
constexpr float kTanhCubic = f32c(0.044715);
constexpr float kTanhCubic3 = f32c(0.134145);
constexpr float kTanhTwoK = f32c(1.5957691216057308);
constexpr float kTanhMaxExpArg = f32c(88.0);

template <typename F>
inline F splat(float c) {
  if constexpr (std::is_same_v<F, float>) {
    return c;
  } else {
    return vsplat(c);
  }
}

template <typename F>
inline F sign_bits(F x, uint32_t mask) {
  if constexpr (std::is_same_v<F, float>) {
    return std::bit_cast<float>(std::bit_cast<uint32_t>(x) & mask);
  } else {
    return __builtin_bit_cast(vfloat, __builtin_bit_cast(vuint, x) & mask);
  }
}
template <typename F>
inline F abs_f(F x) { return sign_bits(x, 0x7fffffffu); }
// torch.copysign(mag, sgn) for a non-negative, non-NaN mag.
template <typename F>
inline F copysign_f(F mag, F sgn) {
  if constexpr (std::is_same_v<F, float>) {
    return std::bit_cast<float>(std::bit_cast<uint32_t>(mag) | (std::bit_cast<uint32_t>(sgn) & 0x80000000u));
  } else {
    return __builtin_bit_cast(vfloat, __builtin_bit_cast(vuint, mag) | (__builtin_bit_cast(vuint, sgn) & 0x80000000u));
  }
}
// x > c ? c : x -- a NaN x stays NaN.
template <typename F>
inline F clamp_above(F x, float c) { return x > c ? splat<F>(c) : x; }

template <typename F, size_t N>
inline F horner(const float (&coeffs)[N], F x) {
  F p = splat<F>(coeffs[0]);
  for (size_t i = 1; i < N; ++i) p = p * x + coeffs[i];
  return p;
}

template <typename F>
inline F erf_f32(F t) {
  const F a = clamp_above(abs_f(t), kErfClamp);
  const F small = t + t * horner(kErfSmallPoly, t * t);
  const F large = copysign_f(splat<F>(1.0f) - exp_f32(horner(kErfLargePoly, a)), t);
  return a < kErfSplit ? small : large;
}

// reference._gelu_tanh_sigmoid: s = 1 / (1 + e), e = exp(-2 sqrt(2/pi) (h + 0.044715 h^3)).
template <typename F>
inline F gelu_tanh_sigmoid(F h, F* e_out) {
  const F h3 = (h * h) * h;
  const F z = clamp_above((h + kTanhCubic * h3) * (-kTanhTwoK), kTanhMaxExpArg);
  const F e = exp_f32(z);
  *e_out = e;
  return splat<F>(1.0f) / (splat<F>(1.0f) + e);
}

template <int kAct, typename F>
inline F activation_forward(F h) {
  if constexpr (kAct == kActGelu) {
    return (0.5f * h) * (splat<F>(1.0f) + erf_f32(h * kSqrt1_2));
  } else if constexpr (kAct == kActGeluTanh) {
    F e;
    return h * gelu_tanh_sigmoid(h, &e);
  } else {
    return h;
  }
}

template <int kAct, typename F>
inline F activation_derivative(F h) {
  if constexpr (kAct == kActGelu) {
    const F cdf = 0.5f * (splat<F>(1.0f) + erf_f32(h * kSqrt1_2));
    const F pdf = exp_f32(-0.5f * (h * h)) * kInvSqrt2Pi;
    return cdf + h * pdf;
  } else if constexpr (kAct == kActGeluTanh) {
    F e;
    const F s = gelu_tanh_sigmoid(h, &e);
    const F slope = kTanhTwoK * (splat<F>(1.0f) + kTanhCubic3 * (h * h));
    return s + ((h * s) * (e * s)) * slope;
  } else {
    return splat<F>(1.0f);
  }
}

template <typename Fn>
void dispatch_activation(int64_t act, const char* op, Fn&& fn) {
  switch (act) {
    case kActNone: fn(std::integral_constant<int, kActNone>{}); break;
    case kActGelu: fn(std::integral_constant<int, kActGelu>{}); break;
    case kActGeluTanh: fn(std::integral_constant<int, kActGeluTanh>{}); break;
    default: TORCH_CHECK(false, op, ": unknown activation code ", act, " (expected 0 none, 1 gelu, 2 gelu_tanh)");
  }
}

// ---------------------------------------------------------------------------------------------
// Conversions. float16/bfloat16 -> float32 is exact; float32 -> T rounds to nearest even exactly
// as torch's .to(dtype) on CPU (vectorised path: a bfloat16 NaN becomes 0xFFFF, a float16 NaN
// keeps its sign).
// ---------------------------------------------------------------------------------------------
template <typename T>
inline float load1(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return *p;
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    return std::bit_cast<float>(static_cast<uint32_t>(p->x) << 16);
  } else {
    return c10::detail::fp16_ieee_to_fp32_value(p->x);
  }
}

inline uint16_t float_to_bf16_bits(float v) {
  if (v != v) return 0xFFFF;
  const uint32_t u = std::bit_cast<uint32_t>(v);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <typename T>
inline void store1(T* p, float v) {
  if constexpr (std::is_same_v<T, float>) {
    *p = v;
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    p->x = float_to_bf16_bits(v);
  } else {
#if defined(__F16C__)
    p->x = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    p->x = c10::detail::fp16_ieee_from_fp32_value(v);
#endif
  }
}

// Grows, never shrinks: one per thread and purpose, so a decode step allocates nothing.
struct Workspace {
  float* ptr = nullptr;
  size_t cap = 0;
  float* get(size_t n) {
    if (n > cap) {
      std::free(ptr);
      cap = std::max<size_t>(n, 2 * cap);
      ptr = static_cast<float*>(std::aligned_alloc(64, (cap * sizeof(float) + 63) / 64 * 64));
      TORCH_CHECK(ptr != nullptr, "fusedtx matmul: out of memory for a packing buffer of ", cap, " floats");
    }
    return ptr;
  }
  ~Workspace() { std::free(ptr); }
};

// ---------------------------------------------------------------------------------------------
// The GEMM.
// ---------------------------------------------------------------------------------------------
constexpr int kMR = 14;            // rows of a micro-tile
constexpr int kNV = 2;             // 16-float vectors across a micro-tile
constexpr int kNR = 16 * kNV;      // columns of a micro-tile
// Cache blocking (tuned on a 2-core Zen 5: 48 KB L1d, 1 MB L2 per core): a kMR x kKCMax panel
// of packed a (21 KB) stays in L1 while it sweeps the kKCMax x kNCMax block of packed b (384 KB)
// in L2. The b block is packed once per K block and task and serves all the task's rows.
constexpr int64_t kKBlock = 128;       // reference.MATMUL_K_BLOCK: k's per FMA chain
constexpr int64_t kKCMax = 3 * kKBlock; // k per packed block (whole chains only)
constexpr int64_t kMCMax = 16 * kMR;   // rows of a per packed block
constexpr int64_t kNCMax = 256;        // columns per task
constexpr int64_t kTaskRowsMax = 1024; // rows per task: bounds the per-thread partials buffer

constexpr int kMaxPanels = 4;
constexpr int64_t kTileLd = kMaxPanels * kNR;  // floats per row of the epilogue's tile
// Column panels per micro-kernel call for a row panel of `rows` rows: at least ~8 accumulators.
constexpr int panels_for_rows(int rows) { return rows <= 3 ? 4 : rows <= 7 ? 2 : 1; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

template <typename T>
struct Problem {
  int64_t M, N, K;
  const T* a;
  int64_t sa0, sa1;
  const T* b;
  int64_t sb0, sb1;
  const float* bias;  // float32, padded to a multiple of kNR, or nullptr
  T* y;               // (M, N) contiguous
  T* preact;          // (M, N) contiguous, or nullptr
};

#if defined(FUSEDTX_LINEAR_AVX512)

inline __mmask16 lane_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1u);
}

template <typename T>
inline __m512 widen16(__m256i raw) {
  if constexpr (std::is_same_v<T, at::Half>) {
    return _mm512_cvtph_ps(raw);
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
}
template <typename T>
inline __m256i narrow16(__m512 v) {
  if constexpr (std::is_same_v<T, at::Half>) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), _mm512_set1_epi32(0xFFFF), r);
    return _mm512_cvtepi32_epi16(r);
  }
}

// 16 elements of T (lanes off the mask read nothing and are +0) as float32.
template <typename T>
inline __m512 load16(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    return widen16<T>(_mm256_maskz_loadu_epi16(m, p));
  }
}
template <typename T>
inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    return widen16<T>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}
template <typename T>
inline void store16(T* p, __m512 v, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, m, v);
  } else {
    _mm256_mask_storeu_epi16(p, m, narrow16<T>(v));
  }
}
// v rounded to T and back (what a store then a load would give).
template <typename T>
inline __m512 round_trip(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return widen16<T>(narrow16<T>(v));
  }
}

// r[i] (i < 16) <- column i of the 16 x 16 matrix whose rows are r[0..15].
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
    r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xDD);
  }
}

// a[i0 : i0 + mc, k0 : k0 + kc] -> ap: panels of kMR rows, each kc x kMR (k-major), rows past
// mc zero.
template <typename T>
void pack_a(const Problem<T>& p, int64_t i0, int64_t mc, int64_t k0, int64_t kc, float* ap) {
  constexpr __mmask16 kPanelMask = (1u << kMR) - 1u;
  for (int64_t ir = 0; ir < mc; ir += kMR) {
    const int rows = static_cast<int>(std::min<int64_t>(kMR, mc - ir));
    float* dst = ap + (ir / kMR) * kc * kMR;
    const T* src = p.a + (i0 + ir) * p.sa0 + k0 * p.sa1;
    if (p.sa1 == 1) {  // k contiguous: 16 x 16 transposes
      for (int64_t k = 0; k < kc; k += 16) {
        const int64_t kn = std::min<int64_t>(16, kc - k);
        const __mmask16 km = lane_mask(kn);
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = i < rows ? load16(src + i * p.sa0 + k, km) : _mm512_setzero_ps();
        transpose16(r);
        for (int64_t kk = 0; kk < kn; ++kk) _mm512_mask_storeu_ps(dst + (k + kk) * kMR, kPanelMask, r[kk]);
      }
    } else if (p.sa0 == 1) {  // rows contiguous
      const __mmask16 rm = lane_mask(rows);
      for (int64_t k = 0; k < kc; ++k) _mm512_mask_storeu_ps(dst + k * kMR, kPanelMask, load16(src + k * p.sa1, rm));
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        for (int r = 0; r < kMR; ++r) dst[k * kMR + r] = r < rows ? load1(src + r * p.sa0 + k * p.sa1) : 0.0f;
      }
    }
  }
}

constexpr int64_t kPrefetchB = 64;  // elements ahead

// b[k0 : k0 + kc, j0 : j0 + nc] -> bp: panels of kNR columns, each kc x kNR, columns past nc zero.
template <typename T>
void pack_b(const Problem<T>& p, int64_t k0, int64_t kc, int64_t j0, int64_t nc, float* bp) {
  if (p.sb1 == 1) {  // rows of b contiguous: copy, each row of the block in one sweep
    const int64_t vecs = round_up(nc, kNR) / 16;
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = p.b + (k0 + k) * p.sb0 + j0;
      float* dst = bp + k * kNR;
      for (int64_t v = 0; v < vecs; ++v) {
        const __m512 x = v * 16 + 16 <= nc ? load16(src + v * 16) : load16(src + v * 16, lane_mask(nc - v * 16));
        _mm512_store_ps(dst + (v / kNV) * kc * kNR + (v % kNV) * 16, x);
      }
    }
    return;
  }
  for (int64_t jr = 0; jr < nc; jr += kNR) {
    const int64_t cols = std::min<int64_t>(kNR, nc - jr);
    float* dst = bp + (jr / kNR) * kc * kNR;
    const T* src = p.b + k0 * p.sb0 + (j0 + jr) * p.sb1;
    if (p.sb0 == 1) {  // columns of b contiguous (b = weight.t()): 16 x 16 transposes
      for (int v = 0; v < kNV; ++v) {
        const int64_t jn = std::clamp<int64_t>(cols - v * 16, 0, 16);
        for (int64_t k = 0; k < kc; k += 16) {
          const int64_t kn = std::min<int64_t>(16, kc - k);
          const __mmask16 km = lane_mask(kn);
          __m512 r[16];
          for (int i = 0; i < 16; ++i) {
            if (i < jn) {
              // 16 row streams at once outrun the hardware prefetcher: fetch a few lines ahead.
              _mm_prefetch(reinterpret_cast<const char*>(src + (v * 16 + i) * p.sb1 + k + kPrefetchB), _MM_HINT_T0);
              r[i] = load16(src + (v * 16 + i) * p.sb1 + k, km);
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
        for (int64_t j = 0; j < kNR; ++j) dst[k * kNR + j] = j < cols ? load1(src + k * p.sb0 + j * p.sb1) : 0.0f;
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

// The epilogue of a rows x cols tile (kTileLd floats per row): h = acc (+ bias), preact = h,
// y = act(h), in T.
template <typename T, int kAct>
void epilogue(const float* tile, int rows, int64_t cols, const float* bias, T* y, T* preact, int64_t ld) {
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
      const __mmask16 m = lane_mask(cols - v * 16);
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

// Few rows (decode): packing b would cost more than the multiply, so b is read where it is.
// a arrives as float32 rows (lda floats apart). Each call covers columns [j0, j1) for all rows.
// b = weight.t() (k contiguous): 16 columns at a time, each 16 x 16 block of b transposed in
// registers and multiplied at once.
template <typename T, int kAct, int MR>
void small_m_kmajor(const Problem<T>& p, const float* a, int64_t lda, int64_t j0, int64_t j1) {
  alignas(64) float tile[kMR * kTileLd];
  for (int64_t j = j0; j < j1; j += 16) {
    const int64_t jn = std::min<int64_t>(16, j1 - j);
    const T* src = p.b + j * p.sb1;
    // The running totals of the kKBlock chains, from +0, in the tile.
    for (int i = 0; i < MR; ++i) _mm512_store_ps(tile + i * kTileLd, _mm512_setzero_ps());
    __m512 acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < p.K; k += 16) {
      const int64_t kn = std::min<int64_t>(16, p.K - k);
      const __mmask16 km = lane_mask(kn);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        if (i < jn) {
          _mm_prefetch(reinterpret_cast<const char*>(src + i * p.sb1 + k + kPrefetchB), _MM_HINT_T0);
          r[i] = kn == 16 ? load16(src + i * p.sb1 + k) : load16(src + i * p.sb1 + k, km);
        } else {
          r[i] = _mm512_setzero_ps();
        }
      }
      transpose16(r);
      if (kn == 16) {
#pragma GCC unroll 16
        for (int kk = 0; kk < 16; ++kk) {
#pragma GCC unroll 16
          for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[i * lda + k + kk]), r[kk], acc[i]);
        }
      } else {
        for (int64_t kk = 0; kk < kn; ++kk) {
          for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[i * lda + k + kk]), r[kk], acc[i]);
        }
      }
      if ((k + kn) % kKBlock == 0 || k + kn == p.K) {  // a chain ends: total = total + acc
        for (int i = 0; i < MR; ++i) {
          _mm512_store_ps(tile + i * kTileLd, _mm512_add_ps(_mm512_load_ps(tile + i * kTileLd), acc[i]));
          acc[i] = _mm512_setzero_ps();
        }
      }
    }
    epilogue<T, kAct>(tile, MR, jn, p.bias ? p.bias + j : nullptr, p.y + j, p.preact ? p.preact + j : nullptr, p.N);
  }
}

// b row-major (columns contiguous, e.g. the backward's weight): NV vectors of columns at a time,
// straight from b's rows.
template <typename T, int kAct, int MR, int NV>
void small_m_nmajor(const Problem<T>& p, const float* a, int64_t lda, int64_t j0, int64_t j1) {
  alignas(64) float tile[kMR * kTileLd];
  static_assert(NV * 16 <= kTileLd);
  constexpr int64_t kAhead = 8;  // rows of b prefetched ahead
  for (int64_t j = j0; j < j1; j += 16 * NV) {
    const int64_t cols = std::min<int64_t>(16 * NV, j1 - j);
    const T* src = p.b + j;
    __m512 acc[MR][NV];
    for (int i = 0; i < MR; ++i) {
      for (int v = 0; v < NV; ++v) {
        acc[i][v] = _mm512_setzero_ps();
        _mm512_store_ps(tile + i * kTileLd + v * 16, _mm512_setzero_ps());  // chain totals, from +0
      }
    }
    __mmask16 masks[NV];
    for (int v = 0; v < NV; ++v) masks[v] = lane_mask(cols - v * 16);
    const bool full = cols == 16 * NV;
    for (int64_t k = 0; k < p.K; ++k) {
      const T* row = src + k * p.sb0;
      for (int v = 0; v < NV * static_cast<int>(sizeof(T)) / 4; ++v) {
        _mm_prefetch(reinterpret_cast<const char*>(row + kAhead * p.sb0) + 64 * v, _MM_HINT_T0);
      }
      __m512 bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = full ? load16(row + v * 16) : load16(row + v * 16, masks[v]);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512 av = _mm512_set1_ps(a[i * lda + k]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
      }
      if ((k + 1) % kKBlock == 0 || k + 1 == p.K) {  // a chain ends: total = total + acc
        for (int i = 0; i < MR; ++i) {
          for (int v = 0; v < NV; ++v) {
            float* t = tile + i * kTileLd + v * 16;
            _mm512_store_ps(t, _mm512_add_ps(_mm512_load_ps(t), acc[i][v]));
            acc[i][v] = _mm512_setzero_ps();
          }
        }
      }
    }
    epilogue<T, kAct>(tile, MR, cols, p.bias ? p.bias + j : nullptr, p.y + j, p.preact ? p.preact + j : nullptr, p.N);
  }
}

constexpr int64_t kSmallMChunk = 128;  // columns per parallel task of the few-rows path
constexpr int64_t kSmallMMax = 8;      // rows up to which b is not packed

template <typename T, int kAct, int MR>
void small_m_columns(const Problem<T>& p, const float* a, int64_t lda, int64_t j0, int64_t j1) {
  if (p.sb0 == 1) {
    small_m_kmajor<T, kAct, MR>(p, a, lda, j0, j1);
  } else {
    small_m_nmajor<T, kAct, MR, (MR <= 2 ? 8 : MR <= 4 ? 4 : 3)>(p, a, lda, j0, j1);
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
      for (int r = 0; r < kMR; ++r) dst[k * kMR + r] = r < rows ? load1(src + r * p.sa0 + k * p.sa1) : 0.0f;
    }
  }
}

template <typename T>
void pack_b(const Problem<T>& p, int64_t k0, int64_t kc, int64_t j0, int64_t nc, float* bp) {
  for (int64_t jr = 0; jr < nc; jr += kNR) {
    const int64_t cols = std::min<int64_t>(kNR, nc - jr);
    float* dst = bp + (jr / kNR) * kc * kNR;
    const T* src = p.b + k0 * p.sb0 + (j0 + jr) * p.sb1;
    for (int64_t k = 0; k < kc; ++k) {
      for (int64_t j = 0; j < kNR; ++j) dst[k * kNR + j] = j < cols ? load1(src + k * p.sb0 + j * p.sb1) : 0.0f;
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
  for (int r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      float h = tile[r * kTileLd + j];
      if (bias) h = h + bias[j];
      if (preact) store1(preact + r * ld + j, h);
      store1(y + r * ld + j, activation_forward<kAct>(h));
    }
  }
}

#endif  // FUSEDTX_LINEAR_AVX512

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

// One task: rows [i_begin, i_end) x columns [j0, j0 + nc), all of K. For each K block, the b
// block is packed once and serves every kMCMax-row block of a.
template <typename T, int kAct>
void gemm_task(const Problem<T>& p, int64_t i_begin, int64_t i_end, int64_t j0, int64_t nc, int64_t kc_max) {
  const int64_t nc_pad = round_up(nc, kNR);
  const int64_t k_blocks = std::max<int64_t>(1, ceil_div(p.K, kc_max));
  const int64_t mc_max = std::min(round_up(kMCMax, kMR), round_up(i_end - i_begin, kMR));
  float* ap = tl_pack_a.get(mc_max * kc_max);
  float* bp = tl_pack_b.get(nc_pad * kc_max);
  // The float32 partials of all the task's rows between K blocks.
  float* part = k_blocks > 1 ? tl_partial.get(round_up(i_end - i_begin, kMR) * nc_pad) : nullptr;
  alignas(64) float tile[kMR * kTileLd];
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    const int64_t k0 = kb * kc_max;
    const int64_t kc = std::min(kc_max, p.K - k0);
    const bool first = kb == 0, last = kb == k_blocks - 1;
    const int64_t b_stride = kc * kNR;
    pack_b(p, k0, kc, j0, nc, bp);
    for (int64_t i0 = i_begin; i0 < i_end; i0 += mc_max) {
      const int64_t mc = std::min(mc_max, i_end - i0);
      pack_a(p, i0, mc, k0, kc, ap);
      for (int64_t ir = 0; ir < mc; ir += kMR) {
        const int rows = static_cast<int>(std::min<int64_t>(kMR, mc - ir));
        const float* a_panel = ap + (ir / kMR) * kc * kMR;
        const int wide = panels_for_rows(rows);
        float* c_rows = part ? part + (i0 - i_begin + ir) * nc_pad : nullptr;
        for (int64_t jr = 0; jr < nc;) {
          const int np = ceil_div(nc - jr, kNR) >= wide ? wide : 1;
          const MicroKernel kernel = np == wide ? kWideKernels[rows - 1] : kOneKernels[rows - 1];
          const float* b_panel = bp + (jr / kNR) * b_stride;
          float* c = c_rows ? c_rows + jr : nullptr;
          if (!last) {
            kernel(kc, a_panel, b_panel, b_stride, first ? nullptr : c, nc_pad, c, nc_pad);
          } else {
            kernel(kc, a_panel, b_panel, b_stride, first ? nullptr : c, nc_pad, tile, kTileLd);
            const int64_t off = (i0 + ir) * p.N + j0 + jr;
            epilogue<T, kAct>(tile, rows, std::min<int64_t>(np * kNR, nc - jr), p.bias ? p.bias + j0 + jr : nullptr,
                              p.y + off, p.preact ? p.preact + off : nullptr, p.N);
          }
          jr += np * kNR;
        }
      }
    }
  }
}

// How the output is cut into tasks: column blocks of at most kNCMax columns over all rows, unless
// that leaves the threads unevenly loaded, then more column blocks, then row groups too. Any cut
// gives the same bits.
struct TaskPlan {
  int64_t rows, cols, row_groups, col_blocks;
};

TaskPlan plan_tasks(int64_t M, int64_t N, int64_t threads) {
  int64_t col_blocks = ceil_div(N, kNCMax), row_groups = ceil_div(M, kTaskRowsMax);
  const int64_t max_col_blocks = ceil_div(N, kNR), max_row_groups = ceil_div(M, kMR);
  while (col_blocks * row_groups < 8 * threads && (col_blocks * row_groups) % threads != 0) {
    if (col_blocks < max_col_blocks) {
      ++col_blocks;
    } else if (row_groups < max_row_groups) {
      ++row_groups;
    } else {
      break;
    }
  }
  TaskPlan t;
  t.cols = round_up(ceil_div(N, col_blocks), kNR);
  t.col_blocks = ceil_div(N, t.cols);
  t.rows = round_up(ceil_div(M, row_groups), kMR);
  t.row_groups = ceil_div(M, t.rows);
  return t;
}

template <typename T, int kAct>
void gemm(const Problem<T>& p) {
  if (p.M == 0 || p.N == 0) return;
#if defined(FUSEDTX_LINEAR_AVX512)
  if (p.M <= kSmallMMax && (p.sb0 == 1 || p.sb1 == 1)) {
    std::vector<float> a_rows;
    const float* a = nullptr;
    int64_t lda = p.K;
    if constexpr (std::is_same_v<T, float>) {
      if (p.sa1 == 1) {
        a = p.a;
        lda = p.sa0;
      }
    }
    if (!a) {
      a_rows.resize(static_cast<size_t>(p.M * p.K));
      for (int64_t i = 0; i < p.M; ++i) {
        for (int64_t k = 0; k < p.K; ++k) a_rows[i * p.K + k] = load1(p.a + i * p.sa0 + k * p.sa1);
      }
      a = a_rows.data();
    }
    at::parallel_for(0, ceil_div(p.N, kSmallMChunk), 1, [&](int64_t begin, int64_t end) {
      const int64_t j0 = begin * kSmallMChunk, j1 = std::min(p.N, end * kSmallMChunk);
      switch (p.M) {
        case 1: small_m_columns<T, kAct, 1>(p, a, lda, j0, j1); break;
        case 2: small_m_columns<T, kAct, 2>(p, a, lda, j0, j1); break;
        case 3: small_m_columns<T, kAct, 3>(p, a, lda, j0, j1); break;
        case 4: small_m_columns<T, kAct, 4>(p, a, lda, j0, j1); break;
        case 5: small_m_columns<T, kAct, 5>(p, a, lda, j0, j1); break;
        case 6: small_m_columns<T, kAct, 6>(p, a, lda, j0, j1); break;
        case 7: small_m_columns<T, kAct, 7>(p, a, lda, j0, j1); break;
        case 8: small_m_columns<T, kAct, 8>(p, a, lda, j0, j1); break;
        default: TORCH_CHECK(false, "fusedtx matmul: internal error, no few-rows kernel for ", p.M, " rows");
      }
    });
    return;
  }
#endif
  // Packed K blocks start at multiples of kKCMax, itself a multiple of kKBlock: every chain
  // lies inside one packed block.
  static_assert(kKCMax % kKBlock == 0);
  const int64_t kc_max = std::clamp<int64_t>(p.K, 1, kKCMax);
  const TaskPlan t = plan_tasks(p.M, p.N, at::get_num_threads());
  at::parallel_for(0, t.row_groups * t.col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rg = task % t.row_groups, cb = task / t.row_groups;
      const int64_t i0 = rg * t.rows, j0 = cb * t.cols;
      gemm_task<T, kAct>(p, i0, std::min(p.M, i0 + t.rows), j0, std::min(t.cols, p.N - j0), kc_max);
    }
  });
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor> linear_matmul_cpu(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                                              int64_t activation, bool save_preact, int64_t k_block) {
  constexpr const char* op = "linear_matmul";
  TORCH_CHECK(k_block == kKBlock, op, ": the CPU kernel sums K in blocks of ", kKBlock, ", asked for ", k_block);
  check_cpu(a, op, "a");
  check_cpu(b, op, "b");
  TORCH_CHECK(a.dim() == 2, op, ": a must be 2-D (M, K), got sizes ", a.sizes());
  TORCH_CHECK(b.dim() == 2, op, ": b must be 2-D (K, N), got sizes ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(0), op, ": a (M, K) and b (K, N) must agree in K, got a ", a.sizes(), " and b ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": a and b must share a dtype, got ", a.scalar_type(), " and ",
              b.scalar_type());
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (bias.has_value()) {
    check_cpu(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == a.scalar_type(), op, ": bias must have a's dtype ", a.scalar_type(), ", got ",
                bias->scalar_type());
  }
  at::Tensor y, preact;
  dispatch_activation(activation, op, [&](auto act_tag) {
    constexpr int kAct = decltype(act_tag)::value;
    dispatch_float_types(a.scalar_type(), op, [&](auto t_tag) {
      using T = decltype(t_tag);
      y = at::empty({M, N}, a.options());
      preact = save_preact && kAct != kActNone ? at::empty({M, N}, a.options()) : at::empty({0}, a.options());
      std::vector<float> bias_f;
      if (bias.has_value()) {
        bias_f.assign(round_up(N, kNR), 0.0f);
        const T* bp = bias->const_data_ptr<T>();
        const int64_t sb = bias->stride(0);
        for (int64_t j = 0; j < N; ++j) bias_f[j] = load1(bp + j * sb);
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
template <typename T, int kAct>
void bias_act_row(const T* gy, const T* pre, T* gp, float* part, int64_t N) {
#if defined(FUSEDTX_LINEAR_AVX512)
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
    const __mmask16 m = lane_mask(N - c);
    __m512 g = load16(gy + c, m);
    if constexpr (kAct != kActNone) {
      const __m512 h = load16(pre + c, m);
      g = _mm512_mul_ps(g, reinterpret_cast<__m512>(activation_derivative<kAct>(reinterpret_cast<vfloat>(h))));
      store16(gp + c, g, m);
      g = round_trip<T>(g);
    }
    if (part) _mm512_mask_storeu_ps(part + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, part + c), g));
  }
#else
  for (int64_t c = 0; c < N; ++c) {
    float g = load1(gy + c);
    if constexpr (kAct != kActNone) {
      store1(gp + c, g * activation_derivative<kAct>(load1(pre + c)));
      g = load1(gp + c);
    }
    if (part) part[c] = part[c] + g;
  }
#endif
}

std::tuple<at::Tensor, at::Tensor> linear_bias_act_backward_cpu(const at::Tensor& grad_y, const std::optional<at::Tensor>& preact,
                                                         int64_t activation, bool need_bias_grad, int64_t groups) {
  constexpr const char* op = "fusedtx linear_bias_act_backward";
  check_cpu(grad_y, op, "grad_y");
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.is_contiguous(), op, ": grad_y must be a contiguous 2-D tensor, got sizes ",
              grad_y.sizes());
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  const int64_t M = grad_y.size(0), N = grad_y.size(1);
  if (activation != kActNone) {
    TORCH_CHECK(preact.has_value(), op, ": preact is required when activation is ", activation);
    check_cpu(*preact, op, "preact");
    TORCH_CHECK(preact->sizes() == grad_y.sizes() && preact->is_contiguous(), op,
                ": preact must be contiguous with grad_y's shape ", grad_y.sizes(), ", got ", preact->sizes());
    TORCH_CHECK(preact->scalar_type() == grad_y.scalar_type(), op, ": preact must have grad_y's dtype ",
                grad_y.scalar_type(), ", got ", preact->scalar_type());
  }
  at::Tensor grad_preact, grad_bias;
  dispatch_activation(activation, op, [&](auto act_tag) {
    constexpr int kAct = decltype(act_tag)::value;
    dispatch_float_types(grad_y.scalar_type(), op, [&](auto t_tag) {
      using T = decltype(t_tag);
      grad_preact = kAct != kActNone ? at::empty_like(grad_y) : at::empty({0}, grad_y.options());
      grad_bias = need_bias_grad ? at::empty({N}, grad_y.options().dtype(at::kFloat))
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
          for (int64_t r = begin; r < end; ++r) bias_act_row<T, kAct>(gy + r * N, pre ? pre + r * N : nullptr, gp ? gp + r * N : nullptr, nullptr, N);
        });
        return;
      }
      // reference.row_group_sum: groups of ceil(M / groups) rows, each group's float32 partial
      // from +0 adding its rows in order, then the partials added in group order from +0. The
      // empty groups at the end (partials +0) are skipped: the total is never -0, so adding +0
      // cannot change it.
      const int64_t per_group = std::max<int64_t>(1, ceil_div(M, groups));
      const int64_t used_groups = ceil_div(M, per_group);
      std::unique_ptr<float[]> partials(new float[used_groups * N]);
      at::parallel_for(0, used_groups, 1, [&](int64_t g_begin, int64_t g_end) {
        for (int64_t g = g_begin; g < g_end; ++g) {
          float* part = partials.get() + g * N;
          std::fill(part, part + N, 0.0f);
          for (int64_t r = g * per_group; r < std::min(M, (g + 1) * per_group); ++r) {
            bias_act_row<T, kAct>(gy + r * N, pre ? pre + r * N : nullptr, gp ? gp + r * N : nullptr, part, N);
          }
        }
      });
      float* gb = grad_bias.mutable_data_ptr<float>();
      constexpr int64_t kCols = 256;
      at::parallel_for(0, ceil_div(N, kCols), 1, [&](int64_t b_begin, int64_t b_end) {
        for (int64_t cb = b_begin; cb < b_end; ++cb) {
          const int64_t c0 = cb * kCols, width = std::min(kCols, N - c0);
          float sum[kCols] = {};
          for (int64_t g = 0; g < used_groups; ++g) {
            const float* part = partials.get() + g * N + c0;
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
