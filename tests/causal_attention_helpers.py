"""What the causal attention tests share: inputs (make, qkv), the spec's full pass, a KV cache
with garbage beyond its length, chunked prefill / decode through any attend function, the batch
invariance check, and its negative control (a split count chosen from the batch)."""
from __future__ import annotations

import math

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
