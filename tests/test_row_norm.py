"""fusedtx.rms_norm / nn.RMSNorm and fusedtx.layer_norm / nn.LayerNorm on every backend, each
test run for both norms (tests/row_norm_helpers.py): accuracy of the output and of every
gradient, gradcheck, batch invariance, determinism, thread-count invariance, reference parity,
the drop-in test, errors, opcheck and torch.compile. What one norm has alone:
tests/test_rms_norm.py, tests/test_layer_norm.py."""
from __future__ import annotations

import pytest
import torch

from fusedtx import policy
from helpers import (
    assert_accuracy, assert_bitwise_equal, assert_compiled_grads_equal, assert_drop_in, assert_runs_equal,
    bitwise_equal, DEVICE_BACKENDS, garbage_like, grads_of, make, NORM_DTYPE_IDS, NORM_DTYPE_PAIRS, NormBlock,
    poisoned_outputs, record_bitexact, repeats, require, require_parity_case, row_invariance_failures,
    scattered_row_sum, under_each_thread_count,
)
from row_norm_helpers import LAYER_NORM, make_params, norm_cases, NORMS, per_norm, RMS_NORM


# ---------------------------------------------------------------------------------------------
# accuracy (contract point 1), gradcheck
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtypes", NORM_DTYPE_PAIRS, ids=NORM_DTYPE_IDS)
# Not RMSNorm at N = 1: there dx is g (1 - xhat^2) rstd with xhat^2 = x^2 / (x^2 + eps), 1 - xhat^2
# ~ eps / x^2, below float32's rounding of xhat: every float32 formula gives rounding noise (torch's too).
@pytest.mark.parametrize("norm,shape,normalized_shape,affine", norm_cases(skip={"rms_norm-N1"}))
def test_accuracy_output_and_gradients(norm, device, backend, dtypes, shape, normalized_shape, affine):
    require(device, backend)
    x_dtype, p_dtype = dtypes
    x = make(shape, x_dtype, device)
    params = make_params(norm, normalized_shape, affine, p_dtype, device)
    dy = make(shape, x_dtype, device, seed=3, scale=1.0, shift=0.0)
    eps = norm.float32_eps  # float64 below must take float32's default
    with poisoned_outputs():
        ours = grads_of(lambda a, *p: norm.fn(a, normalized_shape, *p, backend=backend), x, *params, dy)
    eager = grads_of(lambda a, *p: norm.torch_fn(a, normalized_shape, *p), x, *params, dy)
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    exact = grads_of(lambda a, *p: norm.torch_fn(a, normalized_shape, *p, eps=eps), *map(as64, (x, *params, dy)))
    assert ours[0].dtype == x_dtype and ours[0].shape == x.shape
    present = [p for p in params if p is not None]
    for i, name in enumerate(("y", *norm.grad_names)[: len(ours)]):
        if i >= 2:
            assert ours[i].dtype == present[i - 2].dtype and ours[i].shape == present[i - 2].shape
        if x.numel():
            slack = norm.dweight_slack(x, dy, exact, eps) if i == 2 and norm.dweight_slack else 0.0
            assert_accuracy(ours[i], eager[i], exact[i], f"{backend} {name}", slack=slack)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_float64(norm, backend):
    require("cpu", backend)
    g = torch.Generator().manual_seed(0)
    x, *params = (torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
                  for shape in [(3, 2, 9)] + [(2, 9)] * len(norm.params))
    assert torch.autograd.gradcheck(lambda a, *p: norm.fn(a, (2, 9), *p, eps=1e-5, backend=backend), (x, *params))
    assert torch.autograd.gradcheck(lambda a: norm.fn(a, 9, backend=backend), (x,))


# Hidden sizes past Triton's block take the looped paths and still match the reference; RMSNorm's
# interpreted Triton run takes the smallest such N, for time.
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("norm,interpreted_n", per_norm(16385, 65537))
def test_wide_rows(norm, interpreted_n, device, backend):
    require(device, backend)
    n = interpreted_n if backend == "triton" and device == "cpu" else 65537
    x, dy = make((3, n), torch.float32, device), make((3, n), torch.float32, device, seed=1)
    params = make_params(norm, (n,), "both", torch.float32, device)
    y, *stats = norm.op.impl(x, (n,), *params, 1e-5, backend)
    grads = norm.backward(dy, x, *stats, params[0], True, backend)
    lanes = policy.row_lanes(backend, n, x.device)
    y_ref, *stats_ref = norm.ref_forward(x, *params, 1e-5, lanes)
    grads_ref = norm.ref_backward(dy, x, *stats_ref, params[0], True, lanes, policy.ROW_GROUPS)
    for ours, ref, name in zip((y, *stats, *grads), (y_ref, *stats_ref, *grads_ref),
                               ("y", *norm.stats, *norm.grad_names)):
        assert_bitwise_equal(ours, ref, f"N={n} {name}")
    exact = norm.torch_fn(x.double(), (n,), *(p.double() for p in params), eps=1e-5)
    assert_accuracy(y, norm.torch_fn(x, (n,), *params, eps=1e-5), exact, f"N={n}")


# ---------------------------------------------------------------------------------------------
# reference parity (point 6)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtypes", NORM_DTYPE_PAIRS + [(torch.float64, torch.float64)], ids=NORM_DTYPE_IDS + ["f64"])
@pytest.mark.parametrize("norm,shape,normalized_shape,affine", norm_cases())
def test_bitwise_equal_to_reference(norm, device, backend, dtypes, shape, normalized_shape, affine):
    x_dtype, p_dtype = dtypes
    require_parity_case(device, backend, x_dtype)
    x = make(shape, x_dtype, device)
    dy = make(shape, x_dtype, device, seed=3, scale=1.0, shift=0.0)
    params = make_params(norm, normalized_shape, affine, p_dtype, device)
    with poisoned_outputs():
        y, *stats = norm.op.impl(x, normalized_shape, *params, 1e-5, backend)
        dx, *param_grads = norm.backward(dy, x, *stats, params[0], True, backend)
    n = torch.Size(normalized_shape).numel()
    rows = lambda t: t.reshape(-1, n)  # noqa: E731
    flat = [None if p is None else p.reshape(-1) for p in params]
    lanes = policy.row_lanes(backend, n, x.device)
    y_ref, *stats_ref = norm.ref_forward(rows(x), *flat, 1e-5, lanes)
    dx_ref, *param_grads_ref = norm.ref_backward(rows(dy), rows(x), *stats_ref, flat[0], True, lanes, policy.ROW_GROUPS)
    pairs = [(y, y_ref.view(x.shape)), *((s.reshape(-1), s_ref) for s, s_ref in zip(stats, stats_ref)),
             (dx, dx_ref.view(x.shape)), *zip(param_grads, param_grads_ref)]
    record_bitexact(norm.name, device, backend, x_dtype if x_dtype == p_dtype else f"{x_dtype}+f32",
                    all(bitwise_equal(a, b) for a, b in pairs))
    for (ours, ref), name in zip(pairs, ("y", *norm.stats, *norm.grad_names)):
        assert_bitwise_equal(ours, ref, f"{backend} {name} vs reference (lanes={lanes})")


# ---------------------------------------------------------------------------------------------
# batch invariance (point 2), determinism and thread counts (point 5), with negative controls
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("norm", NORMS)
def test_batch_invariance_of_output(norm, device, backend, dtype):
    require(device, backend)
    params = make_params(norm, (768,), "both", dtype, device)
    assert row_invariance_failures(lambda x: norm.fn(x, 768, *params, backend=backend), 768, dtype, device) == []


@pytest.mark.parametrize("norm", NORMS)
def test_negative_control_batch_invariance(norm):
    params = make_params(norm, (768,), "both", torch.float32, "cpu")
    assert row_invariance_failures(lambda x: norm.batch_variant(x, *params), 768, torch.float32, "cpu"), \
        f"the check missed a batch-variant {norm.name}"


# The probe row's neighbours: garbage (inf, NaN, huge) for RMSNorm, seeded random rows for LayerNorm.
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("norm,garbage", per_norm(True, False))
def test_batch_invariance_of_input_gradient(norm, garbage, device, backend):
    require(device, backend)
    n = 300
    params = make_params(norm, (n,), "both", torch.float32, device)
    probe_x, probe_dy = make((1, n), torch.float32, device, seed=1), make((1, n), torch.float32, device, seed=2)

    def dx_of(x, dy):
        x = x.clone().requires_grad_()
        return torch.autograd.grad(norm.fn(x, n, *params, backend=backend), x, dy)[0]

    alone = dx_of(probe_x, probe_dy)
    g = torch.Generator().manual_seed(6)
    for batch, index in ((2, 1), (9, 0), (130, 77)):
        if garbage:
            x, dy = (garbage_like(torch.empty(batch, n, device=device), g) for _ in range(2))
        else:
            x, dy = make((batch, n), torch.float32, device, seed=batch), make((batch, n), torch.float32, device,
                                                                               seed=batch + 1)
        x[index], dy[index] = probe_x[0], probe_dy[0]
        assert_bitwise_equal(dx_of(x, dy)[index : index + 1], alone, f"dx of row {index} in a batch of {batch}")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_gradients_bitwise_run_to_run(norm, device, backend):
    require(device, backend)
    # 201 rows: groups of two rows in the weight-gradient sums (the interpreter gets 15, for time)
    shape = (5, 3, 96) if backend == "triton" and device == "cpu" else (67, 3, 96)
    x = make(shape, torch.bfloat16, device)
    dy = make(shape, torch.bfloat16, device, seed=1, scale=1.0, shift=0.0)
    params = make_params(norm, (96,), "both", torch.float32, device)
    runs = [grads_of(lambda a, *p: norm.fn(a, 96, *p, backend=backend), x, *params, dy)
            for _ in range(repeats(device, backend))]
    assert_runs_equal(runs, ("y", *norm.grad_names), "repeated")


@pytest.mark.parametrize("norm", NORMS)
def test_negative_control_run_to_run(norm):
    x, dy = make((200, 64), torch.float32, "cpu"), make((200, 64), torch.float32, "cpu", seed=1)
    g = torch.Generator().manual_seed(0)
    runs = [scattered_row_sum(dy * norm.xhat(x), g) for _ in range(20)]
    assert any(not bitwise_equal(run, runs[0]) for run in runs[1:]), "the repeat check missed an order-dependent sum"


def thread_runs(norm, fn):
    x, dy = make((4096, 768), torch.float32, "cpu"), make((4096, 768), torch.float32, "cpu", seed=1)
    params = make_params(norm, (768,), "both", torch.float32, "cpu")
    return under_each_thread_count(lambda: grads_of(fn, x, *params, dy))


@pytest.mark.parametrize("norm", NORMS)
def test_native_thread_count_invariance(norm):
    require("cpu", "native")
    runs = thread_runs(norm, lambda a, *p: norm.fn(a, 768, *p, backend="native"))
    assert_runs_equal(runs, ("y", *norm.grad_names), "1 vs 2 vs 3 threads")


@pytest.mark.parametrize("norm", NORMS)
def test_negative_control_thread_count(norm):
    """The same check flags a weight gradient that follows the thread count."""
    runs = thread_runs(norm, norm.thread_variant)
    assert any(not bitwise_equal(run[2], runs[0][2]) for run in runs[1:]), \
        f"the thread check missed {norm.name}'s thread-variant dweight"


# ---------------------------------------------------------------------------------------------
# the modules: drop-ins for torch.nn.RMSNorm and torch.nn.LayerNorm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("norm,second,final", [
    pytest.param(RMS_NORM, {"eps": 1e-6}, {"elementwise_affine": False}, id="rms_norm"),
    pytest.param(LAYER_NORM, {"elementwise_affine": True, "bias": False}, {"eps": 1e-6}, id="layer_norm"),
])
def test_drop_in_module(norm, second, final, device, backend):
    require(device, backend)
    torch.manual_seed(0)
    ref = NormBlock(norm.torch_module, second, final).to(device)
    ours = NormBlock(lambda *a, **k: norm.module(*a, **k, backend=backend), second, final).to(device)
    assert_drop_in(ours, ref, make((4, 3, 48), torch.float32, device))
    m, theirs = norm.module(16, elementwise_affine=False), norm.torch_module(16, elementwise_affine=False)
    assert all(getattr(m, p) is None for p in norm.params) and isinstance(m, norm.torch_module)
    assert m.eps == theirs.eps and repr(m) == repr(theirs)


# ---------------------------------------------------------------------------------------------
# errors (point 7), torch.library integration
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", NORMS)
def test_bad_input_errors(norm):
    fn, op = norm.fn, norm.name
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match=rf"{op}: normalized_shape \[7\] must match the trailing dims of x.*\[4, 8\]"):
        fn(x, 7)
    with pytest.raises(ValueError, match=rf"{op}: normalized_shape \[2, 4, 8\] must match"):
        fn(x, (2, 4, 8))
    with pytest.raises(TypeError, match=f"{op}: normalized_shape must be an int or a sequence of ints"):
        fn(x, 8.0)
    with pytest.raises(ValueError, match=rf"{op}: weight must have shape \[8\].*\[9\]"):
        fn(x, 8, torch.randn(9))
    with pytest.raises(ValueError, match=f"{op}: weight is on meta but x is on cpu"):
        fn(x, 8, w.to("meta"))
    with pytest.raises(TypeError, match=f"{op}: weight must be torch.float32 for torch.float32 x, got torch.bfloat16"):
        fn(x, 8, w.bfloat16())
    with pytest.raises(TypeError, match=f"{op}: weight must be torch.bfloat16 or torch.float32 for .*float16"):
        fn(x.bfloat16(), 8, w.half())
    with pytest.raises(TypeError, match=f"{op}: weight must be a torch.Tensor or None, got list"):
        fn(x, 8, [1.0] * 8)
    if "bias" in norm.params:
        with pytest.raises(ValueError, match=rf"{op}: bias must have shape \[8\].*\[2, 4\]"):
            fn(x, 8, w, torch.randn(2, 4))
        with pytest.raises(TypeError, match=f"{op}: .*must share a dtype"):
            fn(x.bfloat16(), 8, w, w.bfloat16())
    with pytest.raises(TypeError, match=f"{op}: x must be float32, float16, bfloat16 or float64.*int32"):
        fn(torch.ones(4, 8, dtype=torch.int32), 8)
    for eps in (-1e-5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"{op}: eps must be a finite number >= 0"):
            fn(x, 8, eps=eps)
    with pytest.raises(TypeError, match=f"{op}: eps must be a real number"):
        fn(x, 8, eps="1e-5")
    with pytest.raises(TypeError, match=f"{op}: the triton backend computes in float32"):
        fn(x.double(), 8, backend="triton")
    with pytest.raises(ValueError, match=f"{op}: normalized_shape must be non-empty"):
        fn(torch.randn(4, 0), 0)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_opcheck(norm, device, backend):
    require(device, backend)
    x = make((3, 5, 24), torch.float32, device).requires_grad_()
    params = [p.requires_grad_() for p in make_params(norm, (24,), "both", torch.float32, device)]
    registered = getattr(torch.ops.fusedtx, norm.name).default
    torch.library.opcheck(registered, (x, [24], *params, 1e-5, backend))
    torch.library.opcheck(registered, (x, [5, 24], *[None] * len(params), 1e-3, backend))
    weight_only = (params[0].detach(), *[None] * (len(params) - 1))
    y, *stats = norm.op.impl(x.detach(), (24,), *weight_only, 1e-5, backend)
    torch.library.opcheck(norm.backward.default, (torch.randn_like(y), x.detach(), *stats, params[0].detach(), True,
                                                   backend))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_torch_compile_fullgraph(norm, device, backend):
    require(device, backend)
    m = norm.module(24, backend=backend).to(device)
    assert_compiled_grads_equal(lambda x: m(x * 2.0).square().sum(), make((4, 24), torch.float32, device).requires_grad_(),
                                tuple(getattr(m, p) for p in norm.params))


@pytest.mark.parametrize("norm", NORMS)
def test_torch_compile_inductor(norm):
    require("cpu", "native")
    torch._dynamo.reset()
    x = make((8, 32), torch.float32, "cpu")
    params = make_params(norm, (32,), "both", torch.float32, "cpu")
    compiled = torch.compile(lambda t: norm.fn(t, 32, *params) * 2.0, fullgraph=True)
    assert_bitwise_equal(compiled(x), norm.fn(x, 32, *params) * 2.0, "inductor")


# The NaN row: a zero row for RMSNorm (0 * inf), a constant row (variance 0) for LayerNorm.
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("norm,nan_row", per_norm(0.0, 1.5))
def test_eps_zero_is_accepted_as_torch_accepts_it(norm, nan_row, device, backend):
    """eps = 0 computes what torch.nn.functional's norm does: finite rows within the accuracy
    bound, a row of variance (LayerNorm) or mean square (RMSNorm) 0 NaN. The module with eps = 0
    builds and runs."""
    require(device, backend)
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(4)).to(device)
    x[5] = nan_row
    y = norm.fn(x, 40, eps=0.0, backend=backend)
    eager = norm.torch_fn(x, (40,), *[None] * len(norm.params), eps=0.0)
    exact = norm.torch_fn(x[:5].double(), (40,), *[None] * len(norm.params), eps=0.0)
    assert_accuracy(y[:5], eager[:5], exact, "eps=0")
    assert torch.isnan(y[5]).all() and torch.isnan(eager[5]).all()
    layer = norm.module(40, eps=0.0, backend=backend).to(device)
    params = [getattr(layer, p) for p in norm.params]
    assert torch.equal(layer(x[:5]), norm.fn(x[:5], 40, *params, eps=0.0, backend=backend))
