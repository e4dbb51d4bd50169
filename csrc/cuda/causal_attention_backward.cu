// Causal attention backward with a fixed split size in CUDA: reference.causal_attention_backward,
// bit for bit (docs/design.md, "Attention split size").
//
// Two kernels, each output element owned by one thread of one block (no atomics, fixed orders):
//
//   _attn_bwd_dq    one 128-thread block per (batch b, head h, tile of kTile = 32 queries), the
//                   longest rows (last tiles) scheduled first. The keys [0, c_end) are walked in
//                   tiles of 32, c_end = min(end of the split chunk holding the tile's last query, T):
//                   every chunk the reference sums for these queries except those wholly above the
//                   diagonal, whose sums are exactly +0 (see below).
//     pass 1  for each pair: s = __fmul_rn(dotFMA(q_i, k_j), scale), dP = dotFMA(dO_i, v_j) (FMA
//             chains over d ascending from +0), P = __fdiv_rn(exp_f32(s - m_i), l_i) for j <= i and
//             +0 above the diagonal. D_i = the FMA chain P_ij * dP_ij over keys j <= i ascending from +0,
//             restarted at every multiple of S, the chunk partials added in ascending order (the
//             first chunk's partial is the total); one chain per query, run by warp 0 while the
//             other warps load the next key tile. Written to a (B, H, T) float32 workspace.
//     pass 2  the same s, P, dP (same code, same bits); dS = P * (dP - D_i); dq_i's chunk partials are
//             FMA chains dS_ij * k_j[e] over keys ascending from +0, added in ascending order;
//             dq_i = total * scale.
//   _attn_bwd_dkdv  one 256-thread block per (batch b, KV head hk, tile of 32 keys), the longest
//                   (first tiles) scheduled first. For each query head of the group in ascending
//                   order, the queries [j0, T) (j0 = the tile's first key) are walked in tiles of 32:
//                   the same s, P, dP and dS (D_i from the workspace), then per (key, e) FMA chains over
//                   queries ascending from +0, restarted at every multiple of S and added in ascending
//                   order: dv_head = sum P_ij dO_i[e], dk_head = (sum dS_ij q_i[e]) * scale;
//                   dk = ((+0 + dk_head0) + dk_head1) + ..., dv likewise. The running head sums live in
//                   the float32 output (float32 inputs) or in a float32 workspace (group > 1, 16-bit
//                   inputs), read back only by the thread that wrote them.
//
// Matching the reference's zeros exactly: a pair above the diagonal is no term of any chain (D's,
// dq's, dk's, dv's): inside a processed tile its term is skipped (the chain keeps its value), as
// the reference skips it, so an inf or NaN in a row the other side cannot see never reaches it.
// For a key, the queries before j0 are all above the diagonal: skipping them is the reference's
// own arithmetic, except that when j0 lies past chunk 0 the reference's total is +0 + ... (its
// chunk 0 sum, a chain with no terms, is +0): the total starts at +0 instead of taking the first
// partial as is (which it does from -0: -0 + x == x bitwise). For a query, the chunks past c_end
// have no terms and sum to +0 each: the total gets + 0 once when there are any. Everything else
// is the reference's own sequence of operations, so even the sign of a zero matches. Head
// dims below the template's padded dim (16, 32, 64, 128) are zero-padded in shared memory: the
// extra terms fma(0, 0, acc) leave a dot product unchanged unless it underflowed to -0 (the CPU
// kernel pads the same way).
//
// Tiles: q, dO, k, v tiles of 32 rows x (dim_pad + 4) floats in shared memory (widened to float32;
// the padding keeps float4 rows aligned and spreads 8 rows over the 32 banks) plus 32 x 36 score
// tiles: 75 KiB at dim_pad = 128 (opted into past the 48 KiB default; under the 99 KiB of sm_86 /
// sm_89), 43 KiB at 64, 27 KiB at 32. Dot products: each thread computes a 2 x 4 (dq) or 2 x 2
// (dkdv) tile of pairs from float4 reads. Accumulation: each thread owns a register tile of
// (queries | keys) x columns of the outputs, partial and total (dq: 4 queries x 8 columns at
// dim_pad 128; dkdv: 4 keys x 4 columns of both dk and dv). Both kernels are bounded for two
// blocks per SM (__launch_bounds__(threads, 2)) and fit without spills (tests/test_build.py).
#include <type_traits>

#include "common.cuh"

namespace fusedtx::cuda {
namespace {

constexpr int kTile = 32;         // queries per dq block, keys per dkdv block, and the streamed tiles
constexpr int kHalf = 16;         // chunk boundaries (multiples of S >= 16) fall on tile offsets 0 or 16
constexpr int kDqThreads = 128;
constexpr int kDkvThreads = 256;
constexpr int kPad = 4;            // floats of padding per (row, dim) tile row
constexpr int kPStride = kTile + 4;  // score tiles read as float4 rows
constexpr int kChainStride = kTile + 1;  // score tiles read by one thread per row (conflict-free)
constexpr int64_t kMaxLength = int64_t{1} << 30;

template <int DP>
constexpr int row_stride() { return DP + kPad; }

// Shared floats of each kernel (dq: q, dO, k, v tiles, a 32 x 36 and a 32 x 33 score tile, m, l, D;
// dkdv: k, v, q, dO tiles, two 32 x 36 score tiles, m, l, D).
template <int DP>
constexpr int dq_smem_floats() {
  return 4 * kTile * row_stride<DP>() + kTile * kPStride + kTile * kChainStride + 3 * kTile;
}
template <int DP>
constexpr int dkdv_smem_floats() { return 4 * kTile * row_stride<DP>() + 2 * kTile * kPStride + 3 * kTile; }

// Register tiles of the accumulation: dq: kQPT queries x kCPT float4 column groups per thread;
// dkdv: kKPT keys x 1 float4 column group per thread (at dim_pad 16 only 128 of the 256 threads).
template <int DP>
struct DqShape {
  static constexpr int kGroups = DP / 4;                       // float4 column groups
  static constexpr int kCPT = DP >= 128 ? 2 : 1;
  static constexpr int kNCT = kGroups / kCPT;                  // column threads
  static constexpr int kQPT = kTile * kNCT / kDqThreads;       // queries per thread
  static_assert(kQPT >= 1 && kQPT <= 4 && kTile / kQPT * kNCT == kDqThreads && kNCT * kCPT == kGroups, "dq shape");
};
template <int DP>
struct DkvShape {
  static constexpr int kNCT = DP / 4;                           // column threads, one float4 group each
  static constexpr int kKPT = kTile * kNCT / kDkvThreads >= 1 ? kTile * kNCT / kDkvThreads : 1;
  static constexpr int kActive = kTile / kKPT * kNCT;          // threads that accumulate
  static_assert(kKPT <= 4 && kActive <= kDkvThreads, "dkdv shape");
};

__device__ __forceinline__ int min_int(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int max_int(int a, int b) { return a > b ? a : b; }

template <typename T>
struct Params {
  const T* go;
  const T* q;
  const T* k;
  const T* v;
  const float* m;   // (B, H, T) contiguous
  const float* l;
  T* dq;            // (B, H, T, dim) contiguous
  T* dk;            // (B, Hkv, T, dim) contiguous
  T* dv;
  float* d_row;     // (B, H, T): D_i, written by _attn_bwd_dq, read by _attn_bwd_dkdv
  float* dk_sum;    // (B, Hkv, T, dim) float32 head sums when group > 1 (dk itself for float32), else unused
  float* dv_sum;
  int64_t go_sb, go_sh, go_st, q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st;  // strides in elements
  int64_t batch, heads, kv_heads, group, length, dim, split, tiles;
  float scale;
};

// Rows [0, n) of src (row stride `stride` elements, `dim` columns) -> a kTile x (DP + kPad) float32
// tile, zero past dim and past n.
template <int DP, int NT, typename T>
__device__ __forceinline__ void load_tile(float* dst, const T* src, int64_t stride, int n, int dim) {
  constexpr int RS = row_stride<DP>();
  constexpr int kRowStep = NT / DP;  // rows per sweep of the block; thread t always loads column t % DP
  static_assert(NT % DP == 0 && kTile % kRowStep == 0, "tile loads");
  const int d = threadIdx.x % DP;
  const bool in_dim = d < dim;
  int r = threadIdx.x / DP;
  const T* ptr = src + r * stride + d;
  const int64_t step = kRowStep * stride;
#pragma unroll 4
  for (; r < kTile; r += kRowStep, ptr += step) dst[r * RS + d] = (r < n && in_dim) ? load_f32(ptr) : 0.0f;
}

// out[r][c] = dotFMA(a row r, b row c): one __fmaf_rn chain over d ascending from +0, for the NA
// rows a, a + a_step, ... and the NB rows b, b + b_step, ... (float offsets into shared memory).
template <int DP, int NA, int NB, int UNROLL>
__device__ __forceinline__ void dot_tile(const float* a, int a_step, const float* b, int b_step,
                                         float (&out)[NA][NB]) {
#pragma unroll
  for (int r = 0; r < NA; ++r)
#pragma unroll
    for (int c = 0; c < NB; ++c) out[r][c] = 0.0f;
#pragma unroll UNROLL
  for (int d = 0; d < DP; d += 4) {
    float4 av[NA];
#pragma unroll
    for (int r = 0; r < NA; ++r) av[r] = *reinterpret_cast<const float4*>(a + r * a_step + d);
#pragma unroll
    for (int c = 0; c < NB; ++c) {
      const float4 bv = *reinterpret_cast<const float4*>(b + c * b_step + d);
#pragma unroll
      for (int r = 0; r < NA; ++r) {
        float x = out[r][c];
        x = __fmaf_rn(av[r].x, bv.x, x);
        x = __fmaf_rn(av[r].y, bv.y, x);
        x = __fmaf_rn(av[r].z, bv.z, x);
        x = __fmaf_rn(av[r].w, bv.w, x);
        out[r][c] = x;
      }
    }
  }
}

// P_ij from the dot product q_i . k_j and the forward's row statistics.
__device__ __forceinline__ float probability(float dot, float scale, float m, float l) {
  return __fdiv_rn(exp_f32(__fsub_rn(__fmul_rn(dot, scale), m)), l);
}

// N consecutive floats of shared memory (N = 1, 2, 4; aligned to N floats).
template <int N>
__device__ __forceinline__ void load_vec(const float* src, float (&dst)[N]) {
  if constexpr (N == 4) {
    const float4 v = *reinterpret_cast<const float4*>(src);
    dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
  } else if constexpr (N == 2) {
    const float2 v = *reinterpret_cast<const float2*>(src);
    dst[0] = v.x, dst[1] = v.y;
  } else {
    dst[0] = *src;
  }
}

// A chunk ends: its partial joins the total (ascending chunk order) and the next chain starts at +0.
template <int R, int C>
__device__ __forceinline__ void fold(float (&total)[R][C], float (&part)[R][C]) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) {
      total[r][c] = __fadd_rn(total[r][c], part[r][c]);
      part[r][c] = 0.0f;
    }
}

template <typename T, int DP>
__global__ void __launch_bounds__(kDqThreads, 2) _attn_bwd_dq(const Params<T> p) {
  constexpr int RS = row_stride<DP>();
  using Shape = DqShape<DP>;
  constexpr int QPT = Shape::kQPT, CPT = Shape::kCPT, NCT = Shape::kNCT;
  float* q_s = shared_memory();             // kTile x RS
  float* do_s = q_s + kTile * RS;           // kTile x RS
  float* k_s = do_s + kTile * RS;           // kTile x RS
  float* v_s = k_s + kTile * RS;            // kTile x RS
  float* pa_s = v_s + kTile * RS;           // pass 1: P [query][key] (stride 33); pass 2: dS [key][query] (stride 36)
  float* pb_s = pa_s + kTile * kPStride;    // pass 1: dP [query][key] (stride 33)
  float* m_s = pb_s + kTile * kChainStride;
  float* l_s = m_s + kTile;
  float* d_s = l_s + kTile;

  const int tid = threadIdx.x;
  const int dim = static_cast<int>(p.dim);
  const int length = static_cast<int>(p.length), split = static_cast<int>(p.split);  // < 2^31 (launcher)
  const int n_bh = static_cast<int>(p.batch * p.heads);
  const int tile = static_cast<int>(p.tiles) - 1 - static_cast<int>(blockIdx.x) / n_bh;  // the longest rows first
  const int64_t bh = static_cast<int>(blockIdx.x) % n_bh;
  const int64_t b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  const int i0 = tile * kTile;
  const int nq = min_int(kTile, length - i0);
  const int c_end = static_cast<int>(min64((i0 + nq - 1) / split * static_cast<int64_t>(split) + split, length));
  const int64_t row0 = bh * length + i0;  // (b, h, i0) in (B, H, T)

  const T* kb = p.k + b * p.k_sb + hk * p.k_sh;
  const T* vb = p.v + b * p.v_sb + hk * p.v_sh;
  load_tile<DP, kDqThreads>(q_s, p.q + b * p.q_sb + h * p.q_sh + i0 * p.q_st, p.q_st, nq, dim);
  load_tile<DP, kDqThreads>(do_s, p.go + b * p.go_sb + h * p.go_sh + i0 * p.go_st, p.go_st, nq, dim);
  if (tid < kTile) {
    m_s[tid] = tid < nq ? p.m[row0 + tid] : 0.0f;
    l_s[tid] = tid < nq ? p.l[row0 + tid] : 1.0f;
  }

  // Pairs: thread (qg, kq) takes queries qg, qg + 16 and keys kq + 8c of a tile (a quarter warp reads
  // one query row, broadcast, and 8 key rows in 8 distinct bank groups).
  const int kq = tid % 8, qg = tid / 8;
  const auto pair_dots = [&](float (&s)[2][4], float (&dp)[2][4]) {
    dot_tile<DP, 2, 4, 2>(q_s + qg * RS, kHalf * RS, k_s + kq * RS, 8 * RS, s);
    dot_tile<DP, 2, 4, 2>(do_s + qg * RS, kHalf * RS, v_s + kq * RS, 8 * RS, dp);
  };
  const auto pair_p = [&](float dot, int i, int key) {
    return key <= i0 + i ? probability(dot, p.scale, m_s[i], l_s[i]) : 0.0f;
  };

  // Pass 1: D_i, one chain per query run by thread i of warp 0.
  float d_total = -0.0f, d_part = 0.0f;  // -0 + x == x: the first chunk's partial is the total
  for (int k0 = 0; k0 < c_end; k0 += kTile) {
    const int nk = min_int(kTile, c_end - k0);
    load_tile<DP, kDqThreads>(k_s, kb + k0 * p.k_st, p.k_st, nk, dim);
    load_tile<DP, kDqThreads>(v_s, vb + k0 * p.v_st, p.v_st, nk, dim);
    __syncthreads();
    float s[2][4], dp[2][4];
    pair_dots(s, dp);
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int i = qg + kHalf * r, j = kq + 8 * c;
        pa_s[i * kChainStride + j] = pair_p(s[r][c], i, k0 + j);
        pb_s[i * kChainStride + j] = dp[r][c];
      }
    __syncthreads();
    if (tid < kTile) {
      const float* pr = pa_s + tid * kChainStride;
      const float* dpr = pb_s + tid * kChainStride;
      for (int j = 0; j < nk; ++j) {  // keys ascending
        if (((k0 + j) & (split - 1)) == 0 && k0 + j > 0) {
          d_total = __fadd_rn(d_total, d_part);
          d_part = 0.0f;
        }
        if (k0 + j <= i0 + tid) d_part = __fmaf_rn(pr[j], dpr[j], d_part);  // pairs j <= i only
      }
    }
    // The next tile's loads only touch k_s / v_s, which every thread is done with; pa_s / pb_s are
    // rewritten after the next barrier, which warp 0 reaches once its chains are done.
  }
  if (tid < kTile) {
    d_total = __fadd_rn(d_total, d_part);
    if (c_end < length) d_total = __fadd_rn(d_total, 0.0f);  // the +0 sums of the chunks past c_end
    d_s[tid] = d_total;
    if (tid < nq) p.d_row[row0 + tid] = d_total;
  }
  __syncthreads();

  // Pass 2: dS, and dq's chains. Thread (qa, ct) owns queries qa * QPT + r and float4 column groups
  // ct + NCT * c.
  const int ct = tid % NCT, qa = tid / NCT;
  float part[QPT][4 * CPT], total[QPT][4 * CPT];
#pragma unroll
  for (int r = 0; r < QPT; ++r)
#pragma unroll
    for (int x = 0; x < 4 * CPT; ++x) {
      part[r][x] = 0.0f;
      total[r][x] = -0.0f;
    }
  float* ds_s = pa_s;  // [key][query], stride kPStride
  const int first_q = i0 + qa * QPT;  // this thread's first query
  // Key `key`'s (row j of the staged tiles) terms of this thread's dq chains; a query that does
  // not see the key (masked) skips its term rather than adding +0 * k_j, which an inf or NaN in
  // k_j would turn into NaN.
  const auto dq_step = [&](int j, int key, bool masked) {
    float ds[QPT];
    load_vec<QPT>(ds_s + j * kPStride + qa * QPT, ds);
    const float* kr = k_s + j * RS;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      const float4 kv = *reinterpret_cast<const float4*>(kr + 4 * (ct + NCT * c));
#pragma unroll
      for (int r = 0; r < QPT; ++r) {
        if (masked && key > first_q + r) continue;
        part[r][4 * c + 0] = __fmaf_rn(ds[r], kv.x, part[r][4 * c + 0]);
        part[r][4 * c + 1] = __fmaf_rn(ds[r], kv.y, part[r][4 * c + 1]);
        part[r][4 * c + 2] = __fmaf_rn(ds[r], kv.z, part[r][4 * c + 2]);
        part[r][4 * c + 3] = __fmaf_rn(ds[r], kv.w, part[r][4 * c + 3]);
      }
    }
  };
  for (int k0 = 0; k0 < c_end; k0 += kTile) {
    const int nk = min_int(kTile, c_end - k0);
    load_tile<DP, kDqThreads>(k_s, kb + k0 * p.k_st, p.k_st, nk, dim);
    load_tile<DP, kDqThreads>(v_s, vb + k0 * p.v_st, p.v_st, nk, dim);
    __syncthreads();
    float s[2][4], dp[2][4];
    pair_dots(s, dp);
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int i = qg + kHalf * r, j = kq + 8 * c;
        const float pij = pair_p(s[r][c], i, k0 + j);
        ds_s[j * kPStride + i] = __fmul_rn(pij, __fsub_rn(dp[r][c], d_s[i]));
      }
    __syncthreads();
    for (int j0 = 0; j0 < nk; j0 += kHalf) {
      if (((k0 + j0) & (split - 1)) == 0 && k0 + j0 > 0) fold(total, part);
      const int j_end = j0 + kHalf < nk ? j0 + kHalf : nk;
      // Keys [j0, j_all) are seen by every query of this thread; past them, by its queries r
      // with k0 + j <= first_q + r only (the others skip the term).
      const int j_all = max_int(j0, min_int(j_end, first_q - k0 + 1));
      for (int j = j0; j < j_all; ++j) dq_step(j, k0 + j, false);  // keys ascending
      for (int j = j_all; j < j_end; ++j) dq_step(j, k0 + j, true);
    }
    __syncthreads();  // k_s, v_s and ds_s are rewritten next
  }
  fold(total, part);
  const bool zero_chunks_follow = c_end < length;
#pragma unroll
  for (int r = 0; r < QPT; ++r) {
    const int i = qa * QPT + r;
    if (i >= nq) continue;
    T* out = p.dq + (row0 + i) * p.dim;
#pragma unroll
    for (int c = 0; c < CPT; ++c)
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int e = 4 * (ct + NCT * c) + x;
        float t = total[r][4 * c + x];
        if (zero_chunks_follow) t = __fadd_rn(t, 0.0f);
        if (e < dim) store_rn(out + e, __fmul_rn(t, p.scale));
      }
  }
}

template <typename T, int DP>
__global__ void __launch_bounds__(kDkvThreads, 2) _attn_bwd_dkdv(const Params<T> p) {
  constexpr int RS = row_stride<DP>();
  using Shape = DkvShape<DP>;
  constexpr int KPT = Shape::kKPT, NCT = Shape::kNCT;
  float* k_s = shared_memory();             // kTile x RS
  float* v_s = k_s + kTile * RS;
  float* q_s = v_s + kTile * RS;
  float* do_s = q_s + kTile * RS;
  float* p_s = do_s + kTile * RS;           // P [query][key], stride kPStride
  float* ds_s = p_s + kTile * kPStride;     // dS [query][key]
  float* m_s = ds_s + kTile * kPStride;
  float* l_s = m_s + kTile;
  float* d_s = l_s + kTile;

  const int tid = threadIdx.x;
  const int dim = static_cast<int>(p.dim);
  const int length = static_cast<int>(p.length), split = static_cast<int>(p.split);  // < 2^31 (launcher)
  const int n_bhk = static_cast<int>(p.batch * p.kv_heads);
  const int tile = static_cast<int>(blockIdx.x) / n_bhk;  // the longest columns first
  const int64_t bhk = static_cast<int>(blockIdx.x) % n_bhk;
  const int64_t b = bhk / p.kv_heads, hk = bhk % p.kv_heads;
  const int j0 = tile * kTile;
  const int nk = min_int(kTile, length - j0);

  load_tile<DP, kDkvThreads>(k_s, p.k + b * p.k_sb + hk * p.k_sh + j0 * p.k_st, p.k_st, nk, dim);
  load_tile<DP, kDkvThreads>(v_s, p.v + b * p.v_sb + hk * p.v_sh + j0 * p.v_st, p.v_st, nk, dim);

  // Pairs: thread (qg, kq) takes queries qg, qg + 16 and keys kq, kq + 16 of a tile.
  const int kq = tid % 16, qg = tid / 16;
  // Accumulation: thread (ka, ct) owns keys ka * KPT + a and columns 4 ct ... 4 ct + 3.
  const int ct = tid % NCT, ka = tid / NCT;
  const bool active = tid < Shape::kActive;
  // The reference's first chunk sum is its total; past chunk 0 it is +0 (all above the diagonal).
  const float total0 = j0 < split ? -0.0f : 0.0f;
  const int first_k = j0 + ka * KPT;  // this thread's first key

  const int group = static_cast<int>(p.group);
  for (int hh = 0; hh < group; ++hh) {  // the group's query heads, ascending
    const int64_t h = hk * p.group + hh;
    const int64_t row0 = (b * p.heads + h) * length;  // (b, h, 0) in (B, H, T)
    const T* qb = p.q + b * p.q_sb + h * p.q_sh;
    const T* gb = p.go + b * p.go_sb + h * p.go_sh;
    float dk_part[KPT][4], dk_total[KPT][4], dv_part[KPT][4], dv_total[KPT][4];
#pragma unroll
    for (int a = 0; a < KPT; ++a)
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        dk_part[a][x] = dv_part[a][x] = 0.0f;
        dk_total[a][x] = dv_total[a][x] = total0;
      }
    // Query i0 + i's terms of this thread's dk, dv chains; a key the query does not see (masked)
    // skips its term rather than adding +0 * q_i, +0 * dO_i, which an inf or NaN there would turn
    // into NaN.
    const auto dkdv_step = [&](int i0, int i) {
      float pv[KPT], dsv[KPT];
      load_vec<KPT>(p_s + i * kPStride + ka * KPT, pv);
      load_vec<KPT>(ds_s + i * kPStride + ka * KPT, dsv);
      const float4 qv = *reinterpret_cast<const float4*>(q_s + i * RS + 4 * ct);
      const float4 gv = *reinterpret_cast<const float4*>(do_s + i * RS + 4 * ct);
#pragma unroll
      for (int a = 0; a < KPT; ++a) {
        if (first_k + a > i0 + i) continue;  // only in the tile i0 = j0
        dv_part[a][0] = __fmaf_rn(pv[a], gv.x, dv_part[a][0]);
        dv_part[a][1] = __fmaf_rn(pv[a], gv.y, dv_part[a][1]);
        dv_part[a][2] = __fmaf_rn(pv[a], gv.z, dv_part[a][2]);
        dv_part[a][3] = __fmaf_rn(pv[a], gv.w, dv_part[a][3]);
        dk_part[a][0] = __fmaf_rn(dsv[a], qv.x, dk_part[a][0]);
        dk_part[a][1] = __fmaf_rn(dsv[a], qv.y, dk_part[a][1]);
        dk_part[a][2] = __fmaf_rn(dsv[a], qv.z, dk_part[a][2]);
        dk_part[a][3] = __fmaf_rn(dsv[a], qv.w, dk_part[a][3]);
      }
    };

    for (int i0 = j0; i0 < length; i0 += kTile) {  // query tiles ascending
      const int nq = min_int(kTile, length - i0);
      load_tile<DP, kDkvThreads>(q_s, qb + i0 * p.q_st, p.q_st, nq, dim);
      load_tile<DP, kDkvThreads>(do_s, gb + i0 * p.go_st, p.go_st, nq, dim);
      if (tid < kTile) {
        m_s[tid] = tid < nq ? p.m[row0 + i0 + tid] : 0.0f;
        l_s[tid] = tid < nq ? p.l[row0 + i0 + tid] : 1.0f;
        d_s[tid] = tid < nq ? p.d_row[row0 + i0 + tid] : 0.0f;
      }
      __syncthreads();
      float s[2][2], dp[2][2];
      // Not unrolled: the 64 accumulators leave no registers for a second step's loads.
      dot_tile<DP, 2, 2, 1>(q_s + qg * RS, kHalf * RS, k_s + kq * RS, kHalf * RS, s);
      dot_tile<DP, 2, 2, 1>(do_s + qg * RS, kHalf * RS, v_s + kq * RS, kHalf * RS, dp);
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int i = qg + kHalf * r, j = kq + kHalf * c;
          const float pij = j0 + j <= i0 + i ? probability(s[r][c], p.scale, m_s[i], l_s[i]) : 0.0f;
          p_s[i * kPStride + j] = pij;
          ds_s[i * kPStride + j] = __fmul_rn(pij, __fsub_rn(dp[r][c], d_s[i]));
        }
      __syncthreads();
      if (active) {
        for (int r0 = 0; r0 < nq; r0 += kHalf) {
          if (((i0 + r0) & (split - 1)) == 0 && i0 + r0 > j0) {
            fold(dk_total, dk_part);
            fold(dv_total, dv_part);
          }
          const int r_end = r0 + kHalf < nq ? r0 + kHalf : nq;
          // One loop with the test in it (predicated FMAs): a second, unmasked copy of the loop
          // for the tiles past the diagonal spilled at dim_pad 128 (sm_80, 128 registers).
          for (int i = r0; i < r_end; ++i) dkdv_step(i0, i);  // queries ascending
        }
      }
      __syncthreads();  // q_s, do_s and the score tiles are rewritten next
    }

    if (!active) continue;
    fold(dk_total, dk_part);
    fold(dv_total, dv_part);
    const bool last = hh == group - 1;
#pragma unroll
    for (int a = 0; a < KPT; ++a) {
      const int j = ka * KPT + a;
      if (j >= nk) continue;
      const int64_t out_row = (bhk * length + j0 + j) * p.dim;  // (b, hk, j0 + j) in (B, Hkv, T, dim)
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int e = 4 * ct + x;
        if (e >= dim) continue;
        const float dkh = __fmul_rn(dk_total[a][x], p.scale);
        const float dvh = dv_total[a][x];
        // ((+0 + head 0) + head 1) + ...: the running sums were written by this same thread.
        const float dk = __fadd_rn(hh == 0 ? 0.0f : p.dk_sum[out_row + e], dkh);
        const float dv = __fadd_rn(hh == 0 ? 0.0f : p.dv_sum[out_row + e], dvh);
        if (last) {
          store_rn(p.dk + out_row + e, dk);
          store_rn(p.dv + out_row + e, dv);
        } else {
          p.dk_sum[out_row + e] = dk;
          p.dv_sum[out_row + e] = dv;
        }
      }
    }
  }
}

template <typename K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int DP>
cudaError_t launch_dim(const Params<T>& p, int64_t batch, int64_t heads, int64_t kv_heads, cudaStream_t stream) {
  const size_t dq_bytes = dq_smem_floats<DP>() * sizeof(float);
  const size_t dkdv_bytes = dkdv_smem_floats<DP>() * sizeof(float);
  cudaError_t err = allow_smem(_attn_bwd_dq<T, DP>, dq_bytes);
  if (err != cudaSuccess) return err;
  err = allow_smem(_attn_bwd_dkdv<T, DP>, dkdv_bytes);
  if (err != cudaSuccess) return err;
  _attn_bwd_dq<T, DP><<<static_cast<unsigned>(batch * heads * p.tiles), kDqThreads, dq_bytes, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  _attn_bwd_dkdv<T, DP><<<static_cast<unsigned>(batch * kv_heads * p.tiles), kDkvThreads, dkdv_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const void* grad_o, const int64_t* go_strides, const void* q, const int64_t* q_strides,
                   const void* k, const int64_t* k_strides, const void* v, const int64_t* v_strides, const float* m,
                   const float* l, void* dq, void* dk, void* dv, float* workspace, int64_t batch, int64_t heads,
                   int64_t kv_heads, int64_t length, int64_t dim, float scale, int64_t split_size,
                   cudaStream_t stream) {
  const int64_t group = heads / kv_heads;
  float* d_row = workspace;
  float* dk_sum = nullptr;
  float* dv_sum = nullptr;
  if (group > 1) {
    if (std::is_same<T, float>::value) {  // the float32 outputs hold the running head sums
      dk_sum = static_cast<float*>(dk);
      dv_sum = static_cast<float*>(dv);
    } else {
      dk_sum = workspace + batch * heads * length;
      dv_sum = dk_sum + batch * kv_heads * length * dim;
    }
  }
  Params<T> p{static_cast<const T*>(grad_o), static_cast<const T*>(q), static_cast<const T*>(k),
              static_cast<const T*>(v), m, l, static_cast<T*>(dq), static_cast<T*>(dk), static_cast<T*>(dv),
              d_row, dk_sum, dv_sum,
              go_strides[0], go_strides[1], go_strides[2], q_strides[0], q_strides[1], q_strides[2],
              k_strides[0], k_strides[1], k_strides[2], v_strides[0], v_strides[1], v_strides[2],
              batch, heads, kv_heads, group, length, dim, split_size, (length + kTile - 1) / kTile, scale};
  if (dim <= 16) return launch_dim<T, 16>(p, batch, heads, kv_heads, stream);
  if (dim <= 32) return launch_dim<T, 32>(p, batch, heads, kv_heads, stream);
  if (dim <= 64) return launch_dim<T, 64>(p, batch, heads, kv_heads, stream);
  return launch_dim<T, 128>(p, batch, heads, kv_heads, stream);
}

}  // namespace

cudaError_t causal_attention_backward(const void* grad_o, const int64_t* go_strides, const void* q,
                                      const int64_t* q_strides, const void* k, const int64_t* k_strides, const void* v,
                                      const int64_t* v_strides, const float* m, const float* l, void* dq, void* dk,
                                      void* dv, float* workspace, int64_t batch, int64_t heads, int64_t kv_heads,
                                      int64_t length, int64_t dim, float scale, int64_t split_size, DType dtype,
                                      cudaStream_t stream) {
  if (batch < 0 || heads < 0 || length < 0 || kv_heads <= 0 || heads % kv_heads != 0) return cudaErrorInvalidValue;
  if (dim < 1 || dim > kAttentionMaxHeadDim || split_size < 16 || (split_size & (split_size - 1)) != 0)
    return cudaErrorInvalidValue;
  if (length > kMaxLength) return cudaErrorInvalidValue;  // positions are ints in the kernels
  if (batch == 0 || heads == 0 || length == 0) return cudaSuccess;  // no element to write
  // Any split >= length gives one chunk: clamped so that it fits an int.
  if (split_size > kMaxLength) split_size = kMaxLength;
  const int64_t tiles = (length + kTile - 1) / kTile;
  if (tiles > INT32_MAX / heads / batch) return cudaErrorInvalidValue;  // one block per tile, 1-D grid
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(grad_o, go_strides, q, q_strides, k, k_strides, v, v_strides, m, l, dq, dk, dv, workspace,
                           batch, heads, kv_heads, length, dim, scale, split_size, stream);
    case DType::kFloat16:
      return launch<__half>(grad_o, go_strides, q, q_strides, k, k_strides, v, v_strides, m, l, dq, dk, dv,
                            workspace, batch, heads, kv_heads, length, dim, scale, split_size, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(grad_o, go_strides, q, q_strides, k, k_strides, v, v_strides, m, l, dq, dk, dv,
                                   workspace, batch, heads, kv_heads, length, dim, scale, split_size, stream);
    case DType::kFloat64: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace fusedtx::cuda
