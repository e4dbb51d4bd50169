"""The native CPU attention backward (csrc/cpu/causal_attention_backward.cpp) against its specification.

torch.ops.fusedtx_native.causal_attention_backward must equal reference.causal_attention_backward bit for bit
(dq, dk and dv) for float32, bfloat16 and float16, any head dim, grouped-query heads and split
sizes, given m, l from either forward (the native and the reference forward agree bitwise);
it must give the same bits run after run and for any thread count, a sequence's gradients must
not depend on the batch around it, and bad input must get a clear error."""
from __future__ import annotations

import re

import pytest
import torch

from fusedtx import reference
from helpers import assert_bitwise_equal, require, under_each_thread_count

DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


@pytest.fixture(scope="module")
def ops():
    require("cpu", "native")
    from fusedtx import _extension

    return _extension.ops()


def make(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def problem(batch, heads, kv_heads, length, dim, dtype, seed=0):
    """grad_o, q, k, v for a full causal pass."""
    return (make((batch, heads, length, dim), dtype, seed + 3),
            make((batch, heads, length, dim), dtype, seed),
            make((batch, kv_heads, length, dim), dtype, seed + 1),
            make((batch, kv_heads, length, dim), dtype, seed + 2))


def lengths(q):
    return torch.full((q.shape[0],), q.shape[2], dtype=torch.int64)


def native_grads(ops, grad_o, q, k, v, split, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    _, m, l = ops.causal_attention_forward(q, k, v, lengths(q), scale, split)
    return ops.causal_attention_backward(grad_o, q, k, v, m, l, scale, split)


def assert_same(ours, ref, what):
    for name, a, b in zip(("dq", "dk", "dv"), ours, ref):
        assert_bitwise_equal(a, b, f"{what}: {name}")


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
@pytest.mark.parametrize("dim", [16, 64, 40])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("split", [16, 32])
def test_bitwise_equal_to_spec(ops, dtype, dim, heads, kv_heads, split):
    for length in (1, 2, split - 1, split, split + 1, 3 * split + 5):
        grad_o, q, k, v = problem(1, heads, kv_heads, length, dim, dtype, seed=length)
        scale = dim ** -0.5
        _, m, l = ops.causal_attention_forward(q, k, v, lengths(q), scale, split)
        ours = ops.causal_attention_backward(grad_o, q, k, v, m, l, scale, split)
        ref = reference.causal_attention_backward(grad_o, q, k, v, m, l, scale, split)
        for t, like in zip(ours, (q, k, v)):
            assert t.dtype == dtype and t.shape == like.shape and t.is_contiguous()
        assert_same(ours, ref, f"{DTYPE_IDS[dtype]} D={dim} H={heads}/{kv_heads} S={split} T={length}")


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
@pytest.mark.parametrize("dim,heads,kv_heads,length,split",
                         [(40, 2, 2, 37, 16), (128, 4, 2, 17, 16), (32, 3, 1, 40, 32)],
                         ids=["D40-mha", "D128-gqa", "D32-mqa3"])
def test_with_the_reference_forward_statistics(ops, dtype, dim, heads, kv_heads, length, split):
    grad_o, q, k, v = problem(2, heads, kv_heads, length, dim, dtype, seed=7)
    scale = 0.3
    o, m, l = reference.causal_attention_forward(q, k, v, lengths(q), scale, split)
    for name, a, b in zip("oml", ops.causal_attention_forward(q, k, v, lengths(q), scale, split), (o, m, l)):
        assert_bitwise_equal(a, b, f"native forward {name}")
    ours = ops.causal_attention_backward(grad_o, q, k, v, m, l, scale, split)
    ref = reference.causal_attention_backward(grad_o, q, k, v, m, l, scale, split)
    assert_same(ours, ref, f"{DTYPE_IDS[dtype]} D={dim} H={heads}/{kv_heads} S={split} T={length}")


def test_strided_views(ops):
    # q, k, v, grad_o as (B, T, H, D) buffers viewed as (B, H, T, D): only the last dim is contiguous.
    grad_o, q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in problem(2, 4, 2, 45, 32, torch.float32))
    assert not q.is_contiguous()
    ours = native_grads(ops, grad_o, q, k, v, 16)
    ref = native_grads(ops, *(t.contiguous() for t in (grad_o, q, k, v)), 16)
    assert_same(ours, ref, "strided vs contiguous")


def test_batch_invariance(ops):
    grad_o, q, k, v = problem(3, 4, 2, 70, 64, torch.float32, seed=3)
    full = native_grads(ops, grad_o, q, k, v, 32)
    for b in range(3):
        alone = native_grads(ops, grad_o[b:b + 1], q[b:b + 1], k[b:b + 1], v[b:b + 1], 32)
        assert_same([t[b:b + 1] for t in full], alone, f"sequence {b}")


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
def test_thread_count_invariance(ops, dtype):
    # Enough (batch, head, block) tasks for every thread count to split them differently.
    grad_o, q, k, v = problem(2, 4, 2, 150, 64, dtype, seed=11)
    _, m, l = ops.causal_attention_forward(q, k, v, lengths(q), 0.125, 32)
    runs = under_each_thread_count(lambda: ops.causal_attention_backward(grad_o, q, k, v, m, l, 0.125, 32))
    for n_threads, run in zip((2, 3), runs[1:]):
        assert_same(run, runs[0], f"{n_threads} threads vs 1")


def test_deterministic_run_to_run(ops):
    grad_o, q, k, v = problem(2, 4, 2, 150, 64, torch.float32, seed=5)
    _, m, l = ops.causal_attention_forward(q, k, v, lengths(q), 0.125, 32)
    first = ops.causal_attention_backward(grad_o, q, k, v, m, l, 0.125, 32)
    for _ in range(20):
        assert_same(ops.causal_attention_backward(grad_o, q, k, v, m, l, 0.125, 32), first, "repeat")


def test_empty_sequence(ops):
    grad_o, q, k, v = problem(1, 2, 1, 0, 16, torch.float32)
    m = l = torch.empty(1, 2, 0)
    dq, dk, dv = ops.causal_attention_backward(grad_o, q, k, v, m, l, 0.25, 16)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def _args(**change):
    grad_o, q, k, v = problem(1, 4, 2, 20, 16, torch.float32)
    args = dict(grad_o=grad_o, q=q, k=k, v=v, m=torch.zeros(1, 4, 20), l=torch.ones(1, 4, 20), scale=0.25,
                split_size=16)
    args.update(change)
    return args


BAD_INPUTS = [
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


@pytest.mark.parametrize("what,change,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_clear_error(ops, what, change, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        ops.causal_attention_backward(**_args(**change))
