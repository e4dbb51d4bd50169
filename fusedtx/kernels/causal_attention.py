"""Causal attention forward in Triton with a fixed split size S: prefill, chunked prefill, decode.

The semantics are reference.causal_attention_forward's (q (B, H, Tq, D), a KV cache k, v (B, Hkv, Tmax, D),
per-sequence lengths; GQA by h // (H / Hkv)); `causal_attention_forward` returns (o, m, l).

Why a query's bits depend only on q_t, k_0..k_t, v_0..v_t (docs/design.md, "Attention split size"):
  * The keys are cut into chunks at multiples of S from position 0. Every chunk, in every kind of
    call, is reduced by ONE @jit function, `_attn_chunk`, with ONE tile configuration (a function
    of D, dtype and S only, never of B, Tq or the lengths): a query tile of BLOCK_M rows (decode pads
    its single query into the same tile) against key sub-tiles of BLOCK_N keys that start at
    fixed offsets inside the chunk (BLOCK_N divides S), in ascending order, with a fresh running
    (max, sum, acc) per chunk. A row's arithmetic never mixes with another row's (tl.dot's per
    element order does not depend on the row's position in the tile; under the interpreter the
    sums are numpy reductions whose order does not either — SEQUENTIAL_SUM below). Sub-tiles a
    row cannot see (its keys > t, or past the length) leave its state untouched (tl.where), so
    how many sub-tiles the tile as a whole needs does not matter to a row; inside a sub-tile, a
    key the row cannot see is no term of its P.V sum (-0 in the interpreter's sums, masked_dot
    for tl.dot), so whatever that key holds (inf, NaN) never reaches the row.
  * Keys at or beyond seqlens[b] are never read (masked loads, +0 in their place): a KV cache can
    hold anything there.
  * Chunk partials (m_c, l_c, acc_c) are merged in ascending chunk order, starting from chunk 0's,
    by `_merge`, the reference's formula (m' = max(m, m_c), a = exp_f32(m - m'),
    b = exp_f32(m_c - m'), l = l a + l_c b, acc = acc a + acc_c b), elementwise in float32 with no
    FMA contraction (LAUNCH_OPTIONS); a row merges only chunks it sees. o = acc / l (div_rn).

Two schedules of that same arithmetic:
  * `_attn_fwd` (prefill, Tq > BLOCK_M): grid (query tiles, B * H). A program walks its chunks in
    order and merges each into registers as soon as it is reduced. No partial buffer: a long
    prefill would need (chunks x Tq x D) float32 of them.
  * `_attn_fwd_split` + `_attn_merge` (decode, Tq <= BLOCK_M: one query tile): grid
    (query tiles x B * H, chunks), one chunk per program, so a decode step of a long sequence
    spreads over many programs; each writes its (m_c, l_c, acc_c) to a fixed float32 buffer
    (chunk slots up to Tmax / S; programs past a sequence's length return at once).
    `_attn_merge`, grid (blocks of policy.triton_attention_merge_rows rows, B * H), loads chunk 0 and merges chunks
    1, 2, ... in ascending order with the same `_merge`. float32 survives the store and the load
    exactly, so the merge sees the same values as the prefill kernel's registers: the same bits.
  Which schedule runs depends on Tq; the bits do not (tests force each schedule on every case).

Under the interpreter (TRITON_INTERPRET=1) tl.dot is numpy's BLAS, whose bits depend on a row's
position in the tile, so the dot products are broadcast products summed by tl.sum over the middle
axis (SEQUENTIAL_SUM: numpy adds that axis element by element in ascending order): q.k over d, and
acc * alpha + p_0 v_0 + p_1 v_1 + ... over the sub-tile's keys. bfloat16 is converted by hand there
(bf16_to_f32, f32_to_bf16_rn: the interpreter's casts truncate). On GPUs the dots are tl.dot with
float32 accumulation, input_precision "ieee" for float32; for bfloat16/float16 p is rounded to
the input dtype before p @ v (the tensor cores' path, as FlashAttention does).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import config as _config
from .. import policy
from . import INTERPRETED
from ._common import LAUNCH_OPTIONS, bf16_to_f32, exp_f32, f32_to_bf16_rn, needs_bf16_rounding

# @jit helpers inlined into the kernels, never launched on their own
JIT_HELPERS = ("_load_f32", "masked_dot", "_put_back_non_finite", "_attn_chunk", "_merge")


def input_precision(dtype: torch.dtype) -> str | None:
    return "ieee" if dtype == torch.float32 else None


@triton.jit
def _load_f32(ptrs, mask, ROUND_BF16: tl.constexpr):
    x = tl.load(ptrs, mask=mask, other=0.0)
    if ROUND_BF16:
        return bf16_to_f32(x)
    return x.to(tl.float32)


@triton.jit
def masked_dot(a, valid, b, acc, ANY_MASKED, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b over the pairs (i, k) with valid[i, k] only: tl.dot with the other pairs left
    out (docs/design.md, "Attention split size"). a is 0 at those pairs, but tl.dot still
    multiplies it by row k of b, and 0 * inf = NaN: an inf or NaN in a key (or query) row that
    row i cannot see would reach it. ANY_MASKED (a scalar from the tile's indices) says whether
    the tile has such pairs; where it has, b's non-finite entries enter the dot as 0 and, only if
    there are any (a max over the tile, on those tiles only; a finite tile costs a select and the
    max), _put_back_non_finite puts back the ones row i does see."""
    finite = tl.abs(b.to(tl.float32)) < float("inf")
    acc = tl.dot(a, tl.where(finite | (ANY_MASKED == 0), b, 0.0), acc, input_precision=INPUT_PRECISION,
                 out_dtype=tl.float32)
    if ANY_MASKED:
        if tl.max(tl.max(tl.where(finite, 0, 1), axis=1), axis=0) > 0:
            acc = _put_back_non_finite(a, valid, b, acc)
    return acc


@triton.jit
def _put_back_non_finite(a, valid, b, acc):
    """masked_dot's fix-up, by IEEE rules, of acc = the dot with b's non-finite entries as 0: per
    visible pair (i, k) with b[k, j] non-finite, NaN where b[k, j] is NaN or a[i, k] = 0, else
    +inf / -inf by the signs of a[i, k] and b[k, j] (both signs over the pairs: inf - inf = NaN).
    Applied key by key: adding +inf or -inf, or setting NaN, gives the same value (NaN bits aside)
    in any order and any number of times, and no (BLOCK_M, N) tile beyond acc is live (only key
    k's column of a and row of b) — the fix-up runs on the rare tiles that need it."""
    offs_k = tl.arange(0, a.shape[1])
    for k in range(0, a.shape[1]):
        col = offs_k[None, :] == k
        ak = tl.sum(tl.where(col, a.to(tl.float32), 0.0), axis=1)  # a[:, k] (a -0 read as +0: a = 0 all the same)
        seen = tl.max(tl.where(col & valid, 1, 0), axis=1) > 0
        bk = tl.sum(tl.where(offs_k[:, None] == k, b.to(tl.float32), 0.0), axis=0)  # b[k, :]
        pos = (seen & (ak > 0))[:, None]
        neg = (seen & (ak < 0))[:, None]
        inf_hi = (bk == float("inf"))[None, :]
        inf_lo = (bk == float("-inf"))[None, :]
        acc = tl.where((pos & inf_hi) | (neg & inf_lo), acc + float("inf"), acc)
        acc = tl.where((pos & inf_lo) | (neg & inf_hi), acc - float("inf"), acc)
        nan = (seen[:, None] & (bk != bk)[None, :]) | ((seen & (ak == 0))[:, None] & (inf_hi | inf_lo))
        acc = tl.where(nan, float("nan"), acc)
    return acc


@triton.jit
def _attn_chunk(q, Kh, Vh, stride_kt, stride_kd, stride_vt, stride_vd, chunk_start, end, seqlen, pos, scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, SEQUENTIAL_SUM: tl.constexpr, ROUND_BF16: tl.constexpr):
    """(m_c, l_c, acc_c) of the chunk starting at key chunk_start for the query tile q (BLOCK_M, D)
    whose rows sit at positions pos; keys >= end are seen by no row of the tile (not visited).
    Rows that see no key of the chunk get (-inf, 0, 0)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    first_pos = tl.min(pos, axis=0)  # the tile's first row: sub-tiles past it hold masked pairs
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for n0 in range(0, tl.minimum(end - chunk_start, SPLIT), BLOCK_N):
        keys = chunk_start + n0 + offs_n  # int64
        inside = keys < seqlen  # never read at or past the length
        kt_ptrs = Kh + keys[None, :] * stride_kt + offs_d[:, None] * stride_kd  # (D, BLOCK_N)
        v_ptrs = Vh + keys[:, None] * stride_vt + offs_d[None, :] * stride_vd  # (BLOCK_N, D)
        valid = (keys[None, :] <= pos[:, None]) & inside[None, :]
        sees = chunk_start + n0 <= pos  # the row sees the sub-tile's first key (a prefix of keys)
        if SEQUENTIAL_SUM:
            kt = _load_f32(kt_ptrs, inside[None, :], ROUND_BF16)
            v = _load_f32(v_ptrs, inside[:, None], ROUND_BF16)
            s = tl.sum(q[:, :, None] * kt[None, :, :], axis=1)
        else:
            kt = tl.load(kt_ptrs, mask=inside[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=inside[:, None], other=0.0)
            s = tl.dot(q, kt, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
        s = tl.where(valid, s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = exp_f32(m - m_new)  # 0 on a row's first sub-tile (m = -inf)
        p = tl.where(valid, exp_f32(s - m_new[:, None]), 0.0)
        l_new = l * alpha + tl.sum(p, axis=1)
        scaled = acc * alpha[:, None]
        if SEQUENTIAL_SUM:
            first = (offs_n == 0)[None, :, None]
            # a key the row does not see is no term: -0 leaves every sum as it is (a product
            # 0 * v would not: NaN for an inf or NaN v, and +0 turns a -0 sum into +0)
            pv = tl.where(valid[:, :, None], p[:, :, None] * v[None, :, :], -0.0)  # (BLOCK_M, BLOCK_N, D)
            acc_new = tl.sum(tl.where(first, pv + scaled[:, None, :], pv), axis=1)
        else:
            acc_new = masked_dot(p.to(v.dtype), valid, v, scaled, chunk_start + n0 + BLOCK_N - 1 > first_pos,
                                 INPUT_PRECISION)
        m = tl.where(sees, m_new, m)
        l = tl.where(sees, l_new, l)
        acc = tl.where(sees[:, None], acc_new, acc)
    return m, l, acc


@triton.jit
def _merge(m, l, acc, m_c, l_c, acc_c, sees):
    """reference.causal_attention_forward's merge of a chunk's partial into the running (m, l, acc), for
    the rows that see the chunk."""
    m_new = tl.maximum(m, m_c)
    a = exp_f32(m - m_new)
    b = exp_f32(tl.where(sees, m_c - m_new, 0.0))
    l = tl.where(sees, l * a + l_c * b, l)
    acc = tl.where(sees[:, None], acc * a[:, None] + acc_c * b[:, None], acc)
    m = tl.where(sees, m_new, m)
    return m, l, acc


@triton.jit(do_not_specialize=["n_queries"])
def _attn_fwd(Q, K, V, O, Mout, Lout, Seqlens, scale, n_queries, n_heads, kv_group,
              stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
              stride_vb, stride_vh, stride_vt, stride_vd,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, SEQUENTIAL_SUM: tl.constexpr, ROUND_BF16: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // kv_group
    seqlen = tl.load(Seqlens + b).to(tl.int64)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_queries
    pos = seqlen - n_queries + rows
    end = tl.minimum(seqlen, seqlen - n_queries + tile * BLOCK_M + BLOCK_M)  # keys the tile sees: < end
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None].to(tl.int64) * stride_qt + offs_d[None, :] * stride_qd
    if SEQUENTIAL_SUM:
        q = _load_f32(q_ptrs, row_ok[:, None], ROUND_BF16)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    Kh = K + b * stride_kb + hk * stride_kh
    Vh = V + b * stride_vb + hk * stride_vh
    m, l, acc = _attn_chunk(q, Kh, Vh, stride_kt, stride_kd, stride_vt, stride_vd, seqlen * 0, end, seqlen, pos,
                            scale, BLOCK_M, BLOCK_N, SPLIT, HEAD_DIM, INPUT_PRECISION, SEQUENTIAL_SUM, ROUND_BF16)
    for c0 in range(SPLIT, end, SPLIT):
        m_c, l_c, acc_c = _attn_chunk(q, Kh, Vh, stride_kt, stride_kd, stride_vt, stride_vd, c0, end, seqlen, pos,
                                      scale, BLOCK_M, BLOCK_N, SPLIT, HEAD_DIM, INPUT_PRECISION, SEQUENTIAL_SUM,
                                      ROUND_BF16)
        m, l, acc = _merge(m, l, acc, m_c, l_c, acc_c, c0 <= pos)
    o = tl.math.div_rn(acc, l[:, None])
    out_rows = bh * n_queries + rows  # O, M, L are contiguous (B, H, Tq[, D])
    o_ptrs = O + out_rows[:, None] * HEAD_DIM + offs_d[None, :]
    if ROUND_BF16:
        tl.store(o_ptrs, f32_to_bf16_rn(o), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Mout + out_rows, m, mask=row_ok)
    tl.store(Lout + out_rows, l, mask=row_ok)


@triton.jit(do_not_specialize=["n_queries"])
def _attn_fwd_split(Q, K, V, Pm, Pl, Pacc, Seqlens, scale, n_queries, n_heads, kv_group, n_tiles, n_slots,
                    stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                    stride_vb, stride_vh, stride_vt, stride_vd,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, SEQUENTIAL_SUM: tl.constexpr, ROUND_BF16: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // n_tiles
    tile = pid % n_tiles
    chunk = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // kv_group
    seqlen = tl.load(Seqlens + b).to(tl.int64)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_queries
    pos = seqlen - n_queries + rows
    end = tl.minimum(seqlen, seqlen - n_queries + tile * BLOCK_M + BLOCK_M)
    chunk_start = chunk * SPLIT
    if chunk_start < end:  # slots past the sequence's last chunk are never merged
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptrs = (Q + b * stride_qb + h * stride_qh + rows[:, None].to(tl.int64) * stride_qt
                  + offs_d[None, :] * stride_qd)
        if SEQUENTIAL_SUM:
            q = _load_f32(q_ptrs, row_ok[:, None], ROUND_BF16)
        else:
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        Kh = K + b * stride_kb + hk * stride_kh
        Vh = V + b * stride_vb + hk * stride_vh
        m_c, l_c, acc_c = _attn_chunk(q, Kh, Vh, stride_kt, stride_kd, stride_vt, stride_vd, chunk_start, end,
                                      seqlen, pos, scale, BLOCK_M, BLOCK_N, SPLIT, HEAD_DIM, INPUT_PRECISION,
                                      SEQUENTIAL_SUM, ROUND_BF16)
        slot = (bh * n_slots + chunk) * n_queries + rows  # partials: (B * H, slots, Tq[, D]) float32
        tl.store(Pm + slot, m_c, mask=row_ok)
        tl.store(Pl + slot, l_c, mask=row_ok)
        tl.store(Pacc + slot[:, None] * HEAD_DIM + offs_d[None, :], acc_c, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["n_queries"])
def _attn_merge(Pm, Pl, Pacc, O, Mout, Lout, Seqlens, n_queries, n_heads, n_slots,
                BLOCK_M: tl.constexpr, SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, ROUND_BF16: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    seqlen = tl.load(Seqlens + b).to(tl.int64)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_queries
    pos = seqlen - n_queries + rows
    end = tl.minimum(seqlen, seqlen - n_queries + tile * BLOCK_M + BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    slot = bh * n_slots * n_queries + rows  # chunk 0
    m = tl.load(Pm + slot, mask=row_ok, other=0.0)
    l = tl.load(Pl + slot, mask=row_ok, other=0.0)
    acc = tl.load(Pacc + slot[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    for c0 in range(SPLIT, end, SPLIT):
        slot += n_queries
        m_c = tl.load(Pm + slot, mask=row_ok, other=0.0)
        l_c = tl.load(Pl + slot, mask=row_ok, other=0.0)
        acc_c = tl.load(Pacc + slot[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        m, l, acc = _merge(m, l, acc, m_c, l_c, acc_c, c0 <= pos)
    o = tl.math.div_rn(acc, l[:, None])
    out_rows = bh * n_queries + rows
    o_ptrs = O + out_rows[:, None] * HEAD_DIM + offs_d[None, :]
    if ROUND_BF16:
        tl.store(o_ptrs, f32_to_bf16_rn(o), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Mout + out_rows, m, mask=row_ok)
    tl.store(Lout + out_rows, l, mask=row_ok)


def check_tensors(what: str, tensors, four_d) -> None:
    """Shared by the forward and backward launchers: every (name, tensor) of `tensors` is a tensor
    on q's device (q first), the `four_d` ones 4-D float32/bfloat16/float16, and the device one
    the kernels can run on."""
    q = tensors[0][1]
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in four_d:
        if t.dim() != 4:
            raise ValueError(f"{what}: {name} must be 4-D (B, heads, T, D), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{what}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    for name, t in tensors:
        if t.device != q.device:
            raise ValueError(f"{what}: {name} is on {t.device}, expected q's device {q.device}")
    if q.device.type != "cuda" and not (INTERPRETED and q.device.type == "cpu"):
        raise ValueError(f"{what} (triton): tensors must be on a CUDA device, got {q.device} "
                         "(set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)")


def check_kv_layout(what: str, q, k, v) -> None:
    """k and v (B, Hkv, T, D) against q (B, H, Tq, D): one shape, q's batch and head dim, a head dim
    the kernels take, H a multiple of Hkv."""
    batch, heads, _, dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{what}: k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch:
        raise ValueError(f"{what}: k has batch {k.shape[0]}, expected q's batch {batch}")
    if k.shape[3] != dim:
        raise ValueError(f"{what}: k has head dim {k.shape[3]}, expected q's head dim {dim}")
    if dim not in policy.TRITON_ATTENTION_HEAD_DIMS:
        raise ValueError(f"{what}: head dim must be one of {policy.TRITON_ATTENTION_HEAD_DIMS}, got {dim}")
    kv_heads = k.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{what}: q's heads ({heads}) must be a multiple of k's heads ({kv_heads})")


def _check_inputs(q, k, v, seqlens, scale, split_size):
    what = "causal_attention_forward"
    check_tensors(what, (("q", q), ("k", k), ("v", v)), (("q", q), ("k", k), ("v", v)))
    if not isinstance(seqlens, torch.Tensor):
        raise TypeError(f"{what}: seqlens must be a torch.Tensor, got {type(seqlens).__name__}")
    if seqlens.device not in (q.device, torch.device("cpu")):
        raise ValueError(f"{what}: seqlens is on {seqlens.device}, expected the CPU or q's device {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{what}: k and v must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    check_kv_layout(what, q, k, v)
    batch, _, n_queries, _ = q.shape
    if n_queries > k.shape[2]:
        raise ValueError(f"causal_attention_forward: q has {n_queries} queries, more than the cache's {k.shape[2]} slots")
    if seqlens.dim() != 1 or seqlens.shape[0] != batch:
        raise ValueError(f"causal_attention_forward: seqlens must have shape ({batch},), got {tuple(seqlens.shape)}")
    if seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"causal_attention_forward: seqlens must be int32 or int64, got {seqlens.dtype}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"causal_attention_forward: scale must be a float, got {type(scale).__name__}")
    _config._check_split_size(split_size, "causal_attention_forward")
    if batch and n_queries:
        low, high = int(seqlens.min()), int(seqlens.max())  # a device sync unless seqlens is on the CPU
        if low < n_queries or high > k.shape[2]:
            raise ValueError(f"causal_attention_forward: seqlens must lie in [Tq, Tmax] = [{n_queries}, {k.shape[2]}], "
                             f"got values in [{low}, {high}]")


def causal_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor, scale: float,
                      split_size: int, schedule: str = "auto"):
    """reference.causal_attention_forward in Triton: returns (o (B, H, Tq, D) contiguous in q's dtype,
    m, l float32 (B, H, Tq)). q, k, v may have any strides. schedule: "auto" (split + merge when
    Tq fits one query tile, else the in-kernel merge), "prefill" or "split" — the same bits."""
    _check_inputs(q, k, v, seqlens, scale, split_size)
    if schedule not in ("auto", "prefill", "split"):
        raise ValueError(f"causal_attention_forward: schedule must be 'auto', 'prefill' or 'split', got {schedule!r}")
    batch, heads, n_queries, dim = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    m = torch.empty(batch, heads, n_queries, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    if batch == 0 or heads == 0 or n_queries == 0:
        return o, m, l
    # KVCache keeps its lengths on the CPU (checking them costs no device sync): copy them over.
    seqlens = seqlens.to(q.device, non_blocking=True).contiguous()
    cfg = policy.triton_attention_tiles(dim, q.dtype, split_size, INTERPRETED)
    n_tiles = triton.cdiv(n_queries, cfg.BLOCK_M)
    if schedule == "auto":
        schedule = "split" if n_tiles == 1 else "prefill"
    common = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, SPLIT=split_size, HEAD_DIM=dim,
                  INPUT_PRECISION=input_precision(q.dtype), SEQUENTIAL_SUM=INTERPRETED,
                  ROUND_BF16=needs_bf16_rounding(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                  **LAUNCH_OPTIONS)
    strides = (*q.stride(), *k.stride(), *v.stride())
    kv_group = heads // k.shape[1]
    if schedule == "prefill":
        _attn_fwd[(n_tiles, batch * heads)](q, k, v, o, m, l, seqlens, float(scale), n_queries, heads, kv_group,
                                            *strides, **common)
        return o, m, l
    n_slots = triton.cdiv(k.shape[2], split_size)  # from Tmax: no sync; slots past a length stay unused
    pm = torch.empty(batch * heads, n_slots, n_queries, dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    pacc = torch.empty(batch * heads, n_slots, n_queries, dim, dtype=torch.float32, device=q.device)
    _attn_fwd_split[(batch * heads * n_tiles, n_slots)](q, k, v, pm, pl, pacc, seqlens, float(scale), n_queries,
                                                       heads, kv_group, n_tiles, n_slots, *strides, **common)
    merge_m = policy.triton_attention_merge_rows(INTERPRETED)
    _attn_merge[(triton.cdiv(n_queries, merge_m), batch * heads)](
        pm, pl, pacc, o, m, l, seqlens, n_queries, heads, n_slots, BLOCK_M=merge_m, SPLIT=split_size,
        HEAD_DIM=dim, ROUND_BF16=needs_bf16_rounding(q.dtype), num_warps=policy.TRITON_ATTENTION_MERGE_WARPS, **LAUNCH_OPTIONS)
    return o, m, l
