"""The `fusedtx::softmax` op: argument checks, backend dispatch, fake and autograd.

    fusedtx::softmax(x, dim, scale, causal, backend) -> y
    fusedtx::softmax_backward(grad_y, y, dim, scale, backend) -> dx

The backend arrives already resolved (fusedtx.functional does that), so a traced graph records
which implementation it calls. Every backend works on a contiguous (rows, cols) view with `dim`
moved last and sums each row with policy.row_lanes lanes; the output is returned contiguous in
x's shape.
"""
from __future__ import annotations

import torch

from .. import policy
from ._dispatch import Kernel, check_backend, check_real, register
from ._rows import as_rows, check_x_dim, from_rows

forward_kernel = Kernel("softmax_forward", "softmax")    # (x, scale, causal, n_queries, lanes) -> y
backward_kernel = Kernel("softmax_backward", "softmax")  # (grad_y, y, scale, lanes) -> dx


def check_args(x, dim, scale, causal, backend, name: str = "softmax"):
    """Raise TypeError / ValueError naming the bad argument, with expected vs actual."""
    dim = check_x_dim(x, dim, name)
    scale = check_real(scale, name, "scale")
    if not isinstance(causal, bool):
        raise TypeError(f"{name}: causal must be a bool, got {type(causal).__name__}")
    ndim = max(x.dim(), 1)
    if causal and dim % ndim != ndim - 1:
        raise ValueError(f"{name}: causal masks the last two dims (queries, keys), so dim must be -1, got {dim}")
    return x, dim, scale, causal, check_backend(backend, name)


def _forward(x, dim, scale, causal, backend):
    if x.numel() == 0:  # no rows, or rows of nothing: nothing for a kernel to do, on any backend
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    rows = as_rows(x, dim)
    n_queries = x.shape[-2] if causal and x.dim() >= 2 else 1
    lanes = policy.row_lanes(backend, rows.shape[1], x.device)
    return from_rows(forward_kernel(backend, x.device)(rows, scale, causal, n_queries, lanes), x, dim)


def _fake(x, dim, scale, causal, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check_backward(grad_y, y, dim, scale, backend):
    return grad_y, y, dim, scale, check_backend(backend, "softmax_backward")


def _backward_body(grad_y, y, dim, scale, backend):
    if y.numel() == 0:
        return torch.empty_like(y, memory_format=torch.contiguous_format)
    rows = as_rows(y, dim)
    lanes = policy.row_lanes(backend, rows.shape[1], y.device)
    dx = backward_kernel(backend, y.device)(as_rows(grad_y.to(y.dtype), dim), rows, float(scale), lanes)
    return from_rows(dx, y, dim)


softmax_backward = register(
    "softmax_backward", "(Tensor grad_y, Tensor y, SymInt dim, float scale, str backend) -> Tensor",
    check=_check_backward, body=_backward_body,
    fake=lambda grad_y, y, dim, scale, backend: torch.empty_like(y, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    _, dim, scale, _, backend = inputs
    ctx.save_for_backward(output)
    ctx.dim, ctx.scale, ctx.backend = dim, scale, backend


def _backward(ctx, grad_y):
    (y,) = ctx.saved_tensors
    # Masked positions have y == 0, so their gradient is 0 without knowing the mask.
    dx = softmax_backward.in_backward(ctx)(grad_y, y, ctx.dim, ctx.scale, ctx.backend)
    return dx, None, None, None, None


softmax = register("softmax", "(Tensor x, SymInt dim, float scale, bool causal, str backend) -> Tensor",
                   check=check_args, body=_forward, fake=_fake, setup_context=_setup_context, backward=_backward)
