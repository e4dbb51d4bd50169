// Causal attention backward with a fixed split size on CPU: reference.causal_attention_backward, bit
// for bit (docs/design.md, "Attention split size").
//
// FlashAttention-2 style, in two passes that each recompute the probabilities from the forward's
// row statistics (m, l), so that every output is owned by exactly one task and nothing is reduced
// across threads (no atomics; the bits do not depend on the thread count):
//   pass 1, one task = (batch b, head h, block of up to 32 queries; the lanes of two vectors):
//            for each key chunk [cS, cS + S) up to the block's last query: s = dotFMA(q_i, k_j) * scale
//            and dP = dotFMA(dO_i, v_j), a vector per key and group (broadcast k_j[d] times the transposed
//            q[d]); P = exp_f32(s - m) / l (+0 above the diagonal). P and dP are kept for the whole
//            row range, and D_i = sum_j P dP gathers as the spec's blocked sum: per chunk an FMA
//            chain over its keys ascending from +0, the chunk sums added in ascending order (the
//            first chunk's sum is the total); D is written for pass 2. Only then can dS be formed:
//            a second sweep over the kept chunks computes dS = P * (dP - D) in place of dP and,
//            per (query, e), an FMA chain over the chunk's keys ascending from +0, added to the
//            running total (the first chunk's sum is the total). Chunks wholly above the diagonal
//            would add +0: the total gets + 0 once. dq = total * scale.
//   pass 2, one task = (batch b, KV head, block of up to 32 keys; the lanes): for each query head
//            of the group in ascending order, for each query chunk from the one holding the block
//            onwards: the same s, P, dP, dS (now broadcast q_i[d] times the transposed k[d]), then
//            per (key, e) FMA chains over the chunk's queries ascending from +0 for dv (P dO) and
//            dk (dS q). Chunks before the block's own contribute exactly +0 in the reference, so a
//            block with chunks before it starts its total as +0 + partial. dk_head = total * scale;
//            dk = ((+0 + dk_head0) + dk_head1) + ..., dv likewise.
// Pairs above the diagonal are no terms of any chain (D's, dq's, dk's, dv's), as in the reference:
// their P = +0 and dS may hold anything (an inf or NaN from a row the other side cannot see), and
// the chains skip them rather than add +0 * x. Keys past a query block's last query are not
// visited at all; the +0 sums of whole chunks above the diagonal are added as the reference adds
// them (above).
// Keeping P and dP (2 x 128 bytes per key in pass 1, a thread's scratch ~256 T bytes) instead of
// recomputing them for the second sweep spares two of pass 1's three dot products per pair.
// Why blocks of 32 (two groups of 16 lanes): each broadcast element feeds two FMAs, and the rows
// a block streams (K and V in pass 1, Q and dO in pass 2) are read once per 32 rows instead of 16.
// In pass 1 a group walks only the chunks up to its own last query, as it would in a block of 16.
// Inputs in bfloat16/float16, or with a head dim that is not a multiple of 16, are first
// converted (exactly) to zero-padded float32 copies; the outputs are rounded to the dtype at the end.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace fusedtx::cpu {
namespace {

constexpr int kBlock = kLaneBlock;  // queries (pass 1) or keys (pass 2) per task: the lanes of two vectors
constexpr int kGroups = kLaneGroups;  // lane group g holds the block's rows 16 g ... 16 g + 15
constexpr int kDotRows = 8;   // dot products interleaved for ILP
// The accumulation tile: lanes x 16-float vectors of the head dim, as many accumulators as the
// registers hold (32 zmm; AVX2's 16 ymm take 4 x 1, two ymm per vector). Each accumulator is its
// own FMA chain, so the tile shape changes no bit.
#if defined(FUSEDTX_AVX2)
constexpr int kAxpyLanes = 4;
constexpr int kAxpyVecs = 1;
#else
constexpr int kAxpyLanes = 4;
constexpr int kAxpyVecs = 4;
#endif

// A (batch, heads, positions, dim_pad) float32 view: rows hold dim_pad readable floats.
struct View {
  const float* ptr;
  int64_t s0, s1, s2;
  const float* row(int64_t b, int64_t h, int64_t t) const { return ptr + b * s0 + h * s1 + t * s2; }
};
struct OutView {
  float* ptr;
  int64_t s0, s1, s2;
  float* row(int64_t b, int64_t h, int64_t t) const { return ptr + b * s0 + h * s1 + t * s2; }
};

struct Problem {
  int64_t batch, heads, kv_heads, group, length, dim, dim_pad, split, n_chunks;
  float scale;
  View q, k, v, go;
  const float *m, *l;  // (B, H, T) contiguous
  float* d_row;        // (B, H, T): D_i, written by pass 1, read by pass 2
  OutView dq, dk, dv;
};

// lane_dots for rows [0, n) of x and ng groups, the result for row j and group g stored at
// out + j * kBlock + 16 g. Writing the results out (rather than keeping the vectors live across
// the caller's next steps) keeps the accumulators in registers: otherwise GCC spills one of them
// inside the d loop.
inline void lane_dots_to(const float* xt, const float* x, int64_t ld, int64_t n, int64_t dim, int ng, float* out) {
  vfloat r[kGroups * kDotRows];
  int64_t j = 0;
  for (; j + kDotRows <= n; j += kDotRows) {
    lane_dots_groups<kDotRows>(ng, xt, x + j * ld, ld, dim, r);
    for (int g = 0; g < ng; ++g)
      for (int i = 0; i < kDotRows; ++i) vstore(out + (j + i) * kBlock + g * kVec, r[g * kDotRows + i]);
  }
  for (; j < n; ++j) {
    lane_dots_groups<1>(ng, xt, x + j * ld, ld, dim, r);
    for (int g = 0; g < ng; ++g) vstore(out + j * kBlock + g * kVec, r[g]);
  }
}

enum class Total { kFirst, kZeroPlus, kAdd };  // total = partial | +0 + partial | total + partial

// The rows a lane's chains take: lane a of a block sees rows [lo + a, hi + a) (the causal
// diagonal: positions of lanes and rows both ascend by one). The other rows are no terms of its
// chains: skipped, not added as fma(+0, x, acc), which an inf or NaN in x (a row the lane cannot
// see) would turn into NaN (docs/design.md, "Attention split size").
struct Seen {
  int64_t lo, hi;
};

// For lanes [l0, l0 + NL) and head-dim vectors [e0, e0 + NV): partial = FMA chain over the rows r
// in [0, n_rows) the lane sees, ascending from +0, of tile[r][lane] * x[r][e]; folded into
// out[lane][e] as `mode`.
template <int NL, int NV>
inline void lane_axpy(const float* tile, const float* x, int64_t ld, int64_t n_rows, Seen seen, int l0, int64_t e0,
                      float* out, int64_t out_ld, Total mode) {
#if defined(FUSEDTX_AVX2)
  // The same chains on ymm halves, kept in registers (GCC holds a 16-float vector in memory
  // on AVX2 and splits each FMA with lane shuffles).
  constexpr int NH = 2 * NV;
  __m256 acc[NL][NH];
  for (int a = 0; a < NL; ++a)
    for (int h = 0; h < NH; ++h) acc[a][h] = _mm256_setzero_ps();
  const int64_t lo = seen.lo + l0, hi = seen.hi + l0;
  const int64_t r_end = std::min(n_rows, hi + NL - 1);
  for (int64_t r = std::max<int64_t>(0, lo); r < r_end; ++r) {
    const float* xr = x + r * ld + e0;
    const float* tr = tile + r * kBlock + l0;
    __m256 xv[NH];
    for (int h = 0; h < NH; ++h) xv[h] = _mm256_loadu_ps(xr + 8 * h);
    const bool all = r >= lo + NL - 1 && r < hi;
    for (int a = 0; a < NL; ++a) {
      if (!all && (r < lo + a || r >= hi + a)) continue;
      const __m256 t = _mm256_broadcast_ss(tr + a);
      for (int h = 0; h < NH; ++h) acc[a][h] = _mm256_fmadd_ps(t, xv[h], acc[a][h]);
    }
  }
  for (int a = 0; a < NL; ++a) {
    float* o = out + (l0 + a) * out_ld + e0;
    for (int h = 0; h < NH; ++h) {
      __m256 r = acc[a][h];
      if (mode == Total::kZeroPlus) r = _mm256_add_ps(_mm256_setzero_ps(), r);
      else if (mode == Total::kAdd) r = _mm256_add_ps(_mm256_loadu_ps(o + 8 * h), r);
      _mm256_storeu_ps(o + 8 * h, r);
    }
  }
#else
  vfloat acc[NL][NV];
  for (int a = 0; a < NL; ++a)
    for (int v = 0; v < NV; ++v) acc[a][v] = vsplat(0.0f);
  const int64_t lo = seen.lo + l0, hi = seen.hi + l0;  // lane l0 + a sees rows [lo + a, hi + a)
  const int64_t r_end = std::min(n_rows, hi + NL - 1);
  for (int64_t r = std::max<int64_t>(0, lo); r < r_end; ++r) {
    const float* xr = x + r * ld + e0;
    const float* tr = tile + r * kBlock + l0;
    vfloat xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = vload(xr + v * kVec);
    const bool all = r >= lo + NL - 1 && r < hi;  // every lane of the tile sees row r
    for (int a = 0; a < NL; ++a) {
      if (!all && (r < lo + a || r >= hi + a)) continue;
      const vfloat t = vbroadcast(tr[a]);
      for (int v = 0; v < NV; ++v) acc[a][v] = vfma(t, xv[v], acc[a][v]);
    }
  }
  for (int a = 0; a < NL; ++a) {
    float* o = out + (l0 + a) * out_ld + e0;
    for (int v = 0; v < NV; ++v) {
      vfloat r = acc[a][v];
      if (mode == Total::kZeroPlus) r = vsplat(0.0f) + r;
      else if (mode == Total::kAdd) r = vload(o + v * kVec) + r;
      vstore(o + v * kVec, r);
    }
  }
#endif
}

// lane_axpy over lanes [lane_lo, n_lanes) and the whole (padded) head dim.
inline void accumulate(const float* tile, const float* x, int64_t ld, int64_t n_rows, Seen seen, int lane_lo,
                       int n_lanes, int64_t dim_pad, float* out, Total mode) {
  const int64_t n_vecs = dim_pad / kVec;
  auto for_lanes = [&](auto nv_tag, int64_t e0) {
    constexpr int NV = decltype(nv_tag)::value;
    int a = lane_lo;
    for (; a + kAxpyLanes <= n_lanes; a += kAxpyLanes)
      lane_axpy<kAxpyLanes, NV>(tile, x, ld, n_rows, seen, a, e0, out, dim_pad, mode);
    for (; a < n_lanes; ++a) lane_axpy<1, NV>(tile, x, ld, n_rows, seen, a, e0, out, dim_pad, mode);
  };
  int64_t v = 0;
  for (; v + kAxpyVecs <= n_vecs; v += kAxpyVecs) for_lanes(std::integral_constant<int, kAxpyVecs>{}, v * kVec);
  if (n_vecs - v == 3) for_lanes(std::integral_constant<int, 3>{}, v * kVec);
  else if (n_vecs - v == 2) for_lanes(std::integral_constant<int, 2>{}, v * kVec);
  else if (n_vecs - v == 1) for_lanes(std::integral_constant<int, 1>{}, v * kVec);
}

// rows [0, n) of x (dim_pad floats each) transposed into xt[d][lane], lanes >= n set to +0.
inline void transpose_rows(const float* x, int64_t ld, int64_t n, int64_t dim_pad, float* xt) {
  std::fill(xt, xt + dim_pad * kBlock, 0.0f);
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * ld;
    for (int64_t d = 0; d < dim_pad; ++d) xt[d * kBlock + r] = xr[d];
  }
}

// Pass 1's per-thread buffers: the transposed query block, P and dP (then dS) for every key up to
// the block's last query, the dq total.
struct RowScratch {
  std::vector<float> qt, got, p_keys, dp_keys, total;
  explicit RowScratch(const Problem& p)
      : qt(p.dim_pad * kBlock), got(p.dim_pad * kBlock), p_keys(p.length * kBlock), dp_keys(p.length * kBlock),
        total(kBlock * p.dim_pad) {}
};

// Pass 2's: the transposed key block, one query chunk's P and dS, the per-head and group totals.
struct KeyScratch {
  std::vector<float> kt, vt, p_tile, ds_tile, dk_tot, dv_tot, dk_sum, dv_sum;
  explicit KeyScratch(const Problem& p)
      : kt(p.dim_pad * kBlock), vt(p.dim_pad * kBlock), p_tile(p.split * kBlock), ds_tile(p.split * kBlock),
        dk_tot(kBlock * p.dim_pad), dv_tot(kBlock * p.dim_pad), dk_sum(kBlock * p.dim_pad),
        dv_sum(kBlock * p.dim_pad) {}
};

// Pass 1: D and dq for queries [i0, i0 + n) of (b, h).
void dq_block(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t n, RowScratch& s) {
  const int64_t kvh = h / p.group;
  float* qt = s.qt.data();
  float* got = s.got.data();
  transpose_rows(p.q.row(b, h, i0), p.q.s2, n, p.dim_pad, qt);
  transpose_rows(p.go.row(b, h, i0), p.go.s2, n, p.dim_pad, got);
  const int64_t row0 = (b * p.heads + h) * p.length + i0;
  alignas(64) float m_l[kBlock] = {}, l_l[kBlock], d_l[kBlock];
  for (int i = 0; i < kBlock; ++i) l_l[i] = 1.0f;
  for (int64_t i = 0; i < n; ++i) {
    m_l[i] = p.m[row0 + i];
    l_l[i] = p.l[row0 + i];
  }

  const int64_t last = i0 + n - 1;
  const int64_t last_chunk = last / p.split;
  // Group g (queries i0 + 16 g ...) sees the chunks up to the one of its last query; a chunk is
  // processed for groups [first_group(c), n_groups) only, so that each query walks exactly the
  // chunks it would walk in a block of 16.
  const int n_groups = static_cast<int>((n + kVec - 1) / kVec);
  int64_t group_last_chunk[kGroups];
  for (int g = 0; g < n_groups; ++g) group_last_chunk[g] = std::min<int64_t>(i0 + g * kVec + kVec - 1, last) / p.split;
  auto first_group = [&](int64_t c) {
    int g = 0;
    while (group_last_chunk[g] < c) ++g;
    return g;
  };
  float* pk = s.p_keys.data();    // key j's s, then its P, at pk[j * kBlock + lane]
  float* dpk = s.dp_keys.data();  // key j's dP, then its dS
  // Sweep 1: s, dP, P and D.
  vfloat d_v[kGroups];
  for (int64_t c = 0; c <= last_chunk; ++c) {
    const int64_t start = c * p.split, n_keys = std::min(start + p.split, last + 1) - start;
    const int g_lo = first_group(c);
    float* s_c = pk + start * kBlock;
    float* dp_c = dpk + start * kBlock;
    lane_dots_to(qt + g_lo * kVec, p.k.row(b, kvh, start), p.k.s2, n_keys, p.dim, n_groups - g_lo, s_c + g_lo * kVec);
    lane_dots_to(got + g_lo * kVec, p.v.row(b, kvh, start), p.v.s2, n_keys, p.dim, n_groups - g_lo,
                 dp_c + g_lo * kVec);
    for (int g = g_lo; g < n_groups; ++g) {
#if defined(FUSEDTX_AVX2)
      // The same lanes on one-register halves (a 16-lane vfloat lives in memory on AVX2).
      alignas(64) float sums[kVec];
      for (int hh = 0; hh < 2; ++hh) {
        const int off = g * kVec + 8 * hh;
        const RVec<float> m_h = r8_load(m_l + off), l_h = r8_load(l_l + off);
        RVec<float> sum = RVec<float>{};
        for (int64_t jj = 0; jj < n_keys; ++jj) {
          const uint32_t valid = static_cast<mask16>(~first_lanes(start + jj - i0 - g * kVec)) >> (8 * hh);
          float* sj = s_c + jj * kBlock + off;
          const RVec<float> pj = r8_select(valid, exp_f32((r8_load(sj) * p.scale) - m_h) / l_h, RVec<float>{});
          r8_store(sj, pj);
          sum = r8_select(valid, r8_fma(pj, r8_load(dp_c + jj * kBlock + off), sum), sum);
        }
        r8_store(sums + 8 * hh, sum);
      }
      const vfloat chunk_sum = vload(sums);
#else
      const vfloat m_v = vload(m_l + g * kVec), l_v = vload(l_l + g * kVec);
      vfloat chunk_sum = vsplat(0.0f);
      for (int64_t jj = 0; jj < n_keys; ++jj) {
        // query lane i of group g sees key start + jj when i0 + 16 g + i >= start + jj
        const mask16 valid = static_cast<mask16>(~first_lanes(start + jj - i0 - g * kVec));
        float* sj = s_c + jj * kBlock + g * kVec;
        const vfloat pj = vselect(valid, exp_f32((vload(sj) * p.scale) - m_v) / l_v, vsplat(0.0f));
        vstore(sj, pj);
        // a pair above the diagonal is no term of D's chain (its dP may be inf or NaN)
        chunk_sum = vselect(valid, vfma(pj, vload(dp_c + jj * kBlock + g * kVec), chunk_sum), chunk_sum);
      }
#endif
      d_v[g] = c == 0 ? chunk_sum : d_v[g] + chunk_sum;
    }
  }
  for (int g = 0; g < n_groups; ++g) vstore(d_l + g * kVec, d_v[g]);
  for (int64_t i = 0; i < n; ++i) p.d_row[row0 + i] = d_l[i];

  // Sweep 2: dS = P * (dP - D) and dq, chunk by chunk.
  float* total = s.total.data();
  for (int64_t c = 0; c <= last_chunk; ++c) {
    const int64_t start = c * p.split, n_keys = std::min(start + p.split, last + 1) - start;
    const int g_lo = first_group(c);
    float* ds = dpk + start * kBlock;
    for (int64_t jj = 0; jj < n_keys; ++jj) {
      const float* pj = pk + (start + jj) * kBlock;
      for (int g = g_lo; g < n_groups; ++g) {
        float* dsj = ds + jj * kBlock + g * kVec;
        vstore(dsj, vload(pj + g * kVec) * (vload(dsj) - d_v[g]));
      }
    }
    // query lane a sees keys start + jj <= i0 + a
    accumulate(ds, p.k.row(b, kvh, start), p.k.s2, n_keys, Seen{-kBlock, i0 - start + 1}, g_lo * kVec,
               static_cast<int>(n), p.dim_pad, total, c == 0 ? Total::kFirst : Total::kAdd);
  }
  // Chunks wholly above a query's diagonal: the reference adds their +0 sums.
  for (int64_t i = 0; i < n; ++i) {
    const bool masked_chunks_follow = group_last_chunk[i / kVec] < p.n_chunks - 1;
    float* out = p.dq.row(b, h, i0 + i);
    const float* t = total + i * p.dim_pad;
    for (int64_t e = 0; e < p.dim_pad; e += kVec) {
      vfloat x = vload(t + e);
      if (masked_chunks_follow) x = x + vsplat(0.0f);
      vstore(out + e, x * p.scale);
    }
  }
}

// Pass 2: dk and dv for keys [j0, j0 + n) of (b, kv head kvh).
void dkdv_block(const Problem& p, int64_t b, int64_t kvh, int64_t j0, int64_t n, KeyScratch& s) {
  float* kt = s.kt.data();
  float* vt = s.vt.data();
  transpose_rows(p.k.row(b, kvh, j0), p.k.s2, n, p.dim_pad, kt);
  transpose_rows(p.v.row(b, kvh, j0), p.v.s2, n, p.dim_pad, vt);
  float* pt = s.p_tile.data();
  float* ds = s.ds_tile.data();
  float* dk_tot = s.dk_tot.data();
  float* dv_tot = s.dv_tot.data();
  float* dk_sum = s.dk_sum.data();
  float* dv_sum = s.dv_sum.data();
  const int64_t acc_size = kBlock * p.dim_pad;
  std::fill(dk_sum, dk_sum + acc_size, 0.0f);
  std::fill(dv_sum, dv_sum + acc_size, 0.0f);
  // The chunk of the block's first key. With S = 16 a block of 32 keys straddles two chunks: its
  // second group's keys then get the first chunk's partial, which is exactly +0 for them (no query
  // of that chunk sees them), where the reference starts their totals as +0 + partial: the same.
  const int64_t own_chunk = j0 / p.split;
  const int n_groups = static_cast<int>((n + kVec - 1) / kVec);
  vfloat sc[kGroups * kDotRows], dp[kGroups * kDotRows];
  for (int64_t hh = 0; hh < p.group; ++hh) {
    const int64_t h = kvh * p.group + hh;
    const int64_t row0 = (b * p.heads + h) * p.length;
    for (int64_t c = own_chunk; c < p.n_chunks; ++c) {
      const int64_t start = std::max(c * p.split, j0), stop = std::min((c + 1) * p.split, p.length);
      const int64_t n_queries = stop - start;
      const float* qr = p.q.row(b, h, start);
      const float* gr = p.go.row(b, h, start);
      // s_i[g * stride], dp_i[g * stride]: query start + ii's dot products with group g's keys.
      auto finish = [&](int64_t ii, const vfloat* s_i, const vfloat* dp_i, int stride) {
        const int64_t i = start + ii;
#if defined(FUSEDTX_AVX2)
        // The same lanes on one-register halves (a 16-lane vfloat lives in memory on AVX2).
        const RVec<float> m_i = RVec<float>{} + p.m[row0 + i], l_i = RVec<float>{} + p.l[row0 + i],
                          d_i = RVec<float>{} + p.d_row[row0 + i];
        for (int g = 0; g < n_groups; ++g) {
          const uint32_t valid = first_lanes(i - j0 - g * kVec + 1) & first_lanes(n - g * kVec);
          const float* s_f = reinterpret_cast<const float*>(&s_i[g * stride]);
          const float* dp_f = reinterpret_cast<const float*>(&dp_i[g * stride]);
#pragma GCC unroll 2
          for (int hh = 0; hh < 2; ++hh) {
            const RVec<float> pi =
                r8_select(valid >> (8 * hh), exp_f32((r8_load(s_f + 8 * hh) * p.scale) - m_i) / l_i, RVec<float>{});
            r8_store(pt + ii * kBlock + g * kVec + 8 * hh, pi);
            r8_store(ds + ii * kBlock + g * kVec + 8 * hh, pi * (r8_load(dp_f + 8 * hh) - d_i));
          }
        }
#else
        const vfloat m_i = vsplat(p.m[row0 + i]), l_i = vsplat(p.l[row0 + i]), d_i = vsplat(p.d_row[row0 + i]);
        for (int g = 0; g < n_groups; ++g) {
          // key lane l of group g is seen by query i when j0 + 16 g + l <= i
          const mask16 valid = first_lanes(i - j0 - g * kVec + 1) & first_lanes(n - g * kVec);
          const vfloat pi = vselect(valid, exp_f32((s_i[g * stride] * p.scale) - m_i) / l_i, vsplat(0.0f));
          vstore(pt + ii * kBlock + g * kVec, pi);
          vstore(ds + ii * kBlock + g * kVec, pi * (dp_i[g * stride] - d_i));
        }
#endif
      };
      int64_t ii = 0;
      for (; ii + kDotRows <= n_queries; ii += kDotRows) {
        lane_dots_groups<kDotRows>(n_groups, kt, qr + ii * p.q.s2, p.q.s2, p.dim, sc);
        lane_dots_groups<kDotRows>(n_groups, vt, gr + ii * p.go.s2, p.go.s2, p.dim, dp);
        for (int r = 0; r < kDotRows; ++r) finish(ii + r, sc + r, dp + r, kDotRows);
      }
      for (; ii < n_queries; ++ii) {
        lane_dots_groups<1>(n_groups, kt, qr + ii * p.q.s2, p.q.s2, p.dim, sc);
        lane_dots_groups<1>(n_groups, vt, gr + ii * p.go.s2, p.go.s2, p.dim, dp);
        finish(ii, sc, dp, 1);
      }
      const Total mode = c > own_chunk ? Total::kAdd : (own_chunk > 0 ? Total::kZeroPlus : Total::kFirst);
      const Seen seen{j0 - start, n_queries};  // key lane a is seen by queries start + ii >= j0 + a
      accumulate(pt, gr, p.go.s2, n_queries, seen, 0, static_cast<int>(n), p.dim_pad, dv_tot, mode);
      accumulate(ds, qr, p.q.s2, n_queries, seen, 0, static_cast<int>(n), p.dim_pad, dk_tot, mode);
    }
    for (int64_t x = 0; x < n * p.dim_pad; x += kVec) {
      vstore(dk_sum + x, vload(dk_sum + x) + vload(dk_tot + x) * p.scale);
      vstore(dv_sum + x, vload(dv_sum + x) + vload(dv_tot + x));
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    std::memcpy(p.dk.row(b, kvh, j0 + j), dk_sum + j * p.dim_pad, p.dim_pad * sizeof(float));
    std::memcpy(p.dv.row(b, kvh, j0 + j), dv_sum + j * p.dim_pad, p.dim_pad * sizeof(float));
  }
}

// t as a float32 (B, H, T, dim_pad) view whose rows hold dim_pad readable floats: t itself when
// it is float32 with dim == dim_pad, else an exact zero-padded float32 copy (kept alive in `keep`).
View as_float_view(const at::Tensor& t, int64_t dim_pad, at::Tensor& keep) {
  if (t.scalar_type() == at::kFloat && t.size(3) == dim_pad && (t.stride(3) == 1)) {
    keep = t;
  } else {
    keep = at::zeros({t.size(0), t.size(1), t.size(2), dim_pad}, t.options().dtype(at::kFloat));
    keep.narrow(3, 0, t.size(3)).copy_(t);
  }
  return {keep.const_data_ptr<float>(), keep.stride(0), keep.stride(1), keep.stride(2)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cpu(
    const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& m,
    const at::Tensor& l, double scale, int64_t split_size) {
  constexpr const char* op = "causal_attention_backward";
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": unsupported dtype ", dtype,
              " (expected float32, float16 or bfloat16)");
  check_attention_backward_args(grad_o, q, k, v, m, l, split_size, at::kCPU, op);
  const int64_t batch = q.size(0), heads = q.size(1), length = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1);

  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  if (q.numel() == 0 || k.numel() == 0) {
    return {at::zeros(q.sizes(), opts), at::zeros(k.sizes(), opts), at::zeros(v.sizes(), opts)};
  }

  Problem p{};
  p.batch = batch;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.group = heads / kv_heads;
  p.length = length;
  p.dim = dim;
  p.dim_pad = (dim + kVec - 1) / kVec * kVec;
  p.split = split_size;
  p.n_chunks = (length + split_size - 1) / split_size;
  p.scale = static_cast<float>(scale);
  at::Tensor qf, kf, vf, gf;
  p.q = as_float_view(q, p.dim_pad, qf);
  p.k = as_float_view(k, p.dim_pad, kf);
  p.v = as_float_view(v, p.dim_pad, vf);
  p.go = as_float_view(grad_o, p.dim_pad, gf);
  const at::Tensor mc = m.contiguous(), lc = l.contiguous();
  p.m = mc.const_data_ptr<float>();
  p.l = lc.const_data_ptr<float>();
  at::Tensor d_row = at::empty({batch, heads, length}, q.options().dtype(at::kFloat));
  p.d_row = d_row.mutable_data_ptr<float>();
  // Outputs in float32 with padded rows; written straight into the result when that is float32
  // with dim == dim_pad.
  const auto fopts = opts.dtype(at::kFloat);
  at::Tensor dq = at::empty({batch, heads, length, p.dim_pad}, fopts);
  at::Tensor dk = at::empty({batch, kv_heads, length, p.dim_pad}, fopts);
  at::Tensor dv = at::empty({batch, kv_heads, length, p.dim_pad}, fopts);
  auto out_view = [](at::Tensor& t) -> OutView {
    return {t.mutable_data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
  };
  p.dq = out_view(dq);
  p.dk = out_view(dk);
  p.dv = out_view(dv);

  const int64_t blocks = (length + kBlock - 1) / kBlock;
  // Causal blocks' work grows (pass 1) or shrinks (pass 2) with their index: alternate short and
  // long ones so that the contiguous ranges handed to threads carry similar work (no bits change).
  auto interleaved = [blocks](int64_t r) { return r % 2 == 0 ? r / 2 : blocks - 1 - r / 2; };
  at::parallel_for(0, batch * heads * blocks, 1, [&](int64_t begin, int64_t end) {
    RowScratch scratch(p);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, i0 = interleaved(task % blocks) * kBlock;
      dq_block(p, bh / heads, bh % heads, i0, std::min<int64_t>(kBlock, length - i0), scratch);
    }
  });
  at::parallel_for(0, batch * kv_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    KeyScratch scratch(p);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, j0 = interleaved(task % blocks) * kBlock;
      dkdv_block(p, bh / kv_heads, bh % kv_heads, j0, std::min<int64_t>(kBlock, length - j0), scratch);
    }
  });

  auto finish = [&](at::Tensor& t) {
    if (dtype == at::kFloat && dim == p.dim_pad) return t;
    return t.narrow(3, 0, dim).to(dtype).contiguous();
  };
  return {finish(dq), finish(dk), finish(dv)};
}

}  // namespace
}  // namespace fusedtx::cpu

TORCH_LIBRARY_IMPL(fusedtx_native, CPU, m) {
  m.impl("causal_attention_backward", &fusedtx::cpu::causal_attention_backward_cpu);
}
