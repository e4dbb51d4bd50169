"""csrc/cuda/causal_attention.cu (the native CUDA attention forward) run on the CPU under the
thread-per-CUDA-thread emulator (tests/cuda_emu), compared bit for bit with
reference.causal_attention_forward: full causal passes, GQA, strided views, chunked prefill and decode
against a KV cache holding garbage beyond each sequence's length, and a negative control.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from fusedtx import reference
from helpers import assert_bitwise_equal, garbage_like

from cuda_emu.build import build
from test_cuda_emulated import CUDA_INCLUDE, DTYPE_CODE, F32, I64, INT, P, nan_like, ptr, pytestmark  # noqa: F401

ATTENTION_WRAPPERS = """
extern "C" int emu_attention_forward(const void* q, const int64_t* qs, const void* k, const int64_t* ks, const void* v,
                                     const int64_t* vs, const int64_t* seqlens, void* o, float* m, float* l,
                                     int64_t batch, int64_t heads, int64_t kv_heads, int64_t n_queries, int64_t t_max,
                                     int64_t dim, float scale, int64_t split, int dtype) {
  return (int)fusedtx::cuda::causal_attention_forward(q, qs, k, ks, v, vs, seqlens, o, m, l, batch, heads, kv_heads,
                                               n_queries, t_max, dim, scale, split, (fusedtx::cuda::DType)dtype,
                                               nullptr);
}
"""


def _argtypes(lib):
    lib.emu_attention_forward.argtypes = [P, P, P, P, P, P, P, P, P, P, I64, I64, I64, I64, I64, I64, F32, I64, INT]
    return lib


@pytest.fixture(scope="module")
def attention_lib(tmp_path_factory):
    return _argtypes(build("causal_attention.cu", ATTENTION_WRAPPERS, tmp_path_factory.mktemp("emu"), CUDA_INCLUDE))


def emu_attention(lib, q, k, v, seqlens, scale, split):
    """(o, m, l) from the kernel; q, k, v of any strides with stride(-1) == 1."""
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    batch, heads, n_queries, dim = q.shape
    strides = [torch.tensor(t.stride()[:3], dtype=torch.int64) for t in (q, k, v)]
    lengths = seqlens.to(torch.int64).contiguous()
    o = nan_like(q.shape, q.dtype)
    m, l = nan_like((batch, heads, n_queries), torch.float32), nan_like((batch, heads, n_queries), torch.float32)
    rc = lib.emu_attention_forward(ptr(q), ptr(strides[0]), ptr(k), ptr(strides[1]), ptr(v), ptr(strides[2]),
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
    got = emu_attention(attention_lib, q, k, v, seqlens, scale, split)
    assert_matches_reference(got, q, k, v, seqlens, scale, split, f"T={t} S={split} D={dim}")


def test_head_dim_128(attention_lib):
    g = torch.Generator().manual_seed(128)
    q, k, v = strided_qkv(1, 2, 1, 21, 21, 128, torch.float32, g, "contiguous")
    seqlens = torch.tensor([21])
    got = emu_attention(attention_lib, q * 2, k, v, seqlens, 128 ** -0.5, 16)
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
    got = emu_attention(attention_lib, q, k, v, seqlens, scale, split)
    assert_matches_reference(got, q, k, v, seqlens, scale, split, f"Tq={n_queries}, lengths {lengths}")
    assert torch.isfinite(got[0]).all()
    for b, n in enumerate(lengths):  # the same bits as the full pass of sequence b alone
        full = emu_attention(attention_lib, q_full[b:b + 1, :, :n], k[b:b + 1, :, :n].contiguous(),
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
    o, m, l = emu_attention(attention_lib, q, k, v, seqlens, 0.25, 16)
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
        lib = _argtypes(build("causal_attention.cu", ATTENTION_WRAPPERS, tmp_path, CUDA_INCLUDE, mutate=mutate))
        o, _, _ = emu_attention(lib, q, k, v, seqlens, 0.25, 16)
        torch.testing.assert_close(o, exact, rtol=1e-5, atol=1e-5)  # still a correct attention...
        assert not torch.equal(o, ref[0]), what  # ...with other roundings
