"""The `fusedtx::linear` op: y = act(x @ weight.T + bias), batch-invariant, with autograd.

    fusedtx::linear(Tensor x, Tensor weight, Tensor? bias, int activation, bool save_preact,
                    str backend) -> (Tensor y, Tensor preact)
    fusedtx::linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor preact, int activation,
                             bool need_dx, bool need_dweight, bool need_dbias, str backend)
                             -> (Tensor dx, Tensor dweight, Tensor dbias)

x has any number of leading dims and is viewed as (M, K); weight is (N, K) like torch.nn.Linear.
Every backend computes reference.linear_matmul: one float32 accumulator per output element taking
x[i, k] * weight[j, k] with an FMA for k ascending, then + bias, then the activation (GELU erf
or tanh) in the epilogue. No tile shape, split or thread count enters, so a row's bits depend
on that row and on the weight alone.

The backward runs three pieces through the same kernels:
    g       = dy * act'(h)          fused elementwise pass, also summing dbias in fixed row groups
    dx      = linear_matmul(g, weight)     the same M-invariant kernel: dx rows are batch-invariant too
    dweight = linear_matmul(g.T, x)        one accumulator per element over the M rows in ascending order
The pre-activation h (M, N) is SAVED by the forward when a gradient is needed and there is an
activation, in x's dtype: as much memory as torch's own F.linear + F.gelu keeps for the GELU
backward, and it saves recomputing a whole matmul. Without an activation nothing extra is kept.
"""
from __future__ import annotations

import torch

from .. import _extension, reference
from ..backends import BACKENDS
from ._eager import backward_op, eager_autograd

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTIVATION_NAMES = ("none", "gelu", "gelu_tanh")


def activation_code(activation) -> int:
    """None / "none" / "gelu" (exact, erf) / "gelu_tanh" (GPT-2's tanh approximation) -> ACT_*."""
    if isinstance(activation, str) or activation is None:
        code = reference.ACTIVATIONS.get(activation)
        if code is not None:
            return code
    raise ValueError(f"linear: activation must be None, 'gelu' or 'gelu_tanh', got {activation!r}")


def check_args(x, weight, bias, backend: str | None = None, name: str = "linear") -> None:
    """Raise TypeError / ValueError naming the bad argument, with expected vs actual."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: weight must be a torch.Tensor, got {type(weight).__name__}")
    allowed = SUPPORTED_DTYPES + ((torch.float64,) if backend in (None, "reference") else ())
    if x.dtype not in allowed:
        extra = " (float64 only with backend='reference')" if x.dtype == torch.float64 else ""
        raise TypeError(f"{name}: x must be float32, bfloat16 or float16{extra}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have at least 1 dim (..., in_features), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D (out_features, in_features), got shape {list(weight.shape)}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{name}: x's last dim ({x.shape[-1]}) must equal weight's in_features "
                         f"(weight.shape[1] = {weight.shape[1]}); weight has shape {list(weight.shape)}")
    for arg_name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg_name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name}: {arg_name} is on {t.device} but x is on {x.device}; put them on one device")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: {arg_name} must have x's dtype {x.dtype}, got {t.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: bias must have shape [{weight.shape[0]}] (out_features), got {list(bias.shape)}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"linear: backend must be one of {BACKENDS}, got {backend!r}")


def _empty(like: torch.Tensor, dtype=None) -> torch.Tensor:
    return like.new_empty(0, dtype=dtype or like.dtype)


def _matmul(backend: str, a, b, bias, activation: int, save_preact: bool):
    """(y, preact or None) = act(a @ b + bias) for 2-D a (M, K), b (K, N) of any strides."""
    m, n = a.shape[0], b.shape[1]
    if m == 0 or n == 0 or a.shape[1] == 0 or backend == "reference" or a.dtype == torch.float64:
        # Empty problems go to the spec: an empty sum is +0 whatever the kernel, and no launch.
        y, h = reference.linear_matmul(a, b, bias, activation)
        return y.contiguous(), (h.contiguous() if save_preact and activation else None)
    if backend == "triton":
        from ..kernels import linear as triton_linear

        return triton_linear.linear_matmul(a, b, bias, activation, save_preact)
    y, h = _extension.ops().linear_matmul(a, b, bias, activation, save_preact, reference.MATMUL_K_BLOCK)
    return y, (h if save_preact and activation else None)


def _bias_act_backward(backend: str, grad_y, preact, activation: int, need_bias_grad: bool):
    """(grad_preact, grad_bias or None) for contiguous (M, N) grad_y and preact."""
    if backend == "reference" or grad_y.dtype == torch.float64 or grad_y.numel() == 0:
        return reference.linear_bias_act_backward(grad_y, preact, activation, need_bias_grad)
    if backend == "triton":
        from ..kernels import linear as triton_linear

        g, gb = triton_linear.linear_bias_act_backward(grad_y, preact, activation, need_bias_grad)
    else:
        g, gb = _extension.ops().linear_bias_act_backward(grad_y, preact, activation, need_bias_grad,
                                                   reference.BIAS_GRAD_ROW_GROUPS)
    return (g if activation else grad_y), (gb if need_bias_grad else None)


def linear_impl(x, weight, bias, activation: int, save_preact: bool, backend: str):
    """The op's body. fusedtx.functional calls it directly in eager inference."""
    check_args(x, weight, bias, backend)
    _check_backend(backend)
    lead, k, n = x.shape[:-1], x.shape[-1], weight.shape[0]
    y, h = _matmul(backend, x.reshape(-1, k), weight.t(), bias, activation, save_preact)
    preact = h.view(*lead, n) if h is not None else _empty(x)
    return y.view(*lead, n), preact


@torch.library.custom_op("fusedtx::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: int,
           save_preact: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_impl(x, weight, bias, activation, save_preact, backend)


@linear.register_fake
def _(x, weight, bias, activation, save_preact, backend):
    check_args(x, weight, bias, backend)
    _check_backend(backend)
    shape = (*x.shape[:-1], weight.shape[0])
    y = x.new_empty(shape)
    return y, (x.new_empty(shape) if save_preact and activation else _empty(x))


def linear_backward_impl(grad_y, x, weight, preact, activation, need_dx, need_dweight, need_dbias, backend):
    """The backward op's body."""
    _check_backend(backend)
    k, n = weight.shape[1], weight.shape[0]
    dy = grad_y.to(x.dtype).reshape(-1, n).contiguous()
    h = preact.reshape(-1, n).contiguous() if activation else None
    g, gb = _bias_act_backward(backend, dy, h, activation, need_dbias)
    dx = _matmul(backend, g, weight, None, 0, False)[0].view(x.shape) if need_dx else _empty(x)
    dw = _matmul(backend, g.t(), x.reshape(-1, k), None, 0, False)[0] if need_dweight else _empty(x)
    db = gb if need_dbias else _empty(x, reference.compute_dtype(x.dtype))
    return dx, dw, db


@torch.library.custom_op("fusedtx::linear_backward", mutates_args=())
def linear_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, preact: torch.Tensor,
                    activation: int, need_dx: bool, need_dweight: bool, need_dbias: bool,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return linear_backward_impl(grad_y, x, weight, preact, activation, need_dx, need_dweight, need_dbias, backend)


@linear_backward.register_fake
def _(grad_y, x, weight, preact, activation, need_dx, need_dweight, need_dbias, backend):
    acc = reference.compute_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else _empty(x),
            x.new_empty(weight.shape) if need_dweight else _empty(x),
            x.new_empty(weight.shape[0], dtype=acc) if need_dbias else _empty(x, acc))


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, _, backend = inputs
    _, preact = output
    ctx.save_for_backward(x, weight, preact)
    ctx.activation, ctx.backend = activation, backend
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(preact)


def _backward(ctx, grad_y, _grad_preact):
    x, weight, preact = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if ctx.activation and preact.numel() == 0 and grad_y.numel() != 0:
        raise RuntimeError("linear: the forward did not save the pre-activation (save_preact=False) "
                           "but a gradient is needed; call through fusedtx.linear, which decides it")
    run = backward_op(ctx, linear_backward, linear_backward_impl)
    dx, dw, db = run(grad_y, x, weight, preact, ctx.activation, bool(need_x), bool(need_w), bool(need_b), ctx.backend)
    return (dx if need_x else None, dw if need_w else None, db.to(ctx.bias_dtype) if need_b else None,
            None, None, None)


linear.register_autograd(_backward, setup_context=_setup_context)
linear_eager = eager_autograd("linear", linear_impl, _setup_context, _backward)
