"""Causal attention with a fixed split size: the specification (fusedtx.reference.causal_attention_forward
and causal_attention_backward), then the ops on every backend.

What the kernels will be held to, checked on the spec first: accuracy of the output and of every
gradient against float64 SDPA (every dtype, head dims 16 to 128, T from 1 to past three split
chunks), prefill / chunked prefill / decode consistency bit for bit, batch invariance with
garbage beyond each sequence's length, and a negative control (a split count chosen from the
batch, as split-KV kernels usually do) that visibly fails the same checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedtx
from fusedtx import reference
from causal_attention_helpers import (FEW_POISONS, POISONS, S, backward_unseen_failures, batch_failures, chunked,
                                      decode_cache, forward_unseen_failures, full_causal, make, qkv,
                                      signed_zero_failures, split_count_from_batch, zero_times_unseen_terms)
from helpers import (DEVICE_BACKENDS, DTYPES, assert_accuracy, assert_bitwise_equal, bitwise_equal, garbage_like,
                     rel_error, require)

# Accuracy matrix of the spec: (head dim, KV heads of H = 2), multi-head and multi-query.
HEAD_DIMS = [(16, 2), (32, 1), (64, 2), (128, 1)]
HEAD_DIM_IDS = ["D16", "D32-mqa", "D64", "D128-mqa"]
LENGTHS = [1, 2, 3, S - 1, S, S + 1, 3 * S + 5]
SHORT_ROWS = 3         # T up to this: errors over SHORT_ROW_SEEDS draws together
SHORT_ROW_SEEDS = 8
# FlashAttention's D_i = dO_i . o_i rounds apart from the P dP that dS = P (dP - D) subtracts it
# from; at T = 2, 3 in float32 it left dq and dk up to 1.9x as far from float64 as eager's (errors
# over 8 draws; at D = 128 never under 1.1x), where D_i = sum_j P_ij dP_ij (the spec) stays
# <= 1.0x. Both are inside the contract's 2x: this tighter bound keeps D's gain, and the old form
# fails it.
D_ROW_SUM_BOUND = 1.2


def draws(length):
    """Seeds whose errors are measured together (one norm over all of them). At T = 2, 3 a single
    B = 2, H = 2 draw holds a handful of non-trivial rows, and the ratio of two rounding-error
    norms is heavy-tailed: one draw put the spec's dk at 2.6x eager's and its forward at 2.2x,
    where over 8 draws they are <= 1.0x and <= 1.8x. The norm over 8 draws is the stable
    reading of contract point 1."""
    return range(SHORT_ROW_SEEDS) if 2 <= length <= SHORT_ROWS else range(1)


def sdpa_outputs(q, k, v, grad_o, cast):
    """(o, dq, dk, dv) of torch SDPA's autograd on cast(q), cast(k), cast(v); GQA by expansion."""
    leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
    expand = lambda t: t.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # noqa: E731
    y = F.scaled_dot_product_attention(leaves[0], expand(leaves[1]), expand(leaves[2]), is_causal=True)
    return (y.detach(), *torch.autograd.grad(y, leaves, cast(grad_o)))


def pooled(runs):
    """[(a, b, ...) per draw] -> (cat of the a's, cat of the b's, ...)."""
    return [torch.cat(parts) for parts in zip(*runs)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("dim,kv_heads", HEAD_DIMS, ids=HEAD_DIM_IDS)
def test_spec_accuracy_against_float64(dtype, length, dim, kv_heads):
    runs = []
    for seed in draws(length):
        q, k, v = qkv(2, 2, length, dim, dtype, kv_heads, seed=seed)
        ours = full_causal(q, k, v)
        assert ours.dtype == dtype and ours.shape == q.shape
        expand = lambda t: t.repeat_interleave(2 // kv_heads, dim=1)  # noqa: E731
        eager = F.scaled_dot_product_attention(q, expand(k), expand(v), is_causal=True)
        exact = F.scaled_dot_product_attention(q.double(), expand(k).double(), expand(v).double(), is_causal=True)
        runs.append((ours, eager, exact))
    assert_accuracy(*pooled(runs), f"attention spec {dtype} T={length} D={dim}")


@pytest.mark.parametrize("chunk_sizes", [[1], [7], [S], [S + 1], [5, 30, 2, 11]], ids=["decode", "7", "S", "S+1", "random"])
def test_spec_prefill_chunked_prefill_and_decode_agree_bitwise(chunk_sizes):
    q, k, v = qkv(1, 2, 3 * S + 5, 16, torch.bfloat16)
    full = full_causal(q, k, v)
    assert_bitwise_equal(chunked(q, k, v, chunk_sizes, tmax=4 * S), full, f"chunks {chunk_sizes} vs full pass")


def test_spec_batch_invariance_with_garbage_beyond_lengths():
    assert batch_failures(reference.causal_attention_forward) == []


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
    out = reference.causal_attention_forward(q[:, :, -2:], k_cache, v_cache, torch.tensor([S + 3]), 0.25, S)[0]
    assert torch.isfinite(out).all()
    full = reference.causal_attention_forward(q, k, v, torch.tensor([S + 3]), 0.25, S)[0]
    assert_bitwise_equal(out, full[:, :, -2:], "garbage beyond the length")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_spec_unseen_keys_never_reach_a_query(dtype):
    """inf / NaN in a future k or v row: the queries before it keep their clean bits, each
    query's full-pass row is its decode step's and a chunked prefill's, a visible NaN shows."""
    assert forward_unseen_failures(reference.causal_attention_forward, dtype) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_spec_backward_unseen_pairs_never_reach_a_gradient(dtype):
    assert backward_unseen_failures(reference.causal_attention_backward, dtype=dtype) == []


def test_negative_control_zero_times_unseen_terms_fails_both_checks():
    """The arithmetic before issue 16 (masked terms added as 0 * x) fails both checks."""
    with zero_times_unseen_terms():
        forward = forward_unseen_failures(reference.causal_attention_forward)
        backward = backward_unseen_failures(reference.causal_attention_backward)
    assert any("queries before it changed" in f for f in forward), forward
    assert any("dq of the queries before it changed" in f for f in backward), backward
    assert any("dk, dv of the keys after it changed" in f for f in backward), backward


def test_spec_signed_zero_of_a_masked_term():
    """Even a finite masked value must not reach a query: not the sign of its zero (decode's -0
    vs a full pass's), and the old arithmetic fails this."""
    assert signed_zero_failures(reference.causal_attention_forward) == []
    with zero_times_unseen_terms():
        assert signed_zero_failures(reference.causal_attention_forward), "the signed-zero check missed +0 * v"


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("dim,kv_heads", HEAD_DIMS, ids=HEAD_DIM_IDS)
def test_spec_backward_accuracy_against_float64(dtype, length, dim, kv_heads):
    runs = []
    for seed in draws(length):
        q, k, v = qkv(2, 2, length, dim, dtype, kv_heads, seed=seed)
        grad_o = make(q.shape, dtype, seed=seed + 7)
        scale = dim ** -0.5
        _, m, l = reference.causal_attention_forward(q, k, v, torch.full((2,), length), scale, S)
        ours = reference.causal_attention_backward(grad_o, q, k, v, m, l, scale, S)
        for name, a, like in zip(("dq", "dk", "dv"), ours, (q, k, v)):
            assert a.dtype == dtype and a.shape == like.shape, name
        eager, exact = sdpa_outputs(q, k, v, grad_o, lambda t: t), sdpa_outputs(q, k, v, grad_o, lambda t: t.double())
        runs.append((*ours, *eager[1:], *exact[1:]))
    grads = pooled(runs)
    for i, name in enumerate(("dq", "dk", "dv")):
        ours, eager, exact = grads[i], grads[3 + i], grads[6 + i]
        what = f"attention spec backward {dtype} {name} T={length} D={dim}"
        assert_accuracy(ours, eager, exact, what)
        if dtype == torch.float32 and 2 <= length <= SHORT_ROWS and name != "dv":
            ratio = rel_error(ours, exact) / rel_error(eager, exact)
            assert ratio <= D_ROW_SUM_BOUND, f"{what}: {ratio:.2f}x torch eager's error > {D_ROW_SUM_BOUND}x (D's form)"


# ---------------------------------------------------------------------------------------------
# the ops on every backend: fusedtx.causal_attention / attention_with_kv_cache, the module
# ---------------------------------------------------------------------------------------------
def public_attend(backend):
    """attention_with_kv_cache with reference.causal_attention_forward's signature, for chunked()."""
    def attend(q, k_cache, v_cache, seqlens, scale, split_size):
        return (fusedtx.attention_with_kv_cache(q, k_cache.to(q.device), v_cache.to(q.device), seqlens,
                                                scale=scale, split_size=split_size, backend=backend),)
    return attend


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
def test_op_accuracy_forward_and_backward(device, backend, dtype):
    require(device, backend)
    q, k, v = (t.to(device) for t in qkv(2, 4, 2 * S + 3, 16, dtype, kv_heads=2))
    grad_o = make(q.shape, dtype, seed=9).to(device)

    def grads(fn, cast):
        leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
        y = fn(*leaves)
        return (y, *torch.autograd.grad(y, leaves, cast(grad_o)))

    ours = grads(lambda a, b, c: fusedtx.causal_attention(a, b, c, split_size=S, backend=backend), lambda t: t)
    sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b.repeat_interleave(2, 1), c.repeat_interleave(2, 1),  # noqa: E731
                                                          is_causal=True)
    eager, exact = grads(sdpa, lambda t: t), grads(sdpa, lambda t: t.double())
    for name, a, e, x, like in zip(("o", "dq", "dk", "dv"), ours, eager, exact, (q, q, k, v)):
        assert a.dtype == dtype and a.shape == like.shape, name
        assert_accuracy(a, e, x, f"{backend} causal_attention {dtype} {name}")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("length", [2, 3])
def test_op_backward_accuracy_short_rows(device, backend, length):
    """float32 at T = 2, 3, where the backward's D shows most (see D_ROW_SUM_BOUND): o, dq, dk, dv
    within the contract and dq, dk within D_ROW_SUM_BOUND of eager, errors over 8 draws, through
    the op and its autograd."""
    require(device, backend)
    for dim, kv_heads in [(64, 2), (128, 1)]:
        runs = []
        for seed in range(SHORT_ROW_SEEDS):
            q, k, v = qkv(2, 2, length, dim, torch.float32, kv_heads, seed=seed)
            grad_o = make(q.shape, torch.float32, seed=seed + 7)
            leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
            o = fusedtx.causal_attention(*leaves, split_size=S, backend=backend)
            ours = [t.cpu() for t in (o.detach(), *torch.autograd.grad(o, leaves, grad_o.to(device)))]
            eager, exact = sdpa_outputs(q, k, v, grad_o, lambda t: t), sdpa_outputs(q, k, v, grad_o, lambda t: t.double())
            runs.append((*ours, *eager, *exact))
        outs = pooled(runs)
        for i, name in enumerate(("o", "dq", "dk", "dv")):
            ours, eager, exact = outs[i], outs[4 + i], outs[8 + i]
            what = f"{backend} causal_attention float32 {name} T={length} D={dim}"
            assert_accuracy(ours, eager, exact, what)
            if name in ("dq", "dk"):
                ratio = rel_error(ours, exact) / rel_error(eager, exact)
                assert ratio <= D_ROW_SUM_BOUND, f"{what}: {ratio:.2f}x torch eager's error > {D_ROW_SUM_BOUND}x"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("chunk_sizes", [[1], [7], [S + 1]], ids=["decode", "7", "S+1"])
def test_op_full_chunked_and_decode_agree_bitwise(device, backend, chunk_sizes):
    require(device, backend)
    q, k, v = (t.to(device) for t in qkv(2, 2, 2 * S + 5, 16, torch.bfloat16, kv_heads=1))
    full = fusedtx.causal_attention(q, k, v, scale=0.25, split_size=S, backend=backend)
    stepped = chunked(q, k.cpu(), v.cpu(), chunk_sizes, tmax=3 * S, attend=public_attend(backend))
    assert_bitwise_equal(stepped, full, f"{backend}: chunks {chunk_sizes} vs the full pass")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_op_batch_invariance(device, backend):
    require(device, backend)
    attend = public_attend(backend)

    def on_device(q, k_cache, v_cache, seqlens, scale, split_size):
        return (attend(q.to(device), k_cache, v_cache, seqlens.to(device), scale, split_size)[0].cpu(),)

    assert batch_failures(on_device) == []


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets inf - inf
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_op_unseen_keys_never_reach_a_query(device, backend):
    """inf / NaN in future k, v rows (forward), and in q, k, v, dO rows the other side cannot see
    (backward, through autograd): untouched bits where they are not seen, full pass == decode ==
    chunked prefill, visible NaN shows; a masked finite value does not reach a zero's sign."""
    require(device, backend)
    attend = public_attend(backend)

    def on_device(q, k_cache, v_cache, seqlens, scale, split_size):
        return (attend(q.to(device), k_cache, v_cache, seqlens.to(device), scale, split_size)[0].cpu(),)

    def backward(grad_o, q, k, v, m, l, scale, split_size):
        leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
        o = fusedtx.causal_attention(*leaves, scale=scale, split_size=split_size, backend=backend)
        return [g.cpu() for g in torch.autograd.grad(o, leaves, grad_o.to(device))]

    poisons = FEW_POISONS if backend == "triton" else POISONS  # interpreted Triton: seconds a call
    assert forward_unseen_failures(on_device, poisons=poisons) == []
    assert backward_unseen_failures(backward, forward=None, poisons=poisons) == []
    assert signed_zero_failures(on_device) == []


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets inf - inf
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_op_right_padding_garbage_never_reaches_a_sequence(device, backend):
    """A batch of right-padded sequences in one full pass: the padding (inf, NaN, huge) is keys
    the real tokens cannot see, so a sequence's rows are its bits alone (the T = 65, S = 64 case
    of issue 16: garbage from position 32 on, past the first 32-query block)."""
    require(device, backend)
    g = torch.Generator().manual_seed(2)
    for length, real, split in [(65, 32, 64), (2 * S + 5, S + 3, S)]:
        q, k, v = qkv(2, 2, length, 16, kv_heads=1, seed=length)
        alone = fusedtx.causal_attention(*(t[:1, :, :real].to(device) for t in (q, k, v)), scale=0.25,
                                         split_size=split, backend=backend).cpu()
        for t in (q, k, v):
            t[0, :, real:] = garbage_like(t[0, :, real:], g)
        out = fusedtx.causal_attention(q.to(device), k.to(device), v.to(device), scale=0.25, split_size=split,
                                       backend=backend).cpu()
        assert_bitwise_equal(out[:1, :, :real], alone, f"T={length}: the first {real} tokens of a padded sequence")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_module_decode_with_kv_cache_equals_full_pass(device, backend):
    require(device, backend)
    torch.manual_seed(0)
    attn = fusedtx.nn.CausalSelfAttention(64, 4, n_kv_head=2, split_size=S, backend=backend).to(device)
    x = make((3, 2 * S + 1, 64), torch.float32, seed=4).to(device)
    with torch.no_grad():
        full = attn(x)
        cache = attn.new_kv_cache(3, 3 * S)
        prefill = attn(x[:, :5], cache)
        steps = [attn(x[:, t: t + 1], cache) for t in range(5, x.shape[1])]
    assert_bitwise_equal(torch.cat([prefill, *steps], dim=1), full, f"{backend}: prefill 5 + decode vs full")
    assert cache.lengths.tolist() == [x.shape[1]] * 3


def test_module_matches_a_plain_pytorch_attention():
    torch.manual_seed(0)
    attn = fusedtx.nn.CausalSelfAttention(48, 6, split_size=S)
    x = make((2, 21, 48), torch.float32, seed=2)
    q, k, v = attn.c_attn(x).split(48, dim=2)
    heads = lambda t: t.view(2, 21, 6, 8).transpose(1, 2)  # noqa: E731
    y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    expected = attn.c_proj(y.transpose(1, 2).reshape(2, 21, 48))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
    assert set(attn.state_dict()) == {"c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"}


def test_op_bad_input_errors():
    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16)
    with pytest.raises(ValueError, match=r"q must be 4-D \(batch, heads, tokens, head_dim\), got shape \[4, 8, 16\]"):
        fusedtx.causal_attention(q[0], k, k)
    with pytest.raises(ValueError, match=r"q's heads \(4\) must be a multiple of k's heads \(3\)"):
        fusedtx.causal_attention(q, torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16))
    with pytest.raises(ValueError, match=r"k must be \(batch=2, kv_heads, tokens, head_dim=16\)"):
        fusedtx.causal_attention(q, torch.randn(2, 2, 8, 32), torch.randn(2, 2, 8, 32))
    with pytest.raises(TypeError, match="v must have q's dtype torch.float32, got torch.bfloat16"):
        fusedtx.causal_attention(q, k, k.bfloat16())
    with pytest.raises(TypeError, match="q must be float32, bfloat16 or float16"):
        fusedtx.causal_attention(q.double(), k.double(), k.double())
    with pytest.raises(ValueError, match="split size must be a power of two >= 16, got 24"):
        fusedtx.causal_attention(q, k, k, split_size=24)
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"scale must be a finite number, got {scale!r}"):
            fusedtx.causal_attention(q, k, k, scale=scale)
    for scale, kind in ((True, "bool"), ("0.25", "str")):
        with pytest.raises(TypeError, match=f"scale must be a real number, got {kind}"):
            fusedtx.causal_attention(q, k, k, scale=scale)
    fusedtx.causal_attention(q, k, k, scale=1)  # an int is a real number
    with pytest.raises(ValueError, match="k must have q's 8 tokens, got 9"):
        fusedtx.causal_attention(q, torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16))
    cache = torch.randn(2, 2, 32, 16)
    with pytest.raises(ValueError, match=r"seqlens\[b\] must be <= the cache length Tmax = 32, got max 40"):
        fusedtx.attention_with_kv_cache(q, cache, cache, torch.tensor([8, 40]))
    with pytest.raises(ValueError, match=r"seqlens\[b\] must be >= Tq = 8"):
        fusedtx.attention_with_kv_cache(q, cache, cache, torch.tensor([8, 7]))
    with pytest.raises(ValueError, match=r"seqlens must have shape \[2\]"):
        fusedtx.attention_with_kv_cache(q, cache, cache, torch.tensor([8, 8, 8]))
    with pytest.raises(TypeError, match="seqlens must be an int32/int64 tensor"):
        fusedtx.attention_with_kv_cache(q, cache, cache, torch.tensor([8.0, 8.0]))
    with pytest.raises(ValueError, match="inference-only"):
        fusedtx.attention_with_kv_cache(q.requires_grad_(), cache, cache, torch.tensor([8, 8]))
    with pytest.raises(ValueError, match="overflow the cache"):
        kv = fusedtx.nn.KVCache(1, 2, 4, 16)
        kv.append(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_op_opcheck_and_compile(device, backend):
    require(device, backend)
    q, k, v = (t.to(device).requires_grad_() for t in qkv(1, 2, S + 3, 16, kv_heads=1))
    torch.library.opcheck(torch.ops.fusedtx.causal_attention.default, (q, k, v, 0.25, S, backend))
    cache = torch.randn(1, 1, 2 * S, 16, device=device)
    torch.library.opcheck(torch.ops.fusedtx.attention_with_kv_cache.default,
                          (q.detach()[:, :, :2], cache, cache, torch.tensor([S], device=device), 0.25, S, backend))
    torch._dynamo.reset()
    fn = lambda a, b, c: fusedtx.causal_attention(a * 1.0, b, c, split_size=S, backend=backend).square().sum()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for ours, ref in zip(torch.autograd.grad(compiled(q, k, v), (q, k, v)), torch.autograd.grad(fn(q, k, v), (q, k, v))):
        assert_bitwise_equal(ours, ref, "compiled vs eager")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_op_any_layout_gives_the_contiguous_bits(device, backend):
    """q, k, v in layouts without a unit head-dim stride (channels_last, a transposed copy) give
    the contiguous inputs' output and gradients bit for bit, on every backend; so does the
    KV-cache face."""
    require(device, backend)
    g = torch.Generator().manual_seed(5)
    base = [torch.randn(2, 4, 40, 32, generator=g).to(device) for _ in range(3)]
    layouts = {
        "channels_last": [t.contiguous(memory_format=torch.channels_last) for t in base],
        "transposed": [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in base],
    }
    grad_o = torch.randn(base[0].shape, generator=g).to(device)

    def run(tensors):
        q, k, v = (t.detach().requires_grad_() for t in tensors)
        o = fusedtx.causal_attention(q, k, v, split_size=16, backend=backend)
        return (o, *torch.autograd.grad(o, (q, k, v), grad_o))

    expected = run(base)
    lengths = torch.tensor([40, 23])
    expected_cache = fusedtx.attention_with_kv_cache(base[0][:, :, 9:11], base[1], base[2], lengths,
                                                     split_size=16, backend=backend)
    for name, tensors in layouts.items():
        assert tensors[0].stride(-1) != 1
        for what, a, b in zip(("o", "dq", "dk", "dv"), run(tensors), expected):
            assert_bitwise_equal(a, b, f"{name} {what}")
        got = fusedtx.attention_with_kv_cache(tensors[0][:, :, 9:11], tensors[1], tensors[2], lengths,
                                              split_size=16, backend=backend)
        assert_bitwise_equal(got, expected_cache, f"{name} kv cache")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("batch,tokens", [(0, 4), (1, 0)])
def test_empty_inputs_give_empty_outputs_and_gradients(device, backend, batch, tokens):
    """No sequences or no tokens: empty outputs and gradients on every backend (the reference
    raised a TypeError, the backward refused); no queries against a cache: an empty output; a
    head dim of 0 is refused, naming it."""
    require(device, backend)
    q, k, v = (t.to(device).requires_grad_() for t in torch.randn(3, batch, 2, tokens, 16).unbind(0))
    o = fusedtx.causal_attention(q, k, v, backend=backend)
    assert o.shape == q.shape
    o.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    cache = torch.randn(1, 2, 8, 16, device=device)
    assert fusedtx.attention_with_kv_cache(torch.randn(1, 2, 0, 16, device=device), cache, cache,
                                           torch.tensor([3], device=device), backend=backend).shape == (1, 2, 0, 16)
    with pytest.raises(ValueError, match=r"head_dim \(q's last dim\) must be >= 1, got 0"):
        fusedtx.causal_attention(*torch.randn(3, 1, 2, 4, 0, device=device).unbind(0), backend=backend)
