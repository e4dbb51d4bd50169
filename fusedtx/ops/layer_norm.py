"""The `fusedtx::layer_norm` op: argument checks, backend dispatch, fake and autograd.

    fusedtx::layer_norm(x, normalized_shape, weight, bias, eps, backend) -> (y, mean, rstd)
    fusedtx::layer_norm_backward(grad_y, x, mean, rstd, weight, need_param_grads, backend) -> (dx, dw, db)

The semantics of torch.nn.functional.layer_norm: normalise over the trailing dims given by
normalized_shape. Every backend works on x viewed as (rows, N); mean and rstd (float32, or
float64 for float64 x) are saved for the backward, which computes dx per row and the weight and
bias gradients through the fixed row groups of reference.row_group_sum (policy.ROW_GROUPS): no
atomics, the same bits for any thread count or GPU. Row sums use policy.row_lanes lanes.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import policy, reference
from ._dispatch import Kernel, check_backend, check_real, register

LOW_PRECISION = (torch.float16, torch.bfloat16)
SUPPORTED_DTYPES = (torch.float32, torch.float64, *LOW_PRECISION)

# (x, weight, bias, eps, lanes) -> (y, mean, rstd)
forward_kernel = Kernel("layer_norm_forward", "layer_norm")
# (grad_y, x, mean, rstd, weight, need_param_grads, lanes, groups) -> (dx, dweight, dbias)
backward_kernel = Kernel("layer_norm_backward", "layer_norm")


def _is_size(d) -> bool:
    """An int, or a SymInt: torch.compile(dynamic=True) traces sizes taken from x.shape so."""
    return isinstance(d, (int, torch.SymInt)) and not isinstance(d, bool)


def normalize_shape(normalized_shape) -> tuple[int, ...]:
    if _is_size(normalized_shape):
        return (normalized_shape,)
    if isinstance(normalized_shape, (tuple, list, torch.Size, Sequence)) and all(map(_is_size, normalized_shape)):
        return tuple(normalized_shape)
    raise TypeError(f"layer_norm: normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")


def check_args(x, normalized_shape, weight, bias, eps, backend):
    """Raise TypeError / ValueError naming the bad argument, with expected vs actual."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"layer_norm: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    check_backend(backend, "layer_norm")
    if backend == "triton" and x.dtype == torch.float64:
        raise TypeError("layer_norm: the triton backend computes in float32 and does not take float64 x; "
                        "use backend='native' or 'reference' for float64")
    shape = normalize_shape(normalized_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"layer_norm: normalized_shape must be non-empty with positive sizes, got {list(shape)}")
    if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise ValueError(f"layer_norm: normalized_shape {list(shape)} must match the trailing dims of x, "
                         f"got x of shape {list(x.shape)}")
    param_dtype = None
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"layer_norm: {name} must be a torch.Tensor or None, got {type(p).__name__}")
        if tuple(p.shape) != shape:
            raise ValueError(f"layer_norm: {name} must have shape {list(shape)} (normalized_shape), got {list(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {p.device} but x is on {x.device}; put them on one device")
        allowed = (x.dtype, torch.float32) if x.dtype in LOW_PRECISION else (x.dtype,)
        if p.dtype not in allowed:
            raise TypeError(f"layer_norm: {name} must be {' or '.join(map(str, allowed))} for {x.dtype} x, got {p.dtype}")
        if param_dtype is not None and p.dtype != param_dtype:
            raise TypeError(f"layer_norm: weight ({param_dtype}) and bias ({p.dtype}) must share a dtype")
        param_dtype = p.dtype
    # eps = 0 as torch allows: a constant row then gives NaN, as torch's does.
    return x, shape, weight, bias, check_real(eps, "layer_norm", "eps", least=0.0), backend


def _flat(p: torch.Tensor | None) -> torch.Tensor | None:
    if p is None or (p.dim() == 1 and p.is_contiguous()):
        return p
    return p.contiguous().view(-1)


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t as a contiguous (rows, n) tensor: t itself when it is one (a view costs Python time)."""
    return t if t.dim() == 2 and t.shape[1] == n and t.is_contiguous() else t.contiguous().view(-1, n)


def _stats_shape(x: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x.shape[: x.dim() - len(shape)])


def _forward(x, shape, weight, bias, eps, backend):
    n = math.prod(shape)
    lanes = policy.row_lanes(backend, n, x.device)
    y, mean, rstd = forward_kernel(backend, x.device)(_as_rows(x, n), _flat(weight), _flat(bias), eps, lanes)
    if y.shape == x.shape:  # x was (rows, N) already: no views
        return y, mean, rstd
    stats = _stats_shape(x, shape)
    return y.view(x.shape), mean.view(stats), rstd.view(stats)


def _fake(x, shape, weight, bias, eps, backend):
    stats = _stats_shape(x, shape)
    acc = reference.compute_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(stats, dtype=acc), x.new_empty(stats, dtype=acc))


def _check_backward(grad_y, x, mean, rstd, weight, need_param_grads, backend):
    return grad_y, x, mean, rstd, weight, need_param_grads, check_backend(backend, "layer_norm_backward")


def _backward_body(grad_y, x, mean, rstd, weight, need_param_grads, backend):
    n = math.prod(x.shape[mean.dim():])
    lanes = policy.row_lanes(backend, n, x.device)
    dx, dw, db = backward_kernel(backend, x.device)(_as_rows(grad_y.to(x.dtype), n), _as_rows(x, n), _flat(mean),
                                                    _flat(rstd), _flat(weight), need_param_grads, lanes,
                                                    policy.ROW_GROUPS)
    if not need_param_grads:  # two distinct empty tensors: op outputs may not alias each other
        dw, db = x.new_empty(0, dtype=mean.dtype), x.new_empty(0, dtype=mean.dtype)
    return (dx if dx.shape == x.shape else dx.view(x.shape)), dw, db


def _backward_fake(grad_y, x, mean, rstd, weight, need_param_grads, backend):
    size = math.prod(x.shape[mean.dim():]) if need_param_grads else 0
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(size, dtype=mean.dtype), x.new_empty(size, dtype=mean.dtype))


layer_norm_backward = register(
    "layer_norm_backward",
    "(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, bool need_param_grads, str backend) "
    "-> (Tensor, Tensor, Tensor)",
    check=_check_backward, body=_backward_body, fake=_backward_fake)


def _setup_context(ctx, inputs, output):
    x, _, weight, bias, _, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias, ctx.backend = bias is not None, backend
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    _, _, need_w, need_b, _, _ = ctx.needs_input_grad
    run = layer_norm_backward.in_backward(ctx)
    dx, dw, db = run(grad_y, x, mean, rstd, weight, bool(need_w or need_b), ctx.backend)
    dweight = dw.to(weight.dtype).view(weight.shape) if need_w else None
    dbias = db.to(ctx.bias_dtype).view(x.shape[mean.dim():]) if need_b else None
    return dx, None, dweight, dbias, None, None


layer_norm = register(
    "layer_norm",
    "(Tensor x, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, float eps, str backend) "
    "-> (Tensor, Tensor, Tensor)",
    check=check_args, body=_forward, fake=_fake, setup_context=_setup_context, backward=_backward)
