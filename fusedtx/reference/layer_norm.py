"""LayerNorm over rows, two-pass statistics: forward and backward.
"""
from __future__ import annotations

import torch

from .common import compute_dtype, lane_sum, row_group_sum, sqrt_rn

def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                       lanes: int):
    """LayerNorm of each row of a 2-D (rows, N) tensor, two-pass statistics.

    Returns (y in x's dtype, mean, rstd), mean and rstd in the compute dtype:
        mean = lane_sum(x) / N
        var  = lane_sum((x - mean)^2) / N
        rstd = 1 / sqrt(var + eps)                  (sqrt_rn; / is correctly rounded)
        y    = ((x - mean) * rstd) * weight + bias
    """
    acc = compute_dtype(x.dtype)
    # N as a tensor: PyTorch's CUDA kernels turn division by a Python number into multiplication
    # by its reciprocal, which is not the correctly rounded division the kernels do.
    n = torch.tensor(x.shape[1], dtype=acc, device=x.device)
    xa = x.to(acc)
    mean = lane_sum(xa, lanes) / n
    d = xa - mean[:, None]
    var = lane_sum(d * d, lanes) / n
    rstd = 1.0 / sqrt_rn(var + torch.tensor(eps, dtype=acc, device=x.device))
    y = d * rstd[:, None]
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), mean, rstd


def layer_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        weight: torch.Tensor | None, need_param_grads: bool, lanes: int, groups: int):
    """Gradients of layer_norm_forward. Returns (dx in x's dtype, dweight, dbias) with dweight and
    dbias in the compute dtype (the caller casts them to the parameters' dtype), or None for both
    unless need_param_grads:
        xhat = (x - mean) * rstd,   g = dy * weight (dy without weight)
        dx   = (g - (xhat * (lane_sum(g * xhat) / N) + lane_sum(g) / N)) * rstd
        dweight = row_group_sum(dy * xhat),   dbias = row_group_sum(dy)
    """
    acc = mean.dtype
    n = torch.tensor(x.shape[1], dtype=acc, device=x.device)  # a tensor: see layer_norm_forward
    dy = grad_y.to(acc)
    xhat = (x.to(acc) - mean[:, None]) * rstd[:, None]
    g = dy * weight.to(acc) if weight is not None else dy
    mean_g = lane_sum(g, lanes) / n
    mean_gx = lane_sum(g * xhat, lanes) / n
    dx = (g - (xhat * mean_gx[:, None] + mean_g[:, None])) * rstd[:, None]
    if not need_param_grads:
        return dx.to(x.dtype), None, None
    dweight = row_group_sum(dy * xhat, groups)
    dbias = row_group_sum(dy, groups)
    return dx.to(x.dtype), dweight, dbias
