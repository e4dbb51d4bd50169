"""The `fusedtx::log_softmax` op: argument checks, backend dispatch, fake and autograd.

    fusedtx::log_softmax(x, dim, backend) -> y
    fusedtx::log_softmax_backward(grad_y, y, dim, backend) -> dx

torch.log_softmax's semantics over one dim, without softmax's scale and causal mask (a scaled
or masked log_softmax is x * scale or x.masked_fill(mask, -inf) before it); fusedtx.functional
casts x to `dtype` first. Like softmax, every backend works on a contiguous (rows, cols) view
with `dim` moved last and sums each row with policy.row_lanes lanes; the output is returned
contiguous in x's shape. The backward reads the output only, as torch's does.
"""
from __future__ import annotations

import torch

from .. import policy
from ._dispatch import Kernel, check_backend, register
from ._rows import SUPPORTED_DTYPES, as_rows, check_x_dim, empty_like_contiguous, from_rows

forward_kernel = Kernel("log_softmax_forward", "log_softmax")    # (x, lanes) -> y
backward_kernel = Kernel("log_softmax_backward", "log_softmax")  # (grad_y, y, lanes) -> dx


def check_dtype(dtype, name: str = "log_softmax"):
    """The `dtype` argument of fusedtx.log_softmax: None or one of the supported dtypes."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name}: dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype must be float32, float16 or bfloat16 (float32 math inside), got {dtype}")
    return dtype


def check_args(x, dim, backend, name: str = "log_softmax"):
    """Raise TypeError / ValueError naming the bad argument, with expected vs actual."""
    return x, check_x_dim(x, dim, name), check_backend(backend, name)


def _forward(x, dim, backend):
    if x.numel() == 0:  # no rows, or rows of nothing: nothing for a kernel to do, on any backend
        return empty_like_contiguous(x)
    rows = as_rows(x, dim)
    lanes = policy.row_lanes(backend, rows.shape[1], x.device)
    return from_rows(forward_kernel(backend, x.device)(rows, lanes), x, dim)


def _check_backward(grad_y, y, dim, backend):
    name = "log_softmax_backward"
    if not isinstance(grad_y, torch.Tensor) or grad_y.shape != y.shape:
        raise ValueError(f"{name}: grad_y must be a tensor of y's shape {tuple(y.shape)}, got "
                         f"{tuple(grad_y.shape) if isinstance(grad_y, torch.Tensor) else type(grad_y).__name__}")
    return grad_y, y, check_x_dim(y, dim, name), check_backend(backend, name)


def _backward_body(grad_y, y, dim, backend):
    if y.numel() == 0:
        return empty_like_contiguous(y)
    rows = as_rows(y, dim)
    lanes = policy.row_lanes(backend, rows.shape[1], y.device)
    dx = backward_kernel(backend, y.device)(as_rows(grad_y.to(y.dtype), dim), rows, lanes)
    return from_rows(dx, y, dim)


log_softmax_backward = register(
    "log_softmax_backward", "(Tensor grad_y, Tensor y, SymInt dim, str backend) -> Tensor",
    check=_check_backward, body=_backward_body,
    fake=lambda grad_y, y, dim, backend: empty_like_contiguous(y))


def _setup_context(ctx, inputs, output):
    _, dim, backend = inputs
    ctx.save_for_backward(output)
    ctx.dim, ctx.backend = dim, backend


def _backward(ctx, grad_y):
    (y,) = ctx.saved_tensors
    return log_softmax_backward.in_backward(ctx)(grad_y, y, ctx.dim, ctx.backend), None, None


log_softmax = register("log_softmax", "(Tensor x, SymInt dim, str backend) -> Tensor",
                       check=check_args, body=_forward, fake=lambda x, dim, backend: empty_like_contiguous(x),
                       setup_context=_setup_context, backward=_backward)
