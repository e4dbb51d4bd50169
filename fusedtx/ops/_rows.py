"""What the row-wise ops over one dim (softmax, log_softmax) share: the checks of x and dim, and
the contiguous (rows, cols) view every backend works on, with `dim` moved last."""
from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_x_dim(x, dim, name: str):
    """x a float32 / float16 / bfloat16 tensor and dim an int in its range, else TypeError /
    ValueError naming the argument, expected vs actual. Returns dim as an int."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: x must be float32, float16 or bfloat16 (float32 math inside), got {x.dtype}")
    if isinstance(dim, torch.SymInt):  # an int argument traced by torch.compile(dynamic=True):
        dim = int(dim)                  # specialise it (a guard), a dim picks the code path
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name}: dim must be an int, got {type(dim).__name__}")
    ndim = max(x.dim(), 1)
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}: dim must be in [{-ndim}, {ndim - 1}] for a {x.dim()}-d tensor, got {dim}")
    return dim


def _is_last(t: torch.Tensor, dim: int) -> bool:
    return t.dim() > 0 and dim % t.dim() == t.dim() - 1


def as_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(rows, cols) contiguous view of t with `dim` last (a copy only when t is not laid out so)."""
    t = t.reshape(1) if t.dim() == 0 else t
    if not _is_last(t, dim) or not t.is_contiguous():
        t = t.movedim(dim, -1).contiguous()
    return t.view(math.prod(t.shape[:-1]), t.shape[-1])


def from_rows(rows: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of as_rows: rows back to like's shape, contiguous."""
    if like.dim() == 0 or _is_last(like, dim):
        return rows.view(like.shape)
    moved = list(like.shape)
    moved.append(moved.pop(dim))
    return rows.view(moved).movedim(-1, dim).contiguous()


def empty_like_contiguous(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)
