// The few-rows path of the Linear matmul on CPU (decode: at most kSmallMMax rows of a), AVX-512
// and AVX2 (the scalar build packs whatever M): b is not packed but streamed once,
// straight from where it is, and each output element gets exactly the packed path's arithmetic
// (per block of kKBlock k's an FMA chain from +0, the chain totals added in order, then the
// epilogue of linear_gemm.h). A part of linear.cpp, in an unnamed namespace like linear_gemm.h.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "linear_gemm.h"

namespace fusedtx::cpu {
namespace {

#if defined(FUSEDTX_AVX512)

// Few rows (decode): packing b would cost more than the multiply, so b is read where it is (a
// pair, b and b_odd, too: through b_at, a column or row pointer at a time).
// a arrives as float32 rows (lda floats apart). Each call covers columns [j0, j1) for all rows.
// b = weight.t() (k contiguous): G groups of 16 columns at a time (independent FMA chains for
// few rows), each 16 x 16 block of b transposed in registers and multiplied at once.
template <typename T, int kAct, int MR, int G>
void small_m_kmajor(const Problem<T>& p, const float* a, int64_t lda, int64_t j0, int64_t j1) {
  alignas(64) float tile[kMR * kTileLd];
  static_assert(G * 16 <= kTileLd);
  for (int64_t j = j0; j < j1; j += 16 * G) {
    const int64_t cols = std::min<int64_t>(16 * G, j1 - j);
    const Columns<T> col = columns_at(p, 0, j);
    // The running totals of the kKBlock chains, from +0, in the tile.
    for (int i = 0; i < MR; ++i) {
      for (int g = 0; g < G; ++g) _mm512_store_ps(tile + i * kTileLd + g * 16, _mm512_setzero_ps());
    }
    __m512 acc[MR][G];
    for (int i = 0; i < MR; ++i) {
      for (int g = 0; g < G; ++g) acc[i][g] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < p.K; k += 16) {
      const int64_t kn = std::min<int64_t>(16, p.K - k);
      const mask16 km = first_lanes(kn);
#pragma GCC unroll 2
      for (int g = 0; g < G; ++g) {
        const int64_t jn = cols - g * 16;
        if (jn <= 0) break;
        __m512 r[16];
        if (jn >= 16 && kn == 16) {  // a whole block: unrolled, so that r lives in registers
#pragma GCC unroll 16
          for (int i = 0; i < 16; ++i) {
            _mm_prefetch(reinterpret_cast<const char*>(col.at(g * 16 + i) + k + kPrefetchB), _MM_HINT_T0);
            r[i] = load16(col.at(g * 16 + i) + k);
          }
        } else {
          for (int i = 0; i < 16; ++i) r[i] = i < jn ? load16(col.at(g * 16 + i) + k, km) : _mm512_setzero_ps();
        }
        transpose16(r);
        if (kn == 16) {
#pragma GCC unroll 16
          for (int kk = 0; kk < 16; ++kk) {
#pragma GCC unroll 16
            for (int i = 0; i < MR; ++i) {
              acc[i][g] = _mm512_fmadd_ps(_mm512_set1_ps(a[i * lda + k + kk]), r[kk], acc[i][g]);
            }
          }
        } else {
          for (int64_t kk = 0; kk < kn; ++kk) {
            for (int i = 0; i < MR; ++i) {
              acc[i][g] = _mm512_fmadd_ps(_mm512_set1_ps(a[i * lda + k + kk]), r[kk], acc[i][g]);
            }
          }
        }
      }
      if ((k + kn) % kKBlock == 0 || k + kn == p.K) {  // a chain ends: total = total + acc
        for (int i = 0; i < MR; ++i) {
          for (int g = 0; g < G; ++g) {
            float* t = tile + i * kTileLd + g * 16;
            _mm512_store_ps(t, _mm512_add_ps(_mm512_load_ps(t), acc[i][g]));
            acc[i][g] = _mm512_setzero_ps();
          }
        }
      }
    }
    epilogue<T, kAct>(tile, MR, cols, p.bias ? p.bias + j : nullptr, p.y + out_offset<kAct>(j), p.preact ? p.preact + j : nullptr, p.N);
  }
}

// b row-major (columns contiguous, e.g. the backward's weight): NV vectors of columns at a time,
// straight from b's rows.
template <typename T, int kAct, int MR, int NV>
void small_m_nmajor(const Problem<T>& p, const float* a, int64_t lda, int64_t j0, int64_t j1) {
  alignas(64) float tile[kMR * kTileLd];
  // A tile row is kTileLd floats; one row may be wider (the epilogue then reads row 0 alone).
  static_assert(MR == 1 ? NV * 16 <= kMR * kTileLd : NV * 16 <= kTileLd);
  constexpr int64_t kAhead = 8;  // rows of b prefetched ahead
  for (int64_t j = j0; j < j1; j += 16 * NV) {
    const int64_t cols = std::min<int64_t>(16 * NV, j1 - j);
    __m512 acc[MR][NV];
    for (int i = 0; i < MR; ++i) {
      for (int v = 0; v < NV; ++v) {
        acc[i][v] = _mm512_setzero_ps();
        _mm512_store_ps(tile + i * kTileLd + v * 16, _mm512_setzero_ps());  // chain totals, from +0
      }
    }
    mask16 masks[NV];
    for (int v = 0; v < NV; ++v) masks[v] = first_lanes(cols - v * 16);
    const bool full = cols == 16 * NV;
    for (int64_t k = 0; k < p.K; ++k) {
      const T* row = b_at(p, k, j);
      const T* ahead = b_at(p, k + kAhead, j);  // prefetched only: past the last row is harmless
      for (int v = 0; v < NV * static_cast<int>(sizeof(T)) / 4; ++v) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead) + 64 * v, _MM_HINT_T0);
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
    epilogue<T, kAct>(tile, MR, cols, p.bias ? p.bias + j : nullptr, p.y + out_offset<kAct>(j), p.preact ? p.preact + j : nullptr, p.N);
  }
}

// One row with b row-major (a GPT-2 Conv1D weight, or the backward's weight for dx): the
// columns [j0, j1) in passes of up to kOneRowCols, each sweeping b's rows kOneRowStep at a time
// across the whole pass, so that every row is read in one run of up to 6 KB (what the hardware
// prefetchers follow; sweeps of a few vectors read each row from DRAM a few lines at a time). A
// column's chain runs in a vector accumulator kept in L1 between row blocks (acc), k ascending
// within each kKBlock block from +0, the chain totals added in order in the tile: the same
// arithmetic as small_m_nmajor's.
constexpr int64_t kOneRowCols = 96 * 16;
constexpr int kOneRowStep = 4;
constexpr int64_t kOneRowAhead = 8;  // rows prefetched ahead

template <typename T, int kAct>
void one_row_nmajor(const Problem<T>& p, const float* a, int64_t j0, int64_t j1) {
  static_assert(kKBlock % kOneRowStep == 0 && kOneRowCols <= kMR * kTileLd);
  alignas(64) float tile[kMR * kTileLd];  // the chain totals (one row, as wide as the pass)
  alignas(64) float acc[kOneRowCols];
  for (int64_t j = j0; j < j1; j += kOneRowCols) {
    const int64_t cols = std::min(kOneRowCols, j1 - j);
    const int64_t whole = cols / 16;  // full vectors; a masked one after them if cols % 16
    const int64_t vecs = ceil_div(cols, 16);
    const mask16 tail = first_lanes(cols - whole * 16);
    for (int64_t v = 0; v < vecs; ++v) {
      _mm512_store_ps(tile + v * 16, _mm512_setzero_ps());
      _mm512_store_ps(acc + v * 16, _mm512_setzero_ps());
    }
    for (int64_t k = 0; k < p.K;) {
      // kOneRowStep rows at a time (never across a chain's end: kKBlock is a multiple of it),
      // one at a time at the end of K.
      if (k + kOneRowStep <= p.K) {
        const T* r0 = b_at(p, k, j);
        const T* r1 = b_at(p, k + 1, j);
        const T* r2 = b_at(p, k + 2, j);
        const T* r3 = b_at(p, k + 3, j);
        const __m512 a0 = _mm512_set1_ps(a[k]), a1 = _mm512_set1_ps(a[k + 1]);
        const __m512 a2 = _mm512_set1_ps(a[k + 2]), a3 = _mm512_set1_ps(a[k + 3]);
        // The rows kOneRowAhead on, line by line as these are read: short runs (a few hundred
        // columns a thread) end before the hardware prefetchers get going.
        const int64_t ahead = std::min<int64_t>(k + kOneRowAhead, p.K - kOneRowStep);
        const char* q0 = reinterpret_cast<const char*>(b_at(p, ahead, j));
        const char* q1 = reinterpret_cast<const char*>(b_at(p, ahead + 1, j));
        const char* q2 = reinterpret_cast<const char*>(b_at(p, ahead + 2, j));
        const char* q3 = reinterpret_cast<const char*>(b_at(p, ahead + 3, j));
        for (int64_t v = 0; v < whole; ++v) {
          const int64_t line = v * 16 * static_cast<int64_t>(sizeof(T));
          _mm_prefetch(q0 + line, _MM_HINT_T0);
          _mm_prefetch(q1 + line, _MM_HINT_T0);
          _mm_prefetch(q2 + line, _MM_HINT_T0);
          _mm_prefetch(q3 + line, _MM_HINT_T0);
          __m512 s = _mm512_load_ps(acc + v * 16);
          s = _mm512_fmadd_ps(a0, load16(r0 + v * 16), s);
          s = _mm512_fmadd_ps(a1, load16(r1 + v * 16), s);
          s = _mm512_fmadd_ps(a2, load16(r2 + v * 16), s);
          s = _mm512_fmadd_ps(a3, load16(r3 + v * 16), s);
          _mm512_store_ps(acc + v * 16, s);
        }
        if (whole < vecs) {
          const int64_t o = whole * 16;
          __m512 s = _mm512_load_ps(acc + o);
          s = _mm512_fmadd_ps(a0, load16(r0 + o, tail), s);
          s = _mm512_fmadd_ps(a1, load16(r1 + o, tail), s);
          s = _mm512_fmadd_ps(a2, load16(r2 + o, tail), s);
          s = _mm512_fmadd_ps(a3, load16(r3 + o, tail), s);
          _mm512_store_ps(acc + o, s);
        }
        k += kOneRowStep;
      } else {
        const T* r0 = b_at(p, k, j);
        const __m512 a0 = _mm512_set1_ps(a[k]);
        for (int64_t v = 0; v < vecs; ++v) {
          const __m512 bv = v < whole ? load16(r0 + v * 16) : load16(r0 + v * 16, tail);
          _mm512_store_ps(acc + v * 16, _mm512_fmadd_ps(a0, bv, _mm512_load_ps(acc + v * 16)));
        }
        k += 1;
      }
      if (k % kKBlock == 0 || k == p.K) {  // a chain ends: total = total + acc
        for (int64_t v = 0; v < vecs; ++v) {
          _mm512_store_ps(tile + v * 16, _mm512_add_ps(_mm512_load_ps(tile + v * 16), _mm512_load_ps(acc + v * 16)));
          _mm512_store_ps(acc + v * 16, _mm512_setzero_ps());
        }
      }
    }
    epilogue<T, kAct>(tile, 1, cols, p.bias ? p.bias + j : nullptr, p.y + out_offset<kAct>(j), p.preact ? p.preact + j : nullptr, p.N);
  }
}

constexpr int64_t kSmallMChunk = 128;  // columns per parallel task of the few-rows path
constexpr int64_t kSmallMMax = 8;      // rows up to which b is not packed

template <typename T, int kAct, int MR>
void small_m_columns(const Problem<T>& p, const float* a, int64_t lda, int64_t j0, int64_t j1) {
  if (b_columns_contiguous(p)) {
    small_m_kmajor<T, kAct, MR, (MR <= 2 ? 2 : 1)>(p, a, lda, j0, j1);
  } else {
    if constexpr (MR == 1) {
      one_row_nmajor<T, kAct>(p, a, j0, j1);
      return;
    }
    small_m_nmajor<T, kAct, MR, (MR <= 2 ? 8 : MR <= 4 ? 4 : 3)>(p, a, lda, j0, j1);
  }
}

#elif defined(FUSEDTX_AVX2)

constexpr int64_t kSmallMChunk = 128;  // columns per parallel task of the few-rows path
constexpr int64_t kSmallMMax = 8;      // rows up to which b is not packed

// The AVX-512 functions' method on 8-lane vectors. b = weight.t() (k contiguous): G groups of 8
// columns at a time (independent accumulators for few rows), each 8 x 8 block of b transposed
// in registers and multiplied at once. Each of the 8 G column streams is read a whole 64-byte
// line (16 k's, two blocks) at a time: with a row stride like 6 KB the streams share a few L1
// sets, and a line read in two visits far apart would be fetched twice.
template <typename T, int kAct, int MR, int G>
void small_m_kmajor(const Problem<T>& p, const float* a, int64_t lda, int64_t j0, int64_t j1) {
  alignas(64) float tile[kSmallMMax * kTileLd];
  static_assert(G * 8 <= kTileLd && kKBlock % 16 == 0);
  for (int64_t j = j0; j < j1; j += 8 * G) {
    const int64_t cols = std::min<int64_t>(8 * G, j1 - j);
    const Columns<T> col = columns_at(p, 0, j);
    // The running totals of the kKBlock chains, from +0, in the tile.
    for (int i = 0; i < MR; ++i) {
      for (int g = 0; g < G; ++g) _mm256_store_ps(tile + i * kTileLd + g * 8, _mm256_setzero_ps());
    }
    __m256 acc[MR][G];
    for (int i = 0; i < MR; ++i) {
      for (int g = 0; g < G; ++g) acc[i][g] = _mm256_setzero_ps();
    }
    for (int64_t k16 = 0; k16 < p.K; k16 += 16) {
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const int64_t jn = cols - g * 8;
#pragma GCC unroll 2
        for (int64_t k = k16; k < std::min(k16 + 16, p.K); k += 8) {
          const int64_t kn = std::min<int64_t>(8, p.K - k);
          __m256 r[8];
          for (int c = 0; c < 8; ++c) {
            const T* q = col.at(g * 8 + c) + k;
            r[c] = c >= jn ? _mm256_setzero_ps() : kn == 8 ? load8(q) : load8(q, kn);
          }
          transpose8(r);
          if (kn == 8) {
#pragma GCC unroll 8
            for (int kk = 0; kk < 8; ++kk) {
#pragma GCC unroll 8
              for (int i = 0; i < MR; ++i) acc[i][g] = _mm256_fmadd_ps(_mm256_broadcast_ss(a + i * lda + k + kk), r[kk], acc[i][g]);
            }
          } else {
            for (int64_t kk = 0; kk < kn; ++kk) {
              for (int i = 0; i < MR; ++i) acc[i][g] = _mm256_fmadd_ps(_mm256_broadcast_ss(a + i * lda + k + kk), r[kk], acc[i][g]);
            }
          }
        }
      }
      // Chains end at the multiples of kKBlock (multiples of 16) and at K: total = total + acc.
      if ((k16 + 16) % kKBlock == 0 || k16 + 16 >= p.K) {
        for (int i = 0; i < MR; ++i) {
          for (int g = 0; g < G; ++g) {
            float* t = tile + i * kTileLd + g * 8;
            _mm256_store_ps(t, _mm256_add_ps(_mm256_load_ps(t), acc[i][g]));
            acc[i][g] = _mm256_setzero_ps();
          }
        }
      }
    }
    epilogue<T, kAct>(tile, MR, cols, p.bias ? p.bias + j : nullptr, p.y + out_offset<kAct>(j), p.preact ? p.preact + j : nullptr, p.N);
  }
}

// b row-major (columns contiguous, e.g. the backward's weight): NV vectors of columns at a time,
// straight from b's rows.
template <typename T, int kAct, int MR, int NV>
void small_m_nmajor(const Problem<T>& p, const float* a, int64_t lda, int64_t j0, int64_t j1) {
  alignas(64) float tile[kSmallMMax * kTileLd];
  static_assert(NV * 8 <= kTileLd);
  constexpr int64_t kAhead = 8;  // rows of b prefetched ahead
  for (int64_t j = j0; j < j1; j += 8 * NV) {
    const int64_t cols = std::min<int64_t>(8 * NV, j1 - j);
    __m256 acc[MR][NV];
    for (int i = 0; i < MR; ++i) {
      for (int v = 0; v < NV; ++v) {
        acc[i][v] = _mm256_setzero_ps();
        _mm256_store_ps(tile + i * kTileLd + v * 8, _mm256_setzero_ps());  // chain totals, from +0
      }
    }
    const bool full = cols == 8 * NV;
    for (int64_t k = 0; k < p.K; ++k) {
      const T* row = b_at(p, k, j);
      const T* ahead = b_at(p, k + kAhead, j);  // prefetched only: past the last row is harmless
      for (int v = 0; v < (NV * 8 * static_cast<int>(sizeof(T)) + 63) / 64; ++v) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead) + 64 * v, _MM_HINT_T0);
      }
      __m256 bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = full ? load8(row + v * 8) : load8(row + v * 8, cols - v * 8);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 av = _mm256_broadcast_ss(a + i * lda + k);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(av, bv[v], acc[i][v]);
      }
      if ((k + 1) % kKBlock == 0 || k + 1 == p.K) {  // a chain ends: total = total + acc
        for (int i = 0; i < MR; ++i) {
          for (int v = 0; v < NV; ++v) {
            float* t = tile + i * kTileLd + v * 8;
            _mm256_store_ps(t, _mm256_add_ps(_mm256_load_ps(t), acc[i][v]));
            acc[i][v] = _mm256_setzero_ps();
          }
        }
      }
    }
    epilogue<T, kAct>(tile, MR, cols, p.bias ? p.bias + j : nullptr, p.y + out_offset<kAct>(j), p.preact ? p.preact + j : nullptr, p.N);
  }
}

// Accumulators per call: at most 12 of the 16 ymm registers, the rest for b and a.
template <typename T, int kAct, int MR>
void small_m_columns(const Problem<T>& p, const float* a, int64_t lda, int64_t j0, int64_t j1) {
  if (b_columns_contiguous(p)) {
    small_m_kmajor<T, kAct, MR, (MR == 1 ? 4 : MR == 2 ? 3 : MR <= 4 ? 2 : 1)>(p, a, lda, j0, j1);
  } else {
    small_m_nmajor<T, kAct, MR, (MR == 1 ? 8 : MR == 2 ? 4 : MR == 3 ? 3 : MR <= 6 ? 2 : 1)>(p, a, lda, j0, j1);
  }
}

#endif  // FUSEDTX_AVX512, FUSEDTX_AVX2

}  // namespace
}  // namespace fusedtx::cpu
