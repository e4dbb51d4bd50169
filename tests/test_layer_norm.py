"""fusedtx.layer_norm / fusedtx.nn.LayerNorm on every backend: accuracy of the output and of every
gradient, gradcheck, batch invariance, determinism, thread-count invariance, reference parity,
the drop-in test, errors, opcheck and torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusedtx import policy
import fusedtx
from fusedtx import reference
from fusedtx.ops import layer_norm as layer_norm_op
from helpers import assert_accuracy, assert_bitwise_equal, assert_compiled_grads_equal, assert_drop_in, repeats
from helpers import require_parity_case, assert_runs_equal, bitwise_equal, DEVICE_BACKENDS, grads_of, make, NORM_DTYPE_IDS
from helpers import NORM_DTYPE_PAIRS, poisoned_outputs, record_bitexact, rel_error, require, row_invariance_failures
from helpers import NormBlock, scattered_row_sum, under_each_thread_count


# (x shape, normalized_shape, affine): odd widths, multi-dim normalized shapes, no affine
CASES = [
    ((4, 1), (1,), "both"),
    ((3, 7), (7,), "both"),
    ((2, 5, 768), (768,), "both"),
    ((3, 1000), (1000,), "weight"),
    ((2, 3, 4, 10), (4, 10), "both"),
    ((5, 130), (130,), "none"),
    ((0, 64), (64,), "both"),
    ((131, 64), (64,), "both"),  # row groups of 2: 66 hold rows (the last one row), the last 62 are empty
]
CASE_IDS = ["N1", "N7", "N768", "N1000-noBias", "2d-shape", "no-affine", "0rows", "131rows"]


def make_params(normalized_shape, affine, dtype, device, seed=10):
    weight = make(normalized_shape, dtype, device, seed, 0.5, 1.0) if affine in ("both", "weight") else None
    bias = make(normalized_shape, dtype, device, seed + 1, 0.5, 0.0) if affine == "both" else None
    return weight, bias


# ---------------------------------------------------------------------------------------------
# accuracy (contract point 1), gradcheck
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtypes", NORM_DTYPE_PAIRS, ids=NORM_DTYPE_IDS)
@pytest.mark.parametrize("shape,normalized_shape,affine", CASES, ids=CASE_IDS)
def test_accuracy_output_and_gradients(device, backend, dtypes, shape, normalized_shape, affine):
    require(device, backend)
    x_dtype, p_dtype = dtypes
    x = make(shape, x_dtype, device)
    weight, bias = make_params(normalized_shape, affine, p_dtype, device)
    dy = make(shape, x_dtype, device, seed=3, scale=1.0, shift=0.0)

    with poisoned_outputs():
        ours = grads_of(lambda a, w, b: fusedtx.layer_norm(a, normalized_shape, w, b, backend=backend), x, weight, bias, dy)
    eager = grads_of(lambda a, w, b: F.layer_norm(a, normalized_shape, w, b), x, weight, bias, dy)
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    exact = grads_of(lambda a, w, b: F.layer_norm(a, normalized_shape, w, b), as64(x), as64(weight), as64(bias), dy.double())
    assert ours[0].dtype == x_dtype and ours[0].shape == x.shape
    for i, name in enumerate(["y", "dx", "dweight", "dbias"][: len(ours)]):
        if i >= 2:
            param = [p for p in (weight, bias) if p is not None][i - 2]
            assert ours[i].dtype == param.dtype and ours[i].shape == param.shape
        if x.numel():
            assert_accuracy(ours[i], eager[i], exact[i], f"{backend} {name}")


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_gradcheck_float64(backend):
    require("cpu", backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 9, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, 9, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(2, 9, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: fusedtx.layer_norm(a[0], (2, 9), a[1], a[2], backend=backend), (x, w, b))
    assert torch.autograd.gradcheck(lambda a: fusedtx.layer_norm(a, 9, backend=backend), (x,))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_wide_rows(device, backend):
    """Hidden sizes up to 65,536 and beyond take the looped paths and still match the reference."""
    require(device, backend)
    n = 65537
    x, dy = make((3, n), torch.float32, device), make((3, n), torch.float32, device, seed=1)
    w, b = make_params((n,), "both", torch.float32, device)
    y, mean, rstd = layer_norm_op.layer_norm.impl(x, (n,), w, b, 1e-5, backend)
    dx, dw, db = torch.ops.fusedtx.layer_norm_backward(dy, x, mean, rstd, w, True, backend)
    lanes = policy.row_lanes(backend, n, x.device)
    y_ref, mean_ref, rstd_ref = reference.layer_norm_forward(x, w, b, 1e-5, lanes)
    for ours, ref in zip((y, mean, rstd, dx, dw, db),
                         (y_ref, mean_ref, rstd_ref, *reference.layer_norm_backward(dy, x, mean_ref, rstd_ref, w, True, lanes,
                                                                         policy.ROW_GROUPS))):
        assert_bitwise_equal(ours, ref, f"N={n}")
    assert_accuracy(y, F.layer_norm(x, (n,), w, b), F.layer_norm(x.double(), (n,), w.double(), b.double()), f"N={n}")


# ---------------------------------------------------------------------------------------------
# the statistics: constant rows, offsets, wide rows (docs/design.md, "LayerNorm statistics")
# ---------------------------------------------------------------------------------------------
def plain_two_pass_layer_norm(x, lanes, eps=1e-5):
    """The statistics fusedtx had before the corrected two-pass formula: mean = lane_sum(x) / N,
    var = lane_sum((x - mean)^2) / N, y = (x - mean) * rstd. The mean's rounding error stays in
    every deviation and the squares' plain sum loses bits at wide rows: the negative control."""
    acc = reference.compute_dtype(x.dtype)
    n = torch.tensor(x.shape[1], dtype=acc)
    xa = x.to(acc)
    mean = reference.lane_sum(xa, lanes) / n
    d = xa - mean[:, None]
    var = reference.lane_sum(d * d, lanes) / n
    rstd = 1.0 / reference.sqrt_rn(var + torch.tensor(eps, dtype=acc))
    return (d * rstd[:, None]).to(x.dtype)


# (value, N): the two rows, a negative one, and one past Triton's block (looped paths)
CONSTANT_ROWS = [(4096.3, 768), (12345.678, 127), (-3.0e5 - 0.1, 1000), (0.1, 20000)]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_constant_rows_normalise_to_exactly_zero(device, backend):
    """A constant row has zero deviations: y is +0 (bias with an affine), as in float64 and
    PyTorch, not the mean's rounding error times rstd = 1/sqrt(eps) ~ 316."""
    require(device, backend)
    for value, n in CONSTANT_ROWS:
        x = torch.full((3, n), value, device=device)
        with poisoned_outputs():
            y = fusedtx.layer_norm(x, n, backend=backend)
        assert_bitwise_equal(y, torch.zeros_like(y), f"constant {value}, N={n}")
        assert torch.equal(F.layer_norm(x, (n,)), torch.zeros_like(y))  # what PyTorch gives
        w, b = make_params((n,), "both", torch.float32, device)
        layer = fusedtx.nn.LayerNorm(n, backend=backend).to(device)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        assert torch.equal(layer(x), b.expand(3, n)), f"nn.LayerNorm of constant {value}, N={n}"


def test_negative_control_constant_rows():
    """The plain two-pass arithmetic leaves the mean's rounding error in a constant row."""
    for value, n in CONSTANT_ROWS[:2]:
        y = plain_two_pass_layer_norm(torch.full((1, n), value), policy.CPU_LANES)
        assert y.abs().max() > 0.1, f"the check would miss a constant row {value} normalised to {y.abs().max()}"


# (rows, N, offset, dtype, seeds): large offsets (the mean's rounding error), wide rows (the
# squares' sum), low precision. On every seed, ours is within STATS_BOUND x PyTorch's error.
STATS_CASES = [
    ((4, 768), 100.0, torch.float32, 8),
    ((1, 127), 1000.0, torch.float32, 8),
    ((2, 65536), 3.0, torch.float32, 3),
    ((4, 1 << 20), 0.0, torch.float32, 1),
    ((4, 768), 30.0, torch.bfloat16, 4),
]
STATS_IDS = ["N768-offset100", "N127-offset1000", "N65536-offset3", "N1M", "N768-offset30-bf16"]
STATS_BOUND = 1.5  # contract point 1 allows 2


def worst_ratio(fn, shape, offset, dtype, seeds, device):
    """The largest (error of fn) / (error of PyTorch eager) against float64 over the seeds."""
    worst = 0.0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(shape, generator=g) + offset).to(dtype).to(device)
        exact = F.layer_norm(x.double(), shape[-1:])
        worst = max(worst, rel_error(fn(x), exact) / rel_error(F.layer_norm(x, shape[-1:]), exact))
    return worst


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS + [pytest.param("cpu", "cuda-lanes", id="cpu-cuda-lanes")])
@pytest.mark.parametrize("shape,offset,dtype,seeds", STATS_CASES, ids=STATS_IDS)
def test_statistics_accuracy_against_float64(device, backend, shape, offset, dtype, seeds):
    """Within 1.5x PyTorch's own error at offsets and wide rows, on every backend. cuda-lanes:
    the reference with the native CUDA kernels' lane count (bitwise equal to them under the
    emulator, tests/test_layer_norm_cuda_emulated.py)."""
    if backend == "cuda-lanes":
        fn = lambda x: reference.layer_norm_forward(x, None, None, 1e-5, policy.cuda_lanes(shape[-1]))[0]  # noqa: E731
    else:
        require(device, backend)
        if backend == "triton" and device == "cpu" and shape[-1] > 65536:
            pytest.skip("the interpreter's time: the looped path is covered at N = 65536")
        fn = lambda x: fusedtx.layer_norm(x, shape[-1], backend=backend)  # noqa: E731
    ratio = worst_ratio(fn, shape, offset, dtype, seeds, device)
    assert ratio <= STATS_BOUND, f"{backend}: error {ratio:.2f} x PyTorch's (bound {STATS_BOUND})"


@pytest.mark.parametrize("shape,offset,dtype,seeds", STATS_CASES[:4], ids=STATS_IDS[:4])
def test_negative_control_statistics_accuracy(shape, offset, dtype, seeds):
    """The plain two-pass arithmetic fails the same bound on every float32 case, with the CPU's
    64 lanes (bf16's output rounding hides the difference, so that case has no control)."""
    ratio = worst_ratio(lambda x: plain_two_pass_layer_norm(x, policy.CPU_LANES), shape, offset, dtype, seeds, "cpu")
    assert ratio > STATS_BOUND, f"the bound would pass the plain arithmetic: {ratio:.2f} x PyTorch's error"


# ---------------------------------------------------------------------------------------------
# reference parity (point 6)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtypes", NORM_DTYPE_PAIRS + [(torch.float64, torch.float64)], ids=NORM_DTYPE_IDS + ["f64"])
@pytest.mark.parametrize("shape,normalized_shape,affine", CASES, ids=CASE_IDS)
def test_bitwise_equal_to_reference(device, backend, dtypes, shape, normalized_shape, affine):
    x_dtype, p_dtype = dtypes
    require_parity_case(device, backend, x_dtype)
    x = make(shape, x_dtype, device)
    dy = make(shape, x_dtype, device, seed=3, scale=1.0, shift=0.0)
    weight, bias = make_params(normalized_shape, affine, p_dtype, device)
    with poisoned_outputs():
        y, mean, rstd = layer_norm_op.layer_norm.impl(x, normalized_shape, weight, bias, 1e-5, backend)
        dx, dw, db = torch.ops.fusedtx.layer_norm_backward(dy, x, mean, rstd, weight, True, backend)
    n = torch.Size(normalized_shape).numel()
    rows = lambda t: t.reshape(-1, n)  # noqa: E731
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    lanes = policy.row_lanes(backend, n, x.device)
    y_ref, mean_ref, rstd_ref = reference.layer_norm_forward(rows(x), flat(weight), flat(bias), 1e-5, lanes)
    dx_ref, dw_ref, db_ref = reference.layer_norm_backward(rows(dy), rows(x), mean_ref, rstd_ref, flat(weight), True,
                                                           lanes, policy.ROW_GROUPS)
    pairs = [(y, y_ref.view(x.shape)), (mean.reshape(-1), mean_ref), (rstd.reshape(-1), rstd_ref),
             (dx, dx_ref.view(x.shape)), (dw, dw_ref), (db, db_ref)]
    record_bitexact("layer_norm", device, backend, x_dtype if x_dtype == p_dtype else f"{x_dtype}+f32",
                    all(bitwise_equal(a, b) for a, b in pairs))
    for (ours, ref), name in zip(pairs, ("y", "mean", "rstd", "dx", "dweight", "dbias")):
        assert_bitwise_equal(ours, ref, f"{backend} {name} vs reference (lanes={lanes})")


def test_triton_compiled_fold_form_equals_reference(monkeypatch):
    """The Triton lane folds take a vector's halves by permute + split when interpreted and by
    masked row sums when compiled (kernels/_common.py HALVES_BY_SPLIT): run the compiled form
    under the interpreter on rows holding -0, huge, inf and NaN entries, bit for bit against the
    reference. The interpreter reads the flag at each call."""
    require("cpu", "triton")
    import triton.language as tl
    from fusedtx.kernels import _common
    monkeypatch.setattr(_common, "HALVES_BY_SPLIT", tl.constexpr(False))
    for n in (5, 64):
        x = make((3, n), torch.float32, "cpu")
        x[0, 1], x[1, 2], x[1, 3], x[2, 0] = -0.0, 3e38, float("inf"), float("nan")
        x[0, 0] = -0.0
        weight, bias = make_params((n,), True, torch.float32, "cpu")
        y, mean, rstd = layer_norm_op.layer_norm.impl(x, (n,), weight, bias, 1e-5, "triton")
        y_ref, mean_ref, rstd_ref = reference.layer_norm_forward(x, weight, bias, 1e-5, policy.triton_lanes(n))
        for ours, ref, name in ((y, y_ref, "y"), (mean, mean_ref, "mean"), (rstd, rstd_ref, "rstd")):
            assert_bitwise_equal(ours.reshape(-1), ref.reshape(-1), f"compiled fold form, N={n}: {name}")


# ---------------------------------------------------------------------------------------------
# batch invariance (point 2), determinism and thread counts (point 5), with negative controls
# ---------------------------------------------------------------------------------------------
def matmul_layer_norm(x, weight, bias, backend=None):
    """A LayerNorm whose statistics are matvecs (`x @ ones / N`): PyTorch's CPU matmul blocks by
    the batch size, so this is NOT batch-invariant. The negative control."""
    n = x.shape[-1]
    ones = torch.linspace(1.0, 1.0 + 1e-3, n, dtype=torch.float32, device=x.device)[:, None]
    xf = x.float()
    d = xf - (xf @ ones) / n
    return (d / torch.sqrt((d * d) @ ones / n + 1e-5) * weight + bias).to(x.dtype)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_batch_invariance_of_output(device, backend, dtype):
    require(device, backend)
    weight, bias = make_params((768,), "both", dtype, device)
    assert row_invariance_failures(lambda x: fusedtx.layer_norm(x, 768, weight, bias, backend=backend), 768, dtype,
                                   device) == []


def test_negative_control_batch_invariance():
    weight, bias = make_params((768,), "both", torch.float32, "cpu")
    assert row_invariance_failures(lambda x: matmul_layer_norm(x, weight, bias), 768, torch.float32, "cpu"), \
        "the check missed a batch-variant LayerNorm"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_batch_invariance_of_input_gradient(device, backend):
    require(device, backend)
    n = 300
    weight, bias = make_params((n,), "both", torch.float32, device)
    probe_x, probe_dy = make((1, n), torch.float32, device, seed=1), make((1, n), torch.float32, device, seed=2)

    def dx_of(x, dy):
        x = x.clone().requires_grad_()
        return torch.autograd.grad(fusedtx.layer_norm(x, n, weight, bias, backend=backend), x, dy)[0]

    alone = dx_of(probe_x, probe_dy)
    for batch, index in ((2, 1), (9, 0), (130, 77)):
        x, dy = make((batch, n), torch.float32, device, seed=batch), make((batch, n), torch.float32, device, seed=batch + 1)
        x[index], dy[index] = probe_x[0], probe_dy[0]
        assert_bitwise_equal(dx_of(x, dy)[index : index + 1], alone, f"dx of row {index} in a batch of {batch}")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gradients_bitwise_run_to_run(device, backend):
    require(device, backend)
    # 201 rows: groups of two rows in the weight-gradient sums (the interpreter gets 15, for time)
    shape = (5, 3, 96) if backend == "triton" and device == "cpu" else (67, 3, 96)
    x = make(shape, torch.bfloat16, device)
    dy = make(shape, torch.bfloat16, device, seed=1, scale=1.0, shift=0.0)
    weight, bias = make_params((96,), "both", torch.float32, device)
    runs = [grads_of(lambda a, w, b: fusedtx.layer_norm(a, 96, w, b, backend=backend), x, weight, bias, dy)
            for _ in range(repeats(device, backend))]
    assert_runs_equal(runs, ("y", "dx", "dweight", "dbias"), "repeated")


def test_negative_control_run_to_run():
    x, dy = make((200, 64), torch.float32, "cpu"), make((200, 64), torch.float32, "cpu", seed=1)
    xhat = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    g = torch.Generator().manual_seed(0)
    runs = [scattered_row_sum(dy * xhat, g) for _ in range(20)]
    assert any(not bitwise_equal(run, runs[0]) for run in runs[1:]), "the repeat check missed an order-dependent sum"


def test_native_thread_count_invariance():
    require("cpu", "native")
    x, dy = make((4096, 768), torch.float32, "cpu"), make((4096, 768), torch.float32, "cpu", seed=1)
    weight, bias = make_params((768,), "both", torch.float32, "cpu")
    runs = under_each_thread_count(lambda: grads_of(lambda a, w, b: fusedtx.layer_norm(a, 768, w, b, backend="native"),
                                         x, weight, bias, dy))
    assert_runs_equal(runs, ("y", "dx", "dweight", "dbias"), "1 vs 2 vs 3 threads")


def test_negative_control_thread_count():
    """The same check flags PyTorch's own LayerNorm: its weight gradient follows the thread count."""
    x, dy = make((4096, 768), torch.float32, "cpu"), make((4096, 768), torch.float32, "cpu", seed=1)
    weight, bias = make_params((768,), "both", torch.float32, "cpu")
    runs = under_each_thread_count(lambda: grads_of(lambda a, w, b: F.layer_norm(a, (768,), w, b), x, weight, bias, dy))
    assert any(not bitwise_equal(run[2], runs[0][2]) for run in runs[1:]), "thread check missed torch's dweight"


# ---------------------------------------------------------------------------------------------
# the module: a drop-in for torch.nn.LayerNorm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_drop_in_module(device, backend):
    require(device, backend)
    torch.manual_seed(0)
    second, final = {"elementwise_affine": True, "bias": False}, {"eps": 1e-6}
    ref = NormBlock(torch.nn.LayerNorm, second, final).to(device)
    ours = NormBlock(lambda *a, **k: fusedtx.nn.LayerNorm(*a, **k, backend=backend), second, final).to(device)
    assert_drop_in(ours, ref, make((4, 3, 48), torch.float32, device))
    m = fusedtx.nn.LayerNorm(16, elementwise_affine=False)
    assert m.weight is None and m.bias is None and isinstance(m, torch.nn.LayerNorm)


# ---------------------------------------------------------------------------------------------
# errors (point 7), torch.library integration
# ---------------------------------------------------------------------------------------------
def test_bad_input_errors():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match=r"normalized_shape \[7\] must match the trailing dims of x.*\[4, 8\]"):
        fusedtx.layer_norm(x, 7)
    with pytest.raises(ValueError, match=r"normalized_shape \[2, 4, 8\] must match"):
        fusedtx.layer_norm(x, (2, 4, 8))
    with pytest.raises(TypeError, match="normalized_shape must be an int or a sequence of ints"):
        fusedtx.layer_norm(x, 8.0)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\].*\[9\]"):
        fusedtx.layer_norm(x, 8, torch.randn(9))
    with pytest.raises(ValueError, match=r"bias must have shape \[8\].*\[2, 4\]"):
        fusedtx.layer_norm(x, 8, w, torch.randn(2, 4))
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        fusedtx.layer_norm(x, 8, w.to("meta"))
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64.*int32"):
        fusedtx.layer_norm(torch.ones(4, 8, dtype=torch.int32), 8)
    with pytest.raises(TypeError, match="weight must be torch.float32 for torch.float32 x, got torch.bfloat16"):
        fusedtx.layer_norm(x, 8, w.bfloat16())
    with pytest.raises(TypeError, match="must share a dtype"):
        fusedtx.layer_norm(x.bfloat16(), 8, w, w.bfloat16())
    for eps in (-1e-5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            fusedtx.layer_norm(x, 8, eps=eps)
    with pytest.raises(TypeError, match="triton backend computes in float32"):
        fusedtx.layer_norm(x.double(), 8, backend="triton")
    with pytest.raises(ValueError, match="normalized_shape must be non-empty"):
        fusedtx.layer_norm(torch.randn(4, 0), 0)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    require(device, backend)
    x = make((3, 5, 24), torch.float32, device).requires_grad_()
    w, b = (t.requires_grad_() for t in make_params((24,), "both", torch.float32, device))
    torch.library.opcheck(torch.ops.fusedtx.layer_norm.default, (x, [24], w, b, 1e-5, backend))
    torch.library.opcheck(torch.ops.fusedtx.layer_norm.default, (x, [5, 24], None, None, 1e-3, backend))
    y, mean, rstd = layer_norm_op.layer_norm.impl(x.detach(), (24,), w.detach(), None, 1e-5, backend)
    torch.library.opcheck(torch.ops.fusedtx.layer_norm_backward.default,
                          (torch.randn_like(y), x.detach(), mean, rstd, w.detach(), True, backend))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    require(device, backend)
    m = fusedtx.nn.LayerNorm(24, backend=backend).to(device)
    assert_compiled_grads_equal(lambda x: m(x * 2.0).square().sum(), make((4, 24), torch.float32, device).requires_grad_(),
                                  (m.weight, m.bias))


def test_torch_compile_inductor():
    require("cpu", "native")
    torch._dynamo.reset()
    x = make((8, 32), torch.float32, "cpu")
    w, b = make_params((32,), "both", torch.float32, "cpu")
    compiled = torch.compile(lambda t: fusedtx.layer_norm(t, 32, w, b) * 2.0, fullgraph=True)
    assert_bitwise_equal(compiled(x), fusedtx.layer_norm(x, 32, w, b) * 2.0, "inductor")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_eps_zero_is_accepted_as_torch_accepts_it(device, backend):
    """eps = 0 computes what torch.nn.functional.layer_norm does: finite rows within the accuracy
    bound, a constant row (variance 0) NaN. fusedtx.nn.LayerNorm(eps=0) builds and runs."""
    require(device, backend)
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(4)).to(device)
    x[5] = 1.5
    y = fusedtx.layer_norm(x, 40, eps=0.0, backend=backend)
    eager = F.layer_norm(x, (40,), eps=0.0)
    assert_accuracy(y[:5], eager[:5], F.layer_norm(x[:5].double(), (40,), eps=0.0), "eps=0")
    assert torch.isnan(y[5]).all() and torch.isnan(eager[5]).all()
    layer = fusedtx.nn.LayerNorm(40, eps=0.0, backend=backend).to(device)
    assert torch.equal(layer(x[:5]), fusedtx.layer_norm(x[:5], 40, layer.weight, layer.bias, eps=0.0, backend=backend))
