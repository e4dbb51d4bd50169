"""The functional API: fusedtx.softmax(...) and friends, for eager code and torch.compile.

Each function resolves the backend (argument > use_backend / set_backend > FUSEDTX_BACKEND >
per-device default, see fusedtx.backends), fills in defaults, and calls the registered op.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import backends
from .ops import layer_norm as _layer_norm_op
from .ops import linear as _linear_op
from .ops import softmax as _softmax_op


def _device_of(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _eager_inference(x: torch.Tensor) -> bool:
    """True when calling an op's implementation directly is indistinguishable from calling the
    registered op: a plain tensor, no gradient to record, no tracing, no dispatch mode. The
    dispatcher round trip through a Python custom op costs ~10 us, as much as the kernel on
    small inputs, so eager inference skips it. Same function, same bits."""
    return (type(x) is torch.Tensor
            and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None)


def softmax(x: torch.Tensor, dim: int = -1, *, scale: float | None = None, causal: bool = False,
            backend: str | None = None) -> torch.Tensor:
    """softmax(scale * x) along `dim`, float32 math, output in x's dtype.

    causal=True masks the last two dims as (queries, keys): query i of Tq sees keys
    j <= i + (Tk - Tq), the scaled masked softmax of unfused attention; dim must be -1. Masked
    entries are 0, and so is a query row that sees no key at all.
    Every row's bits depend only on that row (and its position among the queries when causal).
    """
    scale = 1.0 if scale is None else scale
    name = backends.resolve(backend, _device_of(x))
    if _eager_inference(x):  # the implementation checks the arguments itself
        return _softmax_op.softmax_impl(x, dim, scale, causal, name)
    _softmax_op.check_args(x, dim, scale, causal)  # before the op's schema sees them
    return _softmax_op.softmax(x, dim, float(scale), causal, name)


def layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, *, backend: str | None = None) -> torch.Tensor:
    """torch.nn.functional.layer_norm, fused and batch-invariant: normalise over the trailing
    `normalized_shape` dims with two-pass float32 statistics (float64 for float64 x).

    weight and bias may be float32 beside a float16/bfloat16 x (as under autocast); the output
    has x's dtype. Each row's output and input gradient depend on that row alone; the weight and
    bias gradients are summed in a fixed order, so they are the same bits run after run.
    """
    name = backends.resolve(backend, _device_of(x))
    if _eager_inference(x) and not (torch.is_grad_enabled() and any(
            p is not None and p.requires_grad for p in (weight, bias))):
        return _layer_norm_op.layer_norm_impl(x, normalized_shape, weight, bias, eps, name)[0]
    _layer_norm_op.check_args(x, normalized_shape, weight, bias, eps)  # before the op's schema sees them
    return _layer_norm_op.layer_norm(x, _layer_norm_op.normalize_shape(normalized_shape), weight, bias,
                                     float(eps), name)[0]


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           activation: str | None = None, backend: str | None = None) -> torch.Tensor:
    """act(x @ weight.T + bias), weight laid out (out_features, in_features) as in torch.nn.Linear.

    activation: None, "gelu" (exact, erf) or "gelu_tanh" (GPT-2's tanh approximation), fused into
    the matmul's epilogue. x may have any number of leading dims. Each output row's bits depend
    on its own row of x and on the weight alone — not on how many rows there are, where the row
    sits, or the thread count; the weight and bias gradients are summed in a fixed order.
    """
    name = backends.resolve(backend, _device_of(x))
    act = _linear_op.activation_code(activation)
    need_grad = _needs_grad(x, weight, bias)
    if _eager_inference(x) and not need_grad:  # the implementation checks the arguments itself
        return _linear_op.linear_impl(x, weight, bias, act, False, name)[0]
    _linear_op.check_args(x, weight, bias, name)  # before the op's schema sees them
    return _linear_op.linear(x, weight, bias, act, need_grad and act != 0, name)[0]


GELU_APPROXIMATIONS = {"none": "gelu", "tanh": "gelu_tanh"}


def gelu_ffn(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None, proj_weight: torch.Tensor,
             proj_bias: torch.Tensor | None, *, approximate: str = "none", backend: str | None = None) -> torch.Tensor:
    """The GPT feed-forward: linear(gelu(linear(x, fc_weight, fc_bias)), proj_weight, proj_bias),
    the GELU fused into the first matmul. approximate: "none" (erf) or "tanh", as in F.gelu."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"gelu_ffn: approximate must be 'none' or 'tanh', got {approximate!r}")
    hidden = linear(x, fc_weight, fc_bias, activation=GELU_APPROXIMATIONS[approximate], backend=backend)
    return linear(hidden, proj_weight, proj_bias, backend=backend)
