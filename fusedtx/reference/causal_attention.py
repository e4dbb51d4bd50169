"""Causal attention with a fixed split size: forward (full pass, chunked prefill, decode) and
the full pass's backward.
"""
from __future__ import annotations

import torch

from .common import blocked_fma_matmul, exp_f32, fma_matmul

def causal_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor, scale: float,
                      split_size: int):
    """Causal attention of the last q.shape[2] tokens of each sequence, cut into fixed-size chunks.

    q (B, H, Tq, D); k, v (B, Hkv, Tmax, D) with H a multiple of Hkv (query head h reads KV head
    h // (H / Hkv)); seqlens (B,) ints: sequence b has seqlens[b] valid keys (Tq <= seqlens[b] <=
    Tmax; whatever lies beyond is never read) and its queries sit at positions
    seqlens[b] - Tq ... seqlens[b] - 1. A full causal pass is seqlens = T = Tq = Tmax.

    A query at position t sees keys 0 ... t, cut at multiples of S = split_size counted from
    position 0. Chunk c (keys cS ... min(cS + S - 1, t)) is reduced on its own, in float32:
        s_j   = fma_matmul(q, k_j) * scale          (each dot: an FMA chain over d ascending)
        m_c   = max_j s_j
        p_j   = exp_f32(s_j - m_c)
        l_c   = sum_j p_j                           (ascending j, from +0)
        acc_c = fma_matmul(p, v)                    (an FMA chain over the j <= t ascending, from +0)
    and the chunks are merged in ascending order, starting from chunk 0's (m, l, acc):
        m'  = max(m, m_c),  a = exp_f32(m - m'),  b = exp_f32(m_c - m')
        l   = l * a + l_c * b,   acc = acc * a + acc_c * b,   m = m'
    o = acc / l. A key the query does not see (j > t) is no term of any of these: its score is
    -inf before the max, its p_j = +0 (which leaves l_c >= +0 unchanged), and acc_c's chains
    skip it (acc kept as is; fma(+0, v_j, acc) would turn inf or NaN in v_j into NaN and a -0
    accumulator into +0). Whatever k_j and v_j hold, query t gets the bits of chains that stop
    at its own last key, as in a decode step. Nothing here depends on Tq, on the other sequences or on how the queries are
    grouped: a query's bits are the same in a full pass, in any chunked prefill and in a decode
    step. Returns (o in q's dtype, m, l) with m and l float32 (B, H, Tq) for the backward.
    """
    batch, heads, n_queries, _ = q.shape
    group = heads // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    m_out = torch.empty(batch, heads, n_queries, dtype=torch.float32, device=q.device)
    l_out = torch.empty_like(m_out)
    f32 = lambda c: torch.tensor(c, dtype=torch.float32, device=q.device)  # noqa: E731
    for b in range(batch):
        length = int(seqlens[b])
        qb = q[b].float()                                                    # (H, Tq, D)
        kb = k[b].float().repeat_interleave(group, dim=0)                    # (H, Tmax, D)
        vb = v[b].float().repeat_interleave(group, dim=0)
        positions = torch.arange(length - n_queries, length, device=q.device)
        m = l = acc = None
        for start in range(0, length, split_size):
            stop = min(start + split_size, length)
            keys = torch.arange(start, stop, device=q.device)
            valid = keys[None, :] <= positions[:, None]                      # (Tq, Sc)
            sees = valid.any(dim=1)[None, :]                                 # (1, Tq)
            s = fma_matmul(qb, kb[:, start:stop].transpose(1, 2)) * f32(scale)
            s = torch.where(valid, s, f32(float("-inf")))
            m_c = s.amax(dim=2)                                              # (H, Tq)
            p = torch.where(valid, exp_f32(s - torch.where(sees, m_c, f32(0.0))[..., None]), f32(0.0))
            l_c = torch.zeros_like(m_c)
            for j in range(stop - start):
                l_c = l_c + p[..., j]
            acc_c = fma_matmul(p, vb[:, start:stop], valid)                  # keys j <= t only
            if m is None:  # chunk 0: every query sees key 0
                m, l, acc = m_c, l_c, acc_c
                continue
            m_new = torch.maximum(m, m_c)
            alpha, beta = exp_f32(m - m_new), exp_f32(torch.where(sees, m_c - m_new, f32(0.0)))
            l = torch.where(sees, l * alpha + l_c * beta, l)
            acc = torch.where(sees[..., None], acc * alpha[..., None] + acc_c * beta[..., None], acc)
            m = torch.where(sees, m_new, m)
        out[b], m_out[b], l_out[b] = acc / l[..., None], m, l
    return out.to(q.dtype), m_out, l_out


def causal_attention_backward(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       m: torch.Tensor, l: torch.Tensor, scale: float, split_size: int):
    """Gradients of a full causal causal_attention_forward (Tq = Tk = T, every sequence of length T).

    From the forward's final row statistics (m, l), in float32 with the forward's dot products:
        s_ij = fl(dotFMA(q_i, k_j) * scale),   P_ij = exp_f32(s_ij - m_i) / l_i   (j <= i, else 0)
        dP_ij = dotFMA(dO_i, v_j),   D_i = sum_j P_ij dP_ij,   dS_ij = P_ij * (dP_ij - D_i)
        dq_i = (sum_j dS_ij k_j) * scale      sums over keys j in blocks of S from 0
        dk_j = (sum_i dS_ij q_i) * scale      sums over queries i in blocks of S from 0
        dv_j =  sum_i P_ij dO_i
    D_i, like dq_i, is summed over keys j in blocks of S. It is the softmax backward's own row
    sum rather than the shortcut dO_i . o_i (equal in exact arithmetic): summing the same rounded
    P_ij dP_ij that dS uses keeps sum_j dS_ij near 0, where o_i's rounding does not, and at short
    rows (T = 2, 3) that shortcut made dq and dk up to 3.3x less accurate than PyTorch's eager
    backward in float32 (this form: <= 1.7x); it costs one more pass over the keys.
    Every sum runs over the visible pairs j <= i only: a masked pair is no term (left out of the
    chains, not added as 0 * x, which turns an inf or NaN in a q, k, v or dO row the other side
    cannot see into NaN). Each block sum is an FMA chain from +0 over its visible terms (+0 when
    it has none), blocks added in ascending order; with grouped KV heads, each query head's sum is formed so and the group's
    heads are added in ascending head order from +0. Fixed orders, no atomics: the same bits run
    after run and for any thread count. Returns (dq, dk, dv) in the inputs' dtypes.
    """
    heads, kv_heads, length = q.shape[1], k.shape[1], q.shape[2]
    group = heads // kv_heads
    f32 = lambda c: torch.tensor(c, dtype=torch.float32, device=q.device)  # noqa: E731
    qf, dof = q.float(), grad_o.float()
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    s = fma_matmul(qf, kf.transpose(-1, -2)) * f32(scale)
    p = torch.where(causal, exp_f32(torch.where(causal, s - m[..., None], f32(0.0))) / l[..., None], f32(0.0))
    dp = fma_matmul(dof, vf.transpose(-1, -2))
    d_row = blocked_fma_matmul(p[..., None, :], dp[..., :, None], split_size, causal[:, None, :])[..., 0]  # (B, H, T, 1)
    ds = torch.where(causal, p * (dp - d_row), f32(0.0))
    dq = blocked_fma_matmul(ds, kf, split_size, causal) * f32(scale)
    dk_heads = blocked_fma_matmul(ds.transpose(-1, -2), qf, split_size, causal.t()) * f32(scale)
    dv_heads = blocked_fma_matmul(p.transpose(-1, -2), dof, split_size, causal.t())
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for h in range(group):  # ascending head order within each KV group
        dk = dk + dk_heads[:, h::group]
        dv = dv + dv_heads[:, h::group]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
