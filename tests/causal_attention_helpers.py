"""What the causal attention tests share: inputs (make, qkv), the spec's full pass, a KV cache
with garbage beyond its length, chunked prefill / decode through any attend function, the batch
invariance check, and its negative control (a split count chosen from the batch); the checks
that a key a query cannot see never reaches it (forward_unseen_failures,
backward_unseen_failures), NaN-aware bitwise equality, and their negative control (the old
0 * x arithmetic)."""
from __future__ import annotations

import contextlib
import math
from unittest import mock

import torch

from fusedtx import reference
from helpers import bitwise_equal, garbage_like

S = 16  # a small split size keeps the spec's emulated FMA chains fast


def make(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def qkv(batch, heads, length, dim, dtype=torch.float32, kv_heads=None, seed=0):
    kv_heads = kv_heads or heads
    return (make((batch, heads, length, dim), dtype, seed), make((batch, kv_heads, length, dim), dtype, seed + 1),
            make((batch, kv_heads, length, dim), dtype, seed + 2))


def full_causal(q, k, v, split_size=S):
    lengths = torch.full((q.shape[0],), q.shape[2])
    return reference.causal_attention_forward(q, k, v, lengths, q.shape[-1] ** -0.5, split_size)[0]


def decode_cache(k, v, tmax, generator):
    """A KV cache of Tmax slots holding k, v in its first slots and garbage (inf, NaN) after."""
    k_cache = garbage_like(torch.empty(*k.shape[:2], tmax, k.shape[-1], dtype=k.dtype), generator)
    v_cache = garbage_like(torch.empty_like(k_cache), generator)
    k_cache[:, :, : k.shape[2]], v_cache[:, :, : v.shape[2]] = k, v
    return k_cache, v_cache


def chunked(q, k, v, chunk_sizes, tmax, split_size=S, attend=reference.causal_attention_forward):
    """The outputs of a prefill in chunks of the given sizes (the last one repeats), each chunk
    attending to a cache filled up to its end, with garbage beyond."""
    g = torch.Generator().manual_seed(9)
    length, outs, start, i = q.shape[2], [], 0, 0
    while start < length:
        stop = min(length, start + chunk_sizes[min(i, len(chunk_sizes) - 1)])
        k_cache, v_cache = decode_cache(k[:, :, :stop], v[:, :, :stop], tmax, g)
        lengths = torch.full((q.shape[0],), stop)
        outs.append(attend(q[:, :, start:stop], k_cache, v_cache, lengths, q.shape[-1] ** -0.5, split_size)[0])
        start, i = stop, i + 1
    return torch.cat(outs, dim=2)


def batch_failures(attend, split_size=S):
    """(batch, index) pairs where a sequence's outputs differ from the same sequence alone; the
    other sequences have other lengths and the cache garbage beyond every length."""
    g = torch.Generator().manual_seed(3)
    length, tmax, n_queries = 2 * S + 3, 4 * S, 4
    q, k, v = qkv(1, 2, length, 16, seed=5)
    scale = 16 ** -0.5
    k_cache, v_cache = decode_cache(k, v, tmax, g)
    alone = attend(q[:, :, -n_queries:], k_cache, v_cache, torch.tensor([length]), scale, split_size)[0]
    failures = []
    for batch in (2, 5, 10):
        for index in sorted({0, batch // 2, batch - 1}):
            qs, ks, vs = qkv(batch, 2, n_queries, 16, seed=batch)
            kc, vc = (garbage_like(torch.empty(batch, 2, tmax, 16), g) for _ in range(2))
            lengths = torch.randint(n_queries, tmax + 1, (batch,), generator=g)
            kc[:, :, :n_queries], vc[:, :, :n_queries] = ks, vs  # some finite keys everywhere
            lengths[index], qs[index], kc[index], vc[index] = length, q[0, :, -n_queries:], k_cache[0], v_cache[0]
            for b in range(batch):  # garbage beyond each length, real-looking values before it
                fill = make((2, int(lengths[b]), 16), torch.float32, seed=100 + b)
                if b != index:
                    kc[b, :, : int(lengths[b])], vc[b, :, : int(lengths[b])] = fill, fill.flip(-1)
            out = attend(qs, kc, vc, lengths, scale, split_size)[0]
            if not bitwise_equal(out[index: index + 1], alone):
                failures.append((batch, index))
    return failures


def split_count_from_batch(q, k_cache, v_cache, seqlens, scale, split_size):
    """What split-KV decode kernels usually do: pick the number of splits to fill the machine
    from the batch size (two programs per batch here) and the chunk size from the longest
    sequence, so a sequence's chunks follow the batch and its own length."""
    splits = max(1, 2 // q.shape[0])
    longest = int(seqlens.max())
    size = max(16, 1 << math.ceil(math.log2(max(1, math.ceil(longest / splits)))))
    return reference.causal_attention_forward(q, k_cache, v_cache, seqlens, scale, size)


# ---------------------------------------------------------------------------------------------
# a key a query cannot see never reaches it, whatever its value (inf, NaN): the forward's and the
# backward's masked pairs are no terms of any sum (reference.causal_attention_forward's docstring)
# ---------------------------------------------------------------------------------------------
POISONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
# For the interpreted Triton kernels (seconds a call): NaN and +inf, the two that reach a query
# as 0 * x = NaN through either operand; -inf in k is a -inf score, in v the mirror of +inf.
FEW_POISONS = {"nan": float("nan"), "inf": float("inf")}
UNSEEN_LENGTH = 2 * S + 5  # three chunks; the poisoned position sits inside a chunk and a query block
UNSEEN_AT = S + 3


def nan_aware_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """NaN at the same places and the same bits everywhere else (a NaN's sign and payload are not
    part of the contract, its position is)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and bitwise_equal(torch.where(nan_a, 0, a), torch.where(nan_b, 0, b))


def assert_nan_aware_equal(a, b, what=""):
    assert nan_aware_equal(a, b), (f"{what}: differ ({int((torch.isnan(a) != torch.isnan(b)).sum())} NaN positions, "
                                   f"{int((torch.where(torch.isnan(a), 0, a) != torch.where(torch.isnan(b), 0, b)).sum())} values)")


def unseen_inputs(dtype=torch.float32, seed=0):
    """q (1, 2, T, 16), k, v (1, 1, T, 16) (two query heads on one KV head), grad_o like q."""
    q, k, v = qkv(1, 2, UNSEEN_LENGTH, 16, dtype, kv_heads=1, seed=seed)
    return q, k, v, make(q.shape, dtype, seed + 3)


def poisoned(t, value, row, col=5):
    """t with `value` at position `row`, head dim `col` of every head."""
    t = t.clone()
    t[:, :, row, col] = value
    return t


def forward_unseen_failures(attend, dtype=torch.float32, split_size=S, poisons=POISONS):
    """Why a key at position p (an inf or NaN in k_p or v_p) failed to stay out of the queries
    t < p, for `attend` with reference.causal_attention_forward's signature: their outputs must be
    the clean inputs' bits in a full pass, and each query's full-pass row must be its decode
    step's and a chunked prefill's (NaN-aware: rows t >= p may be NaN). A NaN in v_p must reach
    every query t >= p (a visible key does: the check can see a NaN)."""
    q, k, v, _ = unseen_inputs(dtype)
    scale, p, length = 0.25, UNSEEN_AT, UNSEEN_LENGTH
    lengths = torch.tensor([length])
    clean = attend(q, k, v, lengths, scale, split_size)[0]
    failures = []
    for which in ("k", "v"):
        for name, value in poisons.items():
            kk = poisoned(k, value, p) if which == "k" else k
            vv = poisoned(v, value, p) if which == "v" else v
            what = f"{which}[{p}] = {name}"
            full = attend(q, kk, vv, lengths, scale, split_size)[0]
            if not bitwise_equal(full[:, :, :p], clean[:, :, :p]):
                failures.append(f"{what}: queries before it changed")
            if which == "v" and name == "nan" and not torch.isnan(full[:, :, p:, 5]).all():
                failures.append(f"{what}: a query that sees it is not NaN")
            for t in (p - 1, p, length - 1):
                step = attend(q[:, :, t:t + 1], kk, vv, torch.tensor([t + 1]), scale, split_size)[0]
                if not nan_aware_equal(step, full[:, :, t:t + 1]):
                    failures.append(f"{what}: decode at {t} differs from the full pass")
            for sizes in ([7], [p - 1, 2]):  # p inside a prefill chunk: its earlier queries attend to it, masked
                stepped = chunked(q, kk, vv, sizes, tmax=length + 3, split_size=split_size, attend=attend)
                if not nan_aware_equal(stepped, full):
                    failures.append(f"{what}: chunked prefill {sizes} differs from the full pass")
    return failures


def backward_unseen_failures(backward, forward=reference.causal_attention_forward, dtype=torch.float32,
                             split_size=S, poisons=POISONS):
    """The backward's masked pairs, for `backward` with reference.causal_attention_backward's
    signature and m, l from `forward` (None: m = l = None, for a backward that runs its own): an inf or NaN in k_p or v_p must leave dq of the queries
    before p as it is with clean inputs (bitwise), one in q_r or dO_r must leave dk, dv of the
    keys after r and dq of every other query as they are; the ones the poison can reach must
    show it (a NaN in v_p makes dq_p NaN, one in q_r or dO_r makes dk_r, dv_r NaN)."""
    q, k, v, grad_o = unseen_inputs(dtype)
    scale, p = 0.25, UNSEEN_AT
    lengths = torch.tensor([q.shape[2]])

    def grads(q, k, v, grad_o):
        _, m, l = (None, None, None) if forward is None else forward(q, k, v, lengths, scale, split_size)
        return backward(grad_o, q, k, v, m, l, scale, split_size)

    dq0, dk0, dv0 = grads(q, k, v, grad_o)
    failures = []
    for which in ("q", "k", "v", "grad_o"):
        for name, value in poisons.items():
            args = dict(q=q, k=k, v=v, grad_o=grad_o)
            args[which] = poisoned(args[which], value, p)
            dq, dk, dv = grads(**args)
            what = f"{which}[{p}] = {name}"
            if which in ("k", "v"):
                if not bitwise_equal(dq[:, :, :p], dq0[:, :, :p]):
                    failures.append(f"{what}: dq of the queries before it changed")
                if which == "v" and name == "nan" and not torch.isnan(dq[:, :, p]).any():
                    failures.append(f"{what}: dq of the query at it is not NaN")
            else:
                rows = torch.arange(q.shape[2]) != p
                if not bitwise_equal(dq[:, :, rows], dq0[:, :, rows]):
                    failures.append(f"{what}: dq of the other queries changed")
                if not (bitwise_equal(dk[:, :, p + 1:], dk0[:, :, p + 1:])
                        and bitwise_equal(dv[:, :, p + 1:], dv0[:, :, p + 1:])):
                    failures.append(f"{what}: dk, dv of the keys after it changed")
                if name == "nan" and not (torch.isnan(dk[:, :, p]).any() and torch.isnan(dv[:, :, p]).any()):
                    failures.append(f"{what}: dk, dv of the key at it are not NaN")
    return failures


@contextlib.contextmanager
def zero_times_unseen_terms():
    """The spec as it was before issue 16: every key of a chunk in P·V's chains and every pair of
    the backward's blocks in its sums, masked ones as 0 * x (0 * NaN = NaN). Negative control."""
    from fusedtx.reference import causal_attention as spec, common

    def all_terms(fn, n_args):  # the function without its `valid` argument
        return lambda *args: fn(*args[:n_args])

    with mock.patch.object(spec, "fma_matmul", all_terms(common.fma_matmul, 2)), \
            mock.patch.object(spec, "blocked_fma_matmul", all_terms(common.blocked_fma_matmul, 3)):
        yield


def signed_zero_failures(attend, split_size=S):
    """Query 1 sees keys 0 and 1 and its P.V chain sums to -0 (p_0 v_0 = exp(-80) * -1e-20
    underflows to -0 in its FMA, then 1 * -0); key 2, masked for it, has v = +1. Added as a term,
    fma(+0, 1, -0) = +0 would flip the sign: the full pass must give query 1 its decode step's
    -0 (bitwise), the masked key's value (even finite) must not reach it."""
    q, k, v = torch.zeros(3, 1, 1, 3, 16).unbind(0)
    q[..., 0] = 1.0
    k[0, 0, 0, 0] = -80.0  # s_0 = -80, s_1 = 0 = m: p_0 = exp_f32(-80), p_1 = 1
    k[0, 0, 2] = 0.5
    v[0, 0, 0], v[0, 0, 1], v[0, 0, 2] = -1e-20, -0.0, 1.0
    full = attend(q, k, v, torch.tensor([3]), 1.0, split_size)[0][:, :, 1:2]
    step = attend(q[:, :, 1:2], k, v, torch.tensor([2]), 1.0, split_size)[0]
    return [] if bitwise_equal(full, step) else [f"query 1: full pass {full.flatten()[:2].tolist()}, decode "
                                                 f"{step.flatten()[:2].tolist()}"]


def poisoned_problems(dtype=torch.float32, issue_dim=32, poisons=POISONS):
    """(what, grad_o, q, k, v, split) full causal passes with an inf or NaN in one row of q, k, v
    or dO, for comparing a kernel with the spec NaN-aware bitwise (NaN positions included): each
    poison at position UNSEEN_AT of k, v, q, dO, and issue 16's case, T = 65, S = 64, a NaN in
    v_32 (the first position of the second 32-query block), head dim issue_dim."""
    q, k, v, grad_o = unseen_inputs(dtype)
    for which in ("k", "v", "q", "grad_o"):
        for name, value in poisons.items():
            args = dict(grad_o=grad_o, q=q, k=k, v=v)
            args[which] = poisoned(args[which], value, UNSEEN_AT)
            yield f"{which}[{UNSEEN_AT}] = {name}", args["grad_o"], args["q"], args["k"], args["v"], S
    q, k, v = qkv(1, 2, 65, issue_dim, dtype, kv_heads=1, seed=11)
    yield "v[32] = nan, T = 65, S = 64", make(q.shape, dtype, 12), q, k, poisoned(v, float("nan"), 32, col=0), 64
