"""The `fusedtx::softmax` op: schema, argument checks, fake and autograd, backend dispatch.

    fusedtx::softmax(Tensor x, int dim, float scale, bool causal, str backend) -> Tensor
    fusedtx::softmax_backward(Tensor grad_y, Tensor y, int dim, float scale, str backend) -> Tensor

The backend arrives already resolved (fusedtx.functional does that), so a traced graph records
which implementation it calls. Every backend works on a contiguous (rows, cols) view with `dim`
moved last; the output is returned contiguous in x's shape.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from .. import _extension, reference
from ..backends import BACKENDS
from ._eager import backward_op, eager_autograd

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NATIVE_CPU_LANES = reference.SOFTMAX_LANES


def lanes(backend: str, n_cols: int, device: torch.device) -> int:
    """Lane count of the row sums (reference.lane_sum) a backend uses for rows of n_cols."""
    if backend == "triton":
        from ..kernels import softmax as triton_softmax

        return triton_softmax.lanes_for(n_cols)
    if backend == "native" and device.type == "cuda":
        return native_cuda_lanes(n_cols)
    return NATIVE_CPU_LANES


def native_cuda_lanes(n_cols: int) -> int:
    """The CUDA kernel runs one thread block per row, one lane per thread: ~8 elements per
    thread, 32 to 1024 threads. Depends on the row length only."""
    threads = 32
    while threads < 1024 and threads * 8 < n_cols:
        threads *= 2
    return threads


def check_args(x, dim, scale, causal, name: str = "softmax") -> None:
    """Raise TypeError / ValueError naming the bad argument, with expected vs actual."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: x must be float32, float16 or bfloat16 (float32 math inside), got {x.dtype}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name}: dim must be an int, got {type(dim).__name__}")
    ndim = max(x.dim(), 1)
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}: dim must be in [{-ndim}, {ndim - 1}] for a {x.dim()}-d tensor, got {dim}")
    if isinstance(scale, bool) or not isinstance(scale, (float, int, Real)):
        raise TypeError(f"{name}: scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"{name}: scale must be finite, got {scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"{name}: causal must be a bool, got {type(causal).__name__}")
    if causal and dim % ndim != ndim - 1:
        raise ValueError(f"{name}: causal masks the last two dims (queries, keys), so dim must be -1, got {dim}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"softmax: backend must be one of {BACKENDS}, got {backend!r}")


def _forward_2d(backend: str, x: torch.Tensor, scale: float, causal: bool, n_queries: int) -> torch.Tensor:
    if backend == "triton":
        from ..kernels import softmax as triton_softmax

        return triton_softmax.softmax_forward(x, scale, causal, n_queries)
    if backend == "native":
        return _extension.ops().softmax_forward(x, scale, causal, n_queries, lanes(backend, x.shape[1], x.device))
    return reference.softmax_forward(x, scale, causal, n_queries)


def _backward_2d(backend: str, grad_y: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    if backend == "triton":
        from ..kernels import softmax as triton_softmax

        return triton_softmax.softmax_backward(grad_y, y, scale)
    if backend == "native":
        return _extension.ops().softmax_backward(grad_y, y, scale, lanes(backend, y.shape[1], y.device))
    return reference.softmax_backward(grad_y, y, scale)


def _is_last(t: torch.Tensor, dim: int) -> bool:
    return t.dim() > 0 and dim % t.dim() == t.dim() - 1


def _as_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(rows, cols) contiguous view of t with `dim` last (a copy only when t is not laid out so)."""
    t = t.reshape(1) if t.dim() == 0 else t
    if not _is_last(t, dim) or not t.is_contiguous():
        t = t.movedim(dim, -1).contiguous()
    return t.view(math.prod(t.shape[:-1]), t.shape[-1])


def _from_rows(rows: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of _as_rows: rows back to like's shape, contiguous."""
    if like.dim() == 0 or _is_last(like, dim):
        return rows.view(like.shape)
    moved = list(like.shape)
    moved.append(moved.pop(dim))
    return rows.view(moved).movedim(-1, dim).contiguous()


def softmax_impl(x: torch.Tensor, dim: int, scale: float, causal: bool, backend: str) -> torch.Tensor:
    """The op's body. fusedtx.functional calls it directly in eager inference (see there)."""
    check_args(x, dim, scale, causal)
    _check_backend(backend)
    n_queries = x.shape[-2] if causal and x.dim() >= 2 else 1
    y = _forward_2d(backend, _as_rows(x, dim), float(scale), causal, n_queries)
    return _from_rows(y, x, dim)


@torch.library.custom_op("fusedtx::softmax", mutates_args=())
def softmax(x: torch.Tensor, dim: int, scale: float, causal: bool, backend: str) -> torch.Tensor:
    return softmax_impl(x, dim, scale, causal, backend)


@softmax.register_fake
def _(x, dim, scale, causal, backend):
    check_args(x, dim, scale, causal)
    _check_backend(backend)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def softmax_backward_impl(grad_y, y, dim, scale, backend):
    """The backward op's body."""
    _check_backend(backend)
    dx = _backward_2d(backend, _as_rows(grad_y.to(y.dtype), dim), _as_rows(y, dim), float(scale))
    return _from_rows(dx, y, dim)


@torch.library.custom_op("fusedtx::softmax_backward", mutates_args=())
def softmax_backward(grad_y: torch.Tensor, y: torch.Tensor, dim: int, scale: float, backend: str) -> torch.Tensor:
    return softmax_backward_impl(grad_y, y, dim, scale, backend)


@softmax_backward.register_fake
def _(grad_y, y, dim, scale, backend):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, dim, scale, _, backend = inputs
    ctx.save_for_backward(output)
    ctx.dim, ctx.scale, ctx.backend = dim, scale, backend


def _backward(ctx, grad_y):
    (y,) = ctx.saved_tensors
    # Masked positions have y == 0, so their gradient is 0 without knowing the mask.
    run = backward_op(ctx, softmax_backward, softmax_backward_impl)
    return run(grad_y, y, ctx.dim, ctx.scale, ctx.backend), None, None, None, None


softmax.register_autograd(_backward, setup_context=_setup_context)
softmax_eager = eager_autograd("softmax", softmax_impl, _setup_context, _backward)
