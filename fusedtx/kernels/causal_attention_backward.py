"""Causal attention backward in Triton: (dq, dk, dv) of a full causal pass, deterministically.

The gradients are reference.causal_attention_backward's (q (B, H, T, D), k, v (B, Hkv, T, D), GQA by
h // (H / Hkv); m, l from kernels.causal_attention.causal_attention_forward, float32 (B, H, T); the forward's
output o is not needed):
    P_ij = exp_f32(s_ij - m_i) / l_i,  s_ij = (q_i . k_j) * scale  (j <= i, else 0)
    dP = dO v^T,  D_i = sum_j P_ij dP_ij,  dS = P * (dP - D)
    dq = dS k * scale,  dk = dS^T q * scale,  dv = P^T dO
tl.dot has its own internal order, so the bits are not the reference's (the contract's accuracy
bound applies); what this module promises is determinism and batch invariance, by structure
(FlashAttention-2's backward, no atomics, no split counts chosen from the shapes):
  * `_attn_bwd_preprocess`, grid (query blocks, B * H): D_i = sum_j P_ij dP_ij in float32, with
    P and dP recomputed by _attn_bwd_dq's own code (`_p_dp_tile`, same tiles, same warps), so D
    sums the very values dS subtracts it from — the softmax backward's row sum, not FlashAttention's
    shortcut dO_i . o_i, whose independent rounding left float32 dq, dk at T = 2, 3 up to 1.8x as
    far from float64 as PyTorch's eager backward, this form up to 1.1x (errors over 8 draws, under
    the interpreter; see reference.causal_attention_backward and tests/test_causal_attention.py). As in the
    reference, the keys are summed in blocks of split_size from 0, the block sums added in
    ascending order; inside a block, each key tile's tl.sum is added in ascending tile order. It
    costs one more pass over the keys (two of the dq kernel's three dots).
  * `_attn_bwd_dkdv`, grid (key blocks, B * Hkv): a program owns BLOCK_N keys of one KV head and
    accumulates their dk, dv in registers over the GQA group's query heads in ascending order and,
    for each head, its query blocks in ascending order from the block holding the program's
    first key (earlier queries see none of its keys). One writer per output element.
  * `_attn_bwd_dq`, grid (query blocks, B * H): a program owns BLOCK_M queries of one head and
    accumulates dq over the key blocks in ascending order up to the diagonal.
Every sum runs over the visible pairs (key <= query) only, as in the reference: the masked
ones are no terms (-0 in D's sums, masked_dot for the dots), so an inf or NaN in a q, k, v or dO
row reaches only the gradients that see that row.
Every sum runs in an order fixed by (D, dtype, split_size) — the tile configuration depends on
nothing else — and a program reads only its own sequence: the bits do not depend on B, on the
other sequences, on the number of programs or on the run. split_size enters only D's blocks
(above); dq, dk and dv follow the loops above, their own fixed order.

Precision: float32 accumulation everywhere; float32 inputs use input_precision "ieee" (no TF32);
for bfloat16/float16 P and dS are rounded to the input dtype before their dots (the tensor cores'
path, as FlashAttention does). Under the interpreter (TRITON_INTERPRET=1) bf16 tl.dot is broken,
so every dot operand is float32 there (F32_DOTS), P and dS rounded to the input dtype by hand
(round_to_bf16: the interpreter's casts truncate), which models the GPU's arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import config as _config
from .. import policy
from . import INTERPRETED
from ._common import LAUNCH_OPTIONS, bf16_to_f32, exp_f32, f32_to_bf16_rn, needs_bf16_rounding, round_to_bf16
from .causal_attention import check_kv_layout, check_tensors, masked_dot
# @jit helpers inlined into the kernels, never launched on their own
JIT_HELPERS = ("_load", "_dot_d", "_p_dp_tile", "_mma_operand", "_store")


def input_precision(dtype: torch.dtype) -> str | None:
    return "ieee" if dtype == torch.float32 else None


@triton.jit
def _load(ptrs, mask, F32_DOTS: tl.constexpr, ROUND_BF16: tl.constexpr):
    """A tile for tl.dot: as stored on GPUs, float32 under the interpreter (exact for bf16)."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if ROUND_BF16:
        return bf16_to_f32(x)
    if F32_DOTS:
        return x.to(tl.float32)
    return x


@triton.jit
def _dot_d(a, bt, INPUT_PRECISION: tl.constexpr, F32_DOTS: tl.constexpr):
    """a (R, D) @ bt (D, C), a sum over the head dim (s = q.k, dP = dO.v). Under the interpreter
    it is the forward's own sum (a broadcast product summed over d in ascending order, see
    kernels/causal_attention.py): s, and with it P = exp(s - m) / l, then agrees bit for bit with the m
    and l the forward computed (P_00 = 1, so dS_00 = dP_00 - P_00 dP_00 is exactly 0), and every
    kernel's dP agrees with the others'. numpy picks its reduction order from the memory layout, so
    a and bt must be freshly loaded (row-major) tiles, never tl.trans views. On GPUs tl.dot, as
    in the forward."""
    if F32_DOTS:
        return tl.sum(a[:, :, None] * bt[None, :, :], axis=1)
    return tl.dot(a, bt, input_precision=INPUT_PRECISION, out_dtype=tl.float32)


@triton.jit
def _p_dp_tile(q, do, m, l, Kh, Vh, rows, n0, scale, n_ctx, stride_kt, stride_kd, stride_vt, stride_vd,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               F32_DOTS: tl.constexpr, ROUND_BF16: tl.constexpr):
    """P and dP (BLOCK_M, BLOCK_N) of the query tile (q, do, m, l at `rows`) against keys n0 ...
    n0 + BLOCK_N - 1 of the KV head at Kh, Vh, those keys' (D, BLOCK_N) tile kt and the pairs
    the rows see (valid). The one code that forms them for query tiles: _attn_bwd_preprocess sums
    P * dP into D from it and _attn_bwd_dq subtracts that D from the same dP."""
    offs_d = tl.arange(0, HEAD_DIM)
    keys = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    key_ok = keys < n_ctx
    kt = _load(Kh + keys[None, :] * stride_kt + offs_d[:, None] * stride_kd, key_ok[None, :],
               F32_DOTS, ROUND_BF16)  # (D, BLOCK_N)
    vt = _load(Vh + keys[None, :] * stride_vt + offs_d[:, None] * stride_vd, key_ok[None, :],
               F32_DOTS, ROUND_BF16)
    s = _dot_d(q, kt, INPUT_PRECISION, F32_DOTS) * scale  # (BLOCK_M, BLOCK_N)
    valid = (keys[None, :] <= rows[:, None]) & key_ok[None, :]
    p = tl.where(valid, tl.math.div_rn(exp_f32(s - m[:, None]), l[:, None]), 0.0)
    dp = _dot_d(do, vt, INPUT_PRECISION, F32_DOTS)
    return p, dp, kt, valid


@triton.jit
def _mma_operand(x, Like, F32_DOTS: tl.constexpr, ROUND_BF16: tl.constexpr):
    """float32 x rounded to the inputs' dtype (Like's element type) for a dot with an input tile;
    under the interpreter the rounded value is kept in float32."""
    if ROUND_BF16:
        return round_to_bf16(x)
    if F32_DOTS:
        return x.to(Like.dtype.element_ty).to(tl.float32)
    return x.to(Like.dtype.element_ty)


@triton.jit
def _store(ptrs, x, mask, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        tl.store(ptrs, f32_to_bf16_rn(x), mask=mask)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_ctx"])
def _attn_bwd_preprocess(Q, K, V, DO, M, L, Delta, scale, n_ctx, n_heads, kv_group, split_size,
                         stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                         stride_vb, stride_vh, stride_vt, stride_vd, stride_gb, stride_gh, stride_gt, stride_gd,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr, F32_DOTS: tl.constexpr, ROUND_BF16: tl.constexpr):
    """D_i = sum_j P_ij dP_ij for BLOCK_M queries of one head: _attn_bwd_dq's prologue and key
    loop, summing P * dP instead of accumulating dS k. BLOCK_N divides split_size (the launcher
    caps it), so every key tile lies in one split block."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // kv_group
    m0 = tile * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n_ctx
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
              row_ok[:, None], F32_DOTS, ROUND_BF16)  # (BLOCK_M, D)
    do = _load(DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gt + offs_d[None, :] * stride_gd,
               row_ok[:, None], F32_DOTS, ROUND_BF16)
    m = tl.load(M + bh * n_ctx + rows, mask=row_ok, other=0.0)
    l = tl.load(L + bh * n_ctx + rows, mask=row_ok, other=1.0)
    Kh = K + b * stride_kb + hk * stride_kh
    Vh = V + b * stride_vb + hk * stride_vh
    delta = tl.zeros((BLOCK_M,), tl.float32)
    block_sum = tl.zeros((BLOCK_M,), tl.float32)  # the current split block's partial, from +0
    end = tl.minimum(n_ctx, m0 + BLOCK_M)  # keys past the tile's last row add only +-0
    for n0 in range(0, end, BLOCK_N):  # key tiles, ascending
        p, dp, _, valid = _p_dp_tile(q, do, m, l, Kh, Vh, rows, n0, scale, n_ctx, stride_kt, stride_kd,
                                     stride_vt, stride_vd, BLOCK_N, HEAD_DIM, INPUT_PRECISION, F32_DOTS, ROUND_BF16)
        # a masked pair is no term: -0 leaves the sum as it is (its dP may be inf or NaN)
        block_sum = block_sum + tl.sum(tl.where(valid, p * dp, -0.0), axis=1)
        closes_block = (n0 + BLOCK_N) % split_size == 0
        delta = tl.where(closes_block, delta + block_sum, delta)
        block_sum = tl.where(closes_block, 0.0, block_sum)
    delta = delta + block_sum  # the last, partial, split block (+0 when the loop ended on a boundary)
    tl.store(Delta + bh * n_ctx + rows, delta, mask=row_ok)


@triton.jit(do_not_specialize=["n_ctx"])
def _attn_bwd_dkdv(Q, K, V, DO, M, L, Delta, DK, DV, scale, n_ctx, n_heads, kv_group,
                   stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                   stride_vb, stride_vh, stride_vt, stride_vd, stride_gb, stride_gh, stride_gt, stride_gd,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, F32_DOTS: tl.constexpr, ROUND_BF16: tl.constexpr):
    key_block = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    n_kv_heads = n_heads // kv_group
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    n0 = key_block * BLOCK_N
    keys = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    key_ok = keys < n_ctx
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = tl.arange(0, BLOCK_M)
    k = _load(K + b * stride_kb + hk * stride_kh + keys[:, None] * stride_kt + offs_d[None, :] * stride_kd,
              key_ok[:, None], F32_DOTS, ROUND_BF16)  # (BLOCK_N, D)
    v = _load(V + b * stride_vb + hk * stride_vh + keys[:, None] * stride_vt + offs_d[None, :] * stride_vd,
              key_ok[:, None], F32_DOTS, ROUND_BF16)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    first_query_block = (n0 // BLOCK_M) * BLOCK_M  # queries before the program's first key see none of its keys
    for g in range(0, kv_group):  # the group's query heads, ascending
        h = hk * kv_group + g
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_gb + h * stride_gh
        row0 = (b * n_heads + h) * n_ctx  # M, L, Delta: contiguous (B, H, T)
        for m0 in range(first_query_block, n_ctx, BLOCK_M):  # query blocks, ascending
            rows = m0 + offs_m.to(tl.int64)
            row_ok = rows < n_ctx
            qt = _load(Qh + rows[None, :] * stride_qt + offs_d[:, None] * stride_qd, row_ok[None, :],
                       F32_DOTS, ROUND_BF16)  # (D, BLOCK_M)
            do = _load(DOh + rows[:, None] * stride_gt + offs_d[None, :] * stride_gd, row_ok[:, None],
                       F32_DOTS, ROUND_BF16)  # (BLOCK_M, D)
            m = tl.load(M + row0 + rows, mask=row_ok, other=0.0)
            l = tl.load(L + row0 + rows, mask=row_ok, other=1.0)
            delta = tl.load(Delta + row0 + rows, mask=row_ok, other=0.0)
            st = _dot_d(k, qt, INPUT_PRECISION, F32_DOTS) * scale  # (BLOCK_N, BLOCK_M)
            valid = (keys[:, None] <= rows[None, :]) & row_ok[None, :]  # causal; keys <= row < T
            pt = tl.where(valid, tl.math.div_rn(exp_f32(st - m[None, :]), l[None, :]), 0.0)
            # a key that a query does not see takes no term from it (masked_dot): its q and dO
            # rows may hold inf or NaN; the tile has such pairs when it reaches above the diagonal
            any_masked = m0 < n0 + BLOCK_N - 1
            dv = masked_dot(_mma_operand(pt, DO, F32_DOTS, ROUND_BF16), valid, do, dv, any_masked, INPUT_PRECISION)
            if F32_DOTS:  # a fresh (D, BLOCK_M) tile, not a transposed view: see _dot_d
                dot_t = _load(DOh + rows[None, :] * stride_gt + offs_d[:, None] * stride_gd, row_ok[None, :],
                              F32_DOTS, ROUND_BF16)
            else:
                dot_t = tl.trans(do)
            dpt = _dot_d(v, dot_t, INPUT_PRECISION, F32_DOTS)
            dst = tl.where(valid, pt * (dpt - delta[None, :]), 0.0)
            dk = masked_dot(_mma_operand(dst, Q, F32_DOTS, ROUND_BF16), valid, tl.trans(qt), dk, any_masked,
                            INPUT_PRECISION)
    dk = dk * scale
    out = bhk * n_ctx + keys  # DK, DV: contiguous (B, Hkv, T, D)
    _store(DK + out[:, None] * HEAD_DIM + offs_d[None, :], dk, key_ok[:, None], ROUND_BF16)
    _store(DV + out[:, None] * HEAD_DIM + offs_d[None, :], dv, key_ok[:, None], ROUND_BF16)


@triton.jit(do_not_specialize=["n_ctx"])
def _attn_bwd_dq(Q, K, V, DO, M, L, Delta, DQ, scale, n_ctx, n_heads, kv_group,
                 stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                 stride_vb, stride_vh, stride_vt, stride_vd, stride_gb, stride_gh, stride_gt, stride_gd,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, F32_DOTS: tl.constexpr, ROUND_BF16: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // kv_group
    m0 = tile * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n_ctx
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
              row_ok[:, None], F32_DOTS, ROUND_BF16)  # (BLOCK_M, D)
    do = _load(DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gt + offs_d[None, :] * stride_gd,
               row_ok[:, None], F32_DOTS, ROUND_BF16)
    m = tl.load(M + bh * n_ctx + rows, mask=row_ok, other=0.0)
    l = tl.load(L + bh * n_ctx + rows, mask=row_ok, other=1.0)
    delta = tl.load(Delta + bh * n_ctx + rows, mask=row_ok, other=0.0)
    Kh = K + b * stride_kb + hk * stride_kh
    Vh = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    end = tl.minimum(n_ctx, m0 + BLOCK_M)  # the tile's rows see keys < end
    for n0 in range(0, end, BLOCK_N):  # key blocks, ascending, up to the diagonal
        p, dp, kt, valid = _p_dp_tile(q, do, m, l, Kh, Vh, rows, n0, scale, n_ctx, stride_kt, stride_kd,
                                      stride_vt, stride_vd, BLOCK_N, HEAD_DIM, INPUT_PRECISION, F32_DOTS, ROUND_BF16)
        # a key the row does not see is no term of dq (masked_dot): its k row may hold inf or NaN
        ds = tl.where(valid, p * (dp - delta[:, None]), 0.0)
        dq = masked_dot(_mma_operand(ds, K, F32_DOTS, ROUND_BF16), valid, tl.trans(kt), dq, n0 + BLOCK_N - 1 > m0,
                        INPUT_PRECISION)
    dq = dq * scale
    _store(DQ + (bh * n_ctx + rows)[:, None] * HEAD_DIM + offs_d[None, :], dq, row_ok[:, None], ROUND_BF16)


def _check_inputs(grad_o, q, k, v, m, l, scale, split_size):
    what = "causal_attention_backward"
    tensors = (("grad_o", grad_o), ("q", q), ("k", k), ("v", v), ("m", m), ("l", l))
    check_tensors(what, tensors, (("grad_o", grad_o), ("q", q), ("k", k), ("v", v)))
    for name, t in (("grad_o", grad_o), ("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{what}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    if grad_o.shape != q.shape:
        raise ValueError(f"{what}: grad_o must have q's shape {tuple(q.shape)}, got {tuple(grad_o.shape)}")
    check_kv_layout(what, q, k, v)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"{what}: k has {k.shape[2]} keys, expected q's length {q.shape[2]} (a full causal pass)")
    for name, t in (("m", m), ("l", l)):
        if t.dtype != torch.float32:
            raise TypeError(f"{what}: {name} must be float32, got {t.dtype}")
        if t.shape != q.shape[:3]:
            raise ValueError(f"{what}: {name} must have shape {tuple(q.shape[:3])} (B, H, T), got {tuple(t.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{what}: scale must be a float, got {type(scale).__name__}")
    _config._check_split_size(split_size, what)


def preprocess_block_n(cfg: policy.AttentionBackwardTiles, split_size: int) -> int:
    """_attn_bwd_preprocess's key tile: the dq kernel's, capped at split_size (both are powers of
    two) so that no tile straddles two of D's split blocks."""
    return min(cfg.BLOCK_N2, split_size)


def causal_attention_backward(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       m: torch.Tensor, l: torch.Tensor, scale: float, split_size: int):
    """reference.causal_attention_backward in Triton: (dq, dk, dv), contiguous, in the inputs' dtype.
    grad_o, q, k, v may have any strides; m, l are the forward's float32 (B, H, T) statistics."""
    _check_inputs(grad_o, q, k, v, m, l, scale, split_size)
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    if batch == 0 or heads == 0 or length == 0:
        return dq, dk, dv
    m, l = m.contiguous(), l.contiguous()
    delta = torch.empty(batch, heads, length, dtype=torch.float32, device=q.device)
    cfg = policy.triton_attention_backward_tiles(dim, q.dtype, INTERPRETED)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_o.stride())
    common = dict(HEAD_DIM=dim, INPUT_PRECISION=input_precision(q.dtype), F32_DOTS=INTERPRETED,
                  ROUND_BF16=needs_bf16_rounding(q.dtype), num_stages=cfg.num_stages, **LAUNCH_OPTIONS)
    args = (q, k, v, grad_o, m, l, delta)
    sizes = (float(scale), length, heads, heads // kv_heads)
    query_grid = (triton.cdiv(length, cfg.BLOCK_M2), batch * heads)
    _attn_bwd_preprocess[query_grid](
        *args, *sizes, split_size, *strides, BLOCK_M=cfg.BLOCK_M2, BLOCK_N=preprocess_block_n(cfg, split_size),
        num_warps=cfg.num_warps2, **common)
    _attn_bwd_dkdv[(triton.cdiv(length, cfg.BLOCK_N1), batch * kv_heads)](
        *args, dk, dv, *sizes, *strides, BLOCK_M=cfg.BLOCK_M1, BLOCK_N=cfg.BLOCK_N1, num_warps=cfg.num_warps1, **common)
    _attn_bwd_dq[query_grid](
        *args, dq, *sizes, *strides, BLOCK_M=cfg.BLOCK_M2, BLOCK_N=cfg.BLOCK_N2, num_warps=cfg.num_warps2, **common)
    return dq, dk, dv
