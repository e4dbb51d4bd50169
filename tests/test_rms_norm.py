"""fusedtx.rms_norm / fusedtx.nn.RMSNorm on every backend: accuracy of the output and of every
gradient (against torch and HF's LlamaRMSNorm), gradcheck, batch invariance, determinism,
thread-count invariance, reference parity, the drop-in test, errors, opcheck and torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedtx
from fusedtx import policy, reference
from fusedtx.ops import rms_norm as rms_norm_op
from helpers import assert_accuracy, assert_bitwise_equal, assert_compiled_grads_equal, assert_drop_in, repeats
from helpers import require_parity_case, assert_runs_equal, bitwise_equal, DEVICE_BACKENDS, garbage_like, grads_of, make, NORM_DTYPE_IDS
from helpers import NORM_DTYPE_PAIRS, poisoned_outputs, record_bitexact, rel_error, require, row_invariance_failures
from helpers import NormBlock, scattered_row_sum, under_each_thread_count


# (x shape, normalized_shape, affine): odd widths, multi-dim normalized shapes, no weight
CASES = [
    ((4, 1), (1,), True),
    ((3, 7), (7,), True),
    ((2, 5, 768), (768,), True),
    ((2, 3, 4, 10), (4, 10), True),
    ((5, 130), (130,), False),
    ((0, 64), (64,), True),
    ((131, 64), (64,), True),  # row groups of 2: 66 hold rows (the last one row), the last 62 are empty
]
CASE_IDS = ["N1", "N7", "N768", "2d-shape", "no-weight", "0rows", "131rows"]


def make_weight(normalized_shape, dtype, device, seed=10):
    return make(normalized_shape, dtype, device, seed, 0.5, 1.0)


def ours_fn(normalized_shape, backend, eps=None):
    return lambda a, w: fusedtx.rms_norm(a, normalized_shape, w, eps, backend=backend)


def torch_fn(normalized_shape, eps=None):
    """F.rms_norm with its output in x's dtype: beside a float32 weight torch promotes the output
    to float32, which would hold fusedtx's bfloat16 / float16 output to a float32 error."""
    return lambda a, w: F.rms_norm(a, normalized_shape, w, eps).to(a.dtype)


# ---------------------------------------------------------------------------------------------
# accuracy (contract point 1), gradcheck
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtypes", NORM_DTYPE_PAIRS, ids=NORM_DTYPE_IDS)
# Not N = 1: there dx is g (1 - xhat^2) rstd with xhat^2 = x^2 / (x^2 + eps), 1 - xhat^2 ~ eps / x^2,
# below float32's rounding of xhat: every float32 formula gives rounding noise (torch's too).
@pytest.mark.parametrize("shape,normalized_shape,affine", CASES[1:], ids=CASE_IDS[1:])
def test_accuracy_output_and_gradients(device, backend, dtypes, shape, normalized_shape, affine):
    require(device, backend)
    x_dtype, w_dtype = dtypes
    x = make(shape, x_dtype, device)
    weight = make_weight(normalized_shape, w_dtype, device) if affine else None
    dy = make(shape, x_dtype, device, seed=3, scale=1.0, shift=0.0)
    eps = torch.finfo(torch.float32).eps  # torch's default; float64 below must use the same
    with poisoned_outputs():
        ours = grads_of(ours_fn(normalized_shape, backend), x, weight, dy)
    eager = grads_of(torch_fn(normalized_shape), x, weight, dy)
    exact = grads_of(torch_fn(normalized_shape, eps), x.double(), None if weight is None else weight.double(), dy.double())
    assert ours[0].dtype == x_dtype and ours[0].shape == x.shape
    for i, name in enumerate(["y", "dx", "dweight"][: len(ours)]):
        if i == 2:
            assert ours[i].dtype == weight.dtype and ours[i].shape == weight.shape
        if x.numel():
            assert_accuracy(ours[i], eager[i], exact[i], f"{backend} {name}", slack=slack(i, x, dy, exact, eps))


def slack(i, x, dy, exact, eps):
    """The allowance of docs/design.md's accuracy rule where terms cancel: 2 sqrt(K) float32 ulps
    of the magnitude of the K row terms dy * xhat that each dweight element sums, relative to the
    result (dweight of random-sign dy sums terms that cancel; torch's pairwise sum is more
    accurate than the fixed row-group order there). None for y and dx."""
    if i != 2:
        return 0.0
    x64 = x.double().reshape(-1, exact[2].numel())
    terms = dy.double().reshape(x64.shape) * x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps)
    ulps = 2 * x64.shape[0] ** 0.5 * torch.finfo(torch.float32).eps * terms.abs().sum(0).norm().item()
    return ulps / exact[2].norm().item()


def llama_rms_norm(x, weight, eps):
    """HF transformers' LlamaRMSNorm.forward: the normalised x is rounded to x's dtype before the
    weight multiply (fusedtx rounds once, after it)."""
    xf = x.float()
    hidden = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=["bf16-weight", "f32-weight"])
def test_bf16_accuracy_against_hf_llama_and_torch(device, backend, w_dtype):
    """In bfloat16 the one rounding at the end is no worse than 2x the error of HF's two roundings
    (their output: HF's promotes to float32 beside a float32 weight) nor of torch's."""
    require(device, backend)
    x = make((16, 512), torch.bfloat16, device, seed=4, scale=3.0, shift=0.0)
    w = make_weight((512,), w_dtype, device)
    exact = F.rms_norm(x.double(), (512,), w.double(), 1e-6)
    ours = rel_error(fusedtx.rms_norm(x, 512, w, 1e-6, backend=backend), exact)
    for name, theirs in (("HF", llama_rms_norm(x, w, 1e-6)), ("torch", F.rms_norm(x, (512,), w, 1e-6))):
        assert ours <= 2 * rel_error(theirs, exact), f"{backend}: error {ours:.3e} vs {name}'s {rel_error(theirs, exact):.3e}"


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_gradcheck_float64(backend):
    require("cpu", backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 9, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, 9, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fusedtx.rms_norm(a, (2, 9), b, 1e-5, backend=backend), (x, w))
    assert torch.autograd.gradcheck(lambda a: fusedtx.rms_norm(a, 9, backend=backend), (x,))


def test_eps_default_is_torch_default():
    """eps None: torch.rms_norm takes the epsilon of the compute dtype (float32's for bfloat16 x,
    not bfloat16's 2**-7), which matters for rows of small magnitude."""
    x = torch.full((2, 8), 1e-4, dtype=torch.bfloat16)
    torch.testing.assert_close(fusedtx.rms_norm(x, 8), F.rms_norm(x, (8,)), rtol=0, atol=0)
    x64 = torch.full((2, 8), 1e-9, dtype=torch.float64)
    torch.testing.assert_close(fusedtx.rms_norm(x64, 8), F.rms_norm(x64, (8,)))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_wide_rows(device, backend):
    """Hidden sizes past Triton's block take the looped paths and still match the reference."""
    require(device, backend)
    n = 16385 if backend == "triton" and device == "cpu" else 65537
    x, dy = make((3, n), torch.float32, device), make((3, n), torch.float32, device, seed=1)
    w = make_weight((n,), torch.float32, device)
    y, rstd = rms_norm_op.rms_norm.impl(x, (n,), w, 1e-5, backend)
    dx, dw = torch.ops.fusedtx.rms_norm_backward(dy, x, rstd, w, True, backend)
    lanes = policy.row_lanes(backend, n, x.device)
    y_ref, rstd_ref = reference.rms_norm_forward(x, w, 1e-5, lanes)
    dx_ref, dw_ref = reference.rms_norm_backward(dy, x, rstd_ref, w, True, lanes, policy.ROW_GROUPS)
    for ours, ref, name in zip((y, rstd, dx, dw), (y_ref, rstd_ref, dx_ref, dw_ref), ("y", "rstd", "dx", "dweight")):
        assert_bitwise_equal(ours, ref, f"N={n} {name}")
    assert_accuracy(y, F.rms_norm(x, (n,), w, 1e-5), F.rms_norm(x.double(), (n,), w.double(), 1e-5), f"N={n}")


# ---------------------------------------------------------------------------------------------
# reference parity (point 6)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtypes", NORM_DTYPE_PAIRS + [(torch.float64, torch.float64)], ids=NORM_DTYPE_IDS + ["f64"])
@pytest.mark.parametrize("shape,normalized_shape,affine", CASES, ids=CASE_IDS)
def test_bitwise_equal_to_reference(device, backend, dtypes, shape, normalized_shape, affine):
    x_dtype, w_dtype = dtypes
    require_parity_case(device, backend, x_dtype)
    x = make(shape, x_dtype, device)
    dy = make(shape, x_dtype, device, seed=3, scale=1.0, shift=0.0)
    weight = make_weight(normalized_shape, w_dtype, device) if affine else None
    with poisoned_outputs():
        y, rstd = rms_norm_op.rms_norm.impl(x, normalized_shape, weight, 1e-5, backend)
        dx, dw = torch.ops.fusedtx.rms_norm_backward(dy, x, rstd, weight, True, backend)
    n = torch.Size(normalized_shape).numel()
    rows = lambda t: t.reshape(-1, n)  # noqa: E731
    w_flat = None if weight is None else weight.reshape(-1)
    lanes = policy.row_lanes(backend, n, x.device)
    y_ref, rstd_ref = reference.rms_norm_forward(rows(x), w_flat, 1e-5, lanes)
    dx_ref, dw_ref = reference.rms_norm_backward(rows(dy), rows(x), rstd_ref, w_flat, True, lanes, policy.ROW_GROUPS)
    pairs = [(y, y_ref.view(x.shape)), (rstd.reshape(-1), rstd_ref), (dx, dx_ref.view(x.shape)), (dw, dw_ref)]
    record_bitexact("rms_norm", device, backend, x_dtype if x_dtype == w_dtype else f"{x_dtype}+f32",
                    all(bitwise_equal(a, b) for a, b in pairs))
    for (ours, ref), name in zip(pairs, ("y", "rstd", "dx", "dweight")):
        assert_bitwise_equal(ours, ref, f"{backend} {name} vs reference (lanes={lanes})")


# ---------------------------------------------------------------------------------------------
# batch invariance (point 2), determinism and thread counts (point 5), with negative controls
# ---------------------------------------------------------------------------------------------
def matmul_rms_norm(x, weight):
    """An RMSNorm whose mean square is a matvec (`x^2 @ ones / N`): PyTorch's CPU matmul blocks by
    the batch size, so this is NOT batch-invariant. The negative control. (Non-finite garbage
    is zeroed first: with it the matvec happened to take a batch-invariant path; the probe row
    is finite and unchanged by that.)"""
    n = x.shape[-1]
    ones = torch.linspace(1.0, 1.0 + 1e-3, n, dtype=torch.float32, device=x.device)[:, None]
    xf = torch.nan_to_num(x.float(), posinf=0.0, neginf=0.0)
    return (xf * torch.rsqrt((xf * xf) @ ones / n) * weight).to(x.dtype)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_batch_invariance_of_output(device, backend, dtype):
    require(device, backend)
    weight = make_weight((768,), dtype, device)
    assert row_invariance_failures(lambda x: fusedtx.rms_norm(x, 768, weight, backend=backend), 768, dtype, device) == []


def test_negative_control_batch_invariance():
    weight = make_weight((768,), torch.float32, "cpu")
    assert row_invariance_failures(lambda x: matmul_rms_norm(x, weight), 768, torch.float32, "cpu"), \
        "the check missed a batch-variant RMSNorm"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_batch_invariance_of_input_gradient(device, backend):
    require(device, backend)
    n = 300
    weight = make_weight((n,), torch.float32, device)
    probe_x, probe_dy = make((1, n), torch.float32, device, seed=1), make((1, n), torch.float32, device, seed=2)

    def dx_of(x, dy):
        x = x.clone().requires_grad_()
        return torch.autograd.grad(fusedtx.rms_norm(x, n, weight, backend=backend), x, dy)[0]

    alone = dx_of(probe_x, probe_dy)
    g = torch.Generator().manual_seed(6)
    for batch, index in ((2, 1), (9, 0), (130, 77)):
        x, dy = (garbage_like(torch.empty(batch, n, device=device), g) for _ in range(2))
        x[index], dy[index] = probe_x[0], probe_dy[0]
        assert_bitwise_equal(dx_of(x, dy)[index : index + 1], alone, f"dx of row {index} in a batch of {batch}")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gradients_bitwise_run_to_run(device, backend):
    require(device, backend)
    # 201 rows: groups of two rows in the weight-gradient sums (the interpreter gets 15, for time)
    shape = (5, 3, 96) if backend == "triton" and device == "cpu" else (67, 3, 96)
    x = make(shape, torch.bfloat16, device)
    dy = make(shape, torch.bfloat16, device, seed=1, scale=1.0, shift=0.0)
    weight = make_weight((96,), torch.float32, device)
    runs = [grads_of(ours_fn(96, backend), x, weight, dy) for _ in range(repeats(device, backend))]
    assert_runs_equal(runs, ("y", "dx", "dweight"), "repeated")


def test_negative_control_run_to_run():
    x, dy = make((200, 64), torch.float32, "cpu"), make((200, 64), torch.float32, "cpu", seed=1)
    xhat = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5)
    g = torch.Generator().manual_seed(0)
    runs = [scattered_row_sum(dy * xhat, g) for _ in range(20)]
    assert any(not bitwise_equal(run, runs[0]) for run in runs[1:]), "the repeat check missed an order-dependent sum"


def thread_runs(fn):
    x, dy = make((4096, 768), torch.float32, "cpu"), make((4096, 768), torch.float32, "cpu", seed=1)
    weight = make_weight((768,), torch.float32, "cpu")
    return under_each_thread_count(lambda: grads_of(fn, x, weight, dy))


def test_native_thread_count_invariance():
    require("cpu", "native")
    runs = thread_runs(ours_fn(768, "native"))
    assert_runs_equal(runs, ("y", "dx", "dweight"), "1 vs 2 vs 3 threads")


def per_thread_partials_rms_norm(x, weight):
    """An RMSNorm whose weight gradient adds one partial per thread (rows cut into
    torch.get_num_threads() chunks), as a kernel that splits rows by thread count would: the
    negative control. (torch's own RMSNorm reduces dweight column by column, thread-invariant.)"""
    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, w):
            ctx.save_for_backward(a, w)
            return F.rms_norm(a, (a.shape[-1],), w)

        @staticmethod
        def backward(ctx, dy):  # dweight only (dx: a stand-in, the check compares dweight)
            a, w = ctx.saved_tensors
            xhat = a * torch.rsqrt(a.square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
            return dy.clone(), sum(chunk.sum(0) for chunk in (dy * xhat).chunk(torch.get_num_threads()))

    return Function.apply(x, weight)


def test_negative_control_thread_count():
    """The same check flags a weight gradient summed in per-thread partials."""
    runs = thread_runs(lambda a, w: per_thread_partials_rms_norm(a, w))
    assert any(not bitwise_equal(run[2], runs[0][2]) for run in runs[1:]), "thread check missed per-thread partials"


# ---------------------------------------------------------------------------------------------
# the module: a drop-in for torch.nn.RMSNorm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_drop_in_module(device, backend):
    require(device, backend)
    torch.manual_seed(0)
    second, final = {"eps": 1e-6}, {"elementwise_affine": False}
    ref = NormBlock(torch.nn.RMSNorm, second, final).to(device)
    ours = NormBlock(lambda *a, **k: fusedtx.nn.RMSNorm(*a, **k, backend=backend), second, final).to(device)
    assert_drop_in(ours, ref, make((4, 3, 48), torch.float32, device))
    m = fusedtx.nn.RMSNorm(16, elementwise_affine=False)
    assert m.weight is None and isinstance(m, torch.nn.RMSNorm) and m.eps is None
    assert repr(m) == repr(torch.nn.RMSNorm(16, elementwise_affine=False))


# ---------------------------------------------------------------------------------------------
# errors (point 7), torch.library integration
# ---------------------------------------------------------------------------------------------
def test_bad_input_errors():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match=r"rms_norm: normalized_shape \[7\] must match the trailing dims of x.*\[4, 8\]"):
        fusedtx.rms_norm(x, 7)
    with pytest.raises(TypeError, match="rms_norm: normalized_shape must be an int or a sequence of ints"):
        fusedtx.rms_norm(x, 8.0)
    with pytest.raises(ValueError, match=r"rms_norm: weight must have shape \[8\].*\[9\]"):
        fusedtx.rms_norm(x, 8, torch.randn(9))
    with pytest.raises(ValueError, match="rms_norm: weight is on meta but x is on cpu"):
        fusedtx.rms_norm(x, 8, w.to("meta"))
    with pytest.raises(TypeError, match="rms_norm: weight must be torch.float32 for torch.float32 x, got torch.bfloat16"):
        fusedtx.rms_norm(x, 8, w.bfloat16())
    with pytest.raises(TypeError, match=r"rms_norm: weight must be torch.bfloat16 or torch.float32 for .*float16"):
        fusedtx.rms_norm(x.bfloat16(), 8, w.half())
    with pytest.raises(TypeError, match="rms_norm: weight must be a torch.Tensor or None, got list"):
        fusedtx.rms_norm(x, 8, [1.0] * 8)
    with pytest.raises(TypeError, match="rms_norm: x must be float32, float16, bfloat16 or float64.*int32"):
        fusedtx.rms_norm(torch.ones(4, 8, dtype=torch.int32), 8)
    for eps in (-1e-5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rms_norm: eps must be a finite number >= 0"):
            fusedtx.rms_norm(x, 8, eps=eps)
    with pytest.raises(TypeError, match="rms_norm: eps must be a real number"):
        fusedtx.rms_norm(x, 8, eps="1e-5")
    with pytest.raises(TypeError, match="triton backend computes in float32"):
        fusedtx.rms_norm(x.double(), 8, backend="triton")
    with pytest.raises(ValueError, match="rms_norm: normalized_shape must be non-empty"):
        fusedtx.rms_norm(torch.randn(4, 0), 0)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    require(device, backend)
    x = make((3, 5, 24), torch.float32, device).requires_grad_()
    w = make_weight((24,), torch.float32, device).requires_grad_()
    torch.library.opcheck(torch.ops.fusedtx.rms_norm.default, (x, [24], w, 1e-5, backend))
    torch.library.opcheck(torch.ops.fusedtx.rms_norm.default, (x, [5, 24], None, 1e-3, backend))
    y, rstd = rms_norm_op.rms_norm.impl(x.detach(), (24,), w.detach(), 1e-5, backend)
    torch.library.opcheck(torch.ops.fusedtx.rms_norm_backward.default,
                          (torch.randn_like(y), x.detach(), rstd, w.detach(), True, backend))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    require(device, backend)
    m = fusedtx.nn.RMSNorm(24, backend=backend).to(device)
    assert_compiled_grads_equal(lambda x: m(x * 2.0).square().sum(), make((4, 24), torch.float32, device).requires_grad_(),
                                  (m.weight,))


def test_torch_compile_inductor():
    require("cpu", "native")
    torch._dynamo.reset()
    x = make((8, 32), torch.float32, "cpu")
    w = make_weight((32,), torch.float32, "cpu")
    compiled = torch.compile(lambda t: fusedtx.rms_norm(t, 32, w) * 2.0, fullgraph=True)
    assert_bitwise_equal(compiled(x), fusedtx.rms_norm(x, 32, w) * 2.0, "inductor")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_eps_zero_is_accepted_as_torch_accepts_it(device, backend):
    """eps = 0 computes what torch.nn.functional.rms_norm does: a zero row is NaN (0 * inf)."""
    require(device, backend)
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(4)).to(device)
    x[5] = 0.0
    y = fusedtx.rms_norm(x, 40, eps=0.0, backend=backend)
    eager = F.rms_norm(x, (40,), eps=0.0)
    assert_accuracy(y[:5], eager[:5], F.rms_norm(x[:5].double(), (40,), eps=0.0), "eps=0")
    assert torch.isnan(y[5]).all() and torch.isnan(eager[5]).all()
