"""LayerNorm over rows, corrected two-pass statistics: forward and backward.
"""
from __future__ import annotations

import torch

from .common import compute_dtype, lane_sum, lane_sum_compensated, row_group_sum, row_length, rstd_of

def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                       lanes: int):
    """LayerNorm of each row of a 2-D (rows, N) tensor, corrected two-pass statistics.

    Returns (y in x's dtype, mean, rstd), mean and rstd in the compute dtype:
        mean0 = lane_sum(x) / N                       a first mean, off by its rounding error
        d0    = x - mean0
        c     = lane_sum(d0) / N                      the correction: mean = mean0 + c
        var   = lane_sum_compensated(d0^2) / N - c^2, and 0 where that is negative
        rstd  = 1 / sqrt(var + eps)                   (sqrt_rn; / is correctly rounded)
        mean  = mean0 + c                             (returned; the backward's mean)
        y     = (((d0 - c) * rstd) * weight) + bias

    Why (docs/design.md, "LayerNorm statistics"): a float32 mean carries a rounding error that
    x - mean keeps in every element and rstd amplifies: a constant row 4096.3 would give y = 0.15
    instead of 0. d0 is x - mean0 exactly wherever x is within a factor 2 of mean0 (Sterbenz), so
    sum(d0) / N recovers the mean's error, and d0 - c is the deviation from the corrected mean
    with one rounding: a constant row gives d0 = c exactly and y = bias. The variance is the
    corrected two-pass formula (Chan, Golub and LeVeque): sum((d0 - c)^2) = sum(d0^2) - N c^2
    exactly, and its one long sum is compensated, so that it stays about one rounding off at
    any N / lanes (a plain float32 sum of 2**20 squares over 64 lanes is ~8x PyTorch's error).
    """
    acc = compute_dtype(x.dtype)
    n = row_length(x, acc)
    xa = x.to(acc)
    mean0 = lane_sum(xa, lanes) / n
    d0 = xa - mean0[:, None]
    c = lane_sum(d0, lanes) / n
    var = lane_sum_compensated(d0 * d0, lanes) / n - c * c
    var = torch.where(var < 0, torch.zeros_like(var), var)  # rounding only; NaN stays NaN
    rstd = rstd_of(var, eps)
    y = (d0 - c[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), mean0 + c, rstd


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
    n = row_length(x, acc)
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
