"""fusedtx.activation (SiLU, GELU, GELU-tanh): accuracy, reference parity, the batch invariance
PyTorch's own CPU kernels lack, thread counts, errors, the nn layers, opcheck and compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as torch_F

import fusedtx
from fusedtx import reference
from helpers import (
    DEVICE_BACKENDS,
    DTYPES,
    assert_accuracy,
    assert_bitwise_equal,
    assert_compiled_equals_eager,
    bitwise_equal,
    poisoned_outputs,
    record_bitexact,
    require,
    require_parity_case,
    under_each_thread_count,
)

KINDS = ["silu", "gelu", "gelu_tanh"]
TORCH = {"silu": torch_F.silu, "gelu": torch_F.gelu, "gelu_tanh": lambda t: torch_F.gelu(t, approximate="tanh")}
SHAPES = [(1,), (7,), (3, 5, 129), (2, 40001), (0, 4)]
SHAPE_IDS = ["1", "7", "3x5x129", "2x40001", "empty"]


def make_input(shape, dtype, device, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


# ---------------------------------------------------------------------------------------------
# accuracy against float64 and parity with the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward_accuracy(device, backend, dtype, kind):
    require(device, backend)
    x = make_input((4, 1000), dtype, device).requires_grad_()
    dy = make_input((4, 1000), dtype, device, seed=1, scale=1.0)
    y = fusedtx.activation(x, kind, backend=backend)
    (dx,) = torch.autograd.grad(y, x, dy)
    x_e = x.detach().clone().requires_grad_()
    y_e = TORCH[kind](x_e)
    (dx_e,) = torch.autograd.grad(y_e, x_e, dy)
    x64 = x.detach().double().requires_grad_()
    y64 = TORCH[kind](x64)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert_accuracy(y, y_e, y64, f"{kind} forward")
    assert_accuracy(dx, dx_e, dx64, f"{kind} backward")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_bitwise_equal_to_reference(device, backend, dtype, kind, shape):
    require_parity_case(device, backend, dtype)
    if backend == "triton" and shape == (2, 40001):
        pytest.skip("the interpreter is slow; 3x5x129 covers Triton's block tail")
    x = make_input(shape, dtype, device)
    if x.numel() > 3:
        x.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0], dtype=dtype)
    dy = make_input(shape, dtype, device, seed=1, scale=1.0)
    code = reference.ELEMENTWISE[kind]
    with poisoned_outputs():
        y = fusedtx.activation(x, kind, backend=backend)
        dx = torch.ops.fusedtx.activation_backward(dy, x, code, backend)
    exact = bitwise_equal(y, reference.activation_forward(x.cpu(), code).to(device)) and \
        bitwise_equal(dx, reference.activation_backward(dy.cpu(), x.cpu(), code).to(device))
    record_bitexact("activation", device, backend, dtype, exact)
    assert exact, f"{kind} {backend} {dtype}: not the reference's bits"


def test_extremes_are_pytorchs_limits():
    """+-inf, NaN, signed zeros and the far tails: the values PyTorch gives in float64 (NaN where
    it does). Not its float32 kernels': on AVX-512 hosts its vectorised float32 gelu gives NaN at
    +inf, where its float64 and one-element paths give the limit, +inf."""
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 100.0, -100.0, 1e-30, -1e-30])
    for kind in KINDS:
        ours, theirs = fusedtx.activation(x, kind, backend="reference"), TORCH[kind](x.double()).float()
        assert torch.equal(ours.isnan(), theirs.isnan()), kind
        finite = ~theirs.isnan()
        assert torch.allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-30), (kind, ours, theirs)


# ---------------------------------------------------------------------------------------------
# batch invariance: the property PyTorch's CPU silu / gelu lack
# ---------------------------------------------------------------------------------------------
def invariance_failures(fn, width=127, probes=16, batches=(2, 3, 5, 8)) -> list[str]:
    """Each of `probes` rows of `width` under fn, forward: its bits alone vs first and last in
    batches of garbage-free random rows. The width leaves 15 elements to a vector loop's scalar
    tail when a row is alone, none of them when it leads a batch, and moves the threads' split
    points with every batch size."""
    g = torch.Generator().manual_seed(3)
    failures = []
    for p in range(probes):
        row = torch.randn(1, width, generator=g) * 4
        alone = fn(row)
        for n in batches:
            batch = torch.cat([row, torch.randn(n - 1, width, generator=g) * 4])
            for at in (0, n - 1):
                if not bitwise_equal(fn(batch.roll(at, 0))[at : at + 1], alone):
                    failures.append(f"probe {p}: batch {n} at {at}")
    return failures


@pytest.mark.parametrize("device,backend", [p for p in DEVICE_BACKENDS if p[0] == "cpu"])
@pytest.mark.parametrize("kind", KINDS)
def test_batch_invariance(device, backend, kind):
    require(device, backend)
    assert invariance_failures(lambda t: fusedtx.activation(t, kind, backend=backend)) == []


@pytest.mark.parametrize("kind,width", [("silu", 127), ("gelu_tanh", 127), ("gelu", 1)])
def test_negative_control_pytorch_activation_depends_on_the_batch(kind, width):
    """PyTorch's CPU kernels give a row's last elements other bits when they are the tensor's
    scalar tail (alone) than in the vector body (among other rows): the check catches it. Its
    exact GELU vectorises its tail: only a one-element tensor takes its scalar path."""
    assert invariance_failures(TORCH[kind], width=width), f"torch {kind} passed the invariance check"


def test_thread_count_invariance_and_negative_control():
    """A long tensor is cut between threads at points that depend on the thread count; fusedtx's
    elements do not notice, PyTorch's silu does."""
    require("cpu", "native")
    x = make_input((3, 40001), torch.float32, "cpu").requires_grad_()
    dy = make_input((3, 40001), torch.float32, "cpu", seed=1, scale=1.0)

    def run(fn):
        y = fn(x)
        return torch.cat([y.detach(), torch.autograd.grad(y, x, dy)[0]])

    for kind in KINDS:
        outs = under_each_thread_count(lambda: run(lambda t: fusedtx.activation(t, kind, backend="native")),
                                       counts=(1, 2, 3))
        for out in outs[1:]:
            assert_bitwise_equal(out, outs[0], f"{kind}: 1 vs 2 vs 3 threads")
    torch_outs = under_each_thread_count(lambda: run(torch_F.silu), counts=(1, 2, 3))
    assert any(not bitwise_equal(o, torch_outs[0]) for o in torch_outs[1:]), "torch silu ignored the thread count"


# ---------------------------------------------------------------------------------------------
# the API: errors, layouts, layers, registered op, compile
# ---------------------------------------------------------------------------------------------
def test_bad_input_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="activation: activation must be one of \\['gelu', 'gelu_tanh', 'silu'\\], got 'relu'"):
        fusedtx.activation(x, "relu")
    with pytest.raises(ValueError, match="got None"):
        fusedtx.activation(x, None)
    with pytest.raises(TypeError, match="activation: x must be float32, float16 or bfloat16 \\(float32 math inside\\), got torch.int64"):
        fusedtx.activation(torch.ones(3, dtype=torch.int64), "silu")
    with pytest.raises(TypeError, match="activation: x must be a torch.Tensor, got list"):
        fusedtx.activation([1.0], "silu")
    with pytest.raises(ValueError, match="activation: activation must be a code in \\[1, 2, 4\\]"):
        torch.ops.fusedtx.activation(x, 3, "native")
    with pytest.raises(ValueError, match="backend: expected one of"):
        fusedtx.activation(x, "silu", backend="cuda-fast")
    with pytest.raises(ValueError, match="GELU: approximate must be 'none' or 'tanh', got 'fast'"):
        fusedtx.nn.GELU("fast")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_non_contiguous_and_zero_dim(device, backend):
    require(device, backend)
    x = make_input((6, 9), torch.float32, device).t()
    assert_bitwise_equal(fusedtx.activation(x, "gelu", backend=backend),
                         fusedtx.activation(x.contiguous(), "gelu", backend=backend), "transposed")
    scalar = torch.tensor(1.5, device=device)
    y = fusedtx.activation(scalar, "silu", backend=backend)
    assert y.shape == () and torch.allclose(y.cpu(), torch_F.silu(scalar.cpu()))


def test_layers_are_drop_ins():
    x = make_input((2, 33), torch.float32, "cpu")
    assert_bitwise_equal(fusedtx.nn.SiLU()(x), fusedtx.activation(x, "silu"), "nn.SiLU")
    assert_bitwise_equal(fusedtx.nn.GELU()(x), fusedtx.activation(x, "gelu"), "nn.GELU")
    assert_bitwise_equal(fusedtx.nn.GELU("tanh")(x), fusedtx.activation(x, "gelu_tanh"), "nn.GELU(tanh)")
    assert "approximate='tanh'" in repr(fusedtx.nn.GELU("tanh"))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    require(device, backend)
    x = make_input((3, 17), torch.float32, device).requires_grad_()
    for code in reference.ELEMENTWISE.values():
        torch.library.opcheck(torch.ops.fusedtx.activation.default, (x, code, backend))
        torch.library.opcheck(torch.ops.fusedtx.activation_backward.default,
                              (torch.randn_like(x).detach(), x.detach(), code, backend))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    require(device, backend)
    torch._dynamo.reset()

    def f(x):
        return (fusedtx.activation(x * 2.0, "silu", backend=backend) * fusedtx.activation(x, "gelu", backend=backend)).sum()

    assert_compiled_equals_eager(f, make_input((4, 19), torch.float32, device))
