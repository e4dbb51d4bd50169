"""csrc/cuda/causal_attention.cu and causal_attention_backward.cu (the native CUDA attention)
run on the CPU under the thread-per-CUDA-thread emulator (tests/cuda_emu).

Forward, compared bit for bit with reference.causal_attention_forward: full causal passes, GQA,
strided views, chunked prefill and decode against a KV cache holding garbage beyond each
sequence's length, and a negative control.

Backward, compared bit for bit with reference.causal_attention_backward (m and l from
reference.causal_attention_forward): three dtypes, head dims 16 ... 128 (and one padded dim),
lengths around the split size, grouped-query heads, strided views, split sizes past the
kernel's 32-position tiles, and negative controls. On a GPU, the registered op is compared with
the reference too.

What the emulator proves and what it cannot see: tests/cuda_emu/glue.py.
"""
from __future__ import annotations

import re

import pytest
import torch

from fusedtx import reference
from causal_attention_helpers import (assert_nan_aware_equal, backward_unseen_failures, forward_unseen_failures,
                                      poisoned_problems, signed_zero_failures)
from helpers import assert_bitwise_equal, garbage_like, require

from cuda_emu.build import build
from cuda_emu.glue import CUDA_INCLUDE, DTYPE_CODE, F32, I64, INT, P, nan_like, ptr, requires_emulator

pytestmark = requires_emulator

ATTENTION_WRAPPERS = """
extern "C" int emu_causal_attention_forward(const void* q, const int64_t* qs, const void* k, const int64_t* ks, const void* v,
                                     const int64_t* vs, const int64_t* seqlens, void* o, float* m, float* l,
                                     int64_t batch, int64_t heads, int64_t kv_heads, int64_t n_queries, int64_t t_max,
                                     int64_t dim, float scale, int64_t split, int dtype) {
  return (int)fusedtx::cuda::causal_attention_forward(q, qs, k, ks, v, vs, seqlens, o, m, l, batch, heads, kv_heads,
                                               n_queries, t_max, dim, scale, split, (fusedtx::cuda::DType)dtype,
                                               nullptr);
}
"""


def _forward_argtypes(lib):
    lib.emu_causal_attention_forward.argtypes = [P, P, P, P, P, P, P, P, P, P, I64, I64, I64, I64, I64, I64, F32, I64, INT]
    return lib


@pytest.fixture(scope="module")
def attention_lib(tmp_path_factory):
    return _forward_argtypes(build("causal_attention.cu", ATTENTION_WRAPPERS, tmp_path_factory.mktemp("emu"), CUDA_INCLUDE))


def emu_causal_attention(lib, q, k, v, seqlens, scale, split):
    """(o, m, l) from the kernel; q, k, v of any strides with stride(-1) == 1."""
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    batch, heads, n_queries, dim = q.shape
    strides = [torch.tensor(t.stride()[:3], dtype=torch.int64) for t in (q, k, v)]
    lengths = seqlens.to(torch.int64).contiguous()
    o = nan_like(q.shape, q.dtype)
    m, l = nan_like((batch, heads, n_queries), torch.float32), nan_like((batch, heads, n_queries), torch.float32)
    rc = lib.emu_causal_attention_forward(ptr(q), ptr(strides[0]), ptr(k), ptr(strides[1]), ptr(v), ptr(strides[2]),
                                   ptr(lengths), ptr(o), ptr(m), ptr(l), batch, heads, k.shape[1], n_queries,
                                   k.shape[2], dim, scale, split, DTYPE_CODE[q.dtype])
    assert rc == 0
    return o, m, l


def assert_matches_reference(got, q, k, v, seqlens, scale, split, what):
    ref = reference.causal_attention_forward(q, k, v, seqlens, scale, split)
    for ours, theirs, name in zip(got, ref, ("o", "m", "l")):
        assert_bitwise_equal(ours, theirs, f"{what}: {name}")


def strided_qkv(batch, heads, kv_heads, n_queries, t_max, dim, dtype, g, layout):
    """q (B, H, Tq, D), k, v (B, Hkv, Tmax, D). "contiguous", or "strided": q a transposed
    (B, Tq, H, D) view, k and v slices of one (B, Tmax, 2, Hkv, D) buffer (the others' garbage)."""
    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    if layout == "contiguous":
        return rnd(batch, heads, n_queries, dim), rnd(batch, kv_heads, t_max, dim), rnd(batch, kv_heads, t_max, dim)
    q = rnd(batch, n_queries, heads, dim).transpose(1, 2)
    kv = rnd(batch, t_max, 2, kv_heads, dim)
    return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("dim,heads,kv_heads,split,t,layout", [
    (16, 2, 1, 16, 1, "contiguous"),     # one token
    (64, 2, 2, 16, 2, "strided"),        # two tokens, transposed q, interleaved k/v
    (16, 4, 2, 16, 17, "contiguous"),    # S + 1: a second chunk of one key, GQA
    (16, 2, 1, 32, 101, "strided"),      # 3S + 5: four chunks, seven query tiles
    (64, 1, 1, 64, 70, "contiguous"),    # S = 64: two key tiles per chunk (scores recomputed)
], ids=["t1", "t2-strided", "s+1-gqa", "3s+5", "s64"])
def test_full_causal_pass_matches_reference(attention_lib, dtype, dim, heads, kv_heads, split, t, layout):
    g = torch.Generator().manual_seed(dim * 1000 + t * 10 + split)
    q, k, v = strided_qkv(2, heads, kv_heads, t, t, dim, dtype, g, layout)
    seqlens = torch.full((2,), t, dtype=torch.int64)
    scale = dim ** -0.5
    got = emu_causal_attention(attention_lib, q, k, v, seqlens, scale, split)
    assert_matches_reference(got, q, k, v, seqlens, scale, split, f"T={t} S={split} D={dim}")


def test_head_dim_128(attention_lib):
    g = torch.Generator().manual_seed(128)
    q, k, v = strided_qkv(1, 2, 1, 21, 21, 128, torch.float32, g, "contiguous")
    seqlens = torch.tensor([21])
    got = emu_causal_attention(attention_lib, q * 2, k, v, seqlens, 128 ** -0.5, 16)
    assert_matches_reference(got, q * 2, k, v, seqlens, 128 ** -0.5, 16, "D=128")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("n_queries", [1, 5], ids=["decode", "chunked-prefill"])
def test_cache_with_garbage_and_per_sequence_lengths(attention_lib, dtype, n_queries):
    """Queries at the end of sequences of different lengths against a KV cache whose tail (at and
    beyond each length) is NaN / inf / huge: the garbage is never read, and each query's bits
    equal the full causal pass of its own sequence alone (prefill/decode consistency)."""
    g = torch.Generator().manual_seed(n_queries)
    batch, heads, kv_heads, t_max, dim, split = 3, 4, 2, 40, 16, 16
    lengths = [5, 17, 40] if n_queries > 1 else [1, 17, 40]
    q_full, k, v = strided_qkv(batch, heads, kv_heads, t_max, t_max, dim, dtype, g, "contiguous")
    for b, n in enumerate(lengths):
        k[b, :, n:] = garbage_like(k[b, :, n:], generator=g)
        v[b, :, n:] = garbage_like(v[b, :, n:], generator=g)
    q = torch.stack([q_full[b, :, n - n_queries:n] for b, n in enumerate(lengths)])
    seqlens = torch.tensor(lengths, dtype=torch.int64)
    scale = 0.3
    got = emu_causal_attention(attention_lib, q, k, v, seqlens, scale, split)
    assert_matches_reference(got, q, k, v, seqlens, scale, split, f"Tq={n_queries}, lengths {lengths}")
    assert torch.isfinite(got[0]).all()
    for b, n in enumerate(lengths):  # the same bits as the full pass of sequence b alone
        full = emu_causal_attention(attention_lib, q_full[b:b + 1, :, :n], k[b:b + 1, :, :n].contiguous(),
                             v[b:b + 1, :, :n].contiguous(), torch.tensor([n]), scale, split)
        for ours, alone, name in zip(got, full, ("o", "m", "l")):
            assert_bitwise_equal(ours[b:b + 1], alone[..., n - n_queries:n, :] if name == "o" else
                                 alone[..., n - n_queries:n], f"sequence {b} (length {n}) vs its full pass: {name}")


def test_out_of_range_lengths_give_nan_rows(attention_lib):
    """A (device) seqlens outside [Tq, Tmax] cannot be checked by the glue without a sync: the
    kernel writes NaN rows for it and reads nothing; the other sequences are untouched."""
    g = torch.Generator().manual_seed(9)
    q, k, v = strided_qkv(3, 2, 2, 2, 20, 16, torch.float32, g, "contiguous")
    seqlens = torch.tensor([1, 20, 21])
    o, m, l = emu_causal_attention(attention_lib, q, k, v, seqlens, 0.25, 16)
    assert o[0].isnan().all() and m[0].isnan().all() and o[2].isnan().all() and l[2].isnan().all()
    ref = reference.causal_attention_forward(q[1:2], k[1:2], v[1:2], seqlens[1:2], 0.25, 16)
    assert_bitwise_equal(o[1:2], ref[0], "the valid sequence")


def test_negative_control_fma_merge_and_descending_chunks_are_caught(tmp_path):
    """The same comparison fails for a kernel that merges chunks with an FMA (acc * a + acc_c * b
    rounded once), and for one that merges them in descending order: still a correct attention,
    other roundings."""
    merge = "acc[i] = __fadd_rn(__fmul_rn(acc[i], a), __fmul_rn(acc_c[i], bb));"
    g = torch.Generator().manual_seed(11)
    q, k, v = strided_qkv(1, 2, 1, 53, 53, 16, torch.float32, g, "contiguous")
    q = q * 3  # spread the scores so that chunk maxima differ
    seqlens = torch.tensor([53])
    ref = reference.causal_attention_forward(q, k, v, seqlens, 0.25, 16)
    exact = torch.softmax((q @ k.transpose(-1, -2) * 0.25).masked_fill(
        torch.ones(53, 53, dtype=torch.bool).triu(1), float("-inf")), -1) @ v

    def fma_merge(source):
        assert source.count(merge) == 1
        return source.replace(merge, "acc[i] = __fmaf_rn(acc[i], a, __fmul_rn(acc_c[i], bb));")

    chunks_up = "for (int64_t c0 = 0; c0 <= t_last; c0 += p.split) {"

    def descending(source):
        # Visit the chunks last to first; "chunk 0" (the one that initialises) is then the last one.
        assert source.count(chunks_up) == 1 and source.count("if (c0 == 0) {") == 1
        source = source.replace(chunks_up, "const int64_t c_top = t_last / p.split * p.split;\n"
                                "  for (int64_t c0 = c_top; c0 >= 0; c0 -= p.split) {")
        source = source.replace("} else if (c0 <= t_q) {", "} else if (c0 <= t_q && first_done) {")
        source = source.replace("if (c0 == 0) {", "if (!first_done && c0 <= t_q) {\n      first_done = true;")
        return source.replace("float m = 0.0f, l = 0.0f;", "float m = 0.0f, l = 0.0f;\n  bool first_done = false;")

    for mutate, what in ((fma_merge, "FMA merge"), (descending, "descending chunks")):
        lib = _forward_argtypes(build("causal_attention.cu", ATTENTION_WRAPPERS, tmp_path, CUDA_INCLUDE, mutate=mutate))
        o, _, _ = emu_causal_attention(lib, q, k, v, seqlens, 0.25, 16)
        torch.testing.assert_close(o, exact, rtol=1e-5, atol=1e-5)  # still a correct attention...
        assert not torch.equal(o, ref[0]), what  # ...with other roundings


def emu_attend(lib):
    """The kernel with reference.causal_attention_forward's signature."""
    return lambda q, k, v, seqlens, scale, split: emu_causal_attention(lib, q, k, v, seqlens, scale, split)


def test_unseen_keys_never_reach_a_query(attention_lib):
    """inf / NaN in a future k or v row: NaN-aware bitwise equal to the spec (issue 16's T = 65,
    S = 64 case among them), clean bits before it, full pass == decode == chunked prefill; a
    masked finite value does not reach a zero's sign."""
    for what, _, q, k, v, split in poisoned_problems():
        got = emu_causal_attention(attention_lib, q, k, v, torch.tensor([q.shape[2]]), 0.25, split)
        ref = reference.causal_attention_forward(q, k, v, torch.tensor([q.shape[2]]), 0.25, split)
        for name, a, b in zip("oml", got, ref):
            assert_nan_aware_equal(a, b, f"{what}: {name}")
    assert forward_unseen_failures(emu_attend(attention_lib)) == []
    assert signed_zero_failures(emu_attend(attention_lib)) == []


def test_negative_control_unseen_value_terms_are_caught(tmp_path):
    """A kernel whose P.V chain takes the masked keys as +0 * v_j (the code before issue 16)
    fails the same checks."""
    skip = "if (k0 + j > t_q) continue;  // not seen: no term of acc_c's chain"

    def mutate(source):
        assert source.count(skip) == 1
        return source.replace(skip, "")

    lib = _forward_argtypes(build("causal_attention.cu", ATTENTION_WRAPPERS, tmp_path, CUDA_INCLUDE, mutate=mutate))
    assert any("queries before it changed" in f for f in forward_unseen_failures(emu_attend(lib)))
    assert signed_zero_failures(emu_attend(lib))


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
BACKWARD_WRAPPERS = """
extern "C" int emu_causal_attention_backward(const void* go, const int64_t* gos, const void* q, const int64_t* qs,
                                      const void* k, const int64_t* ks, const void* v, const int64_t* vs,
                                      const float* m, const float* l, void* dq, void* dk, void* dv, float* ws,
                                      int64_t batch, int64_t heads, int64_t kv_heads, int64_t length, int64_t dim,
                                      float scale, int64_t split, int dtype) {
  return (int)fusedtx::cuda::causal_attention_backward(go, gos, q, qs, k, ks, v, vs, m, l, dq, dk, dv, ws, batch, heads,
                                                kv_heads, length, dim, scale, split, (fusedtx::cuda::DType)dtype,
                                                nullptr);
}
extern "C" int64_t emu_causal_attention_backward_workspace(int64_t batch, int64_t heads, int64_t kv_heads, int64_t length,
                                                    int64_t dim, int dtype) {
  return fusedtx::cuda::causal_attention_backward_workspace_elems(batch, heads, kv_heads, length, dim,
                                                           (fusedtx::cuda::DType)dtype);
}
"""

DTYPE_IDS = ["f32", "bf16", "f16"]
SPLIT = 16


def _backward_argtypes(lib):
    lib.emu_causal_attention_backward.argtypes = [P, P, P, P, P, P, P, P, P, P, P, P, P, P, I64, I64, I64, I64, I64, F32,
                                           I64, INT]
    lib.emu_causal_attention_backward_workspace.argtypes = [I64, I64, I64, I64, I64, INT]
    lib.emu_causal_attention_backward_workspace.restype = I64
    return lib


@pytest.fixture(scope="module")
def backward_lib(tmp_path_factory):
    return _backward_argtypes(build("causal_attention_backward.cu", BACKWARD_WRAPPERS, tmp_path_factory.mktemp("emu"), CUDA_INCLUDE))


def emu_backward(lib, grad_o, q, k, v, m, l, scale, split):
    """(dq, dk, dv) from the kernels; grad_o, q, k, v of any strides with stride(-1) == 1."""
    assert all(t.stride(-1) == 1 for t in (grad_o, q, k, v))
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    strides = [torch.tensor(t.stride()[:3], dtype=torch.int64) for t in (grad_o, q, k, v)]
    m, l = m.contiguous(), l.contiguous()
    dq, dk, dv = nan_like(q.shape, q.dtype), nan_like(k.shape, k.dtype), nan_like(v.shape, v.dtype)
    # NaN-filled, exactly as large as the launcher asks: a read before a write, or past the end, shows.
    n_ws = lib.emu_causal_attention_backward_workspace(batch, heads, kv_heads, length, dim, DTYPE_CODE[q.dtype])
    workspace = nan_like((max(n_ws, 1),), torch.float32)
    rc = lib.emu_causal_attention_backward(ptr(grad_o), ptr(strides[0]), ptr(q), ptr(strides[1]), ptr(k), ptr(strides[2]),
                                    ptr(v), ptr(strides[3]), ptr(m), ptr(l), ptr(dq), ptr(dk), ptr(dv),
                                    ptr(workspace), batch, heads, kv_heads, length, dim, scale, split,
                                    DTYPE_CODE[q.dtype])
    assert rc == 0
    return dq, dk, dv


def make_problem(batch, heads, kv_heads, length, dim, dtype, seed, layout="contiguous", device="cpu"):
    """grad_o, q (B, H, T, D), k, v (B, Hkv, T, D). "strided": q and grad_o transposed (B, T, H, D)
    views, k and v slices of one (B, T, 2, Hkv, D) buffer."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    if layout == "contiguous":
        return (rnd(batch, heads, length, dim), rnd(batch, heads, length, dim), rnd(batch, kv_heads, length, dim),
                rnd(batch, kv_heads, length, dim))
    kv = rnd(batch, length, 2, kv_heads, dim)
    return (rnd(batch, length, heads, dim).transpose(1, 2), rnd(batch, length, heads, dim).transpose(1, 2),
            kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2))


def forward_stats(q, k, v, scale, split):
    seqlens = torch.full((q.shape[0],), q.shape[2], dtype=torch.int64)
    _, m, l = reference.causal_attention_forward(q, k, v, seqlens, scale, split)
    return m, l


def check(lib, grad_o, q, k, v, scale, split, what):
    m, l = forward_stats(q, k, v, scale, split)
    got = emu_backward(lib, grad_o, q, k, v, m, l, scale, split)
    ref = reference.causal_attention_backward(grad_o, q, k, v, m, l, scale, split)
    for ours, theirs, name in zip(got, ref, ("dq", "dk", "dv")):
        assert_bitwise_equal(ours, theirs, f"{what}: {name}")
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dim", [16, 32, 64, 128])
def test_backward_matches_reference(backward_lib, dtype, dim):
    """Lengths around the split size S = 16: one and two tokens, S - 1, S + 1 (a second chunk of one
    key) and 2S + 3 (three chunks, two 32-position tiles), grouped-query heads (4 over 2)."""
    for length in (1, 2, SPLIT - 1, SPLIT + 1, 2 * SPLIT + 3):
        grad_o, q, k, v = make_problem(1, 4, 2, length, dim, dtype, seed=dim * 100 + length)
        check(backward_lib, grad_o, q, k, v, dim ** -0.5, SPLIT, f"D={dim} T={length}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (3, 3)], ids=["mqa", "mha"])
def test_backward_head_groups(backward_lib, dtype, heads, kv_heads):
    """All query heads over one KV head (dk, dv: four head sums, in order from +0), and no grouping."""
    grad_o, q, k, v = make_problem(2, heads, kv_heads, 37, 32, dtype, seed=heads * 10 + kv_heads)
    check(backward_lib, grad_o, q, k, v, 0.2, SPLIT, f"H={heads}/{kv_heads}")


@pytest.mark.parametrize("split,length", [(32, 70), (64, 70), (64, 20)], ids=["s32", "s64", "s64-short"])
def test_backward_split_sizes(backward_lib, split, length):
    """S = 32 (chunks fill whole tiles) and S = 64 (a chunk spans two query / key tiles: the dq side
    walks the keys past its tile up to the end of the chunk, the dk / dv side starts at +0 mid-chunk)."""
    grad_o, q, k, v = make_problem(1, 2, 1, length, 64, torch.float32, seed=split + length)
    check(backward_lib, grad_o, q * 2, k, v, 0.125, split, f"S={split} T={length}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_strided_views(backward_lib, dtype):
    """q and grad_o as (B, T, H, D) buffers viewed as (B, H, T, D), k and v interleaved in one buffer:
    read through their strides, the same bits as the reference (and as contiguous copies)."""
    grad_o, q, k, v = make_problem(2, 4, 2, 35, 64, dtype, seed=5, layout="strided")
    assert not (q.is_contiguous() or grad_o.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    got = check(backward_lib, grad_o, q, k, v, 0.125, SPLIT, "strided")
    m, l = forward_stats(q, k, v, 0.125, SPLIT)
    contiguous = emu_backward(backward_lib, *(t.contiguous() for t in (grad_o, q, k, v)), m, l, 0.125, SPLIT)
    for ours, theirs, name in zip(got, contiguous, ("dq", "dk", "dv")):
        assert_bitwise_equal(ours, theirs, f"strided vs contiguous: {name}")


def test_backward_padded_head_dim(backward_lib):
    """A head dim below the kernel's tile width (40 of 64): zero-padded columns, same bits."""
    grad_o, q, k, v = make_problem(1, 2, 1, 33, 40, torch.bfloat16, seed=40)
    check(backward_lib, grad_o, q, k, v, 40 ** -0.5, SPLIT, "D=40")


def test_backward_batch_invariance_and_determinism(backward_lib):
    """Each sequence's gradients are the bits of that sequence alone, and a rerun gives the same bits."""
    grad_o, q, k, v = make_problem(3, 4, 2, 35, 32, torch.float32, seed=3)
    m, l = forward_stats(q, k, v, 0.25, SPLIT)
    full = emu_backward(backward_lib, grad_o, q, k, v, m, l, 0.25, SPLIT)
    again = emu_backward(backward_lib, grad_o, q, k, v, m, l, 0.25, SPLIT)
    for a, b, name in zip(full, again, ("dq", "dk", "dv")):
        assert_bitwise_equal(a, b, f"rerun: {name}")
    for b in (0, 2):
        s = slice(b, b + 1)
        alone = emu_backward(backward_lib, grad_o[s], q[s], k[s], v[s], m[s], l[s], 0.25, SPLIT)
        for ours, theirs, name in zip(full, alone, ("dq", "dk", "dv")):
            assert_bitwise_equal(ours[s], theirs, f"sequence {b} alone: {name}")


def test_backward_launcher_rejects_bad_arguments(backward_lib):
    """Head dims past 128, split sizes that are not powers of two >= 16 and head counts that do not
    group return an error without launching; an empty sequence launches nothing and succeeds."""
    grad_o, q, k, v = make_problem(1, 2, 1, 5, 16, torch.float32, seed=0)
    m, l = forward_stats(q, k, v, 0.25, SPLIT)
    strides = [torch.tensor(t.stride()[:3], dtype=torch.int64) for t in (grad_o, q, k, v)]
    out = [nan_like(t.shape, t.dtype) for t in (q, k, v)]
    workspace = nan_like((64,), torch.float32)

    def call(heads=2, kv_heads=1, length=5, dim=16, split=SPLIT):
        return backward_lib.emu_causal_attention_backward(
            ptr(grad_o), ptr(strides[0]), ptr(q), ptr(strides[1]), ptr(k), ptr(strides[2]), ptr(v), ptr(strides[3]),
            ptr(m), ptr(l), *map(ptr, out), ptr(workspace), 1, heads, kv_heads, length, dim, 0.25, split, 0)

    for bad in (dict(dim=129), dict(dim=0), dict(split=24), dict(split=8), dict(heads=3, kv_heads=2),
                dict(kv_heads=0)):
        assert call(**bad) != 0, bad
    assert call(length=0) == 0
    assert all(t.isnan().all() for t in out) and workspace.isnan().all()  # nothing written


def emu_backward_of(lib):
    return lambda grad_o, q, k, v, m, l, scale, split: emu_backward(lib, grad_o, q, k, v, m, l, scale, split)


def test_backward_unseen_pairs_never_reach_a_gradient(backward_lib):
    """inf / NaN in a row of q, k, v or dO: dq, dk, dv NaN-aware bitwise equal to the spec, and
    untouched where the poisoned row is not seen."""
    for what, grad_o, q, k, v, split in poisoned_problems():
        m, l = forward_stats(q, k, v, 0.25, split)
        got = emu_backward(backward_lib, grad_o, q, k, v, m, l, 0.25, split)
        for name, a, b in zip(("dq", "dk", "dv"), got,
                              reference.causal_attention_backward(grad_o, q, k, v, m, l, 0.25, split)):
            assert_nan_aware_equal(a, b, f"{what}: {name}")
    assert backward_unseen_failures(emu_backward_of(backward_lib)) == []


@pytest.mark.parametrize("what,skip", [
    ("dq", "if (masked && key > first_q + r) continue;"),
    ("dk/dv", "if (first_k + a > i0 + i) continue;"),
])
def test_backward_negative_control_unseen_terms_are_caught(tmp_path, what, skip):
    """Kernels whose dq (or dk, dv) chains take the masked pairs as +0 * x fail the check."""
    def mutate(source):
        assert source.count(skip) == 1
        return source.replace(skip, "")

    lib = _backward_argtypes(build("causal_attention_backward.cu", BACKWARD_WRAPPERS, tmp_path, CUDA_INCLUDE,
                                   mutate=mutate))
    failures = backward_unseen_failures(emu_backward_of(lib))
    expected = "dq of the queries before it changed" if what == "dq" else "dk, dv of the keys after it changed"
    assert any(expected in f for f in failures), failures


def _exact_grads(grad_o, q, k, v, scale):
    """float64 autograd gradients of causal softmax attention (GQA by repeating k and v)."""
    group = q.shape[1] // k.shape[1]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    kk, vv = k64.repeat_interleave(group, 1), v64.repeat_interleave(group, 1)
    length = q.shape[2]
    mask = torch.ones(length, length, dtype=torch.bool).triu(1)
    o = torch.softmax((q64 @ kk.transpose(-1, -2) * scale).masked_fill(mask, float("-inf")), -1) @ vv
    return torch.autograd.grad(o, (q64, k64, v64), grad_o.double())


MUTATIONS = {
    # D_i as one chain of separately rounded products and sums: the same sum, other roundings.
    "D with mul + add": ("d_part = __fmaf_rn(pr[j], dpr[j], d_part);",
                         "d_part = __fadd_rn(__fmul_rn(pr[j], dpr[j]), d_part);"),
    # dq summed over all keys in one chain, no restart at the split boundaries.
    "dq unblocked": ("if (((k0 + j0) & (split - 1)) == 0 && k0 + j0 > 0) fold(total, part);", ""),
    # dk and dv summed over all queries in one chain.
    "dk/dv unblocked": ("""          if (((i0 + r0) & (split - 1)) == 0 && i0 + r0 > j0) {
            fold(dk_total, dk_part);
            fold(dv_total, dv_part);
          }""", ""),
}


@pytest.mark.parametrize("what", list(MUTATIONS))
def test_backward_negative_control_other_orders_are_caught(tmp_path, what):
    """The same comparison fails for kernels that compute D_i with a multiply and an add instead of
    an FMA, or that sum dq (or dk and dv) without restarting at the split boundaries: still correct
    gradients (close to the float64 ones), other roundings."""
    old, new = MUTATIONS[what]

    def mutate(source):
        assert source.count(old) == 1, what
        return source.replace(old, new)

    lib = _backward_argtypes(build("causal_attention_backward.cu", BACKWARD_WRAPPERS, tmp_path, CUDA_INCLUDE, mutate=mutate))
    grad_o, q, k, v = make_problem(1, 2, 1, 70, 32, torch.float32, seed=17)
    q = q * 2  # spread the scores
    scale = 32 ** -0.5
    m, l = forward_stats(q, k, v, scale, SPLIT)
    got = emu_backward(lib, grad_o, q, k, v, m, l, scale, SPLIT)
    ref = reference.causal_attention_backward(grad_o, q, k, v, m, l, scale, SPLIT)
    for ours, exact in zip(got, _exact_grads(grad_o, q, k, v, scale)):
        torch.testing.assert_close(ours.double(), exact, rtol=1e-4, atol=1e-4)  # still correct gradients...
    assert not all(torch.equal(a, b) for a, b in zip(got, ref)), what  # ...with other roundings


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dim,heads,kv_heads,length,split,layout", [
    (64, 4, 2, 77, 16, "contiguous"),
    (128, 4, 1, 100, 64, "strided"),
    (16, 2, 2, 33, 32, "contiguous"),
    (40, 3, 1, 50, 16, "strided"),
], ids=["D64-gqa", "D128-mqa-strided", "D16", "D40-strided"])
def test_backward_cuda_op_matches_reference(dtype, dim, heads, kv_heads, length, split, layout):
    """On a GPU: torch.ops.fusedtx_native.causal_attention_backward (this kernel, through its glue) equals
    the reference bit for bit, run after run."""
    require("cuda", "native")
    from fusedtx import _extension

    ops = _extension.ops()
    inputs = make_problem(2, heads, kv_heads, length, dim, dtype, seed=dim + length, layout=layout, device="cuda")
    assert layout == "contiguous" or not any(t.is_contiguous() for t in inputs)
    grad_o, q, k, v = (t.cpu() for t in inputs)
    scale = dim ** -0.5
    m, l = forward_stats(q, k, v, scale, split)
    ref = reference.causal_attention_backward(grad_o, q, k, v, m, l, scale, split)
    args = [*inputs, m.cuda(), l.cuda()]
    first = ops.causal_attention_backward(*args, scale, split)
    for ours, theirs, name in zip(first, ref, ("dq", "dk", "dv")):
        assert ours.is_cuda and ours.is_contiguous() and ours.dtype == dtype
        assert_bitwise_equal(ours.cpu(), theirs, f"{name}")
    for ours, again in zip(first, ops.causal_attention_backward(*args, scale, split)):
        assert_bitwise_equal(ours, again, "rerun")


@pytest.mark.gpu
def test_backward_cuda_op_rejects_bad_input():
    require("cuda", "native")
    from fusedtx import _extension

    ops = _extension.ops()
    grad_o, q, k, v = make_problem(1, 4, 2, 20, 16, torch.float32, seed=1, device="cuda")
    m, l = torch.zeros(1, 4, 20, device="cuda"), torch.ones(1, 4, 20, device="cuda")
    bad = [
        ((grad_o, q, k, v, m.cpu(), l, 0.25, 16), "m must be on q's device"),
        ((grad_o, q, k, v, m, l.half(), 0.25, 16), "l must be float32"),
        ((grad_o, q, k.half(), v, m, l, 0.25, 16), "k must have q's dtype"),
        ((grad_o, q, k, v, m, l, 0.25, 24), "split_size must be a power of two >= 16, got 24"),
        ((grad_o[..., :8], q[..., :8], k[..., :8], v, m, l, 0.25, 16), "k and v must have the same shape"),
        ((grad_o.cpu(), q, k, v, m, l, 0.25, 16), "grad_o must be a CUDA tensor"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            ops.causal_attention_backward(*args)
