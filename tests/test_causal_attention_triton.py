"""The Triton attention, forward (fusedtx.kernels.causal_attention) and backward
(fusedtx.kernels.causal_attention_backward), run by the interpreter on CPU.

Forward: accuracy against float64 SDPA; bitwise: full causal pass == chunked prefill == token-by-token
decode against a KV cache with garbage beyond the length, on both schedules (in-kernel merge and
split + merge kernel); batch invariance; negative controls that make the same checks fail; bad
input errors.

Backward: accuracy of dq, dk, dv against float64 SDPA autograd (GQA expanded for SDPA), bitwise
run-to-run determinism, batch invariance of dq, dk, dv (a sequence alone vs inside a batch of 3),
bad input errors.

Sizes are small: the interpreter costs ~0.1 s per launch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from fusedtx import reference  # noqa: E402
from fusedtx.kernels import INTERPRETED  # noqa: E402
from fusedtx.kernels import causal_attention as forward_kernels  # noqa: E402
from fusedtx.kernels import causal_attention_backward as backward_kernels  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from causal_attention_helpers import (FEW_POISONS, backward_unseen_failures, batch_failures, chunked, decode_cache,  # noqa: E402
                                      forward_unseen_failures, make, nan_aware_equal, poisoned_problems, qkv,
                                      signed_zero_failures)
from helpers import assert_accuracy, assert_bitwise_equal, bitwise_equal  # noqa: E402

# masked lanes compute exp(-inf - -inf) etc. before tl.where drops them: numpy warns
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICE = "cpu" if INTERPRETED else "cuda"


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def attend(schedule="auto"):
    """forward_kernels.causal_attention_forward with the reference's signature (CPU tensors in, CPU tensors out)."""
    def run(q, k, v, seqlens, scale, split_size):
        q, k, v, seqlens = on_device(q, k, v, seqlens)
        out = forward_kernels.causal_attention_forward(q, k, v, seqlens, scale, split_size, schedule=schedule)
        return [t.cpu() for t in out]
    return run


def full_pass(q, k, v, split_size, schedule="auto"):
    lengths = torch.full((q.shape[0],), q.shape[2])
    return attend(schedule)(q, k, v, lengths, q.shape[-1] ** -0.5, split_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("rel_length", ["1", "2", "S-1", "S", "S+1", "3S+5"])
@pytest.mark.parametrize("dim,split", [(16, 16), (64, 32)], ids=["D16-S16", "D64-S32"])
def test_accuracy_against_float64_sdpa(dtype, rel_length, dim, split):
    length = {"1": 1, "2": 2, "S-1": split - 1, "S": split, "S+1": split + 1, "3S+5": 3 * split + 5}[rel_length]
    q, k, v = qkv(1, 2, length, dim, dtype, kv_heads=1)  # GQA: two query heads share one KV head
    o, m, l = full_pass(q, k, v, split)
    ek, ev = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    eager = F.scaled_dot_product_attention(q, ek, ev, is_causal=True)
    exact = F.scaled_dot_product_attention(q.double(), ek.double(), ev.double(), is_causal=True)
    assert o.dtype == dtype and o.shape == q.shape and o.is_contiguous()
    assert m.dtype == l.dtype == torch.float32 and m.shape == l.shape == q.shape[:3]
    assert_accuracy(o, eager, exact, f"triton attention {dtype} T={length} D={dim} S={split}")
    # m, l are the final running max and sum: o * l reproduces sum_j exp(s_j - m) v_j
    s = (q.double() @ ek.double().transpose(-1, -2)) * dim ** -0.5
    s = s.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(m.double(), s.amax(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l.double(), torch.exp(s - m.double()[..., None]).sum(-1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("schedule", ["prefill", "split"])
def test_both_schedules_give_the_same_bits(schedule):
    for dtype, dim, split in ((torch.float32, 64, 32), (torch.bfloat16, 16, 16), (torch.float16, 32, 16)):
        q, k, v = qkv(1, 2, 2 * split + 21, dim, dtype, kv_heads=1, seed=4)
        ours = full_pass(q, k, v, split, schedule)
        auto = full_pass(q, k, v, split)
        for a, b, what in zip(ours, auto, "oml"):
            assert_bitwise_equal(a, b, f"{schedule} vs auto, {what}, {dtype}")


CONSISTENCY = [  # (dtype, D, S, T, chunk sizes)
    (torch.bfloat16, 16, 16, 3 * 16 + 5, [[1], [7], [16], [17]]),
    (torch.float32, 64, 32, 2 * 32 + 5, [[7], [32], [33], [5, 30, 2, 11]]),  # S = 2 sub-tiles here
    (torch.float16, 32, 16, 2 * 16 + 5, [[1], [17]]),
]


@pytest.mark.parametrize("dtype,dim,split,length,chunkings", CONSISTENCY,
                         ids=["bf16-D16-S16", "f32-D64-S32", "f16-D32-S16"])
def test_full_pass_chunked_prefill_and_decode_agree_bitwise(dtype, dim, split, length, chunkings):
    q, k, v = qkv(1, 2, length, dim, dtype, kv_heads=1, seed=7)
    full = full_pass(q, k, v, split, "prefill")[0]
    assert_bitwise_equal(full_pass(q, k, v, split, "split")[0], full, "split schedule vs in-kernel merge")
    for sizes in chunkings:
        # "auto" runs the split + merge kernels for chunks up to one query tile; "prefill" forces
        # the in-kernel merge on the same chunks (decode twice over costs too much interpreter time)
        for schedule in ("auto",) if sizes == [1] else ("auto", "prefill"):
            out = chunked(q, k, v, sizes, tmax=length + split, split_size=split, attend=attend(schedule))
            assert_bitwise_equal(out, full, f"chunks {sizes} ({schedule}) vs full pass, {dtype}")


def test_batch_invariance_with_garbage_beyond_lengths():
    assert batch_failures(attend()) == []


def test_batch_invariance_prefill_schedule():
    assert batch_failures(attend("prefill")) == []


def split_from_batch(q, k, v, seqlens, scale, split_size):
    """The kernel with the chunk size derived from the batch and the longest length, as split-KV
    kernels that pick a split count do (the tile config then follows S too)."""
    splits = max(1, 2 // q.shape[0])
    size = max(16, 1 << math.ceil(math.log2(max(1, math.ceil(int(seqlens.max()) / splits)))))
    return attend()(q, k, v, seqlens, scale, size)


def test_negative_control_batch_dependent_split_fails_the_batch_check():
    assert batch_failures(split_from_batch), "the batch check missed a batch-dependent split"


def test_negative_control_length_dependent_split_fails_the_consistency_check():
    q, k, v = qkv(1, 2, 3 * 16 + 5, 16, seed=7)
    full = split_from_batch(q, k, v, torch.tensor([q.shape[2]]), 0.25, 16)[0]
    pieces = chunked(q, k, v, [7], tmax=4 * 16, split_size=16, attend=split_from_batch)
    assert not bitwise_equal(pieces, full), "the consistency check missed a length-dependent split"


def test_garbage_beyond_length_is_never_read_and_strided_inputs():
    g = torch.Generator().manual_seed(2)
    q, k, v = qkv(2, 2, 21, 32, torch.bfloat16, seed=3)
    k_cache, v_cache = decode_cache(k, v, 48, g)
    lengths = torch.tensor([21, 21])
    ours = attend()(q[:, :, -3:], k_cache, v_cache, lengths, 0.2, 16)[0]
    assert torch.isfinite(ours.float()).all()
    full = attend()(q, k, v, lengths, 0.2, 16)[0]
    assert_bitwise_equal(ours, full[:, :, -3:], "decode against a garbage-filled cache vs full pass")
    # (B, T, H, D) storage viewed as (B, H, T, D): any strides, the same bits
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qs.is_contiguous()
    assert_bitwise_equal(attend()(qs, ks, vs, lengths, 0.2, 16)[0], full, "strided q, k, v")


def test_seqlens_on_the_cpu_give_the_same_bits():
    """KVCache keeps its lengths on the CPU (validating them costs no device sync), so the decode
    launcher takes CPU seqlens beside CUDA q, k, v (copying them over) as well as device ones."""
    g = torch.Generator().manual_seed(11)
    q, k, v = qkv(3, 2, 30, 64, torch.float16, seed=5)
    k_cache, v_cache = on_device(*decode_cache(k, v, 40, g))
    lengths = torch.tensor([30, 17, 1])
    q_last = on_device(q[:, :, -1:])[0]
    on_host = forward_kernels.causal_attention_forward(q_last, k_cache, v_cache, lengths, 0.125, 16)
    on_dev = forward_kernels.causal_attention_forward(q_last, k_cache, v_cache, lengths.to(DEVICE), 0.125, 16)
    for a, b, name in zip(on_host, on_dev, ("o", "m", "l")):
        assert_bitwise_equal(a, b, f"{name}: CPU seqlens vs seqlens on {DEVICE}")
    with pytest.raises(ValueError, match=r"seqlens must lie in \[Tq, Tmax\]"):
        forward_kernels.causal_attention_forward(q_last, k_cache, v_cache, torch.tensor([30, 41, 1]), 0.125, 16)


def test_empty_query_block():
    q, k, v = on_device(*qkv(2, 2, 0, 16))
    k, v = on_device(*qkv(2, 2, 5, 16)[1:])
    o, m, l = forward_kernels.causal_attention_forward(q, k, v, torch.tensor([3, 4], device=DEVICE), 0.25, 16)
    assert o.shape == (2, 2, 0, 16) and m.shape == l.shape == (2, 2, 0)


def same_non_finite(a, b):
    """NaN, +inf and -inf at the same places (tl.dot's order is the hardware's: the finite
    values are within tolerance only, the pattern is exact)."""
    a, b = a.float(), b.float()
    return all(torch.equal(f(a), f(b)) for f in (torch.isnan, torch.isposinf, torch.isneginf))


def test_unseen_keys_never_reach_a_query():
    """inf / NaN in a future k or v row: clean bits before it, full pass == decode == chunked
    prefill (NaN-aware), both schedules the same, and the spec's NaN / inf pattern."""
    assert forward_unseen_failures(attend(), poisons=FEW_POISONS) == []
    assert signed_zero_failures(attend()) == []
    for what, _, q, k, v, split in poisoned_problems(poisons=FEW_POISONS):
        prefill, split_kernels = full_pass(q, k, v, split, "prefill"), full_pass(q, k, v, split, "split")
        assert nan_aware_equal(prefill[0], split_kernels[0]), what
        ref = reference.causal_attention_forward(q, k, v, torch.tensor([q.shape[2]]), q.shape[-1] ** -0.5, split)
        assert same_non_finite(prefill[0], ref[0]), what


def test_backward_unseen_pairs_never_reach_a_gradient():
    """inf / NaN in a row of q, k, v or dO: untouched gradients where it is not seen, the spec's
    NaN / inf pattern everywhere."""
    def forward(q, k, v, seqlens, scale, split_size):
        return attend()(q, k, v, seqlens, scale, split_size)

    def backward(grad_o, q, k, v, m, l, scale, split_size):
        out = backward_kernels.causal_attention_backward(*on_device(grad_o, q, k, v, m, l), scale, split_size)
        return [t.cpu() for t in out]

    assert backward_unseen_failures(backward, forward, poisons=FEW_POISONS) == []
    for what, grad_o, q, k, v, split in poisoned_problems(poisons=FEW_POISONS):
        _, m, l = reference.causal_attention_forward(q, k, v, torch.tensor([q.shape[2]]), 0.25, split)
        ours = backward(grad_o, q, k, v, m, l, 0.25, split)
        for name, a, b in zip(("dq", "dk", "dv"), ours,
                              reference.causal_attention_backward(grad_o, q, k, v, m, l, 0.25, split)):
            assert same_non_finite(a, b), f"{what}: {name}"


@triton.jit
def _masked_dot_kernel(A, VALID, B, C, OUT, ANY_MASKED, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                       PLAIN: tl.constexpr):
    rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(A + rm[:, None] * K + rk[None, :])
    valid = tl.load(VALID + rm[:, None] * K + rk[None, :]) != 0
    b = tl.load(B + rk[:, None] * N + rn[None, :])
    c = tl.load(C + rm[:, None] * N + rn[None, :])
    if PLAIN:
        out = tl.dot(a, b, c, input_precision="ieee", out_dtype=tl.float32)
    else:
        out = forward_kernels.masked_dot(a, valid, b, c, tl.load(ANY_MASKED) != 0, "ieee")
    tl.store(OUT + rm[:, None] * N + rn[None, :], out)


def _masked_dot(a, valid, b, c, plain=False):
    out = torch.empty_like(c)
    any_masked = torch.tensor([int(not valid.all())], dtype=torch.int32)
    _masked_dot_kernel[(1,)](*on_device(a, valid.to(torch.int8), b, c, out, any_masked), *a.shape, b.shape[1],
                             PLAIN=plain)
    return out


def test_masked_dot_leaves_out_the_masked_pairs():
    """forward_kernels.masked_dot (the tl.dot path's P.V, and the backward's dots): c + the sum over
    the valid pairs only, with every IEEE case of a visible inf / NaN entry (p > 0, p < 0, p = 0,
    +inf and -inf together), against a float64 sum that skips the masked pairs; a plain tl.dot
    (the negative control) puts NaN where a masked pair meets an inf or NaN."""
    g = torch.Generator().manual_seed(0)
    m_, k_, n_ = 16, 32, 16
    a = torch.randn(m_, k_, generator=g)
    a[1, :] = -a[1, :].abs()  # a negative row (dS can be < 0)
    valid = torch.rand(m_, k_, generator=g) < 0.6
    valid[:, 0] = valid[2, 5] = True
    a = torch.where(valid, a, 0.0)
    a[2, 5] = 0.0  # a visible p = 0 meets b = +inf below: NaN
    b = torch.randn(k_, n_, generator=g)
    c = torch.randn(m_, n_, generator=g)
    for kk, nn, value in [(3, 0, float("nan")), (5, 1, float("inf")), (6, 1, float("-inf")), (7, 2, float("inf")),
                          (8, 3, float("-inf")), (9, 3, float("-inf")), (10, 4, float("nan"))]:
        b[kk, nn] = value
    exact = c.double().clone()
    for i in range(m_):
        for kk in range(k_):
            if valid[i, kk]:
                exact[i] += a[i, kk].double() * b[kk].double()
    ours = _masked_dot(a, valid, b, c)
    assert same_non_finite(ours, exact)
    assert torch.isnan(exact).any() and torch.isinf(exact).any() and torch.isfinite(exact[:, 5:]).all()
    finite = torch.isfinite(exact)
    torch.testing.assert_close(ours.double()[finite], exact[finite], rtol=1e-5, atol=1e-5)
    plain = _masked_dot(a, valid, b, c, plain=True)
    assert not same_non_finite(plain, exact), "the check missed 0 * inf in a plain tl.dot"
    # no masked pair: the plain dot's own arithmetic (visible inf / NaN entries included)
    all_valid = torch.ones_like(valid)
    assert nan_aware_equal(_masked_dot(a, all_valid, b, c), _masked_dot(a, all_valid, b, c, plain=True))


def _bad(**changes):
    q, k, v = qkv(2, 4, 8, 16, kv_heads=2)
    args = dict(q=q, k=k, v=v, seqlens=torch.tensor([8, 8]), scale=0.25, split_size=16)
    args.update(changes)
    return args


BAD_INPUTS = [
    (dict(q=torch.zeros(2, 4, 8)), ValueError, "q must be 4-D"),
    (dict(q=torch.zeros(2, 4, 8, 16, dtype=torch.float64)), TypeError, "float32, bfloat16 or float16"),
    (dict(k=torch.zeros(2, 2, 8, 16, dtype=torch.float16)), TypeError, "k must be float32|k and v must have"),
    (dict(q=torch.zeros(2, 4, 8, 24), k=torch.zeros(2, 2, 8, 24), v=torch.zeros(2, 2, 8, 24)), ValueError,
     "head dim must be one of"),
    (dict(k=torch.zeros(2, 2, 8, 32)), ValueError, "k and v must have one shape"),
    (dict(k=torch.zeros(2, 2, 8, 32), v=torch.zeros(2, 2, 8, 32)), ValueError, "head dim 32, expected q's head dim 16"),
    (dict(k=torch.zeros(2, 3, 8, 16), v=torch.zeros(2, 3, 8, 16)), ValueError, "multiple of k's heads"),
    (dict(k=torch.zeros(3, 2, 8, 16), v=torch.zeros(3, 2, 8, 16)), ValueError, "batch 3, expected q's batch 2"),
    (dict(k=torch.zeros(2, 2, 4, 16), v=torch.zeros(2, 2, 4, 16)), ValueError, "more than the cache"),
    (dict(seqlens=torch.tensor([8])), ValueError, r"seqlens must have shape \(2,\)"),
    (dict(seqlens=torch.tensor([8.0, 8.0])), TypeError, "seqlens must be int32 or int64"),
    (dict(seqlens=torch.tensor([8, 7])), ValueError, r"seqlens must lie in \[Tq, Tmax\] = \[8, 8\]"),
    (dict(seqlens=torch.tensor([8, 9])), ValueError, r"seqlens must lie in"),
    (dict(split_size=24), ValueError, "power of two >= 16"),
    (dict(split_size=8), ValueError, "power of two >= 16"),
    (dict(split_size=16.0), TypeError, "split size must be an int"),
    (dict(scale="0.25"), TypeError, "scale must be a float"),
    (dict(seqlens=[8, 8]), TypeError, "seqlens must be a torch.Tensor"),
]


@pytest.mark.parametrize("changes,error,match", BAD_INPUTS, ids=[m.split(" ")[0] + str(i) for i, (_, _, m) in
                                                                 enumerate(BAD_INPUTS)])
def test_bad_input_raises_a_clear_error(changes, error, match):
    args = _bad(**changes)
    args = {name: a.to(DEVICE) if isinstance(a, torch.Tensor) else a for name, a in args.items()}
    with pytest.raises(error, match=match):
        forward_kernels.causal_attention_forward(**args)


def test_bad_schedule_and_wrong_device():
    args = {name: a.to(DEVICE) if isinstance(a, torch.Tensor) else a for name, a in _bad().items()}
    with pytest.raises(ValueError, match="schedule must be"):
        forward_kernels.causal_attention_forward(**args, schedule="fast")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="seqlens is on meta"):
            forward_kernels.causal_attention_forward(**{**args, "seqlens": torch.tensor([8, 8], device="meta")})


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
SPLIT = 16
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]


def forward_backward(q, k, v, grad_o, split_size=SPLIT):
    """Triton forward (for o, m, l) then the Triton backward; CPU tensors in, CPU tensors out."""
    q, k, v, grad_o = (t.to(DEVICE) for t in (q, k, v, grad_o))
    scale = q.shape[-1] ** -0.5
    lengths = torch.full((q.shape[0],), q.shape[2], device=DEVICE)
    _, m, l = forward_kernels.causal_attention_forward(q, k, v, lengths, scale, split_size)
    return [t.cpu() for t in backward_kernels.causal_attention_backward(grad_o, q, k, v, m, l, scale, split_size)]


def sdpa_grads(q, k, v, grad_o, dtype):
    """(dq, dk, dv) of torch SDPA's autograd in `dtype`, GQA by repeat_interleave."""
    group = q.shape[1] // k.shape[1]
    q, k, v = (t.to(dtype).detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                         is_causal=True)
    out.backward(grad_o.to(dtype))
    return q.grad, k.grad, v.grad


def inputs(batch, heads, length, dim, dtype, kv_heads, seed=0):
    q, k, v = qkv(batch, heads, length, dim, dtype, kv_heads=kv_heads, seed=seed)
    return q, k, v, make(q.shape, dtype, seed + 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 53])
@pytest.mark.parametrize("dim,kv_heads", [(16, 1), (64, 2)], ids=["D16-gqa", "D64-mha"])
def test_backward_accuracy_against_float64_sdpa(dtype, length, dim, kv_heads):
    q, k, v, grad_o = inputs(1, 2, length, dim, dtype, kv_heads)
    ours = forward_backward(q, k, v, grad_o)
    eager = sdpa_grads(q, k, v, grad_o, dtype)
    exact = sdpa_grads(q.double(), k.double(), v.double(), grad_o.double(), torch.float64)
    for name, a, b, ref, like in zip(("dq", "dk", "dv"), ours, eager, exact, (q, k, v)):
        assert a.dtype == dtype and a.shape == like.shape and a.is_contiguous(), name
        what = f"triton attention backward {name} {dtype} T={length} D={dim} Hkv={kv_heads}"
        if length == 1 and name != "dv":
            # one key: P = 1, dS = dP - D = dP - P dP, so dq = dk = 0 exactly; the float64
            # reference is ~1e-17, a relative error means nothing: bound the absolute one
            tol = 2 * (b.double() - ref).norm().item() + 8 * torch.finfo(torch.float32).eps * (
                grad_o.double().norm() * v.double().norm() * max(q.double().norm(), k.double().norm())).item()
            assert (a.double() - ref).norm().item() <= tol, what
        else:
            assert_accuracy(a, b, ref, what)


@pytest.mark.parametrize("split_size", [32, 64])
def test_backward_accuracy_with_larger_split_sizes(split_size):
    """D sums its keys in blocks of split_size: several key tiles per block, a last block cut
    short (T = 53), or one block for all (S = 64 > T)."""
    q, k, v, grad_o = inputs(1, 2, 53, 16, torch.float32, kv_heads=1, seed=4)
    ours = forward_backward(q, k, v, grad_o, split_size=split_size)
    eager = sdpa_grads(q, k, v, grad_o, torch.float32)
    exact = sdpa_grads(q.double(), k.double(), v.double(), grad_o.double(), torch.float64)
    for name, a, b, ref in zip(("dq", "dk", "dv"), ours, eager, exact):
        assert_accuracy(a, b, ref, f"triton attention backward {name} S={split_size}")


def test_backward_group_heads_add_up_in_dk_dv():
    """GQA: a KV head's dk, dv equal the sum of what each of its query heads gives alone (to
    rounding) — each query head's contribution is computed with that head only, Hkv = H."""
    q, k, v, grad_o = inputs(1, 2, 37, 16, torch.float32, kv_heads=1, seed=5)
    _, dk, dv = forward_backward(q, k, v, grad_o)
    parts = [forward_backward(q[:, h:h + 1], k, v, grad_o[:, h:h + 1]) for h in range(2)]
    torch.testing.assert_close(dk, parts[0][1] + parts[1][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv, parts[0][2] + parts[1][2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_run_to_run_determinism(dtype):
    """The same inputs give the same bits, 5 runs (no atomics; fixed loop orders)."""
    q, k, v, grad_o = (t.to(DEVICE) for t in inputs(1, 2, 41, 16, dtype, kv_heads=1, seed=7))
    scale = 16 ** -0.5
    _, m, l = forward_kernels.causal_attention_forward(q, k, v, torch.full((1,), 41, device=DEVICE), scale, SPLIT)
    first = backward_kernels.causal_attention_backward(grad_o, q, k, v, m, l, scale, SPLIT)
    for run in range(5):
        again = backward_kernels.causal_attention_backward(grad_o, q, k, v, m, l, scale, SPLIT)
        for name, a, b in zip(("dq", "dk", "dv"), again, first):
            assert_bitwise_equal(a, b, f"{name} {dtype} run {run + 1}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_backward_batch_invariance(dtype):
    """A sequence's dq (and its dk, dv) alone == inside a batch of 3, at every position."""
    q, k, v, grad_o = inputs(3, 2, 29, 16, dtype, kv_heads=1, seed=11)
    batched = forward_backward(q, k, v, grad_o)
    for i in range(3):
        alone = forward_backward(q[i:i + 1], k[i:i + 1], v[i:i + 1], grad_o[i:i + 1])
        for name, a, b in zip(("dq", "dk", "dv"), alone, batched):
            assert_bitwise_equal(a[0], b[i], f"{name} {dtype} sequence {i} alone vs in a batch of 3")


def test_backward_batch_invariance_negative_control():
    """The same check on a plain PyTorch gradient that is not batch-invariant on CPU — dx = dy W of
    a float32 F.linear, whose bits change with the row count (a row alone vs 192 rows) (TOOLCHAIN.md) — fails: the check
    can fail."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(768, 768, generator=g)
    grad_y = torch.randn(3, 64, 768, generator=g)
    batched = F.linear(grad_y.reshape(-1, 768), w.t()).reshape(3, 64, 768)
    differs = [not torch.equal(F.linear(grad_y[i, :1], w.t()), batched[i, :1]) for i in range(3)]  # one row alone
    assert any(differs), "the negative control was batch-invariant: the check proves nothing here"


def test_backward_empty_and_strided_inputs():
    q, k, v, grad_o = inputs(1, 2, 0, 16, torch.float32, kv_heads=1)
    q, k, v, grad_o = (t.to(DEVICE) for t in (q, k, v, grad_o))
    m = torch.empty(1, 2, 0, device=DEVICE)
    dq, dk, dv = backward_kernels.causal_attention_backward(grad_o, q, k, v, m, m, 0.25, SPLIT)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    # (B, T, H, D) storage seen as (B, H, T, D): any strides are read as they are
    q, k, v, grad_o = inputs(1, 2, 19, 16, torch.float32, kv_heads=1, seed=2)
    contiguous = forward_backward(q, k, v, grad_o)
    strided = forward_backward(*(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, grad_o)))
    for name, a, b in zip(("dq", "dk", "dv"), strided, contiguous):
        assert_bitwise_equal(a, b, f"{name}: strided vs contiguous inputs")


def _good(dtype=torch.float32):
    q, k, v, grad_o = (t.to(DEVICE) for t in inputs(1, 2, 4, 16, dtype, kv_heads=1))
    m = torch.zeros(1, 2, 4, device=DEVICE)
    return dict(grad_o=grad_o, q=q, k=k, v=v, m=m, l=torch.ones_like(m), scale=0.25, split_size=SPLIT)


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(q=a["q"].double()), TypeError, "q must be float32"),
    (lambda a: a.update(grad_o=a["grad_o"].half()), TypeError, "grad_o must have q's dtype"),
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must be 4-D"),
    (lambda a: a.update(k=[1.0]), TypeError, "k must be a torch.Tensor"),
    (lambda a: a.update(grad_o=a["grad_o"][:, :, :3]), ValueError, "grad_o must have q's shape"),
    (lambda a: a.update(v=a["v"][:, :, :3]), ValueError, "k and v must have one shape"),
    (lambda a: a.update(k=a["k"][:, :, :3], v=a["v"][:, :, :3]), ValueError, "k has 3 keys"),
    (lambda a: a.update(**{n: torch.zeros(1, 2, 4, 24, device=DEVICE) for n in ("q", "k", "v", "grad_o")}),
     ValueError, "head dim must be one of"),
    (lambda a: a.update(k=torch.cat([a["k"]] * 3, 1), v=torch.cat([a["v"]] * 3, 1)), ValueError,
     "must be a multiple of k's heads"),
    (lambda a: a.update(m=a["m"].double()), TypeError, "m must be float32"),
    (lambda a: a.update(l=a["l"][:, :1]), ValueError, r"l must have shape \(1, 2, 4\)"),
    (lambda a: a.update(scale="0.25"), TypeError, "scale must be a float"),
    (lambda a: a.update(split_size=24), ValueError, "split size must be a power of two"),
    (lambda a: a.update(split_size=16.0), TypeError, "split size must be an int"),
])
def test_backward_bad_input_errors(change, error, match):
    args = _good()
    change(args)
    with pytest.raises(error, match=match):
        backward_kernels.causal_attention_backward(**args)


@pytest.mark.skipif(not INTERPRETED, reason="the device check is tested with the interpreter on CPU")
def test_backward_device_mismatch_error():
    args = _good()
    args["m"] = args["m"].to("meta")
    with pytest.raises(ValueError, match="m is on meta"):
        backward_kernels.causal_attention_backward(**args)
