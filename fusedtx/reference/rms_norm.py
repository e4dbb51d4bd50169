"""RMSNorm over rows: forward and backward.
"""
from __future__ import annotations

import torch

from .common import compute_dtype, lane_sum, lane_sum_compensated, row_group_sum, row_length, rstd_of


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float, lanes: int):
    """RMSNorm of each row of a 2-D (rows, N) tensor. Returns (y in x's dtype, rstd) with rstd in
    the compute dtype (float32; float64 for float64 x):
        ms   = lane_sum_compensated(x * x) / N
        rstd = 1 / sqrt(ms + eps)                     (sqrt_rn; / is correctly rounded)
        y    = (x * rstd) * weight, rounded to x's dtype once, at the end

    The mean square is a compensated sum for the reason LayerNorm's variance is (docs/design.md,
    "LayerNorm statistics"): a plain float32 sum of N squares over 64 lanes loses ~log2(N / 64)
    bits. There is no mean to subtract, so there is nothing to correct.

    HF's LlamaRMSNorm rounds x * rstd to x's dtype before multiplying by the weight; this rounds
    once, after the weight (docs/design.md, "RMSNorm"): the two differ by that one rounding in
    bfloat16 / float16, and are the same in float32.
    """
    acc = compute_dtype(x.dtype)
    xa = x.to(acc)
    rstd = rstd_of(lane_sum_compensated(xa * xa, lanes) / row_length(x, acc), eps)
    y = xa * rstd[:, None]
    if weight is not None:
        y = y * weight.to(acc)
    return y.to(x.dtype), rstd


def rms_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None,
                      need_param_grads: bool, lanes: int, groups: int):
    """Gradients of rms_norm_forward. Returns (dx in x's dtype, dweight in the compute dtype — the
    caller casts it to the weight's dtype — or None unless need_param_grads):
        xhat = x * rstd,   g = dy * weight (dy without weight)
        dx   = (g - xhat * (lane_sum(g * xhat) / N)) * rstd
        dweight = row_group_sum(dy * xhat)
    """
    acc = rstd.dtype
    dy = grad_y.to(acc)
    xhat = x.to(acc) * rstd[:, None]
    g = dy * weight.to(acc) if weight is not None else dy
    mean_gx = lane_sum(g * xhat, lanes) / row_length(x, acc)
    dx = (g - xhat * mean_gx[:, None]) * rstd[:, None]
    if not need_param_grads:
        return dx.to(x.dtype), None
    return dx.to(x.dtype), row_group_sum(dy * xhat, groups)
