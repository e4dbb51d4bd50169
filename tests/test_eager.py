"""The eager autograd path (fusedtx/ops/_eager.py) against the registered ops.

In plain eager training fusedtx.functional runs an autograd.Function built from each op's own
pieces instead of the torch.library op. Both must give the same bits — outputs and every
gradient — and the same errors; tracing, dispatch modes and double backward must still go
through the registered op.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fusedtx
from fusedtx.ops import _eager
from fusedtx.ops import layer_norm as layer_norm_op
from helpers import DEVICE_BACKENDS, assert_bitwise_equal, bitwise_equal, require


def _inputs(shapes, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]


ROPE_TABLE = fusedtx.rope_table(8, 16)
ROPE_POSITIONS = torch.tensor([[3, 4, 5, 6, 7], [0, 15, 2, 9, 9]])


def _rope_args(x):
    return ROPE_POSITIONS.to(x.device), *(t.to(x.device) for t in ROPE_TABLE)


# name -> (input shapes, the functional call, the same computation through the registered op)
CASES = {
    "activation": (
        [(3, 5, 40)],
        lambda x, b: fusedtx.activation(x, "silu", backend=b),
        lambda x, b: torch.ops.fusedtx.activation(x, 4, b),
    ),
    "softmax": (
        [(3, 5, 40)],
        lambda x, b: fusedtx.softmax(x, dim=1, scale=0.7, backend=b),
        lambda x, b: torch.ops.fusedtx.softmax(x, 1, 0.7, False, b),
    ),
    "softmax_causal": (
        [(2, 24, 24)],
        lambda x, b: fusedtx.softmax(x, scale=0.5, causal=True, backend=b),
        lambda x, b: torch.ops.fusedtx.softmax(x, -1, 0.5, True, b),
    ),
    "log_softmax": (
        [(3, 5, 40)],
        lambda x, b: fusedtx.log_softmax(x, dim=1, backend=b),
        lambda x, b: torch.ops.fusedtx.log_softmax(x, 1, b),
    ),
    "layer_norm": (
        [(2, 5, 48), (48,), (48,)],
        lambda x, w, bias, b: fusedtx.layer_norm(x, 48, w, bias, backend=b),
        lambda x, w, bias, b: torch.ops.fusedtx.layer_norm(x, [48], w, bias, 1e-5, b)[0],
    ),
    "layer_norm_2d": (  # normalized over both dims of a 2-D x: one row of 120
        [(5, 24), (5, 24)],
        lambda x, w, b: fusedtx.layer_norm(x, (5, 24), w, backend=b),
        lambda x, w, b: torch.ops.fusedtx.layer_norm(x, [5, 24], w, None, 1e-5, b)[0],
    ),
    "linear_gelu": (
        [(3, 7, 32), (24, 32), (24,)],
        lambda x, w, bias, b: fusedtx.linear(x, w, bias, activation="gelu_tanh", backend=b),
        lambda x, w, bias, b: torch.ops.fusedtx.linear(x, w, bias, 2, True, b)[0],
    ),
    "linear": (
        [(5, 32), (16, 32)],
        lambda x, w, b: fusedtx.linear(x, w, backend=b),
        lambda x, w, b: torch.ops.fusedtx.linear(x, w, None, 0, False, b)[0],
    ),
    "causal_attention": (
        [(1, 2, 37, 16), (1, 1, 37, 16), (1, 1, 37, 16)],
        lambda q, k, v, b: fusedtx.causal_attention(q, k, v, split_size=16, backend=b),
        lambda q, k, v, b: torch.ops.fusedtx.causal_attention(q, k, v, 0.25, 16, b)[0],
    ),
    "rope": (  # positions and the table are constants: the gradient is x's alone
        [(2, 3, 5, 8)],
        lambda x, b: fusedtx.rope(x, *_rope_args(x), backend=b),
        lambda x, b: torch.ops.fusedtx.rope(x, *_rope_args(x), b),
    ),
}


def _run(fn, inputs, backend):
    """Output and the gradient of every input, for a fixed upstream gradient."""
    out = fn(*inputs, backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    return out, torch.autograd.grad(out, inputs, grad_out), type(out.grad_fn).__name__


def _assert_same(eager, registered, what):
    for name, a, b in zip(("output", *(f"grad {i}" for i in range(len(eager[1])))),
                          (eager[0], *eager[1]), (registered[0], *registered[1])):
        assert_bitwise_equal(a, b, f"{what} {name}")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_eager_path_equals_registered_op(device, backend, case):
    require(device, backend)
    shapes, functional, registered_call = CASES[case]
    inputs = _inputs(shapes, device, seed=len(case))
    eager = _run(functional, inputs, backend)
    registered = _run(registered_call, inputs, backend)
    assert eager[2].endswith("_eagerBackward"), f"{case}: the functional call took {eager[2]}"
    assert registered[2].startswith("GeneratedBackwardFor_fusedtx_"), registered[2]
    _assert_same(eager, registered, f"{case} eager vs registered op")


def test_negative_control_a_different_body_is_caught():
    """The comparison above can fail: the same autograd glue around F.layer_norm, whose bits
    are not fusedtx's, differs from the registered op."""
    require("cpu", "native")

    def torch_body(x, shape, weight, bias, eps, backend):
        mean = x.mean(-1)
        rstd = torch.rsqrt(x.var(-1, unbiased=False) + eps)
        return F.layer_norm(x, shape, weight, bias, eps), mean, rstd

    other = _eager.eager_autograd("layer_norm_torch", torch_body, layer_norm_op._setup_context,
                                  layer_norm_op._backward)
    x, w, bias = _inputs([(2, 5, 48), (48,), (48,)], "cpu", seed=3)
    ours = _run(lambda x, w, bias, b: other(x, (48,), w, bias, 1e-5, b)[0], [x, w, bias], "native")
    registered = _run(CASES["layer_norm"][2], [x, w, bias], "native")
    assert not all(bitwise_equal(a, b) for a, b in zip((ours[0], *ours[1]), (registered[0], *registered[1])))


def test_double_backward_raises_as_the_registered_op():
    require("cpu", "native")
    x, w = _inputs([(4, 8), (8,)], "cpu", seed=1)
    for call in (lambda: fusedtx.layer_norm(x, 8, w), lambda: torch.ops.fusedtx.layer_norm(x, [8], w, None, 1e-5,
                                                                                         "native")[0]):
        y = call()
        (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="no autograd formula was registered"):
            gx.sum().backward()


def test_unused_output_gradient_is_zero_filled():
    """gradcheck asks for gradients of the non-differentiable outputs alone: the backward then
    gets no gradient for the first output and must treat it as zero, as the registered op does."""
    require("cpu", "native")
    x, w, bias = (t.double().detach().requires_grad_() for t in _inputs([(3, 6), (6,), (6,)], "cpu", seed=2))
    def f(x, w, bias):
        return layer_norm_op.layer_norm.eager(x, (6,), w, bias, 1e-5, "native")

    assert torch.autograd.gradcheck(f, (x, w, bias))


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_and_tracing_take_the_registered_op():
    require("cpu", "native")
    x, w = _inputs([(4, 8), (8,)], "cpu", seed=4)
    assert _eager.is_plain_eager(x)
    assert type(fusedtx.layer_norm(x, 8, w).grad_fn).__name__ == "layer_norm_eagerBackward"
    with _Passthrough():
        assert not _eager.is_plain_eager(x)
        assert type(fusedtx.layer_norm(x, 8, w).grad_fn).__name__.startswith("GeneratedBackwardFor_fusedtx_layer_norm")
    assert not _eager.is_plain_eager(torch.nn.Parameter(torch.ones(2)))  # a subclass: the op handles it


@pytest.mark.parametrize("case", ["layer_norm", "linear_gelu", "causal_attention"])
def test_eager_path_errors_match(case):
    """Bad input raises the same error whichever path runs (the body checks its arguments)."""
    require("cpu", "native")
    shapes, functional, registered_call = CASES[case]
    inputs = _inputs(shapes, "cpu", seed=5)
    bad = [inputs[0].to(torch.float64 if case == "causal_attention" else torch.int32).detach(), *inputs[1:]]
    errors = []
    for call in (functional, registered_call):
        with pytest.raises((TypeError, ValueError, RuntimeError)) as info:
            call(*bad, "native")
        errors.append(str(info.value).splitlines()[0])
    assert errors[0] in errors[1] or errors[1] in errors[0], errors


# their backward reads the output, as torch.softmax's and torch.log_softmax's do
SAVES_OUTPUT = {"softmax", "softmax_causal", "log_softmax"}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_outputs_accept_in_place_modification_in_training(case, device, backend):
    """An output modified in place (ReLU(inplace=True), `h += 1`) trains as the out-of-place
    computation does, bit for bit; where the backward reads the output, autograd refuses the
    modification with its version error, as for torch.softmax."""
    require(device, backend)
    shapes, functional, _ = CASES[case]
    inputs = _inputs(shapes, device, seed=3)
    out = functional(*inputs, backend)
    out.mul_(2)  # exact: the out-of-place gradients below are the same bits
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    if case in SAVES_OUTPUT:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(out, inputs, grad_out)
        y = torch.softmax(inputs[0], -1)  # torch refuses the same
        y.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(y, inputs[0], torch.ones_like(y))
        return
    in_place = torch.autograd.grad(out, inputs, grad_out)
    out_of_place = torch.autograd.grad(functional(*inputs, backend) * 2, inputs, grad_out)
    for i, (a, b) in enumerate(zip(in_place, out_of_place)):
        assert_bitwise_equal(a, b, f"{case} grad {i}")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_layers_followed_by_in_place_ops_train(device, backend):
    """The drop-in case: torch.nn's in-place activations after fusedtx layers."""
    require(device, backend)
    torch.manual_seed(0)
    m = torch.nn.Sequential(fusedtx.nn.Linear(16, 32, backend=backend), torch.nn.ReLU(inplace=True),
                            fusedtx.nn.Linear(32, 4, backend=backend)).to(device)
    m(torch.randn(5, 16, device=device)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    x = torch.randn(2, 3, 16, device=device, requires_grad=True)
    h = fusedtx.nn.LayerNorm(16, backend=backend).to(device)(x)
    h += 1
    h.sum().backward()
    assert x.grad is not None
