"""The native CPU attention, forward (csrc/cpu/causal_attention.cpp) and backward
(csrc/cpu/causal_attention_backward.cpp), against its specification.

Forward: 
torch.ops.fusedtx_native.causal_attention_forward must equal reference.causal_attention_forward bit for bit
(o, m and l) for float32, bfloat16 and float16, any head dim, grouped-query heads and split
sizes; a full causal pass, any chunked prefill and token-by-token decode against a KV cache
with garbage beyond its length must agree bitwise; a sequence's bits must not depend on the
batch around it nor on the thread count; bad input must get a clear error.

Backward: torch.ops.fusedtx_native.causal_attention_backward must equal reference.causal_attention_backward bit for bit
(dq, dk and dv) for float32, bfloat16 and float16, any head dim, grouped-query heads and split
sizes, given m, l from either forward (the native and the reference forward agree bitwise);
it must give the same bits run after run and for any thread count, a sequence's gradients must
not depend on the batch around it, and bad input must get a clear error."""
from __future__ import annotations

import re

import pytest
import torch

from fusedtx import reference
from causal_attention_helpers import (assert_nan_aware_equal, backward_unseen_failures, batch_failures, chunked,
                                      decode_cache, forward_unseen_failures, make, poisoned_problems, qkv,
                                      signed_zero_failures, split_count_from_batch)
from helpers import assert_bitwise_equal, bits, garbage_like, poisoned_outputs, require, under_each_thread_count

DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


@pytest.fixture(scope="module")
def native():
    require("cpu", "native")
    from fusedtx import _extension

    return _extension.ops().causal_attention_forward


def lengths_of(q, length=None):
    return torch.full((q.shape[0],), q.shape[2] if length is None else length, dtype=torch.int64)


def assert_same(ours, ref, what):
    for name, a, b in zip("oml", ours, ref):
        assert_bitwise_equal(a, b, f"{what}: {name}")


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
@pytest.mark.parametrize("dim", [16, 64, 128, 40])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (2, 2)], ids=["gqa", "mqa", "mha"])
@pytest.mark.parametrize("split", [16, 32])
def test_bitwise_equal_to_spec(native, dtype, dim, heads, kv_heads, split):
    # T in {1, 2, S-1, S, S+1, 3S+5}, batched along the query axis of one reference call each.
    for length in (1, 2, split - 1, split, split + 1, 3 * split + 5):
        if dim == 128 and length not in (1, split + 1, 3 * split + 5):
            continue  # keep the emulated reference fast
        q, k, v = qkv(1, heads, length, dim, dtype, kv_heads, seed=length)
        lens, scale = lengths_of(q), dim ** -0.5
        ref = reference.causal_attention_forward(q, k, v, lens, scale, split)
        ours = native(q, k, v, lens, scale, split)
        assert ours[0].dtype == dtype and ours[0].shape == q.shape and ours[0].is_contiguous()
        assert ours[1].dtype == torch.float32 and ours[1].shape == q.shape[:3]
        assert_same(ours, ref, f"{DTYPE_IDS[dtype]} D={dim} H={heads}/{kv_heads} S={split} T={length}")


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
def test_queries_at_the_end_of_a_longer_cache_with_garbage(native, dtype):
    # Tq < seqlens < Tmax, per-sequence lengths, garbage (inf, NaN) beyond each length.
    g = torch.Generator().manual_seed(4)
    split, dim, n_queries = 16, 24, 5
    lens = torch.tensor([n_queries, 40, 23])
    q = make((3, 4, n_queries, dim), dtype, 1)
    k_cache = garbage_like(torch.empty(3, 2, 64, dim, dtype=dtype), g)
    v_cache = garbage_like(torch.empty(3, 2, 64, dim, dtype=dtype), g)
    for b, n in enumerate(lens.tolist()):
        k_cache[b, :, :n] = make((2, n, dim), dtype, 10 + b)
        v_cache[b, :, :n] = make((2, n, dim), dtype, 20 + b)
    with poisoned_outputs():
        ours = native(q, k_cache, v_cache, lens, 0.3, split)
    assert torch.isfinite(ours[0]).all()
    for b, n in enumerate(lens.tolist()):  # the reference on exactly the valid keys
        ref = reference.causal_attention_forward(q[b:b + 1], k_cache[b:b + 1, :, :n], v_cache[b:b + 1, :, :n],
                                          lens[b:b + 1], 0.3, split)
        assert_same([t[b:b + 1] for t in ours], ref, f"sequence {b}")


@pytest.mark.parametrize("dtype,dim", [(torch.float32, 64), (torch.bfloat16, 40), (torch.float16, 128)],
                         ids=["f32-D64", "bf16-D40", "f16-D128"])
@pytest.mark.parametrize("split", [64, 256])
def test_few_queries_against_a_long_cache(native, dtype, dim, split):
    # Decode-sized query blocks take the keys-in-lanes score path: groups of 16 and 64 keys and
    # partial groups, with garbage beyond the length.
    g = torch.Generator().manual_seed(6)
    lens = torch.tensor([300, 211])
    q = make((2, 4, 3, dim), dtype, 2)
    k_cache = garbage_like(torch.empty(2, 2, 320, dim, dtype=dtype), g)
    v_cache = garbage_like(torch.empty(2, 2, 320, dim, dtype=dtype), g)
    for b, n in enumerate(lens.tolist()):
        k_cache[b, :, :n], v_cache[b, :, :n] = make((2, n, dim), dtype, 30 + b), make((2, n, dim), dtype, 40 + b)
    for n_queries in (1, 2, 3):
        qs = q[:, :, :n_queries]
        ours = native(qs, k_cache, v_cache, lens, dim ** -0.5, split)
        for b, n in enumerate(lens.tolist()):
            ref = reference.causal_attention_forward(qs[b:b + 1], k_cache[b:b + 1, :, :n], v_cache[b:b + 1, :, :n],
                                              lens[b:b + 1], dim ** -0.5, split)
            assert_same([t[b:b + 1] for t in ours], ref, f"Tq={n_queries} sequence {b} (length {n})")


def test_decode_equals_full_pass_with_a_nan_key(native):
    """A NaN key inside the valid range: the row max keeps the NaN (as the reference's amax and
    maximum do), so a full pass and token-by-token decode give the same m, l and o bits. A max
    that drops a NaN once a later key is compared gave m = -inf in the full pass (the masked keys
    after a query's last visible key) but m = NaN in decode, which stops at that key."""
    split, dim, length = 32, 64, 40
    q, k, v = qkv(1, 2, length, dim, torch.float32, seed=9)
    k[0, :, 7] = float("nan")
    full = native(q, k, v, lengths_of(q), 0.125, split)
    assert torch.isnan(full[1][..., 7:]).all() and not torch.isnan(full[1][..., :7]).any()
    for t in range(length):
        step = native(q[:, :, t:t + 1], k, v, torch.tensor([t + 1]), 0.125, split)
        assert_same(step, [x[:, :, t:t + 1] for x in full], f"decode at position {t}")


@pytest.mark.parametrize("plus_key, minus_key", [(15, 20), (4, 15), (15, 4)])
def test_decode_row_max_of_signed_zeros_matches_full_pass(native, plus_key, minus_key):
    """Equal scores of different bits (+0 and -0) make the order of a row max visible: decode
    must give the full pass's in-order fold (the last of the tied keys), whatever order a decode
    kernel takes its keys in. q = (1e-30, 0, ...) and keys whose products underflow: one key
    scores +0, another -0, every other key below zero. Decode's max over 16 keys a vector then
    across lanes picks by lane, not by key: with the zeros in lanes 15 and 4 of two vectors
    (keys 15, 20) a later-lane pick fails, with both in one vector (keys 4, 15) an earlier-lane
    pick fails, unless the fold is replayed when the maximum is zero."""
    split, dim, length = 32, 16, 24
    q = torch.zeros(1, 1, length, dim)
    q[..., 0] = 1e-30
    k = -torch.rand(1, 1, length, dim, generator=torch.Generator().manual_seed(4)) - 0.5  # every product <= -0
    k[0, 0, plus_key, 0] = 1e-30    # +1e-60 rounds to +0; + (-0) products stays +0
    k[0, 0, minus_key, 0] = -1e-30  # -1e-60 rounds to -0; + (-0) products stays -0
    v = make((1, 1, length, dim), torch.float32, 5)
    full = native(q, k, v, lengths_of(q), 1.0, split)
    last_zero = torch.tensor(-0.0 if minus_key > plus_key else 0.0)
    assert bits(full[1][0, 0, -1]) == bits(last_zero), "the full pass's m is the fold's last zero"
    step = native(q[:, :, -1:], k, v, torch.tensor([length]), 1.0, split)
    assert_same(step, [x[:, :, -1:] for x in full], "decode vs full pass")


def _fold_max(scores):
    """The spec's in-order row max: m = s if not (m > s or m is NaN), from -inf."""
    m = torch.tensor(float("-inf"))
    for x in scores:
        m = m if (m > x) or torch.isnan(m) else x
    return m


def _lanes_then_across_max(scores, later_lane_wins):
    """A max taken 16 keys a vector (lane-wise, in key order) then across the lanes, picking
    among equal lanes the earlier or the later one: what decode would do without the replay."""
    lanes = [_fold_max(scores[t::16]) for t in range(16)]
    best = lanes[0]
    for x in lanes[1:]:
        best = x if (x > best or (later_lane_wins and x == best)) else best
    return best


def test_negative_control_lane_order_max_differs_from_the_fold():
    """The signed-zero placements above can tell the orders apart: for either lane preference,
    some placement gives a max whose sign differs from the in-order fold's."""
    for later_lane_wins in (False, True):
        differs = []
        for plus_key, minus_key in [(15, 20), (4, 15), (15, 4)]:
            scores = -torch.rand(24, generator=torch.Generator().manual_seed(4)) - 0.5
            scores[plus_key], scores[minus_key] = 0.0, -0.0
            differs.append(bits(_fold_max(scores)) != bits(_lanes_then_across_max(scores, later_lane_wins)))
        assert any(differs), f"later_lane_wins={later_lane_wins}: no placement distinguishes the orders"


def test_strided_views(native):
    # (B, T, H, D) storage seen as (B, H, T, D): real strides, last dim contiguous.
    x = make((2, 37, 3, 3, 32), torch.float32, 7)  # q, k, v packed as in a fused QKV projection
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    lens = lengths_of(q)
    assert_same(native(q, k, v, lens, 0.2, 16),
                reference.causal_attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), lens, 0.2, 16), "strided")


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
@pytest.mark.parametrize("split", [16, 32])
@pytest.mark.parametrize("chunk_sizes", [[1], [7], ["S"], ["S+1"], [5, 30, 2, 11]],
                         ids=["decode", "7", "S", "S+1", "mixed"])
def test_full_pass_chunked_prefill_and_decode_agree_bitwise(native, dtype, split, chunk_sizes):
    sizes = [{"S": split, "S+1": split + 1}.get(c, c) for c in chunk_sizes]
    q, k, v = qkv(2, 4, 3 * split + 5, 32, dtype, kv_heads=2, seed=3)
    full = native(q, k, v, lengths_of(q), 32 ** -0.5, split)[0]
    assert_bitwise_equal(chunked(q, k, v, sizes, tmax=4 * split + 3, split_size=split, attend=native), full,
                         f"chunks {chunk_sizes} vs full pass")


def test_full_pass_matches_spec_in_decode(native):
    # Decode against the spec directly (not only against the native full pass).
    q, k, v = qkv(1, 2, 2 * 16 + 3, 16, torch.bfloat16, seed=8)
    assert_bitwise_equal(chunked(q, k, v, [1], tmax=64, attend=native),
                         chunked(q, k, v, [1], tmax=64), "native decode vs spec decode")


def test_batch_invariance_with_garbage_beyond_lengths(native):
    assert batch_failures(native) == []
    assert batch_failures(native, split_size=32) == []


def test_negative_control_batch_dependent_split_fails_the_same_check():
    assert batch_failures(split_count_from_batch), "the batch check missed a batch-dependent split"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_thread_count_invariance(native, dtype):
    # Enough (batch, head, query block) tasks for every thread count to split them differently.
    q, k, v = qkv(3, 4, 70, 64, dtype, kv_heads=2, seed=11)
    lens = lengths_of(q)
    k_cache, v_cache = decode_cache(k, v, 96, torch.Generator().manual_seed(2))
    runs = under_each_thread_count(lambda: (native(q, k_cache, v_cache, lens, 0.125, 16),
                                            native(q[:, :, -1:], k_cache, v_cache, lens, 0.125, 16)))
    for n_threads, run in zip((2, 3), runs[1:]):
        for a, b in zip(run, runs[0]):
            assert_same(a, b, f"{n_threads} threads vs 1")


def test_deterministic_run_to_run(native):
    q, k, v = qkv(2, 2, 50, 48, torch.bfloat16, seed=12)
    first = native(q, k, v, lengths_of(q), 0.1, 16)
    for _ in range(3):
        assert_same(native(q, k, v, lengths_of(q), 0.1, 16), first, "rerun")


def test_empty_query_block(native):
    q, k, v = qkv(2, 2, 4, 16)
    o, m, l = native(q[:, :, :0], k, v, torch.tensor([0, 3]), 0.25, 16)
    assert o.shape == (2, 2, 0, 16) and m.shape == l.shape == (2, 2, 0)


def _bad_calls():
    q, k, v = qkv(2, 4, 8, 16, kv_heads=2)
    lens = torch.tensor([8, 8])
    ok = dict(q=q, k=k, v=v, seqlens=lens, scale=0.25, split_size=16)
    return [
        ("3-D q", dict(ok, q=q[0]), "q must be 4-D"),
        ("dtype mix", dict(ok, k=k.half()), "share a dtype"),
        ("float64", dict(ok, q=q.double(), k=k.double(), v=v.double()), "unsupported dtype"),
        ("int q", dict(ok, q=q.int(), k=k.int(), v=v.int()), "unsupported dtype"),
        ("k/v shapes", dict(ok, v=v[:, :, :4]), "same shape"),
        ("batch", dict(ok, k=k[:1], v=v[:1]), "batch size"),
        ("head dim", dict(ok, k=k[..., :8], v=v[..., :8]), "head dim"),
        ("heads", dict(ok, k=torch.zeros(2, 3, 8, 16), v=torch.zeros(2, 3, 8, 16)), "multiple"),
        ("last stride", dict(ok, q=q.transpose(2, 3).contiguous().transpose(2, 3)), "contiguous last dim"),
        ("split 0", dict(ok, split_size=0), "power of two"),
        ("split 24", dict(ok, split_size=24), "power of two"),
        ("split 8", dict(ok, split_size=8), "power of two"),
        ("seqlens dtype", dict(ok, seqlens=lens.int()), "int64"),
        ("seqlens shape", dict(ok, seqlens=lens[:1]), "seqlens must have shape"),
        ("seqlens long", dict(ok, seqlens=torch.tensor([8, 9])), "seqlens[1] = 9"),
        ("seqlens short", dict(ok, seqlens=torch.tensor([7, 8])), "seqlens[0] = 7"),
    ]


@pytest.mark.parametrize("what,kwargs,message", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_is_a_clear_error(native, what, kwargs, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        native(**kwargs)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ops():
    require("cpu", "native")
    from fusedtx import _extension

    return _extension.ops()


def problem(batch, heads, kv_heads, length, dim, dtype, seed=0):
    """grad_o, q, k, v for a full causal pass."""
    return (make((batch, heads, length, dim), dtype, seed + 3),
            make((batch, heads, length, dim), dtype, seed),
            make((batch, kv_heads, length, dim), dtype, seed + 1),
            make((batch, kv_heads, length, dim), dtype, seed + 2))


def native_grads(ops, grad_o, q, k, v, split, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    _, m, l = ops.causal_attention_forward(q, k, v, lengths_of(q), scale, split)
    return ops.causal_attention_backward(grad_o, q, k, v, m, l, scale, split)


def assert_same_grads(ours, ref, what):
    for name, a, b in zip(("dq", "dk", "dv"), ours, ref):
        assert_bitwise_equal(a, b, f"{what}: {name}")


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
@pytest.mark.parametrize("dim", [16, 64, 40])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("split", [16, 32])
def test_backward_bitwise_equal_to_spec(ops, dtype, dim, heads, kv_heads, split):
    for length in (1, 2, split - 1, split, split + 1, 3 * split + 5):
        grad_o, q, k, v = problem(1, heads, kv_heads, length, dim, dtype, seed=length)
        scale = dim ** -0.5
        _, m, l = ops.causal_attention_forward(q, k, v, lengths_of(q), scale, split)
        ours = ops.causal_attention_backward(grad_o, q, k, v, m, l, scale, split)
        ref = reference.causal_attention_backward(grad_o, q, k, v, m, l, scale, split)
        for t, like in zip(ours, (q, k, v)):
            assert t.dtype == dtype and t.shape == like.shape and t.is_contiguous()
        assert_same_grads(ours, ref, f"{DTYPE_IDS[dtype]} D={dim} H={heads}/{kv_heads} S={split} T={length}")


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
@pytest.mark.parametrize("dim,heads,kv_heads,length,split",
                         [(40, 2, 2, 37, 16), (128, 4, 2, 17, 16), (32, 3, 1, 40, 32)],
                         ids=["D40-mha", "D128-gqa", "D32-mqa3"])
def test_backward_with_the_reference_forward_statistics(ops, dtype, dim, heads, kv_heads, length, split):
    grad_o, q, k, v = problem(2, heads, kv_heads, length, dim, dtype, seed=7)
    scale = 0.3
    o, m, l = reference.causal_attention_forward(q, k, v, lengths_of(q), scale, split)
    for name, a, b in zip("oml", ops.causal_attention_forward(q, k, v, lengths_of(q), scale, split), (o, m, l)):
        assert_bitwise_equal(a, b, f"native forward {name}")
    ours = ops.causal_attention_backward(grad_o, q, k, v, m, l, scale, split)
    ref = reference.causal_attention_backward(grad_o, q, k, v, m, l, scale, split)
    assert_same_grads(ours, ref, f"{DTYPE_IDS[dtype]} D={dim} H={heads}/{kv_heads} S={split} T={length}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_unseen_poison_equals_the_spec_nan_aware(ops, dtype):
    """inf / NaN in a row of q, k, v or dO: o, m, l and dq, dk, dv equal the spec's bit for bit,
    NaN positions included (the spec leaves masked pairs out of every sum; so must the 32-query
    blocks, the axpy tiles and D's chains)."""
    for what, grad_o, q, k, v, split in poisoned_problems(dtype, issue_dim=40):  # 40: rows padded to 48
        lens, scale = lengths_of(q), 0.25
        ref = reference.causal_attention_forward(q, k, v, lens, scale, split)
        for name, a, b in zip("oml", ops.causal_attention_forward(q, k, v, lens, scale, split), ref):
            assert_nan_aware_equal(a, b, f"{what}: {name}")
        ours = ops.causal_attention_backward(grad_o, q, k, v, ref[1], ref[2], scale, split)
        for name, a, b in zip(("dq", "dk", "dv"), ours, reference.causal_attention_backward(grad_o, q, k, v, ref[1], ref[2],
                                                                                          scale, split)):
            assert_nan_aware_equal(a, b, f"{what}: {name}")


def test_unseen_keys_and_pairs_never_reach_a_query(ops):
    assert forward_unseen_failures(ops.causal_attention_forward) == []
    assert backward_unseen_failures(ops.causal_attention_backward, ops.causal_attention_forward) == []
    assert signed_zero_failures(ops.causal_attention_forward) == []


def test_backward_strided_views(ops):
    # q, k, v, grad_o as (B, T, H, D) buffers viewed as (B, H, T, D): only the last dim is contiguous.
    grad_o, q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in problem(2, 4, 2, 45, 32, torch.float32))
    assert not q.is_contiguous()
    ours = native_grads(ops, grad_o, q, k, v, 16)
    ref = native_grads(ops, *(t.contiguous() for t in (grad_o, q, k, v)), 16)
    assert_same_grads(ours, ref, "strided vs contiguous")


def test_backward_batch_invariance(ops):
    grad_o, q, k, v = problem(3, 4, 2, 70, 64, torch.float32, seed=3)
    full = native_grads(ops, grad_o, q, k, v, 32)
    for b in range(3):
        alone = native_grads(ops, grad_o[b:b + 1], q[b:b + 1], k[b:b + 1], v[b:b + 1], 32)
        assert_same_grads([t[b:b + 1] for t in full], alone, f"sequence {b}")


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
def test_backward_thread_count_invariance(ops, dtype):
    # Enough (batch, head, block) tasks for every thread count to split them differently.
    grad_o, q, k, v = problem(2, 4, 2, 150, 64, dtype, seed=11)
    _, m, l = ops.causal_attention_forward(q, k, v, lengths_of(q), 0.125, 32)
    runs = under_each_thread_count(lambda: ops.causal_attention_backward(grad_o, q, k, v, m, l, 0.125, 32))
    for n_threads, run in zip((2, 3), runs[1:]):
        assert_same_grads(run, runs[0], f"{n_threads} threads vs 1")


def test_backward_deterministic_run_to_run(ops):
    grad_o, q, k, v = problem(2, 4, 2, 150, 64, torch.float32, seed=5)
    _, m, l = ops.causal_attention_forward(q, k, v, lengths_of(q), 0.125, 32)
    first = ops.causal_attention_backward(grad_o, q, k, v, m, l, 0.125, 32)
    for _ in range(20):
        assert_same_grads(ops.causal_attention_backward(grad_o, q, k, v, m, l, 0.125, 32), first, "repeat")


def test_backward_empty_sequence(ops):
    grad_o, q, k, v = problem(1, 2, 1, 0, 16, torch.float32)
    m = l = torch.empty(1, 2, 0)
    dq, dk, dv = ops.causal_attention_backward(grad_o, q, k, v, m, l, 0.25, 16)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def _backward_args(**change):
    grad_o, q, k, v = problem(1, 4, 2, 20, 16, torch.float32)
    args = dict(grad_o=grad_o, q=q, k=k, v=v, m=torch.zeros(1, 4, 20), l=torch.ones(1, 4, 20), scale=0.25,
                split_size=16)
    args.update(change)
    return args


BACKWARD_BAD_INPUTS = [
    ("float64", dict(q=torch.zeros(1, 4, 20, 16, dtype=torch.float64)), "unsupported dtype"),
    ("mixed dtypes", dict(k=torch.zeros(1, 2, 20, 16, dtype=torch.bfloat16)), "k must have q's dtype"),
    ("rank", dict(q=torch.zeros(4, 20, 16)), "q must be 4-D"),
    ("grad_o shape", dict(grad_o=torch.zeros(1, 4, 21, 16)), "grad_o must have q's shape"),
    ("k length", dict(k=torch.zeros(1, 2, 21, 16), v=torch.zeros(1, 2, 21, 16)), "k and v must have q's length 20"),
    ("k vs v", dict(v=torch.zeros(1, 2, 20, 8)), "k and v must have the same shape"),
    ("head dim", dict(k=torch.zeros(1, 2, 20, 8), v=torch.zeros(1, 2, 20, 8)), "k and v must have q's head dim 16"),
    ("heads", dict(k=torch.zeros(1, 3, 20, 16), v=torch.zeros(1, 3, 20, 16)),
     "must be a multiple of k and v's head count 3"),
    ("split not a power of two", dict(split_size=24), "split_size must be a power of two >= 16, got 24"),
    ("split too small", dict(split_size=8), "split_size must be a power of two >= 16, got 8"),
    ("m dtype", dict(m=torch.zeros(1, 4, 20, dtype=torch.float16)), "m must be float32"),
    ("l shape", dict(l=torch.ones(1, 4, 19)), "l must have shape (1, 4, 20)"),
    ("strided last dim", dict(q=torch.zeros(1, 4, 20, 32)[..., ::2]), "q must have a contiguous last dim (stride 1)"),
]


@pytest.mark.parametrize("what,change,message", BACKWARD_BAD_INPUTS, ids=[b[0] for b in BACKWARD_BAD_INPUTS])
def test_backward_bad_input_is_a_clear_error(ops, what, change, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        ops.causal_attention_backward(**_backward_args(**change))
