// Causal attention forward with a fixed split size in CUDA: reference.causal_attention_forward, bit
// for bit (docs/design.md, "Attention split size").
//
// One thread block of kThreads = 128 threads per (batch b, head h, tile of kBlockQ = 16 queries);
// a decode step (Tq = 1) runs the same block shape with the tile padded (the padding rows
// duplicate the last real query and are never stored), so a query's bits are the same in a full
// pass, a chunked prefill and a decode step. Thread t serves query row qi = t / 8 of the tile:
// its 8 threads (one aligned group of a warp) compute 4 scores each of a key tile and own the
// head-dim columns e = t % 8 + 8 i of the accumulators (kMaxDim = 128: at most 16 per thread).
//
// The block walks the chunks [cS, min(cS + S, seqlens[b])) from chunk 0 up to the chunk of its
// last query, each in key tiles of kKeyTile = 32 keys staged in shared memory as float32:
//   pass 1  s_j = __fmul_rn(dot, scale), dot one __fmaf_rn chain over d ascending from +0, for
//           the keys j <= t the query sees; m_c = their max (NaN-propagating, as torch.amax).
//   pass 2  p_j = exp_f32(s_j - m_c) for j <= t, +0 for the chunk's keys beyond t (the scores
//           are recomputed with the same code, so the same bits; a chunk of one key tile, S <= 32,
//           keeps its scores from pass 1 instead); l_c = __fadd_rn chain over j ascending from
//           +0, acc_c[e] = __fmaf_rn(p_j, v_j[e], acc_c[e]) over the keys j <= t ascending from
//           +0. Like the reference, the keys beyond t are no terms of acc_c's chain (skipped, not
//           added as +0 * v_j, which an inf or NaN in v_j would turn into NaN), so even the sign
//           of a zero matches.
//   merge   chunk 0 gives (m, l, acc); a later chunk the query sees (cS <= t) is merged as
//           m' = max(m, m_c), a = exp_f32(m - m'), b = exp_f32(m_c - m'), l = l a + l_c b,
//           acc = acc a + acc_c b (each product and the sum separately rounded), m = m'.
// Finally o = __fdiv_rn(acc, l), rounded to q's dtype (nearest even); m and l are float32.
// Keys at or beyond seqlens[b] are never read. A seqlens[b] outside [Tq, Tmax] (possible only
// for a device seqlens, which the glue cannot check without a sync) yields NaN rows instead of
// out-of-bounds reads.
//
// Shared memory: q tile 16 x (D + 1), k tile 32 x (D + 1) (padded rows: the 8 threads of a query
// read 8 different keys in the dot products), v tile 32 x D, score/probability tile 16 x 33:
// 43 KB at D = 128, under the 48 KB default. Registers: acc and acc_c, 2 x 16 floats; the kernel
// is bounded for 4 blocks of 128 threads per SM (__launch_bounds__(128, 4)): with (128) alone
// ptxas aims at fewer registers and spills on sm_80 (tests/test_build.py checks for spills).
#include "common.cuh"

namespace fusedtx::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kBlockQ = 16;                                   // queries per block
constexpr int kThreadsPerQuery = kThreads / kBlockQ;          // 8
constexpr int kKeyTile = 32;                                  // keys staged per step
constexpr int kScoresPerThread = kKeyTile / kThreadsPerQuery; // 4
constexpr int kMaxDim = 128;
constexpr int kColsPerThread = kMaxDim / kThreadsPerQuery;    // 16
constexpr int kPStride = kKeyTile + 1;
static_assert(kThreads % kBlockQ == 0 && kKeyTile % kThreadsPerQuery == 0, "tile shape");
static_assert(kThreadsPerQuery <= 32 && 32 % kThreadsPerQuery == 0, "a query's threads share a warp");

// torch.maximum / amax: NaN if either is NaN.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

size_t smem_bytes(int64_t dim) {
  return static_cast<size_t>(kBlockQ * (dim + 1) + kKeyTile * (dim + 1) + kKeyTile * dim + kBlockQ * kPStride) *
         sizeof(float);
}

template <typename T>
struct Params {
  const T* q;
  const T* k;
  const T* v;
  const int64_t* seqlens;
  T* o;
  float* m;
  float* l;
  int64_t q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st;  // strides in elements (last dim: 1)
  int64_t heads, group, n_queries, t_max, dim, split, tiles;
  float scale;
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 4) attention_forward_kernel(const Params<T> p) {
  const int dim = static_cast<int>(p.dim);
  const int row = dim + 1;
  float* q_s = shared_memory();          // kBlockQ x row
  float* k_s = q_s + kBlockQ * row;      // kKeyTile x row
  float* v_s = k_s + kKeyTile * row;     // kKeyTile x dim
  float* p_s = v_s + kKeyTile * dim;     // kBlockQ x kPStride: scores, then probabilities

  const int tid = threadIdx.x;
  const int qi = tid / kThreadsPerQuery, sub = tid % kThreadsPerQuery;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) % p.tiles;
  const int64_t bh = static_cast<int64_t>(blockIdx.x) / p.tiles;
  const int64_t b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  const int64_t i0 = tile * kBlockQ;
  const int64_t n_here = min64(kBlockQ, p.n_queries - i0);
  const int64_t out_row0 = bh * p.n_queries + i0;  // (b, h, i0) in the (B, H, Tq) outputs
  const int64_t length = p.seqlens[b];

  if (length < p.n_queries || length > p.t_max) {  // invalid length: NaN rows, nothing read
    const float nan = __int_as_float(0x7fc00000);
    for (int64_t idx = tid; idx < n_here * dim; idx += kThreads) store_rn(p.o + out_row0 * dim + idx, nan);
    if (tid < n_here) {
      p.m[out_row0 + tid] = nan;
      p.l[out_row0 + tid] = nan;
    }
    return;
  }

  // This thread's query (padding rows duplicate the tile's last query) and its position.
  const int64_t iq = i0 + min64(qi, n_here - 1);
  const int64_t t_q = length - p.n_queries + iq;
  const int64_t t_last = length - p.n_queries + i0 + n_here - 1;  // the tile's last position

  const T* qb = p.q + b * p.q_sb + h * p.q_sh;
  const T* kb = p.k + b * p.k_sb + hk * p.k_sh;
  const T* vb = p.v + b * p.v_sb + hk * p.v_sh;
  for (int idx = tid; idx < kBlockQ * dim; idx += kThreads) {
    const int r = idx / dim, d = idx % dim;
    q_s[r * row + d] = load_f32(qb + (i0 + min64(r, n_here - 1)) * p.q_st + d);
  }

  // Keys [k0, k0 + nk) -> shared memory (float32).
  const auto load_keys = [&](int64_t k0, int nk) {
    for (int idx = tid; idx < nk * dim; idx += kThreads) {
      const int j = idx / dim, d = idx % dim;
      k_s[j * row + d] = load_f32(kb + (k0 + j) * p.k_st + d);
    }
  };
  const auto load_values = [&](int64_t k0, int nk) {
    for (int idx = tid; idx < nk * dim; idx += kThreads) {
      const int j = idx / dim, d = idx % dim;
      v_s[j * dim + d] = load_f32(vb + (k0 + j) * p.v_st + d);
    }
  };
  // This thread's scores of the staged keys into p_s (-inf where the query does not see the key).
  const auto scores = [&](int64_t k0, int nk) {
    const float* qr = q_s + qi * row;
#pragma unroll
    for (int r = 0; r < kScoresPerThread; ++r) {
      const int j = sub + r * kThreadsPerQuery;
      float s = -INFINITY;
      if (j < nk && k0 + j <= t_q) {
        const float* kr = k_s + j * row;
        float dot = 0.0f;
        for (int d = 0; d < dim; ++d) dot = __fmaf_rn(qr[d], kr[d], dot);  // d ascending from +0
        s = __fmul_rn(dot, p.scale);
      }
      p_s[qi * kPStride + j] = s;
    }
  };

  float m = 0.0f, l = 0.0f;
  float acc[kColsPerThread], acc_c[kColsPerThread];
#pragma unroll
  for (int i = 0; i < kColsPerThread; ++i) acc[i] = 0.0f;

  __syncthreads();  // q tile ready
  for (int64_t c0 = 0; c0 <= t_last; c0 += p.split) {  // chunks ascending
    const int64_t c_end = min64(c0 + p.split, length);  // the reference's `stop`
    const bool single = c_end - c0 <= kKeyTile;         // one key tile: pass 2 reuses pass 1's scores

    // Pass 1: the chunk's max score.
    float m_c = -INFINITY;
    for (int64_t k0 = c0; k0 < c_end; k0 += kKeyTile) {
      const int nk = static_cast<int>(min64(kKeyTile, c_end - k0));
      load_keys(k0, nk);
      __syncthreads();
      scores(k0, nk);
      __syncthreads();
      for (int j = 0; j < nk; ++j) m_c = nan_max(m_c, p_s[qi * kPStride + j]);
      __syncthreads();  // k_s and p_s are overwritten next (p_s in place, when single)
    }

    // Pass 2: p, l_c and acc_c, keys ascending.
    float l_c = 0.0f;
#pragma unroll
    for (int i = 0; i < kColsPerThread; ++i) acc_c[i] = 0.0f;
    for (int64_t k0 = c0; k0 < c_end; k0 += kKeyTile) {
      const int nk = static_cast<int>(min64(kKeyTile, c_end - k0));
      if (!single) load_keys(k0, nk);
      load_values(k0, nk);
      if (!single) {
        __syncthreads();
        scores(k0, nk);
      }
      // Each thread turns its own scores into probabilities (it wrote exactly these entries).
#pragma unroll
      for (int r = 0; r < kScoresPerThread; ++r) {
        const int j = sub + r * kThreadsPerQuery;
        if (j < nk) {
          float* ps = p_s + qi * kPStride + j;
          *ps = k0 + j <= t_q ? exp_f32(__fsub_rn(*ps, m_c)) : 0.0f;
        }
      }
      __syncthreads();
      for (int j = 0; j < nk; ++j) {  // j ascending
        const float pj = p_s[qi * kPStride + j];
        l_c = __fadd_rn(l_c, pj);
        if (k0 + j > t_q) continue;  // not seen: no term of acc_c's chain
        const float* vr = v_s + j * dim;
#pragma unroll
        for (int i = 0; i < kColsPerThread; ++i) {
          const int e = sub + i * kThreadsPerQuery;
          if (e < dim) acc_c[i] = __fmaf_rn(pj, vr[e], acc_c[i]);
        }
      }
      __syncthreads();  // v_s, k_s and p_s are overwritten next
    }

    // Merge, chunks ascending.
    if (c0 == 0) {
      m = m_c;
      l = l_c;
#pragma unroll
      for (int i = 0; i < kColsPerThread; ++i) acc[i] = acc_c[i];
    } else if (c0 <= t_q) {
      const float m_new = nan_max(m, m_c);
      const float a = exp_f32(__fsub_rn(m, m_new));
      const float bb = exp_f32(__fsub_rn(m_c, m_new));
      l = __fadd_rn(__fmul_rn(l, a), __fmul_rn(l_c, bb));
#pragma unroll
      for (int i = 0; i < kColsPerThread; ++i) acc[i] = __fadd_rn(__fmul_rn(acc[i], a), __fmul_rn(acc_c[i], bb));
      m = m_new;
    }
  }

  if (qi < n_here) {
    const int64_t out_row = out_row0 + qi;
    T* orow = p.o + out_row * dim;
#pragma unroll
    for (int i = 0; i < kColsPerThread; ++i) {
      const int e = sub + i * kThreadsPerQuery;
      if (e < dim) store_rn(orow + e, __fdiv_rn(acc[i], l));
    }
    if (sub == 0) {
      p.m[out_row] = m;
      p.l[out_row] = l;
    }
  }
}

template <typename T>
cudaError_t launch(const void* q, const int64_t* q_strides, const void* k, const int64_t* k_strides, const void* v,
                   const int64_t* v_strides, const int64_t* seqlens, void* o, float* m, float* l, int64_t heads,
                   int64_t group, int64_t n_queries, int64_t t_max, int64_t dim, float scale, int64_t split,
                   int64_t tiles, int64_t blocks, cudaStream_t stream) {
  Params<T> p{static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), seqlens,
              static_cast<T*>(o), m, l,
              q_strides[0], q_strides[1], q_strides[2], k_strides[0], k_strides[1], k_strides[2],
              v_strides[0], v_strides[1], v_strides[2],
              heads, group, n_queries, t_max, dim, split, tiles, scale};
  attention_forward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, smem_bytes(dim), stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t causal_attention_forward(const void* q, const int64_t* q_strides, const void* k, const int64_t* k_strides,
                                     const void* v, const int64_t* v_strides, const int64_t* seqlens, void* o, float* m,
                                     float* l, int64_t batch, int64_t heads, int64_t kv_heads, int64_t n_queries,
                                     int64_t t_max, int64_t dim, float scale, int64_t split_size, DType dtype,
                                     cudaStream_t stream) {
  if (batch < 0 || heads < 0 || n_queries < 0 || t_max < 0 || kv_heads <= 0 || heads % kv_heads != 0)
    return cudaErrorInvalidValue;
  if (dim < 1 || dim > kAttentionMaxHeadDim || split_size < 16 || (split_size & (split_size - 1)) != 0)
    return cudaErrorInvalidValue;
  if (batch == 0 || heads == 0 || n_queries == 0) return cudaSuccess;  // no element to write
  const int64_t tiles = (n_queries + kBlockQ - 1) / kBlockQ;
  if (tiles > INT32_MAX / heads / batch) return cudaErrorInvalidValue;  // one block per tile, 1-D grid
  const int64_t blocks = batch * heads * tiles;
  const int64_t group = heads / kv_heads;
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(q, q_strides, k, k_strides, v, v_strides, seqlens, o, m, l, heads, group, n_queries, t_max,
                           dim, scale, split_size, tiles, blocks, stream);
    case DType::kFloat16:
      return launch<__half>(q, q_strides, k, k_strides, v, v_strides, seqlens, o, m, l, heads, group, n_queries,
                            t_max, dim, scale, split_size, tiles, blocks, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(q, q_strides, k, k_strides, v, v_strides, seqlens, o, m, l, heads, group,
                                   n_queries, t_max, dim, scale, split_size, tiles, blocks, stream);
    case DType::kFloat64: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace fusedtx::cuda
