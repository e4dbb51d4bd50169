"""softmax(scale * x) over rows, optionally causal: forward and backward.
"""
from __future__ import annotations

import torch

from .common import exp_f32, lane_sum

def causal_valid_counts(n_rows: int, n_cols: int, n_queries: int, device) -> torch.Tensor:
    """Keys visible to each row of a causal softmax over (..., Tq, Tk) flattened to rows.

    Row r is query i = r % Tq, which sees keys j <= i + (Tk - Tq): bottom-right aligned, as
    for the last Tq queries of a sequence of Tk tokens.
    """
    query = torch.arange(n_rows, device=device) % n_queries
    return (query + (n_cols - n_queries) + 1).clamp(0, n_cols)


def softmax_forward(x: torch.Tensor, scale: float, causal: bool, n_queries: int, lanes: int) -> torch.Tensor:
    """softmax(scale * x) over the last dim of a 2-D (rows, cols) tensor, float32 math.

    causal: row r only sees its first `causal_valid_counts` columns; masked columns are 0, and a
    row that sees nothing is all 0 (unlike masked_fill(-inf) + softmax, which gives NaN).
    """
    rows, cols = x.shape
    z = x.float() * torch.tensor(scale, dtype=torch.float32)
    if causal:
        valid = torch.arange(cols, device=x.device)[None, :] < causal_valid_counts(rows, cols, n_queries, x.device)[:, None]
    else:
        valid = torch.ones(rows, cols, dtype=torch.bool, device=x.device)
    neg_inf = torch.tensor(float("-inf"), device=x.device)
    z = torch.where(valid, z, neg_inf)
    m = z.amax(dim=-1, keepdim=True) if cols else z.new_zeros(rows, 1)
    e = torch.where(valid, exp_f32(z - m), torch.zeros((), device=x.device))
    s = lane_sum(e, lanes)[:, None]
    y = torch.where(valid, e / s, torch.zeros((), device=x.device))
    return y.to(x.dtype)


def softmax_backward(grad_y: torch.Tensor, y: torch.Tensor, scale: float, lanes: int) -> torch.Tensor:
    """dx = scale * y * (dy - sum(dy * y)) per row, float32 math, written in that order."""
    y32, dy32 = y.float(), grad_y.float()
    dot = lane_sum(dy32 * y32, lanes)[:, None]
    dx = (y32 * (dy32 - dot)) * torch.tensor(scale, dtype=torch.float32)
    return dx.to(y.dtype)
