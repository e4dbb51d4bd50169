"""Fused RMSNorm in Triton: forward, and a backward that also reduces the weight gradient.

The arithmetic is reference.rms_norm_forward / rms_norm_backward with the lane count the op
passes (policy.triton_lanes), bit for bit: every row sum accumulates whole blocks of BLOCK =
lanes elements lane by lane, in ascending block order from +0, then folds the block in halves
(`fold_lanes`, `fold_lanes_compensated`); divisions and the square root are correctly rounded
(`div_rn`, `sqrt_rn`) and the kernels are launched without fused multiply-add. The block width
(= the lane count) depends on N only, so a row gets the same bits in any batch.

Forward, one program per row: the compensated sum of squares, rstd, then y = (x * rstd) * w. A
row that fits one block is held in registers (one read, one write); a longer row loops over
blocks twice (the sum; normalise + store), the second pass mostly from L2.

Backward: LayerNorm's kernels without the mean (kernels/_row_norm.py): `_rms_norm_bwd_dx_fused`,
one program per row group, dx and the group's dweight partial row; `_rms_norm_bwd_dw`, the
partials added per column in group order. No atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..policy import triton_layer_norm_backward_warps, triton_layer_norm_forward_warps
from ._common import LAUNCH_OPTIONS, fold_lanes_compensated, log2, needs_bf16_rounding, round_to_bf16, two_sum
from ._row_norm import bwd_rows, plan_groups, sum_row_groups

JIT_HELPERS = ("_normalize",)  # inlined into the forward; not launched on its own
DW_BLOCK = 128  # columns per program of the partial-sum kernel (one warp); any width gives the same bits


@triton.jit
def _normalize(x, w_ptr, inside, rstd, HAS_WEIGHT: tl.constexpr, ROUND_BF16: tl.constexpr):
    y = x * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr, mask=inside, other=0.0).to(tl.float32)
    if ROUND_BF16:
        y = round_to_bf16(y)
    return y


@triton.jit
def _rms_norm_fwd(X, W, Y, Rstd, n_cols, eps,
                  HAS_WEIGHT: tl.constexpr, LOOPED: tl.constexpr,
                  BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * n_cols may pass 2**31
    x_row = X + row * n_cols
    y_row = Y + row * n_cols
    cols = tl.arange(0, BLOCK)
    n = tl.cast(n_cols, tl.float32)
    sq = tl.zeros((BLOCK,), tl.float32)  # the lanes' (sum, error) pairs start at (+0, +0)
    sq_err = tl.zeros((BLOCK,), tl.float32)
    if not LOOPED:
        inside = cols < n_cols
        x = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)  # past the end: +0, as lane_sum's padding
        sq, sq_err = two_sum(sq, x * x)
        sq_err = 0.0 + sq_err
    else:
        for start in range(0, n_cols, BLOCK):
            xb = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
            sq, r = two_sum(sq, xb * xb)
            sq_err = sq_err + r
    ms = tl.math.div_rn(fold_lanes_compensated(sq, sq_err, LOG2_BLOCK), n)
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(ms + eps))
    if not LOOPED:
        y = _normalize(x, W + cols, inside, rstd, HAS_WEIGHT, ROUND_BF16)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=inside)
    else:
        for start in range(0, n_cols, BLOCK):
            inside = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=inside, other=0.0).to(tl.float32)
            y = _normalize(x, W + start + cols, inside, rstd, HAS_WEIGHT, ROUND_BF16)
            tl.store(y_row + start + cols, y.to(Y.dtype.element_ty), mask=inside)
    tl.store(Rstd + row, rstd)


@triton.jit
def _rms_norm_bwd_dx_fused(DY, X, W, Rstd, DX, DW_partial, n_rows, n_cols, rows_per_program,
                           HAS_WEIGHT: tl.constexpr, PARAM_GRADS: tl.constexpr, LOOPED: tl.constexpr,
                           BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    # Not centred: no mean (Rstd stands in for it) and no bias partials (DW_partial for them).
    bwd_rows(DY, X, W, Rstd, Rstd, DX, DW_partial, DW_partial, n_rows, n_cols, rows_per_program,
             False, HAS_WEIGHT, PARAM_GRADS, LOOPED, BLOCK, LOG2_BLOCK, ROUND_BF16)


@triton.jit
def _rms_norm_bwd_dw(DW_partial, DW, n_groups, n_cols, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = cols < n_cols
    tl.store(DW + cols, sum_row_groups(DW_partial + cols, n_groups, n_cols, inside, BLOCK_N), mask=inside)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float, lanes: int):
    """x: contiguous (rows, N); weight: None or contiguous (N,), float32 or x's dtype.

    Returns (y in x's dtype, rstd float32 (rows,))."""
    rows, cols = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, rstd
    _rms_norm_fwd[(rows,)](
        x, x if weight is None else weight, y, rstd, cols, eps,
        HAS_WEIGHT=weight is not None, LOOPED=cols > lanes, BLOCK=lanes, LOG2_BLOCK=log2(lanes),
        ROUND_BF16=needs_bf16_rounding(x.dtype), num_warps=triton_layer_norm_forward_warps(lanes), **LAUNCH_OPTIONS,
    )
    return y, rstd


def rms_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None,
                      need_param_grads: bool, lanes: int, groups: int):
    """grad_y, x: contiguous (rows, N), same dtype; rstd: float32 (rows,); weight: None or (N,).

    Returns (dx in x's dtype, dweight float32 (N,) — the caller casts it to the weight's dtype —
    or None when need_param_grads is False)."""
    rows, cols = x.shape
    dx = torch.empty_like(x)
    dw = torch.zeros(cols, dtype=torch.float32, device=x.device) if need_param_grads else None
    if rows == 0:
        return dx, dw
    rows_per_program, n_groups = plan_groups(rows, groups, need_param_grads)
    dw_partial = torch.empty(n_groups, cols, dtype=torch.float32, device=x.device) if need_param_grads else dx
    _rms_norm_bwd_dx_fused[(n_groups,)](
        grad_y, x, x if weight is None else weight, rstd, dx, dw_partial, rows, cols, rows_per_program,
        HAS_WEIGHT=weight is not None, PARAM_GRADS=need_param_grads, LOOPED=cols > lanes,
        BLOCK=lanes, LOG2_BLOCK=log2(lanes), ROUND_BF16=needs_bf16_rounding(x.dtype),
        num_warps=triton_layer_norm_backward_warps(lanes), **LAUNCH_OPTIONS,
    )
    if need_param_grads:
        _rms_norm_bwd_dw[(triton.cdiv(cols, DW_BLOCK),)](dw_partial, dw, n_groups, cols, BLOCK_N=DW_BLOCK, num_warps=1,
                                                         **LAUNCH_OPTIONS)
    return dx, dw
