// Causal attention forward with a fixed split size on CPU: reference.causal_attention_forward, bit
// for bit (docs/design.md, "Attention split size").
//
// One task = (batch b, head h, block of up to 32 queries); tasks are spread over threads and
// nothing inside a task is split, so neither the thread count nor the batch changes any bits.
// A task walks the key chunks [cS, cS + S) from chunk 0 up to the chunk of its last query:
//   scores   per key, two 16-lane vectors (groups of 16 queries in the lanes): an FMA chain over
//            d ascending (broadcast k_j[d] times the transposed q[d] of each group), 8 keys
//            interleaved for ILP, then * scale; (query, key) pairs above the diagonal become
//            -inf (chunks that a whole group sees skip the masking). Blocks of at most 2 queries
//            (decode) put 16 keys in the lanes instead (K transposed 16 x 16 in registers,
//            broadcast q[d]): the same chain per (query, key), a full vector of work; their
//            softmax below runs 16 keys a vector too (key_lane_softmax, same bits).
//   softmax  lane-wise over the chunk's keys: m_c = max (keeping NaN, as the reference's amax),
//            p = exp_f32(s - m_c), l_c = sum from +0 in ascending key order (masked pairs give
//            p = +0, exactly as the reference).
//   P @ V    vectorised over the head dim e with p broadcast: per (query, e) one FMA chain over
//            the chunk's keys it sees ascending from +0 (the others are no terms: whatever v
//            holds there never reaches the query), 4 queries x up to 4 vectors of e at a time, and
//            merged at once into the running accumulator with a = exp_f32(m - m'), b = exp_f32(m_c - m')
//            as acc * a + acc_c * b (separate roundings: the file is built with -ffp-contract=off).
// Why 32 queries a task: each key broadcast then feeds two FMAs, and every K/V chunk is read
// once per 32 queries instead of per 16, which halves the traffic from L2/L3 once a head's K
// and V outgrow L2.
// Every lane computes exactly the scalar sequence of the reference, so a query's bits do not
// depend on which block (prefill, chunked prefill, decode) it sits in. Keys at or beyond
// seqlens[b] are never loaded: a block reads keys up to the position of its last query only.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace fusedtx::cpu {
namespace {

constexpr int kBlockQ = kLaneBlock;  // queries per task: the lanes of two 16-lane score vectors
constexpr int kGroups = kLaneGroups;  // the score vectors per key: group g holds queries 16 g ...
constexpr int kScoreKeys = 8;  // keys whose dot products are interleaved
constexpr int kPvQueries = 4;  // P @ V tile: queries x vectors of the head dim
constexpr int kPvVecs = 4;
constexpr int kKeyLaneQueries = 2;  // blocks of at most this many queries put keys in the score lanes

// max(a, b) lane-wise that keeps a NaN from either side, as torch.amax / torch.maximum do in the
// reference. vmax (a > b ? a : b) drops a NaN in a as soon as a later operand is compared, so a
// query whose last visible key scored NaN would get m = -inf from the masked keys after it in a
// full pass but m = NaN in decode, which stops at its last key: different bits for m and l.
inline vfloat vmax_nan(vfloat a, vfloat b) { return (a > b) | (a != a) ? a : b; }

// n (<= 16) elements of T at p as floats (exact conversions); lanes >= n are +0 and nothing
// past p + n is read.
template <typename T>
inline vfloat load_partial(const T* p, int64_t n) {
#if defined(FUSEDTX_AVX512)
  return reinterpret_cast<vfloat>(load16(p, first_lanes(n)));
#else
  alignas(64) T tmp[kVec] = {};
  for (int64_t l = 0; l < n; ++l) tmp[l] = p[l];
  return load_vec(tmp);
#endif
}

// Row `src` (n elements of T) as floats into dst, padded with +0 up to a multiple of 16.
template <typename T>
inline void load_row(float* dst, const T* src, int64_t n) {
  int64_t e = 0;
  for (; e + kVec <= n; e += kVec) vstore(dst + e, load_vec(src + e));
  if (e < n) vstore(dst + e, load_partial(src + e, n - e));
}

// Elements [0, n) of v into p, in T (round to nearest even).
template <typename T>
inline void store_partial(T* p, vfloat v, int64_t n) {
  if (n >= kVec) {
    store_vec(p, v);
    return;
  }
  alignas(64) T tmp[kVec];
  store_vec(tmp, v);
  std::memcpy(p, tmp, n * sizeof(T));
}

struct Problem {
  int64_t batch, heads, kv_heads, n_queries, dim, dim_pad;  // dim_pad: dim rounded up to 16
  int64_t split;
  float scale;
  const int64_t* seqlens;
  int64_t q_strides[3], k_strides[3], v_strides[3];  // batch, head, position (the last dim is contiguous)
};

// Rows of a chunk of K or V as float32: straight from the tensor when it is float32 with a head
// dim that is a multiple of 16, else converted into a zero-padded buffer.
struct Rows {
  const float* ptr;
  int64_t ld;
};

template <typename T>
Rows chunk_rows(const T* base, int64_t row_stride, int64_t n_rows, const Problem& p, float* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    if (p.dim % kVec == 0) return {base, row_stride};
  }
  for (int64_t j = 0; j < n_rows; ++j) load_row(buffer + j * p.dim_pad, base + j * row_stride, p.dim);
  return {buffer, p.dim_pad};
}

#if defined(FUSEDTX_AVX2)
using R8 = RVec<float>;  // one ymm: the r8_* helpers of common.h
#endif

// c[l] = column d0 + l of the 16 x 16 block of K at keys [j0, j0 + 16): lane t holds
// k[j0 + t][d0 + l], +0 for the keys t >= cnt (which are not read). k's rows hold dim_pad readable floats.
inline void transposed_block(Rows k, int64_t j0, int64_t cnt, int64_t d0, vfloat c[kVec]) {
#if defined(__AVX512F__)
  __m512 r[16];
  for (int l = 0; l < 16; ++l) r[l] = l < cnt ? _mm512_loadu_ps(k.ptr + (j0 + l) * k.ld + d0) : _mm512_setzero_ps();
  transpose16(r);
  for (int l = 0; l < 16; ++l) c[l] = reinterpret_cast<vfloat>(r[l]);
#else
  alignas(64) float tmp[kVec][kVec];
  for (int l = 0; l < kVec; ++l)
    for (int t = 0; t < kVec; ++t) tmp[l][t] = t < cnt ? k.ptr[(j0 + t) * k.ld + d0 + l] : 0.0f;
  for (int l = 0; l < kVec; ++l) c[l] = vload(tmp[l]);
#endif
}

// Scores of queries [i_lo, i_lo + NQ) of q_t against keys [0, n_keys) of k, 16 keys in the
// lanes of a vector: s[i * s_ld + j] = (FMA chain over d < dim ascending from +0 of
// q_i[d] * k_j[d]) * scale, the lane path's chain (lane_dots), so the same bits. For decode,
// where a lane per query would leave most of each vector idle. Each 16 x 16 block of K is
// transposed in registers and its columns go straight into the chains, rather than through a
// stored transposed copy of K that would be read back.
template <int NQ>
void score_keys_transposed(const float* q_t, int i_lo, Rows k, int64_t n_keys, int64_t dim, float scale, float* s,
                           int64_t s_ld) {
#if defined(FUSEDTX_AVX2)
  // The same chains on ymm halves: keys [j0 + 16 jb + 8 kh, + 8) in acc[jb][i][kh], each 8 x 8
  // block of K transposed in registers (transpose8), its columns fed in ascending d. A single
  // query takes two 16-key blocks at once: four chains, not two, hide the FMA latency.
  constexpr int JB = NQ == 1 ? 2 : 1;
  for (int64_t j0 = 0; j0 < n_keys; j0 += JB * kVec) {
    int64_t cnt[JB];
    __m256 acc[JB][NQ][2];
    for (int jb = 0; jb < JB; ++jb) {
      cnt[jb] = std::clamp<int64_t>(n_keys - j0 - jb * kVec, 0, kVec);
      for (int i = 0; i < NQ; ++i) acc[jb][i][0] = acc[jb][i][1] = _mm256_setzero_ps();
    }
    for (int64_t d0 = 0; d0 < dim; d0 += 8) {
      const int64_t dn = std::min<int64_t>(8, dim - d0);
      for (int jb = 0; jb < JB; ++jb) {
        for (int kh = 0; kh < 2; ++kh) {
          const int64_t key0 = j0 + jb * kVec + 8 * kh;
          __m256 c[8];
          for (int t = 0; t < 8; ++t)
            c[t] = 8 * kh + t < cnt[jb] ? _mm256_loadu_ps(k.ptr + (key0 + t) * k.ld + d0) : _mm256_setzero_ps();
          transpose8(c);
          for (int64_t l = 0; l < dn; ++l)
            for (int i = 0; i < NQ; ++i)
              acc[jb][i][kh] =
                  _mm256_fmadd_ps(_mm256_broadcast_ss(q_t + (d0 + l) * kBlockQ + i_lo + i), c[l], acc[jb][i][kh]);
        }
      }
    }
    const __m256 sc = _mm256_set1_ps(scale);
    for (int jb = 0; jb < JB && cnt[jb] > 0; ++jb) {
      for (int i = 0; i < NQ; ++i) {
        _mm256_storeu_ps(s + i * s_ld + j0 + jb * kVec, _mm256_mul_ps(acc[jb][i][0], sc));
        _mm256_storeu_ps(s + i * s_ld + j0 + jb * kVec + 8, _mm256_mul_ps(acc[jb][i][1], sc));
      }
    }
  }
#else
  for (int64_t j0 = 0; j0 < n_keys; j0 += kVec) {
    const int64_t cnt = std::min<int64_t>(kVec, n_keys - j0);
    vfloat acc[NQ];
    for (int i = 0; i < NQ; ++i) acc[i] = vsplat(0.0f);
    for (int64_t d0 = 0; d0 < dim; d0 += kVec) {
      vfloat c[kVec];
      transposed_block(k, j0, cnt, d0, c);
      const int64_t dn = std::min<int64_t>(kVec, dim - d0);
      for (int64_t l = 0; l < dn; ++l)
        for (int i = 0; i < NQ; ++i) acc[i] = vfma(vbroadcast(q_t[(d0 + l) * kBlockQ + i_lo + i]), c[l], acc[i]);
    }
    for (int i = 0; i < NQ; ++i) vstore(s + i * s_ld + j0, acc[i] * scale);
  }
#endif
}

// The softmax statistics of one query over its first n_valid scores s[0 .. n_valid) (16 keys a
// vector; the chunk's keys past n_valid are masked): m = the lane path's fold m = vmax_nan(m, s_j)
// over the keys ascending from -inf, p_j = exp_f32(s_j - m) into p_col[j * kBlockQ] for all
// n_keys keys (+0 when masked), l = sum of p_j ascending from +0. The same bits as the lane
// path, with a sixteenth of its exp_f32 vectors. Max is order-free except for which of tied
// +0/-0 scores wins (the fold keeps the last) and which NaN (the first): when the maximum is zero
// or a NaN, the fold is replayed in order.
inline void key_lane_softmax(const float* s, int64_t n_valid, int64_t n_keys, float* p_col, float* m_out, float* l_out) {
  vfloat mv = vsplat(kNegInf);
  for (int64_t j0 = 0; j0 < n_valid; j0 += kVec)
    mv = vmax_nan(mv, vselect(first_lanes(n_valid - j0), vload(s + j0), vsplat(kNegInf)));
  alignas(64) float lanes[kVec];
  vstore(lanes, mv);
  float m = kNegInf;
  bool replay = false;
  for (int t = 0; t < kVec; ++t) {
    replay |= lanes[t] != lanes[t];
    m = lanes[t] > m ? lanes[t] : m;
  }
  if (replay || m == 0.0f) {
    m = kNegInf;
    for (int64_t j = 0; j < n_valid; ++j) m = (m > s[j]) || (m != m) ? m : s[j];
  }
  float l = 0.0f;
  alignas(64) float pj[kVec];
  for (int64_t j0 = 0; j0 < n_keys; j0 += kVec) {
    vstore(pj, vselect(first_lanes(n_valid - j0), exp_f32(vload(s + j0) - m), vsplat(0.0f)));
    const int64_t cnt = std::min<int64_t>(kVec, n_keys - j0);
    for (int64_t t = 0; t < cnt; ++t) {
      l = l + pj[t];
      p_col[(j0 + t) * kBlockQ] = pj[t];
    }
  }
  *m_out = m;
  *l_out = l;
}

#if defined(FUSEDTX_AVX2)
// pv_tile's arithmetic for NQ queries from q0 and NE vectors of e from e0, on ymm halves, in
// registers (NQ x NE x 2 <= 12 accumulators, beside NE x 2 of v and a broadcast; fully unrolled
// loops).
template <int NQ, int NE>
inline void pv_pass(const float* p_tile, int64_t n_keys, int64_t seen, Rows v, int q0, int64_t e0, float* o,
                    int64_t o_ld, bool first, const float* alpha, const float* beta) {
  static_assert(NQ * NE <= 6 && NE <= 4, "at most 12 ymm accumulators");
  const int64_t all_see = std::min(n_keys, seen + q0);
  const int64_t any_sees = std::min(n_keys, seen + q0 + NQ - 1);
  __m256 acc[NQ][NE][2];
#pragma GCC unroll 6
  for (int i = 0; i < NQ; ++i)
#pragma GCC unroll 4
    for (int e = 0; e < NE; ++e) acc[i][e][0] = acc[i][e][1] = _mm256_setzero_ps();
  auto key = [&](int64_t j, bool all) __attribute__((always_inline)) {
    const float* vrow = v.ptr + j * v.ld + e0;
    __m256 vj[NE][2];
#pragma GCC unroll 4
    for (int e = 0; e < NE; ++e) {
      vj[e][0] = _mm256_loadu_ps(vrow + e * kVec);
      vj[e][1] = _mm256_loadu_ps(vrow + e * kVec + 8);
      asm("" : "+x"(vj[e][0]), "+x"(vj[e][1]));  // loaded once, not folded into each query's FMA
    }
#pragma GCC unroll 6
    for (int i = 0; i < NQ; ++i) {
      if (!all && j >= seen + q0 + i) continue;
      const __m256 pj = _mm256_broadcast_ss(p_tile + j * kBlockQ + q0 + i);
#pragma GCC unroll 4
      for (int e = 0; e < NE; ++e) {
        acc[i][e][0] = _mm256_fmadd_ps(pj, vj[e][0], acc[i][e][0]);
        acc[i][e][1] = _mm256_fmadd_ps(pj, vj[e][1], acc[i][e][1]);
      }
    }
  };
  int64_t j = 0;
  for (; j < all_see; ++j) key(j, true);    // keys every query of the pass sees
  for (; j < any_sees; ++j) key(j, false);  // keys only its later queries see
#pragma GCC unroll 6
  for (int i = 0; i < NQ; ++i) {
    const __m256 a = _mm256_set1_ps(first ? 0.0f : alpha[q0 + i]), b = _mm256_set1_ps(first ? 0.0f : beta[q0 + i]);
#pragma GCC unroll 4
    for (int e = 0; e < NE; ++e) {
      float* orow = o + (q0 + i) * o_ld + e0 + e * kVec;
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __m256 out = acc[i][e][h];
        if (!first) out = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(orow + 8 * h), a), _mm256_mul_ps(out, b));
        _mm256_storeu_ps(orow + 8 * h, out);
      }
    }
  }
}
#endif

// acc_c = p @ v for NQ queries (lanes q0 ... of the P tile) and NE vectors of e starting at e0:
// per query one FMA chain over the keys it sees, ascending from +0. Lane q sees the chunk's keys
// j < seen + q (its position is the block's first plus q); the keys after it are no terms of its
// chain (skipped, not added as fma(+0, v_j, acc), which an inf or NaN in v_j would turn into NaN:
// docs/design.md, "Attention split size"). Then merged into the running accumulators: o = acc_c
// on the first chunk, else o = o * alpha + acc_c * beta.
template <int NQ, int NE>
inline void pv_tile(const float* p_tile, int64_t n_keys, int64_t seen, Rows v, int q0, int64_t e0, float* o,
                    int64_t o_ld, bool first, const float* alpha, const float* beta) {
#if defined(FUSEDTX_AVX2)
  // AVX2's 16 ymm registers hold 8 accumulators beside the loads: passes of QP queries x EP
  // vectors of e (2 x 2, or a single query's whole head), the EP vectors of v loaded once per key
  // for QP queries. Each (query, e) chain is unchanged.
  constexpr int QP = NQ >= 2 ? 2 : 1;
  static_assert(NQ % QP == 0, "pv_tile takes 1 or an even number of queries");
  constexpr int EP = QP == 1 ? NE : (NE % 2 == 0 ? 2 : 1);
  for (int qi = 0; qi < NQ; qi += QP)
    for (int e = 0; e < NE; e += EP)
      pv_pass<QP, EP>(p_tile, n_keys, seen, v, q0 + qi, e0 + e * kVec, o, o_ld, first, alpha, beta);
#else
  const int64_t all_see = std::min(n_keys, seen + q0);            // keys every query of the tile sees
  const int64_t any_sees = std::min(n_keys, seen + q0 + NQ - 1);  // keys its last query sees
  vfloat acc[NQ][NE];
  for (int i = 0; i < NQ; ++i)
    for (int e = 0; e < NE; ++e) acc[i][e] = vsplat(0.0f);
  for (int64_t j = 0; j < any_sees; ++j) {
    const float* vrow = v.ptr + j * v.ld + e0;
    vfloat vj[NE];
    for (int e = 0; e < NE; ++e) vj[e] = vload(vrow + e * kVec);
    const bool all = j < all_see;
    for (int i = 0; i < NQ; ++i) {
      if (!all && j >= seen + q0 + i) continue;
      const vfloat pj = vbroadcast(p_tile[j * kBlockQ + q0 + i]);
      for (int e = 0; e < NE; ++e) acc[i][e] = vfma(pj, vj[e], acc[i][e]);
    }
  }
  for (int i = 0; i < NQ; ++i) {
    float* orow = o + (q0 + i) * o_ld + e0;
    if (first) {
      for (int e = 0; e < NE; ++e) vstore(orow + e * kVec, acc[i][e]);
    } else {
      const float a = alpha[q0 + i], b = beta[q0 + i];
      for (int e = 0; e < NE; ++e) vstore(orow + e * kVec, vload(orow + e * kVec) * a + acc[i][e] * b);
    }
  }
#endif
}

template <int NQ>
inline void pv_queries(const float* p_tile, int64_t n_keys, int64_t seen, Rows v, int q0, int64_t dim_pad, float* o,
                       bool first, const float* alpha, const float* beta) {
  int64_t e0 = 0;
  for (; e0 + kPvVecs * kVec <= dim_pad; e0 += kPvVecs * kVec)
    pv_tile<NQ, kPvVecs>(p_tile, n_keys, seen, v, q0, e0, o, dim_pad, first, alpha, beta);
  switch ((dim_pad - e0) / kVec) {
    case 0: break;
    case 1: pv_tile<NQ, 1>(p_tile, n_keys, seen, v, q0, e0, o, dim_pad, first, alpha, beta); break;
    case 2: pv_tile<NQ, 2>(p_tile, n_keys, seen, v, q0, e0, o, dim_pad, first, alpha, beta); break;
    case 3: pv_tile<NQ, 3>(p_tile, n_keys, seen, v, q0, e0, o, dim_pad, first, alpha, beta); break;
  }
}

struct Scratch {
  std::vector<float> q_t, k_buf, s_keys, v_buf, p_tile, o;
  explicit Scratch(const Problem& p, int64_t max_keys)
      : q_t(p.dim * kBlockQ),
        k_buf(max_keys * p.dim_pad),
        s_keys(kKeyLaneQueries * ((max_keys + kVec - 1) / kVec * kVec)),
        v_buf(max_keys * p.dim_pad),
        p_tile(max_keys * kBlockQ),
        o(kBlockQ * p.dim_pad) {}
};

// One task: queries [i0, i0 + n) of (b, h).
template <typename T>
void attend_block(const Problem& p, const T* q, const T* k, const T* v, T* out, float* m_out, float* l_out,
                  int64_t b, int64_t h, int64_t i0, int64_t n, Scratch& s) {
  const int64_t length = p.seqlens[b];
  const int64_t pos0 = length - p.n_queries + i0;  // position of the block's first query
  const int64_t last = pos0 + n - 1;               // and of its last: keys up to it are read
  const int64_t kvh = h / (p.heads / p.kv_heads);
  const T* qb = q + b * p.q_strides[0] + h * p.q_strides[1];
  const T* kb = k + b * p.k_strides[0] + kvh * p.k_strides[1];
  const T* vb = v + b * p.v_strides[0] + kvh * p.v_strides[1];

  // q transposed: q_t[d * 16 + lane] = q[i0 + lane][d]; lanes >= n are +0.
  {
    alignas(64) float row[kVec];
    float* q_t = s.q_t.data();
    std::fill(s.q_t.begin(), s.q_t.end(), 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      const T* qrow = qb + (i0 + i) * p.q_strides[2];
      for (int64_t d0 = 0; d0 < p.dim; d0 += kVec) {
        const int64_t cnt = std::min<int64_t>(kVec, p.dim - d0);
        vstore(row, load_partial(qrow + d0, cnt));
        for (int64_t d = 0; d < cnt; ++d) q_t[(d0 + d) * kBlockQ + i] = row[d];
      }
    }
  }

  // Group g holds queries i0 + 16 g ... (lanes >= n are idle); groups [g_lo, n_groups) see a chunk.
  const int n_groups = static_cast<int>((n + kVec - 1) / kVec);
  vfloat m_run[kGroups], l_run[kGroups];
  alignas(64) float alpha[kBlockQ], beta[kBlockQ];
  vfloat scores[kGroups * kScoreKeys];
  float* o_acc = s.o.data();
  float* p_tile = s.p_tile.data();

  for (int64_t start = 0; start <= last; start += p.split) {
    const int64_t n_keys = std::min(p.split, last + 1 - start);
    const bool first = start == 0;
    const bool key_lanes = n <= kKeyLaneQueries;
    const int g_lo = static_cast<int>(std::max<int64_t>(0, start - pos0) / kVec);
    const Rows kr = chunk_rows(kb + start * p.k_strides[2], p.k_strides[2], n_keys, p, s.k_buf.data());
    // Lanes (queries) of group g that see key start + j: position >= start + j, i.e. lane >= start + j - pos(g).
    auto valid = [&](int g, int64_t j) -> mask16 {
      const mask16 lanes = first_lanes(n - g * kVec);
      const int64_t lo = start + j - pos0 - g * kVec;
      return lo <= 0 ? lanes : static_cast<mask16>(lanes & ~first_lanes(lo));
    };
    // Groups whose every lane sees the whole chunk skip the masking (a select per key and vector).
    mask16 sees[kGroups];
    bool unmasked[kGroups];
    for (int g = g_lo; g < n_groups; ++g) {
      sees[g] = valid(g, 0);
      unmasked[g] = valid(g, n_keys - 1) == 0xFFFF;
    }

    // Scores (stored in p_tile) and their lane-wise max.
    vfloat m_c[kGroups];
    for (int g = g_lo; g < n_groups; ++g) m_c[g] = vsplat(kNegInf);
    int64_t j = 0;
    auto keep = [&](int g, int64_t jj, vfloat sc) {
      if (!unmasked[g]) sc = vselect(valid(g, jj), sc, vsplat(kNegInf));
      m_c[g] = vmax_nan(m_c[g], sc);
      vstore(p_tile + jj * kBlockQ + g * kVec, sc);
    };
    vfloat l_key_lanes = vsplat(0.0f);
    if (key_lanes) {
      // Lanes [i_lo, n) see this chunk; the others keep m_c = -inf, l_c = +0 (all masked).
      const int i_lo = static_cast<int>(std::max<int64_t>(0, start - pos0));
      const int64_t s_ld = (n_keys + kVec - 1) / kVec * kVec;
      float* s_keys = s.s_keys.data();
      if (n - i_lo == 2) {
        score_keys_transposed<2>(s.q_t.data(), i_lo, kr, n_keys, p.dim, p.scale, s_keys, s_ld);
      } else {
        score_keys_transposed<1>(s.q_t.data(), i_lo, kr, n_keys, p.dim, p.scale, s_keys, s_ld);
      }
      alignas(64) float m_l[kVec], l_l[kVec];
      for (int t = 0; t < kVec; ++t) {
        m_l[t] = kNegInf;
        l_l[t] = 0.0f;
      }
      for (int64_t i = i_lo; i < n; ++i) {
        const int64_t n_valid = std::min(n_keys, pos0 + i - start + 1);  // query i sees keys <= its position
        key_lane_softmax(s_keys + (i - i_lo) * s_ld, n_valid, n_keys, p_tile + i, &m_l[i], &l_l[i]);
      }
      m_c[0] = vload(m_l);
      l_key_lanes = vload(l_l);
    } else {
      const float* q_t = s.q_t.data() + g_lo * kVec;
      const int ng = n_groups - g_lo;
      // s = (FMA chain over d of q[d] k_j[d]) * scale, kScoreKeys keys at a time.
#if defined(FUSEDTX_AVX2)
      // keep() on one-register halves, the running maxima in registers (a 16-lane m_c has none
      // without AVX-512): the same lanes, the same fold over the keys.
      R8 m_h[kGroups][2];
#pragma GCC unroll 2
      for (int g = 0; g < kGroups; ++g) m_h[g][0] = m_h[g][1] = R8{} + kNegInf;
      auto keep8 = [&](int g, int64_t jj, const vfloat& sc16) __attribute__((always_inline)) {
        const mask16 live = unmasked[g] ? mask16{0xFFFF} : valid(g, jj);
        const float* sc_f = reinterpret_cast<const float*>(&sc16);
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          R8 sc = r8_load(sc_f + 8 * h) * p.scale;
          if (!unmasked[g]) sc = r8_select(static_cast<uint32_t>(live >> (8 * h)), sc, R8{} + kNegInf);
          m_h[g][h] = (m_h[g][h] > sc) | (m_h[g][h] != m_h[g][h]) ? m_h[g][h] : sc;
          r8_store(p_tile + jj * kBlockQ + g * kVec + 8 * h, sc);
        }
      };
      for (; j + kScoreKeys <= n_keys; j += kScoreKeys) {
        lane_dots_groups<kScoreKeys>(ng, q_t, kr.ptr + j * kr.ld, kr.ld, p.dim, scores);
#pragma GCC unroll 2
        for (int g = 0; g < kGroups; ++g) {
          if (g < g_lo || g >= n_groups) continue;
#pragma GCC unroll 8
          for (int i = 0; i < kScoreKeys; ++i) keep8(g, j + i, scores[(g - g_lo) * kScoreKeys + i]);
        }
      }
      for (; j < n_keys; ++j) {
        lane_dots_groups<1>(ng, q_t, kr.ptr + j * kr.ld, kr.ld, p.dim, scores);
#pragma GCC unroll 2
        for (int g = 0; g < kGroups; ++g) {
          if (g >= g_lo && g < n_groups) keep8(g, j, scores[g - g_lo]);
        }
      }
      for (int g = g_lo; g < n_groups; ++g) {
        alignas(64) float m_lanes[kVec];
        r8_store(m_lanes, m_h[g][0]);
        r8_store(m_lanes + 8, m_h[g][1]);
        m_c[g] = vload(m_lanes);
      }
#else
      for (; j + kScoreKeys <= n_keys; j += kScoreKeys) {
        lane_dots_groups<kScoreKeys>(ng, q_t, kr.ptr + j * kr.ld, kr.ld, p.dim, scores);
        for (int g = 0; g < ng; ++g)
          for (int i = 0; i < kScoreKeys; ++i) keep(g_lo + g, j + i, scores[g * kScoreKeys + i] * p.scale);
      }
      for (; j < n_keys; ++j) {
        lane_dots_groups<1>(ng, q_t, kr.ptr + j * kr.ld, kr.ld, p.dim, scores);
        for (int g = 0; g < ng; ++g) keep(g_lo + g, j, scores[g] * p.scale);
      }
#endif
    }
    for (int g = g_lo; g < n_groups; ++g) {
      // p = exp_f32(s - m_c) (+0 where masked) and l_c, ascending over keys from +0 (a decode
      // block's came from key_lane_softmax; l_key_lanes is +0 otherwise).
      vfloat l_c = l_key_lanes;
      if (!key_lanes) {
        const vfloat m_sub = vselect(sees[g], m_c[g], vsplat(0.0f));
        float* p_col = p_tile + g * kVec;
#if defined(FUSEDTX_AVX2)
        // The same lanes on two one-register halves: a 16-lane l_c and m_sub have no register
        // without AVX-512, and GCC kept them in memory, a store and reload per key.
        alignas(64) float halves[2][kVec];
        vstore(halves[0], m_sub);
        vstore(halves[1], l_c);
        R8 m_h[2], l_h[2];
        for (int h = 0; h < 2; ++h) {
          m_h[h] = r8_load(halves[0] + 8 * h);
          l_h[h] = r8_load(halves[1] + 8 * h);
        }
        for (j = 0; j < n_keys; ++j) {
          const mask16 live = unmasked[g] ? mask16{0xFFFF} : valid(g, j);
#pragma GCC unroll 2
          for (int h = 0; h < 2; ++h) {
            R8 pj = exp_f32(r8_load(p_col + j * kBlockQ + 8 * h) - m_h[h]);
            if (!unmasked[g]) pj = r8_select(static_cast<uint32_t>(live >> (8 * h)), pj, R8{});
            r8_store(p_col + j * kBlockQ + 8 * h, pj);
            l_h[h] = l_h[h] + pj;
          }
        }
        for (int h = 0; h < 2; ++h) r8_store(halves[1] + 8 * h, l_h[h]);
        l_c = vload(halves[1]);
#else
        for (j = 0; j < n_keys; ++j) {
          vfloat pj = exp_f32(vload(p_col + j * kBlockQ) - m_sub);
          if (!unmasked[g]) pj = vselect(valid(g, j), pj, vsplat(0.0f));
          vstore(p_col + j * kBlockQ, pj);
          l_c = l_c + pj;
        }
#endif
      }
      // Merge the statistics; alpha, beta for the accumulators.
      if (first) {
        m_run[g] = m_c[g];
        l_run[g] = l_c;
      } else {
        const vfloat m_new = vmax_nan(m_run[g], m_c[g]);
        const vfloat a = exp_f32(m_run[g] - m_new);
        const vfloat bb = exp_f32(vselect(sees[g], m_c[g] - m_new, vsplat(0.0f)));
        vstore(alpha + g * kVec, a);
        vstore(beta + g * kVec, bb);
        l_run[g] = vselect(sees[g], l_run[g] * a + l_c * bb, l_run[g]);
        m_run[g] = vselect(sees[g], m_new, m_run[g]);
      }
    }
    // P @ V for the queries that see this chunk: lanes [q_lo, n).
    const Rows vr = chunk_rows(vb + start * p.v_strides[2], p.v_strides[2], n_keys, p, s.v_buf.data());
    // Lane q of the block sees the chunk's keys j < seen + q.
    const int64_t seen = pos0 - start + 1;
    int q0 = static_cast<int>(std::max<int64_t>(0, start - pos0));
#if defined(FUSEDTX_AVX2)
    if (n - q0 > kKeyLaneQueries) {
      // e outer: a 16-float column panel of V (16 KB of a 256-key chunk) stays in L1 while every
      // 6-query pass of the block reads it (query tiles outer streamed V from L2 once per tile).
      for (int64_t e0 = 0; e0 < p.dim_pad; e0 += kVec) {
        int qq = q0;
        for (; qq + 6 <= n; qq += 6) pv_pass<6, 1>(p_tile, n_keys, seen, vr, qq, e0, o_acc, p.dim_pad, first, alpha, beta);
        switch (n - qq) {
          case 0: break;
          case 1: pv_pass<1, 1>(p_tile, n_keys, seen, vr, qq, e0, o_acc, p.dim_pad, first, alpha, beta); break;
          case 2: pv_pass<2, 1>(p_tile, n_keys, seen, vr, qq, e0, o_acc, p.dim_pad, first, alpha, beta); break;
          case 3: pv_pass<3, 1>(p_tile, n_keys, seen, vr, qq, e0, o_acc, p.dim_pad, first, alpha, beta); break;
          case 4: pv_pass<4, 1>(p_tile, n_keys, seen, vr, qq, e0, o_acc, p.dim_pad, first, alpha, beta); break;
          default: pv_pass<5, 1>(p_tile, n_keys, seen, vr, qq, e0, o_acc, p.dim_pad, first, alpha, beta); break;
        }
      }
      q0 = static_cast<int>(n);
    }
#endif
    for (; q0 + kPvQueries <= n; q0 += kPvQueries)
      pv_queries<kPvQueries>(p_tile, n_keys, seen, vr, q0, p.dim_pad, o_acc, first, alpha, beta);
    for (; q0 < n; ++q0) pv_queries<1>(p_tile, n_keys, seen, vr, q0, p.dim_pad, o_acc, first, alpha, beta);
  }

  // o = acc / l, m and l.
  alignas(64) float l_lanes[kBlockQ], m_lanes[kBlockQ];
  for (int g = 0; g < n_groups; ++g) {
    vstore(l_lanes + g * kVec, l_run[g]);
    vstore(m_lanes + g * kVec, m_run[g]);
  }
  const int64_t row0 = (b * p.heads + h) * p.n_queries + i0;  // o, m, l are contiguous
  for (int64_t i = 0; i < n; ++i) {
    T* orow = out + (row0 + i) * p.dim;
    const float* acc = o_acc + i * p.dim_pad;
    for (int64_t e = 0; e < p.dim; e += kVec) store_partial(orow + e, vload(acc + e) / l_lanes[i], p.dim - e);
    m_out[row0 + i] = m_lanes[i];
    l_out[row0 + i] = l_lanes[i];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                     const at::Tensor& v, const at::Tensor& seqlens,
                                                                     double scale, int64_t split_size) {
  constexpr const char* op = "causal_attention_forward";
  check_attention_forward_args(q, k, v, split_size, at::kCPU, op);
  const int64_t batch = q.size(0), heads = q.size(1), n_queries = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), t_max = k.size(2);
  TORCH_CHECK(seqlens.device().is_cpu(), op, ": seqlens must be a CPU tensor, got ", seqlens.device());
  TORCH_CHECK(seqlens.scalar_type() == at::kLong, op, ": seqlens must be int64, got ", seqlens.scalar_type());
  TORCH_CHECK(seqlens.dim() == 1 && seqlens.size(0) == batch, op, ": seqlens must have shape (", batch, "), got ",
              seqlens.sizes());
  const at::Tensor lengths = seqlens.contiguous();
  check_seqlens_values(lengths, n_queries, t_max, op);
  const int64_t* len = lengths.data_ptr<int64_t>();

  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto m_out = at::empty({batch, heads, n_queries}, q.options().dtype(at::kFloat));
  auto l_out = at::empty({batch, heads, n_queries}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, m_out, l_out};

  Problem p{};
  p.batch = batch;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.n_queries = n_queries;
  p.dim = dim;
  p.dim_pad = (dim + kVec - 1) / kVec * kVec;
  p.split = split_size;
  p.scale = static_cast<float>(scale);
  p.seqlens = len;
  for (int i = 0; i < 3; ++i) {
    p.q_strides[i] = q.stride(i);
    p.k_strides[i] = k.stride(i);
    p.v_strides[i] = v.stride(i);
  }
  const int64_t blocks = (n_queries + kBlockQ - 1) / kBlockQ;
  const int64_t max_keys = std::min(split_size, t_max);

  dispatch_float_types(q.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* qp = q.const_data_ptr<T>();
    const T* kp = k.const_data_ptr<T>();
    const T* vp = v.const_data_ptr<T>();
    T* op_ = out.mutable_data_ptr<T>();
    float* mp = m_out.mutable_data_ptr<float>();
    float* lp = l_out.mutable_data_ptr<float>();
    at::parallel_for(0, batch * heads * blocks, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch(p, max_keys);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / blocks, r = task % blocks;
        // Causal blocks grow with their index: alternate short and long ones so that the
        // contiguous ranges handed to threads carry similar work (the order changes no bits).
        const int64_t blk = r % 2 == 0 ? r / 2 : blocks - 1 - r / 2;
        const int64_t i0 = blk * kBlockQ;
        attend_block<T>(p, qp, kp, vp, op_, mp, lp, bh / heads, bh % heads, i0,
                        std::min<int64_t>(kBlockQ, n_queries - i0), scratch);
      }
    });
  });
  return {out, m_out, l_out};
}

}  // namespace
}  // namespace fusedtx::cpu

TORCH_LIBRARY_IMPL(fusedtx_native, CPU, m) {
  m.impl("causal_attention_forward", &fusedtx::cpu::causal_attention_forward_cpu);
}
