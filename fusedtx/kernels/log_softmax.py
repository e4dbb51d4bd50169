"""Fused log_softmax in Triton over rows, float32 math.

softmax's layout (kernels/softmax.py): one program per row, the block width the lane count of
the row sums (policy.triton_lanes: the row length rounded up to a power of two, at most
policy.TRITON_MAX_BLOCK). A row that fits one block is held in registers (one read, one write);
a longer row loops over blocks in three passes (max, exp + lane sums, subtract + store), the
later passes mostly served from L2. Either way the arithmetic is reference.log_softmax_forward /
log_softmax_backward with that lane count, which depends on the row length only, never on the
number of rows, so every row gets the same bits whatever batch it is in.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..policy import triton_row_warps
from ._common import LAUNCH_OPTIONS, exp_f32, fold_lanes, log2, log_f32, needs_bf16_rounding, round_to_bf16


@triton.jit
def _log_softmax_fwd(X, Y, n_cols, BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * n_cols
    y_row = Y + row * n_cols
    cols = tl.arange(0, BLOCK)
    if BLOCK >= n_cols:
        valid = cols < n_cols
        x = tl.load(x_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        d = x - tl.max(x, axis=0)
        lse = log_f32(fold_lanes(tl.where(valid, exp_f32(d), 0.0), LOG2_BLOCK))
        y = d - lse
        if ROUND_BF16:
            y = round_to_bf16(y)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=valid)
    else:
        m = tl.zeros((), tl.float32) - float("inf")
        for start in range(0, n_cols, BLOCK):
            x = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
            m = tl.maximum(m, tl.max(x, axis=0))
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n_cols, BLOCK):
            valid = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=valid, other=0.0).to(tl.float32)
            acc = acc + tl.where(valid, exp_f32(x - m), 0.0)
        lse = log_f32(fold_lanes(acc, LOG2_BLOCK))
        for start in range(0, n_cols, BLOCK):
            valid = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=valid, other=0.0).to(tl.float32)
            y = (x - m) - lse
            if ROUND_BF16:
                y = round_to_bf16(y)
            tl.store(y_row + start + cols, y.to(Y.dtype.element_ty), mask=valid)


@triton.jit
def _log_softmax_bwd(DY, Y, DX, n_cols, BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    dy_row = DY + row * n_cols
    y_row = Y + row * n_cols
    dx_row = DX + row * n_cols
    cols = tl.arange(0, BLOCK)
    if BLOCK >= n_cols:
        inside = cols < n_cols
        dy = tl.load(dy_row + cols, mask=inside, other=0.0).to(tl.float32)
        y = tl.load(y_row + cols, mask=inside, other=0.0).to(tl.float32)
        dx = dy - exp_f32(y) * fold_lanes(0.0 + dy, LOG2_BLOCK)
        if ROUND_BF16:
            dx = round_to_bf16(dx)
        tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=inside)
    else:
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n_cols, BLOCK):
            acc = acc + tl.load(dy_row + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
        total = fold_lanes(acc, LOG2_BLOCK)
        for start in range(0, n_cols, BLOCK):
            inside = start + cols < n_cols
            dy = tl.load(dy_row + start + cols, mask=inside, other=0.0).to(tl.float32)
            y = tl.load(y_row + start + cols, mask=inside, other=0.0).to(tl.float32)
            dx = dy - exp_f32(y) * total
            if ROUND_BF16:
                dx = round_to_bf16(dx)
            tl.store(dx_row + start + cols, dx.to(DX.dtype.element_ty), mask=inside)


def log_softmax_forward(x: torch.Tensor, lanes: int) -> torch.Tensor:
    """x: contiguous (rows, cols). Returns log_softmax(x) over cols, same dtype; the block width
    is the lane count (a power of two; policy.triton_lanes)."""
    rows, cols = x.shape
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    _log_softmax_fwd[(rows,)](x, y, cols, BLOCK=lanes, LOG2_BLOCK=log2(lanes), ROUND_BF16=needs_bf16_rounding(x.dtype),
                              num_warps=triton_row_warps(lanes), **LAUNCH_OPTIONS)
    return y


def log_softmax_backward(grad_y: torch.Tensor, y: torch.Tensor, lanes: int) -> torch.Tensor:
    """grad_y, y: contiguous (rows, cols), same dtype. Returns dx."""
    rows, cols = y.shape
    dx = torch.empty_like(y)
    if y.numel() == 0:
        return dx
    _log_softmax_bwd[(rows,)](grad_y, y, dx, cols, BLOCK=lanes, LOG2_BLOCK=log2(lanes),
                              ROUND_BF16=needs_bf16_rounding(y.dtype), num_warps=triton_row_warps(lanes),
                              **LAUNCH_OPTIONS)
    return dx
