"""The Triton attention forward (fusedtx.kernels.causal_attention), run by the interpreter on CPU.

Accuracy against float64 SDPA; bitwise: full causal pass == chunked prefill == token-by-token
decode against a KV cache with garbage beyond the length, on both schedules (in-kernel merge and
split + merge kernel); batch invariance; negative controls that make the same checks fail; bad
input errors. Sizes are small: the interpreter costs ~0.1 s per launch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from fusedtx.kernels import INTERPRETED  # noqa: E402
from fusedtx.kernels import causal_attention as kernels  # noqa: E402
from helpers import assert_accuracy, assert_bitwise_equal, bitwise_equal  # noqa: E402
from test_causal_attention import batch_failures, chunked, decode_cache, qkv  # noqa: E402

# masked lanes compute exp(-inf - -inf) etc. before tl.where drops them: numpy warns
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICE = "cpu" if INTERPRETED else "cuda"


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def attend(schedule="auto"):
    """kernels.causal_attention_forward with the reference's signature (CPU tensors in, CPU tensors out)."""
    def run(q, k, v, seqlens, scale, split_size):
        q, k, v, seqlens = on_device(q, k, v, seqlens)
        return [t.cpu() for t in kernels.causal_attention_forward(q, k, v, seqlens, scale, split_size, schedule=schedule)]
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
    on_host = kernels.causal_attention_forward(q_last, k_cache, v_cache, lengths, 0.125, 16)
    on_dev = kernels.causal_attention_forward(q_last, k_cache, v_cache, lengths.to(DEVICE), 0.125, 16)
    for a, b, name in zip(on_host, on_dev, ("o", "m", "l")):
        assert_bitwise_equal(a, b, f"{name}: CPU seqlens vs seqlens on {DEVICE}")
    with pytest.raises(ValueError, match=r"seqlens must lie in \[Tq, Tmax\]"):
        kernels.causal_attention_forward(q_last, k_cache, v_cache, torch.tensor([30, 41, 1]), 0.125, 16)


def test_empty_query_block():
    q, k, v = on_device(*qkv(2, 2, 0, 16))
    k, v = on_device(*qkv(2, 2, 5, 16)[1:])
    o, m, l = kernels.causal_attention_forward(q, k, v, torch.tensor([3, 4], device=DEVICE), 0.25, 16)
    assert o.shape == (2, 2, 0, 16) and m.shape == l.shape == (2, 2, 0)


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
        kernels.causal_attention_forward(**args)


def test_bad_schedule_and_wrong_device():
    args = {name: a.to(DEVICE) if isinstance(a, torch.Tensor) else a for name, a in _bad().items()}
    with pytest.raises(ValueError, match="schedule must be"):
        kernels.causal_attention_forward(**args, schedule="fast")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="seqlens is on meta"):
            kernels.causal_attention_forward(**{**args, "seqlens": torch.tensor([8, 8], device="meta")})
