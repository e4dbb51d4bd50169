"""fusedtx.log_softmax on every backend: log_f32's accuracy, accuracy of the op and its gradient,
reference parity, batch and thread-count invariance, determinism, edge values and errors as
torch.log_softmax, layouts, the module, opcheck and torch.compile."""
from __future__ import annotations

import pytest
import torch

import fusedtx
from fusedtx import policy, reference
from fusedtx.ops import _rows
from helpers import (
    DEVICE_BACKENDS,
    DTYPES,
    assert_accuracy,
    assert_bitwise_equal,
    assert_compiled_equals_eager,
    batch_invariance_failures,
    bitwise_equal,
    poisoned_outputs,
    record_bitexact,
    require,
    under_each_thread_count,
)

# (shape, dim): one element, odd widths on both sides of the CPU's 64 lanes, a row longer than
# Triton's widest block (the looped path), empty tensors, another dim.
CASES = [
    ((1, 1), -1),
    ((3, 7, 1023), -1),
    ((2, 65537), -1),
    ((0, 16), -1),
    ((4, 0), -1),
    ((5, 33, 3), 1),
    ((19, 6), 0),
]
CASE_IDS = ["1x1", "3x7x1023", "2x65537", "0rows", "0cols", "dim1", "dim0"]


def make_input(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype).to(device)


def ulp_errors(x: torch.Tensor) -> torch.Tensor:
    """|log_f32(x) - log(x)| in ulps of the exact value (float64 torch.log as the exact value)."""
    got, exact = reference.log_f32(x).double(), torch.log(x.double())
    below = exact.abs().float()  # the float32 at or below |exact|: the binade's spacing is the ulp
    below = torch.where(below.double() > exact.abs(), torch.nextafter(below, torch.zeros(())), below)
    ulp = torch.nextafter(below, torch.full((), float("inf"))).double() - below.double()
    return (got - exact).abs() / ulp


# ---------------------------------------------------------------------------------------------
# log_f32: faithfully rounded, and the same special values as torch.log
# ---------------------------------------------------------------------------------------------
def test_log_f32_is_within_one_ulp():
    """Every float32 in [1, 2) and every 61st in [1, 2**31) (log_softmax's arguments are >= 1),
    and every 997th positive float32 (subnormals included). Measured when it was written: at
    most 0.83 ulp (docs/design.md, "exp, log and erf")."""
    one, top = (torch.tensor(v, dtype=torch.float32).view(torch.int32).item() for v in (1.0, 2.0 ** 31))
    two = torch.tensor(2.0).view(torch.int32).item()
    samples = [torch.arange(one, two, dtype=torch.int32), torch.arange(one, top, 61, dtype=torch.int32),
               torch.arange(1, 0x7F800000, 997, dtype=torch.int32)]
    for bits_ in samples:
        worst = ulp_errors(bits_.view(torch.float32)).max().item()
        assert worst < 0.85, f"log_f32 is {worst:.3f} ulp off (measured 0.83 at most)"


def test_log_f32_negative_control():
    """The ulp measure flags a log that is 1 ulp off: the measure can fail."""
    x = torch.linspace(1.0, 1e6, 10001)
    assert ulp_errors(x).max() < 1
    shifted = torch.nextafter(reference.log_f32(x), torch.full((), float("inf")))
    exact = torch.log(x.double())
    assert ((shifted.double() - exact).abs() > (reference.log_f32(x).double() - exact).abs()).any()


def test_log_f32_special_values_as_torch_log():
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([0.0, -0.0, -1.0, -1e-45, -inf, inf, nan, 1.0])
    assert_bitwise_equal(reference.log_f32(x), torch.log(x), "special values")
    ends = torch.tensor([1e-45, 2.0 ** -126, 3.4028235e38, 1.4142135, 1.4142137])  # the range's ends, the m cut
    assert ulp_errors(ends).max() < 0.85


# ---------------------------------------------------------------------------------------------
# accuracy (contract point 1) and reference parity (point 6)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape,dim", CASES, ids=CASE_IDS)
def test_forward_backward_accuracy(device, backend, dtype, shape, dim):
    """Relative error against float64 torch.log_softmax at most 2x torch eager's own in the same
    dtype, output and gradient (the contract's bound)."""
    require(device, backend)
    x = make_input(shape, dtype, device).requires_grad_()
    grad = make_input(shape, dtype, device, seed=1)
    with poisoned_outputs():
        y = fusedtx.log_softmax(x, dim, backend=backend)
        (dx,) = torch.autograd.grad(y, x, grad) if x.numel() else (torch.zeros_like(x),)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device and y.is_contiguous()
    if x.numel() == 0:
        return
    x64 = x.detach().double().requires_grad_()
    y64 = torch.log_softmax(x64, dim)
    x_eager = x.detach().clone().requires_grad_()
    y_eager = torch.log_softmax(x_eager, dim)
    (dx64,) = torch.autograd.grad(y64, x64, grad.double())
    (dx_eager,) = torch.autograd.grad(y_eager, x_eager, grad)
    assert_accuracy(y, y_eager, y64, f"{backend} forward")
    assert_accuracy(dx, dx_eager, dx64, f"{backend} backward")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape,dim", CASES, ids=CASE_IDS)
def test_bitwise_equal_to_reference(device, backend, dtype, shape, dim):
    """Each backend computes reference.log_softmax_forward/backward with its own lane count."""
    require(device, backend)
    if backend == "reference":
        pytest.skip("the reference is compared with itself by the determinism test")
    x = make_input(shape, dtype, device)
    dy = make_input(shape, dtype, device, seed=1)
    with poisoned_outputs():
        y = fusedtx.log_softmax(x, dim, backend=backend)
        dx = torch.ops.fusedtx.log_softmax_backward(dy, y, dim, backend)
    rows_x = _rows.as_rows(x, dim)
    lanes = policy.row_lanes(backend, rows_x.shape[1], x.device)
    y_ref = _rows.from_rows(reference.log_softmax_forward(rows_x, lanes), x, dim)
    dx_ref = _rows.from_rows(reference.log_softmax_backward(_rows.as_rows(dy, dim), _rows.as_rows(y, dim), lanes),
                             x, dim)
    record_bitexact("log_softmax", device, backend, dtype, bitwise_equal(y, y_ref) and bitwise_equal(dx, dx_ref))
    assert_bitwise_equal(y, y_ref, f"{backend} forward vs reference (lanes={lanes})")
    assert_bitwise_equal(dx, dx_ref, f"{backend} backward vs reference (lanes={lanes})")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_long_rows(device, backend):
    """Rows of 300,000 elements take every backend's looped path and still match the reference."""
    require(device, backend)
    x = make_input((2, 300_000), torch.float32, device)
    y = fusedtx.log_softmax(x, backend=backend)
    lanes = policy.row_lanes(backend, x.shape[1], x.device)
    assert_bitwise_equal(y, reference.log_softmax_forward(x, lanes), "long rows")
    torch.testing.assert_close(y, torch.log_softmax(x.double(), -1).float(), rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# batch invariance (point 2), thread counts and determinism (point 5), with negative controls
# ---------------------------------------------------------------------------------------------
def matmul_log_softmax(x):
    """A plausible log_softmax whose row sum is a matmul (`e @ ones`): PyTorch's CPU matmul picks
    its blocking from the batch, so this is NOT batch-invariant. The negative control."""
    z = x.float()
    d = z - z.amax(-1, keepdim=True)
    return (d - torch.log(torch.exp(d) @ torch.ones(d.shape[-1], 1))).to(x.dtype)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_batch_invariance(device, backend, dtype):
    """A row's output alone == inside batches of garbage rows (inf, NaN, huge), at the first,
    middle and last position."""
    require(device, backend)
    g = torch.Generator().manual_seed(7)
    probe = (torch.randn(1, 300, generator=g) * 3).to(dtype).to(device)
    batches = (1, 2, 3, 17) if backend == "triton" and device == "cpu" else (1, 2, 3, 17, 40)
    assert batch_invariance_failures(lambda t: fusedtx.log_softmax(t, backend=backend), probe, batches, g) == []


def test_negative_control_batch_invariance():
    """The same check flags the matmul-based log_softmax."""
    g = torch.Generator().manual_seed(7)
    probe = torch.randn(1, 768, generator=g) * 3
    assert batch_invariance_failures(matmul_log_softmax, probe, (1, 2, 3, 17, 40), g), \
        "the invariance check failed to flag a matmul-based log_softmax"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_backward_batch_invariance(device, backend):
    require(device, backend)
    g = torch.Generator().manual_seed(3)
    probe_x, probe_dy = (torch.randn(1, 257, generator=g).to(device) for _ in range(2))

    def grad_of(x, dy):
        x = x.clone().requires_grad_()
        return torch.autograd.grad(fusedtx.log_softmax(x, backend=backend), x, dy)[0]

    alone = grad_of(probe_x, probe_dy)
    for batch, index in ((2, 1), (9, 4), (33, 32)):
        x = torch.randn(batch, 257, generator=g).to(device) * 10
        dy = torch.randn(batch, 257, generator=g).to(device)
        x[index], dy[index] = probe_x[0], probe_dy[0]
        assert_bitwise_equal(grad_of(x, dy)[index: index + 1], alone, f"dx of row {index} in a batch of {batch}")


def thread_input(shape, dtype):
    """make_input with each row's first element 5.2 above its max: the row sum is about 2, so
    log(sum) keeps the sum's last bits (a sum near 180 would lose them in the log's rounding)."""
    x = make_input(shape, torch.float32, "cpu")
    x[..., 0] = x.amax(-1) + 5.2
    return x.to(dtype)


def torch_sum_log_softmax(x):
    """log_softmax with PyTorch's own row sum: for a single long row, torch.sum splits the row
    between threads, so its bits follow the thread count. The negative control."""
    d = x - x.amax(-1, keepdim=True)
    return d - torch.log(torch.exp(d).sum(-1, keepdim=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [(96, 2049), (1, 4_000_000)], ids=["many-rows", "one-long-row"])
def test_native_thread_count_invariance(dtype, shape):
    require("cpu", "native")
    x = thread_input(shape, dtype).requires_grad_()
    dy = make_input(shape, dtype, "cpu", seed=1)

    def run():
        y = fusedtx.log_softmax(x, backend="native")
        return torch.cat([y.detach(), torch.autograd.grad(y, x, dy)[0]])

    outs = under_each_thread_count(run)
    for out in outs[1:]:
        assert_bitwise_equal(out, outs[0], "1 vs 2 vs 3 threads")


def test_negative_control_thread_count():
    """The same thread check, on the same long row, flags a log_softmax whose row sum is split
    between threads."""
    x = thread_input((1, 4_000_000), torch.float32)
    outs = under_each_thread_count(lambda: torch_sum_log_softmax(x))
    assert any(not bitwise_equal(o, outs[0]) for o in outs[1:]), "thread check failed to flag torch.sum"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_run_to_run_determinism(device, backend):
    require(device, backend)
    x = make_input((8, 3, 600), torch.bfloat16, device).requires_grad_()
    dy = make_input((8, 3, 600), torch.bfloat16, device, seed=2)
    outs = []
    for _ in range(3):
        y = fusedtx.log_softmax(x, backend=backend)
        outs.append((y.detach(), torch.autograd.grad(y, x, dy)[0]))
    for y, dx in outs[1:]:
        assert_bitwise_equal(y, outs[0][0], "forward, repeated")
        assert_bitwise_equal(dx, outs[0][1], "backward, repeated")


# ---------------------------------------------------------------------------------------------
# edge values as torch.log_softmax; bad input gets a clear error (point 7)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_edge_values_like_torch(device, backend, dtype):
    """+inf, -inf, all -inf (NaN, as torch), NaN, huge magnitudes: output and gradient as
    torch.log_softmax's, NaN in the same places."""
    require(device, backend)
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([
        [1.0, 2.0, 3.0, 4.0],
        [nan, 1.0, 2.0, 3.0],
        [inf, 1.0, 2.0, 3.0],
        [-inf, 1.0, -inf, 3.0],
        [-inf, -inf, -inf, -inf],
        [inf, -inf, 0.0, 1.0],
        [3e4, -3e4, 0.0, 5.0],
        [-inf, -inf, -inf, 2.0],
    ], dtype=dtype, device=device)
    dy = torch.linspace(-1.0, 1.0, x.numel()).view(x.shape).to(dtype).to(device)
    leaf = x.clone().requires_grad_()
    y = fusedtx.log_softmax(leaf, backend=backend)
    (dx,) = torch.autograd.grad(y, leaf, dy)
    x64 = x.double().requires_grad_()
    y64 = torch.log_softmax(x64, -1)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    for ours, theirs, what in ((y, y64, "forward"), (dx, dx64, "backward")):
        assert torch.equal(ours.isnan(), theirs.isnan()), what
        finite = ~theirs.isnan()
        # gradients cancel (dy - p * sum dy): an absolute allowance of two ulps of 1 in x's dtype
        tol = 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(ours[finite].double(), theirs[finite], rtol=tol, atol=tol, msg=what)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_zero_dim_and_empty(device, backend):
    require(device, backend)
    x = torch.tensor(3.0, device=device, requires_grad=True)
    y = fusedtx.log_softmax(x, backend=backend)
    assert y.shape == () and y.item() == torch.log_softmax(x.detach(), 0).item() == 0.0
    (dx,) = torch.autograd.grad(y, x, torch.tensor(2.0, device=device))
    assert dx.item() == 0.0
    for shape in ((2, 0, 5), (2, 5, 0), (0,)):
        e = torch.randn(shape, device=device, requires_grad=True)
        out = fusedtx.log_softmax(e, backend=backend)
        assert out.shape == torch.log_softmax(e, -1).shape
        out.sum().backward()
        assert e.grad.shape == e.shape


def test_dtype_argument_casts_first_as_torch():
    x = make_input((4, 33), torch.bfloat16, "cpu")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        y = fusedtx.log_softmax(x, -1, dtype=dtype)
        assert y.dtype == torch.log_softmax(x, -1, dtype=dtype).dtype == dtype
        assert_bitwise_equal(y, fusedtx.log_softmax(x.to(dtype), -1), f"dtype={dtype}")
    leaf = x.clone().requires_grad_()
    fusedtx.log_softmax(leaf, dtype=torch.float32).sum().backward()
    assert leaf.grad.dtype == torch.bfloat16


def test_bad_input_errors():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="log_softmax: x must be float32, float16 or bfloat16.*int64"):
        fusedtx.log_softmax(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be .*got torch.float64"):
        fusedtx.log_softmax(x.double())
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        fusedtx.log_softmax([1.0, 2.0])
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\].*got 2"):
        fusedtx.log_softmax(x, dim=2)
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\].*got -3"):
        fusedtx.log_softmax(x, dim=-3)
    with pytest.raises(TypeError, match="dim must be an int, got float"):
        fusedtx.log_softmax(x, dim=1.0)
    with pytest.raises(TypeError, match="dim must be an int, got NoneType"):
        fusedtx.log_softmax(x, dim=None)
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16.*got torch.float64"):
        fusedtx.log_softmax(x, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype or None, got str"):
        fusedtx.log_softmax(x, dtype="float32")
    with pytest.raises(ValueError, match="backend.*'cuda'"):
        fusedtx.log_softmax(x, backend="cuda")
    with pytest.raises(fusedtx.BackendUnavailableError, match="meta"):
        fusedtx.log_softmax(x.to("meta"))
    with pytest.raises(ValueError, match=r"log_softmax_backward: grad_y must be a tensor of y's shape \(4, 8\), got \(4, 7\)"):
        torch.ops.fusedtx.log_softmax_backward(torch.randn(4, 7), x, -1, "reference")
    with pytest.raises(ValueError, match="LogSoftmax: dim must be given"):
        fusedtx.nn.LogSoftmax()(x)


def test_native_kernels_refuse_other_lanes():
    require("cpu", "native")
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="log_softmax_forward: the CPU kernel sums with 64 lanes, asked for 32"):
        torch.ops.fusedtx_native.log_softmax_forward(x, 32)
    with pytest.raises(RuntimeError, match="log_softmax_backward: grad_y and y must match"):
        torch.ops.fusedtx_native.log_softmax_backward(x.half(), x, 64)


# ---------------------------------------------------------------------------------------------
# layouts, module, torch.library integration
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_non_contiguous_inputs(device, backend):
    require(device, backend)
    base = make_input((6, 40, 10), torch.float32, device)
    for x, dim in ((base.transpose(1, 2), -1), (base[:, ::2, :], 1), (base.expand(2, 6, 40, 10)[1], 0),
                   (base.transpose(0, 2), 1)):
        expected = fusedtx.log_softmax(x.contiguous(), dim, backend=backend)
        assert_bitwise_equal(fusedtx.log_softmax(x, dim, backend=backend), expected, "strided view")
        torch.testing.assert_close(expected, torch.log_softmax(x, dim), rtol=1e-5, atol=1e-5)


def test_module_is_a_drop_in():
    x = make_input((2, 5, 7), torch.float32, "cpu")
    for dim in (-1, 1):
        ours, theirs = fusedtx.nn.LogSoftmax(dim), torch.nn.LogSoftmax(dim)
        assert_bitwise_equal(ours(x), fusedtx.log_softmax(x, dim), "nn.LogSoftmax")
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    assert "dim=1" in repr(fusedtx.nn.LogSoftmax(dim=1))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    require(device, backend)
    x = make_input((3, 5, 17), torch.float32, device).requires_grad_()
    torch.library.opcheck(torch.ops.fusedtx.log_softmax.default, (x, -1, backend))
    torch.library.opcheck(torch.ops.fusedtx.log_softmax.default, (x, 1, backend))
    y = fusedtx.log_softmax(x.detach(), backend=backend)
    torch.library.opcheck(torch.ops.fusedtx.log_softmax_backward.default, (torch.randn_like(y), y, -1, backend))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    require(device, backend)
    torch._dynamo.reset()

    def f(x):
        return fusedtx.log_softmax(x * 2.0, backend=backend).sum(-1).square().sum()

    assert_compiled_equals_eager(f, make_input((2, 6, 9), torch.float32, device))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_eager_path_equals_registered_op(device, backend):
    """The plain-eager path (the op's body and eager autograd Function) and the torch.library op
    give the same bits, output and gradient."""
    require(device, backend)
    x = make_input((3, 5, 40), torch.bfloat16, device)
    dy = make_input((3, 5, 40), torch.bfloat16, device, seed=1)
    outs = []
    for call in (lambda t: fusedtx.log_softmax(t, 1, backend=backend),
                 lambda t: torch.ops.fusedtx.log_softmax(t, 1, backend)):
        leaf = x.clone().requires_grad_()
        y = call(leaf)
        outs.append((y, torch.autograd.grad(y, leaf, dy)[0]))
    assert_bitwise_equal(outs[0][0], outs[1][0], "eager vs registered forward")
    assert_bitwise_equal(outs[0][1], outs[1][1], "eager vs registered backward")
