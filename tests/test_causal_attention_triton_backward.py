"""The Triton attention backward (fusedtx.kernels.causal_attention_backward), run by the interpreter on CPU.

Accuracy of dq, dk, dv against float64 SDPA autograd (GQA expanded for SDPA), bitwise run-to-run
determinism, batch invariance of dq, dk, dv (a sequence alone vs inside a batch of 3), bad input
errors. Sizes are small: the interpreter costs ~0.1 s per launch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from fusedtx.kernels import INTERPRETED  # noqa: E402
from fusedtx.kernels import causal_attention as forward_kernels  # noqa: E402
from fusedtx.kernels import causal_attention_backward as kernels  # noqa: E402
from helpers import assert_accuracy, assert_bitwise_equal, rel_error  # noqa: E402
from test_causal_attention import make, qkv  # noqa: E402

# masked lanes compute exp(-inf - -inf) etc. before tl.where drops them: numpy warns
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICE = "cpu" if INTERPRETED else "cuda"
SPLIT = 16
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]


def forward_backward(q, k, v, grad_o, split_size=SPLIT):
    """Triton forward (for o, m, l) then the Triton backward; CPU tensors in, CPU tensors out."""
    q, k, v, grad_o = (t.to(DEVICE) for t in (q, k, v, grad_o))
    scale = q.shape[-1] ** -0.5
    lengths = torch.full((q.shape[0],), q.shape[2], device=DEVICE)
    _, m, l = forward_kernels.causal_attention_forward(q, k, v, lengths, scale, split_size)
    return [t.cpu() for t in kernels.causal_attention_backward(grad_o, q, k, v, m, l, scale, split_size)]


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
def test_accuracy_against_float64_sdpa(dtype, length, dim, kv_heads):
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
def test_accuracy_with_larger_split_sizes(split_size):
    """D sums its keys in blocks of split_size: several key tiles per block, a last block cut
    short (T = 53), or one block for all (S = 64 > T)."""
    q, k, v, grad_o = inputs(1, 2, 53, 16, torch.float32, kv_heads=1, seed=4)
    ours = forward_backward(q, k, v, grad_o, split_size=split_size)
    eager = sdpa_grads(q, k, v, grad_o, torch.float32)
    exact = sdpa_grads(q.double(), k.double(), v.double(), grad_o.double(), torch.float64)
    for name, a, b, ref in zip(("dq", "dk", "dv"), ours, eager, exact):
        assert_accuracy(a, b, ref, f"triton attention backward {name} S={split_size}")


def test_group_heads_add_up_in_dk_dv():
    """GQA: a KV head's dk, dv equal the sum of what each of its query heads gives alone (to
    rounding) — each query head's contribution is computed with that head only, Hkv = H."""
    q, k, v, grad_o = inputs(1, 2, 37, 16, torch.float32, kv_heads=1, seed=5)
    _, dk, dv = forward_backward(q, k, v, grad_o)
    parts = [forward_backward(q[:, h:h + 1], k, v, grad_o[:, h:h + 1]) for h in range(2)]
    torch.testing.assert_close(dk, parts[0][1] + parts[1][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv, parts[0][2] + parts[1][2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_run_to_run_determinism(dtype):
    """The same inputs give the same bits, 5 runs (no atomics; fixed loop orders)."""
    q, k, v, grad_o = (t.to(DEVICE) for t in inputs(1, 2, 41, 16, dtype, kv_heads=1, seed=7))
    scale = 16 ** -0.5
    _, m, l = forward_kernels.causal_attention_forward(q, k, v, torch.full((1,), 41, device=DEVICE), scale, SPLIT)
    first = kernels.causal_attention_backward(grad_o, q, k, v, m, l, scale, SPLIT)
    for run in range(5):
        again = kernels.causal_attention_backward(grad_o, q, k, v, m, l, scale, SPLIT)
        for name, a, b in zip(("dq", "dk", "dv"), again, first):
            assert_bitwise_equal(a, b, f"{name} {dtype} run {run + 1}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_batch_invariance(dtype):
    """A sequence's dq (and its dk, dv) alone == inside a batch of 3, at every position."""
    q, k, v, grad_o = inputs(3, 2, 29, 16, dtype, kv_heads=1, seed=11)
    batched = forward_backward(q, k, v, grad_o)
    for i in range(3):
        alone = forward_backward(q[i:i + 1], k[i:i + 1], v[i:i + 1], grad_o[i:i + 1])
        for name, a, b in zip(("dq", "dk", "dv"), alone, batched):
            assert_bitwise_equal(a[0], b[i], f"{name} {dtype} sequence {i} alone vs in a batch of 3")


def test_batch_invariance_negative_control():
    """The same check on a plain PyTorch gradient that is not batch-invariant on CPU — dx = dy W of
    a float32 F.linear, whose bits change with the row count (a row alone vs 192 rows) (TOOLCHAIN.md) — fails: the check
    can fail."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(768, 768, generator=g)
    grad_y = torch.randn(3, 64, 768, generator=g)
    batched = F.linear(grad_y.reshape(-1, 768), w.t()).reshape(3, 64, 768)
    differs = [not torch.equal(F.linear(grad_y[i, :1], w.t()), batched[i, :1]) for i in range(3)]  # one row alone
    assert any(differs), "the negative control was batch-invariant: the check proves nothing here"


def test_empty_and_strided_inputs():
    q, k, v, grad_o = inputs(1, 2, 0, 16, torch.float32, kv_heads=1)
    q, k, v, grad_o = (t.to(DEVICE) for t in (q, k, v, grad_o))
    m = torch.empty(1, 2, 0, device=DEVICE)
    dq, dk, dv = kernels.causal_attention_backward(grad_o, q, k, v, m, m, 0.25, SPLIT)
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
def test_bad_input_errors(change, error, match):
    args = _good()
    change(args)
    with pytest.raises(error, match=match):
        kernels.causal_attention_backward(**args)


@pytest.mark.skipif(not INTERPRETED, reason="the device check is tested with the interpreter on CPU")
def test_device_mismatch_error():
    args = _good()
    args["m"] = args["m"].to("meta")
    with pytest.raises(ValueError, match="m is on meta"):
        kernels.causal_attention_backward(**args)
