"""log_softmax over rows: forward and backward.
"""
from __future__ import annotations

import torch

from .common import exp_f32, lane_sum, log_f32


def log_softmax_forward(x: torch.Tensor, lanes: int) -> torch.Tensor:
    """log_softmax over the last dim of a 2-D (rows, cols) tensor, float32 math, in this order:

        m   = max_j x_j
        d   = x - m                       (one rounding per element)
        s   = lane_sum(exp_f32(d), lanes)
        lse = log_f32(s)
        y   = d - lse                     rounded to x's dtype once

    s >= 1 (the max term is exp_f32(0) = 1) unless the row holds NaN or +inf. Edge rows as
    torch.log_softmax: -inf entries give -inf; a row holding +inf or NaN, or all -inf
    (-inf - -inf is NaN), is NaN throughout.
    """
    rows, cols = x.shape
    x32 = x.float()
    m = x32.amax(dim=-1, keepdim=True) if cols else x32.new_zeros(rows, 1)
    d = x32 - m
    s = lane_sum(exp_f32(d), lanes)[:, None]
    return (d - log_f32(s)).to(x.dtype)


def log_softmax_backward(grad_y: torch.Tensor, y: torch.Tensor, lanes: int) -> torch.Tensor:
    """dx = dy - exp_f32(y) * lane_sum(dy, lanes) per row, float32 math: the sum, then for each
    element the product (one rounding), then the difference (one rounding), rounded to y's dtype.

    y <= 0 always (a log-probability), exp_f32's domain; where y < -87, exp_f32(y) is +0 and dx
    is dy (the exact term is below 1.7e-38 * |sum dy|)."""
    y32, dy32 = y.float(), grad_y.float()
    total = lane_sum(dy32, lanes)[:, None]
    return (dy32 - exp_f32(y32) * total).to(y.dtype)
