"""What fusedtx.layer_norm has alone: its statistics (constant rows, large offsets, wide rows)
and the Triton lane folds' compiled form. What it shares with rms_norm (accuracy of the output
and of every gradient, gradcheck, batch invariance, determinism, thread-count invariance,
reference parity, the drop-in test, errors, opcheck and torch.compile): tests/test_row_norm.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedtx
from fusedtx import policy, reference
from fusedtx.ops import layer_norm as layer_norm_op
from helpers import assert_bitwise_equal, DEVICE_BACKENDS, make, poisoned_outputs, rel_error, require
from row_norm_helpers import LAYER_NORM, make_params


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
        w, b = make_params(LAYER_NORM, (n,), "both", torch.float32, device)
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
    emulator, tests/test_row_norm_cuda_emulated.py)."""
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
        weight, bias = make_params(LAYER_NORM, (n,), "both", torch.float32, "cpu")
        y, mean, rstd = layer_norm_op.layer_norm.impl(x, (n,), weight, bias, 1e-5, "triton")
        y_ref, mean_ref, rstd_ref = reference.layer_norm_forward(x, weight, bias, 1e-5, policy.triton_lanes(n))
        for ours, ref, name in ((y, y_ref, "y"), (mean, mean_ref, "mean"), (rstd, rstd_ref, "rstd")):
            assert_bitwise_equal(ours.reshape(-1), ref.reshape(-1), f"compiled fold form, N={n}: {name}")
