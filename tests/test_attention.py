"""Causal attention with a fixed split size: the specification (fusedtx.reference.attention_forward).

What the kernels will be held to, checked on the spec first: accuracy against float64 SDPA,
prefill / chunked prefill / decode consistency bit for bit, batch invariance with garbage
beyond each sequence's length, and a negative control (a split count chosen from the batch,
as split-KV kernels usually do) that visibly fails the same checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fusedtx import reference
from helpers import DTYPES, assert_accuracy, assert_bitwise_equal, bitwise_equal, garbage_like

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
    return reference.attention_forward(q, k, v, lengths, q.shape[-1] ** -0.5, split_size)[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("length", [1, 2, S - 1, S, S + 1, 3 * S + 5])
@pytest.mark.parametrize("dim,kv_heads", [(16, 2), (32, 1)], ids=["D16", "D32-mqa"])
def test_spec_accuracy_against_float64(dtype, length, dim, kv_heads):
    q, k, v = qkv(2, 2, length, dim, dtype, kv_heads)
    ours = full_causal(q, k, v)
    expand = lambda t: t.repeat_interleave(2 // kv_heads, dim=1)  # noqa: E731
    eager = F.scaled_dot_product_attention(q, expand(k), expand(v), is_causal=True)
    exact = F.scaled_dot_product_attention(q.double(), expand(k).double(), expand(v).double(), is_causal=True)
    assert ours.dtype == dtype and ours.shape == q.shape
    assert_accuracy(ours, eager, exact, f"attention spec {dtype} T={length} D={dim}")


def decode_cache(k, v, tmax, generator):
    """A KV cache of Tmax slots holding k, v in its first slots and garbage (inf, NaN) after."""
    k_cache = garbage_like(torch.empty(*k.shape[:2], tmax, k.shape[-1], dtype=k.dtype), generator)
    v_cache = garbage_like(torch.empty_like(k_cache), generator)
    k_cache[:, :, : k.shape[2]], v_cache[:, :, : v.shape[2]] = k, v
    return k_cache, v_cache


def chunked(q, k, v, chunk_sizes, tmax, split_size=S, attend=reference.attention_forward):
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


@pytest.mark.parametrize("chunk_sizes", [[1], [7], [S], [S + 1], [5, 30, 2, 11]], ids=["decode", "7", "S", "S+1", "random"])
def test_spec_prefill_chunked_prefill_and_decode_agree_bitwise(chunk_sizes):
    q, k, v = qkv(1, 2, 3 * S + 5, 16, torch.bfloat16)
    full = full_causal(q, k, v)
    assert_bitwise_equal(chunked(q, k, v, chunk_sizes, tmax=4 * S), full, f"chunks {chunk_sizes} vs full pass")


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


def test_spec_batch_invariance_with_garbage_beyond_lengths():
    assert batch_failures(reference.attention_forward) == []


def split_count_from_batch(q, k_cache, v_cache, seqlens, scale, split_size):
    """What split-KV decode kernels usually do: pick the number of splits to fill the machine
    from the batch size (two programs per batch here) and the chunk size from the longest
    sequence, so a sequence's chunks follow the batch and its own length."""
    splits = max(1, 2 // q.shape[0])
    longest = int(seqlens.max())
    size = max(16, 1 << math.ceil(math.log2(max(1, math.ceil(longest / splits)))))
    return reference.attention_forward(q, k_cache, v_cache, seqlens, scale, size)


def test_negative_control_split_count_from_batch():
    assert batch_failures(split_count_from_batch), "the batch check missed a batch-dependent split"


def test_negative_control_prefill_vs_decode_with_a_batch_dependent_split():
    q, k, v = qkv(1, 2, 3 * S + 5, 16)
    full = split_count_from_batch(q, k, v, torch.tensor([q.shape[2]]), 16 ** -0.5, S)[0]
    decoded = chunked(q, k, v, [1], tmax=4 * S, attend=split_count_from_batch)
    assert not bitwise_equal(decoded, full), "the consistency check missed a length-dependent split"


def test_spec_garbage_beyond_length_is_never_read():
    q, k, v = qkv(1, 2, S + 3, 16)
    g = torch.Generator().manual_seed(1)
    k_cache, v_cache = decode_cache(k, v, 3 * S, g)
    out = reference.attention_forward(q[:, :, -2:], k_cache, v_cache, torch.tensor([S + 3]), 0.25, S)[0]
    assert torch.isfinite(out).all()
    full = reference.attention_forward(q, k, v, torch.tensor([S + 3]), 0.25, S)[0]
    assert_bitwise_equal(out, full[:, :, -2:], "garbage beyond the length")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("length,dim,kv_heads", [(S + 1, 16, 2), (3 * S + 5, 32, 1), (1, 16, 2)],
                         ids=["S+1", "3S+5-mqa", "T1"])
def test_spec_backward_accuracy_against_float64(dtype, length, dim, kv_heads):
    q, k, v = qkv(2, 2, length, dim, dtype, kv_heads)
    grad_o = make(q.shape, dtype, seed=7)
    scale = dim ** -0.5
    o, m, l = reference.attention_forward(q, k, v, torch.full((2,), length), scale, S)
    ours = reference.attention_backward(grad_o, q, k, v, o, m, l, scale, S)

    def sdpa_grads(cast):
        leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
        expand = lambda t: t.repeat_interleave(2 // kv_heads, dim=1)  # noqa: E731
        y = F.scaled_dot_product_attention(leaves[0], expand(leaves[1]), expand(leaves[2]), is_causal=True)
        return torch.autograd.grad(y, leaves, cast(grad_o))

    eager, exact = sdpa_grads(lambda t: t), sdpa_grads(lambda t: t.double())
    for name, a, e, x, like in zip(("dq", "dk", "dv"), ours, eager, exact, (q, k, v)):
        assert a.dtype == dtype and a.shape == like.shape, name
        assert_accuracy(a, e, x, f"attention spec backward {dtype} {name} T={length}")
