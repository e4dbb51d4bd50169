"""Fused LayerNorm in Triton: forward, and a backward that also reduces the weight/bias gradients.

The arithmetic is reference.layer_norm_forward / layer_norm_backward with the lane count the
op passes (policy.triton_lanes), bit for bit: every row sum accumulates whole blocks of BLOCK = lanes elements lane by lane, in
ascending block order from +0, then folds the block in halves (`fold_lanes`); divisions and the
square root are correctly rounded (`div_rn`, `sqrt_rn`) and the kernels are launched without
fused multiply-add. The block width (= the lane count) depends on N only, so a row gets the same bits in any batch.

Forward, one program per row, reference.layer_norm_forward's corrected two-pass statistics. A
row that fits one block is held in registers (one read, one write); a longer row loops over
blocks in three passes (the sum for the first mean; the plain sum of the deviations d0 and the
compensated sum of their squares; normalise + store), the later passes mostly from L2.

Backward, two kernels and no atomics, written once for LayerNorm and RMSNorm in _row_norm.py:
  * `_layer_norm_bwd_dx_fused` (_row_norm.bwd_rows): one program per row group
    (reference.row_group_sum, policy.ROW_GROUPS groups), dx of its rows and its own float32
    partial rows of dweight and dbias; one program per row without parameter gradients.
  * `_layer_norm_bwd_dwdb`: one program per block of columns adds the partial rows in
    ascending group order from +0 (_row_norm.sum_row_groups).
Only the non-empty groups are launched and summed (_row_norm.plan_groups).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..policy import triton_layer_norm_backward_warps, triton_layer_norm_forward_warps
from ._common import (LAUNCH_OPTIONS, fold_lanes, fold_lanes_compensated, log2, needs_bf16_rounding, round_to_bf16,
                      two_sum)
from ._row_norm import bwd_rows, plan_groups, sum_row_groups
DWDB_BLOCK = 128  # columns per program of the partial-sum kernel (one warp); any width gives the same bits


@triton.jit
def _layer_norm_fwd(X, W, B, Y, Mean, Rstd, n_cols, eps,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, LOOPED: tl.constexpr,
                    BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * n_cols may pass 2**31
    x_row = X + row * n_cols
    y_row = Y + row * n_cols
    cols = tl.arange(0, BLOCK)
    n = tl.cast(n_cols, tl.float32)
    if not LOOPED:
        inside = cols < n_cols
        x = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
        # `0.0 +`: the reference's accumulators start at +0, which turns a -0 element into +0.
        mean0 = tl.math.div_rn(fold_lanes(0.0 + x, LOG2_BLOCK), n)
        d0 = tl.where(inside, x - mean0, 0.0)  # columns past the end count as +0
        c = tl.math.div_rn(fold_lanes(0.0 + d0, LOG2_BLOCK), n)
        sq, sq_err = two_sum(tl.zeros((BLOCK,), tl.float32), d0 * d0)
        var = tl.math.div_rn(fold_lanes_compensated(sq, 0.0 + sq_err, LOG2_BLOCK), n) - c * c
        var = tl.where(var < 0.0, 0.0, var)  # rounding only; NaN stays NaN
        rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))
        y = (d0 - c) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=inside, other=0.0).to(tl.float32)
        if ROUND_BF16:
            y = round_to_bf16(y)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=inside)
    else:
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n_cols, BLOCK):
            inside = start + cols < n_cols
            acc = acc + tl.load(x_row + start + cols, mask=inside, other=0.0).to(tl.float32)
        mean0 = tl.math.div_rn(fold_lanes(acc, LOG2_BLOCK), n)
        acc = tl.zeros((BLOCK,), tl.float32)
        sq = tl.zeros((BLOCK,), tl.float32)
        sq_err = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n_cols, BLOCK):
            inside = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=inside, other=0.0).to(tl.float32)
            d0 = tl.where(inside, x - mean0, 0.0)
            acc = acc + d0
            sq, r = two_sum(sq, d0 * d0)
            sq_err = sq_err + r
        c = tl.math.div_rn(fold_lanes(acc, LOG2_BLOCK), n)
        var = tl.math.div_rn(fold_lanes_compensated(sq, sq_err, LOG2_BLOCK), n) - c * c
        var = tl.where(var < 0.0, 0.0, var)
        rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))
        for start in range(0, n_cols, BLOCK):
            inside = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=inside, other=0.0).to(tl.float32)
            y = ((x - mean0) - c) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + start + cols, mask=inside, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(B + start + cols, mask=inside, other=0.0).to(tl.float32)
            if ROUND_BF16:
                y = round_to_bf16(y)
            tl.store(y_row + start + cols, y.to(Y.dtype.element_ty), mask=inside)
    mean = mean0 + c
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_bwd_dx_fused(DY, X, W, Mean, Rstd, DX, DW_partial, DB_partial,
                             n_rows, n_cols, rows_per_program,
                             HAS_WEIGHT: tl.constexpr, PARAM_GRADS: tl.constexpr, LOOPED: tl.constexpr,
                             BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    bwd_rows(DY, X, W, Mean, Rstd, DX, DW_partial, DB_partial, n_rows, n_cols, rows_per_program,
             True, HAS_WEIGHT, PARAM_GRADS, LOOPED, BLOCK, LOG2_BLOCK, ROUND_BF16)


@triton.jit
def _layer_norm_bwd_dwdb(DW_partial, DB_partial, DW, DB, n_groups, n_cols, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = cols < n_cols
    tl.store(DW + cols, sum_row_groups(DW_partial + cols, n_groups, n_cols, inside, BLOCK_N), mask=inside)
    tl.store(DB + cols, sum_row_groups(DB_partial + cols, n_groups, n_cols, inside, BLOCK_N), mask=inside)


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                       lanes: int):
    """x: contiguous (rows, N); weight, bias: None or contiguous (N,), float32 or x's dtype.

    Returns (y in x's dtype, mean float32 (rows,), rstd float32 (rows,))."""
    rows, cols = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, mean, rstd
    block = lanes
    _layer_norm_fwd[(rows,)](
        x, x if weight is None else weight, x if bias is None else bias, y, mean, rstd, cols, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, LOOPED=cols > block,
        BLOCK=block, LOG2_BLOCK=log2(block), ROUND_BF16=needs_bf16_rounding(x.dtype),
        num_warps=triton_layer_norm_forward_warps(block), **LAUNCH_OPTIONS,
    )
    return y, mean, rstd


def layer_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        weight: torch.Tensor | None, need_param_grads: bool, lanes: int, groups: int):
    """grad_y, x: contiguous (rows, N), same dtype; mean, rstd: float32 (rows,); weight: None or (N,).

    Returns (dx in x's dtype, dweight, dbias), the last two float32 (N,) — the caller casts them
    to the parameters' dtype — or None when need_param_grads is False."""
    rows, cols = x.shape
    dx = torch.empty_like(x)
    dw = db = None
    if need_param_grads:
        dw = torch.zeros(cols, dtype=torch.float32, device=x.device)
        db = torch.zeros(cols, dtype=torch.float32, device=x.device)
    if rows == 0:
        return dx, dw, db
    block = lanes
    rows_per_program, n_groups = plan_groups(rows, groups, need_param_grads)
    if need_param_grads:
        dw_partial = torch.empty(n_groups, cols, dtype=torch.float32, device=x.device)
        db_partial = torch.empty(n_groups, cols, dtype=torch.float32, device=x.device)
    else:
        dw_partial = db_partial = dx  # never touched when PARAM_GRADS is False
    _layer_norm_bwd_dx_fused[(n_groups,)](
        grad_y, x, x if weight is None else weight, mean, rstd, dx, dw_partial, db_partial,
        rows, cols, rows_per_program,
        HAS_WEIGHT=weight is not None, PARAM_GRADS=need_param_grads, LOOPED=cols > block,
        BLOCK=block, LOG2_BLOCK=log2(block), ROUND_BF16=needs_bf16_rounding(x.dtype),
        num_warps=triton_layer_norm_backward_warps(block), **LAUNCH_OPTIONS,
    )
    if need_param_grads:
        _layer_norm_bwd_dwdb[(triton.cdiv(cols, DWDB_BLOCK),)](
            dw_partial, db_partial, dw, db, n_groups, cols, BLOCK_N=DWDB_BLOCK, num_warps=1, **LAUNCH_OPTIONS,
        )
    return dx, dw, db
