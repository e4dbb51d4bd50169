"""The `fusedtx::activation` op: argument checks, backend dispatch, fake and autograd.

    fusedtx::activation(x, activation, backend) -> y                      y = act(x)
    fusedtx::activation_backward(grad_y, x, activation, backend) -> dx    dx = dy * act'(x)

`activation` is a reference.ACT_* code (functional.activation maps the names "gelu", "gelu_tanh"
and "silu" to it). Every backend works on a contiguous 1-D view of x and computes each element
with the same operations (reference.activation_forward), so an element's bits depend on its
value alone: not on the tensor's size, its layout, or how a kernel cut it.
"""
from __future__ import annotations

import torch

from .. import reference
from ._dispatch import Kernel, NativeFastPath, check_backend, register

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NAMES = {code: name for name, code in reference.ELEMENTWISE.items()}

forward_kernel = Kernel("activation_forward", "activation")    # (x, activation) -> y
backward_kernel = Kernel("activation_backward", "activation")  # (grad_y, x, activation) -> dx
# fusedtx.functional.activation's whole inference call, native on CPU, checks included (None
# where a check would fail: the Python path raises): (x, activation code or -1) -> y
native_call = NativeFastPath("activation_call")


def activation_code(activation, name: str = "activation") -> int:
    """"gelu" (exact, erf) / "gelu_tanh" (the tanh approximation) / "silu" -> reference.ACT_*."""
    code = reference.ELEMENTWISE.get(activation) if isinstance(activation, str) else None
    if code is None:
        raise ValueError(f"{name}: activation must be one of {sorted(reference.ELEMENTWISE)}, got {activation!r}")
    return code


def check_args(x, activation, backend, name: str = "activation"):
    """Raise TypeError / ValueError naming the bad argument, with expected vs actual."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: x must be float32, float16 or bfloat16 (float32 math inside), got {x.dtype}")
    if isinstance(activation, torch.SymInt):  # traced by torch.compile(dynamic=True): it picks the code
        activation = int(activation)
    if isinstance(activation, bool) or not isinstance(activation, int) or activation not in NAMES:
        raise ValueError(f"{name}: activation must be a code in {sorted(NAMES)} ({NAMES}), got {activation!r}")
    return x, activation, check_backend(backend, name)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().view(-1)


def _forward(x, activation, backend):
    y = forward_kernel(backend, x.device)(_flat(x), activation)
    return y.view(x.shape)


def _fake(x, activation, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check_backward(grad_y, x, activation, backend):
    if grad_y.shape != x.shape:
        raise ValueError(f"activation_backward: grad_y must have x's shape {list(x.shape)}, got {list(grad_y.shape)}")
    return (grad_y,) + check_args(x, activation, backend, "activation_backward")


def _backward_body(grad_y, x, activation, backend):
    dx = backward_kernel(backend, x.device)(_flat(grad_y.to(x.dtype)), _flat(x), activation)
    return dx.view(x.shape)


activation_backward = register(
    "activation_backward", "(Tensor grad_y, Tensor x, SymInt activation, str backend) -> Tensor",
    check=_check_backward, body=_backward_body,
    fake=lambda grad_y, x, activation, backend: torch.empty_like(x, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    x, activation, backend = inputs
    ctx.save_for_backward(x)
    ctx.activation, ctx.backend = activation, backend


def _backward(ctx, grad_y):
    (x,) = ctx.saved_tensors
    return activation_backward.in_backward(ctx)(grad_y, x, ctx.activation, ctx.backend), None, None


activation = register("activation", "(Tensor x, SymInt activation, str backend) -> Tensor",
                      check=check_args, body=_forward, fake=_fake, setup_context=_setup_context, backward=_backward)
