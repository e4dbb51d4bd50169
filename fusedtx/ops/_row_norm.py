"""What the row normalisations (fusedtx/ops/layer_norm.py, fusedtx/ops/rms_norm.py) share: the
argument checks of torch.nn.functional's layer_norm / rms_norm, the (rows, N) views, the fakes of
their forward and backward ops and the check of the backward's.

The two differ only in their parameters (weight; weight and bias) and their per-row statistics
(rstd; mean and rstd), which their kernels take in one order on every backend:

    forward  (x, *params, eps, lanes) -> (y, *stats)
    backward (grad_y, x, *stats, weight, need_param_grads, lanes, groups) -> (dx, *param_grads)

The bodies that call the kernels stay in each op, written out for its arity: they run on every
eager call, where a generic body's star-arguments and extra call cost host time that the
smallest calls notice.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import reference
from ._dispatch import check_backend, check_real

LOW_PRECISION = (torch.float16, torch.bfloat16)
SUPPORTED_DTYPES = (torch.float32, torch.float64, *LOW_PRECISION)


def _is_size(d) -> bool:
    """An int, or a SymInt: torch.compile(dynamic=True) traces sizes taken from x.shape so."""
    return isinstance(d, (int, torch.SymInt)) and not isinstance(d, bool)


def normalize_shape(normalized_shape, op: str) -> tuple[int, ...]:
    if _is_size(normalized_shape):
        return (normalized_shape,)
    if isinstance(normalized_shape, (tuple, list, torch.Size, Sequence)) and all(map(_is_size, normalized_shape)):
        return tuple(normalized_shape)
    raise TypeError(f"{op}: normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")


def check_norm_args(op: str, x, normalized_shape, params: dict, eps, backend):
    """Raise TypeError / ValueError naming the bad argument, with expected vs actual. params:
    {name: tensor or None} (weight, bias), each of normalized_shape's shape, on x's device, of
    x's dtype or float32 beside a float16/bfloat16 x, all of one dtype. Returns (x, shape,
    [params], eps, backend) normalised."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    check_backend(backend, op)
    if backend == "triton" and x.dtype == torch.float64:
        raise TypeError(f"{op}: the triton backend computes in float32 and does not take float64 x; "
                        "use backend='native' or 'reference' for float64")
    shape = normalize_shape(normalized_shape, op)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"{op}: normalized_shape must be non-empty with positive sizes, got {list(shape)}")
    if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise ValueError(f"{op}: normalized_shape {list(shape)} must match the trailing dims of x, "
                         f"got x of shape {list(x.shape)}")
    param_dtype = None
    for name, p in params.items():
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(p).__name__}")
        if tuple(p.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {list(shape)} (normalized_shape), got {list(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{op}: {name} is on {p.device} but x is on {x.device}; put them on one device")
        allowed = (x.dtype, torch.float32) if x.dtype in LOW_PRECISION else (x.dtype,)
        if p.dtype not in allowed:
            raise TypeError(f"{op}: {name} must be {' or '.join(map(str, allowed))} for {x.dtype} x, got {p.dtype}")
        if param_dtype is not None and p.dtype != param_dtype:
            raise TypeError(f"{op}: weight ({param_dtype}) and bias ({p.dtype}) must share a dtype")
        param_dtype = p.dtype
    # eps = 0 as torch allows: a constant (LayerNorm) or zero (RMSNorm) row then gives NaN, as torch's does.
    return x, shape, list(params.values()), check_real(eps, op, "eps", least=0.0), backend


def flat(p: torch.Tensor | None) -> torch.Tensor | None:
    if p is None or (p.dim() == 1 and p.is_contiguous()):
        return p
    return p.contiguous().view(-1)


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t as a contiguous (rows, n) tensor: t itself when it is one (a view costs Python time)."""
    return t if t.dim() == 2 and t.shape[1] == n and t.is_contiguous() else t.contiguous().view(-1, n)


def stats_shape(x: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a per-row statistic (mean, rstd): x's leading dims."""
    return tuple(x.shape[: x.dim() - len(shape)])


def fake_forward(x, shape, n_stats: int):
    """The forward's outputs, empty: y like x (contiguous), n_stats per-row statistics in the
    compute dtype."""
    lead, acc = stats_shape(x, shape), reference.compute_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            *[x.new_empty(lead, dtype=acc) for _ in range(n_stats)])


def check_backward(op: str):
    """The check of a backward op: its arguments as they are but the backend (the last)."""
    return lambda *args: (*args[:-1], check_backend(args[-1], op))


def fake_backward(x, stat, need_param_grads: bool, n_params: int):
    """The backward's outputs, empty: dx like x (contiguous), n_params flat parameter gradients
    in the dtype of the saved statistic `stat` (empty without need_param_grads)."""
    size = math.prod(x.shape[stat.dim():]) if need_param_grads else 0
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            *[x.new_empty(size, dtype=stat.dtype) for _ in range(n_params)])
