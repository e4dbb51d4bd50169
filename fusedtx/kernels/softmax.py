"""Fused softmax in Triton: softmax(scale * x) over rows, optional causal mask, float32 math.

One program per row. The block width is the lane count of the row sums (policy.triton_lanes:
the row length rounded up to a power of two, at most policy.TRITON_MAX_BLOCK). A row that fits
one block is held in registers (one read, one write); a longer row loops over blocks in three
passes (max, exp + lane sums, divide + store), the later passes mostly served from L2. Either
way the arithmetic is reference.softmax_forward / softmax_backward with that lane count, which
depends on the row length only, never on the number of rows, so every row gets the same bits
whatever batch it is in.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..policy import triton_row_warps
from ._common import LAUNCH_OPTIONS, exp_f32, fold_lanes, log2, needs_bf16_rounding, round_to_bf16


@triton.jit
def _softmax_fwd(X, Y, n_cols, scale, n_queries,
                 CAUSAL: tl.constexpr, BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr,
                 ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * n_cols
    y_row = Y + row * n_cols
    if CAUSAL:
        # query row % Tq sees keys <= its position (reference.causal_valid_counts)
        n_valid = tl.minimum(tl.maximum(row % n_queries + (n_cols - n_queries) + 1, 0), n_cols)
    else:
        n_valid = n_cols
    cols = tl.arange(0, BLOCK)
    if BLOCK >= n_cols:
        valid = cols < n_valid
        x = tl.load(x_row + cols, mask=valid, other=0.0).to(tl.float32)
        z = tl.where(valid, x * scale, float("-inf"))
        m = tl.max(z, axis=0)
        e = tl.where(valid, exp_f32(z - m), 0.0)
        s = fold_lanes(0.0 + e, LOG2_BLOCK)
        y = tl.where(valid, tl.math.div_rn(e, s), 0.0)
        if ROUND_BF16:
            y = round_to_bf16(y)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=cols < n_cols)
    else:
        m = tl.zeros((), tl.float32) - float("inf")
        for start in range(0, n_valid, BLOCK):
            valid = start + cols < n_valid
            x = tl.load(x_row + start + cols, mask=valid, other=0.0).to(tl.float32)
            m = tl.maximum(m, tl.max(tl.where(valid, x * scale, float("-inf")), axis=0))
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n_valid, BLOCK):
            valid = start + cols < n_valid
            x = tl.load(x_row + start + cols, mask=valid, other=0.0).to(tl.float32)
            acc = acc + tl.where(valid, exp_f32(x * scale - m), 0.0)
        s = fold_lanes(acc, LOG2_BLOCK)
        for start in range(0, n_cols, BLOCK):
            valid = start + cols < n_valid
            x = tl.load(x_row + start + cols, mask=valid, other=0.0).to(tl.float32)
            y = tl.where(valid, tl.math.div_rn(exp_f32(x * scale - m), s), 0.0)
            if ROUND_BF16:
                y = round_to_bf16(y)
            tl.store(y_row + start + cols, y.to(Y.dtype.element_ty), mask=start + cols < n_cols)


@triton.jit
def _softmax_bwd(DY, Y, DX, n_cols, scale,
                 BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    dy_row = DY + row * n_cols
    y_row = Y + row * n_cols
    dx_row = DX + row * n_cols
    cols = tl.arange(0, BLOCK)
    if BLOCK >= n_cols:
        inside = cols < n_cols
        y = tl.load(y_row + cols, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=inside, other=0.0).to(tl.float32)
        dot = fold_lanes(0.0 + dy * y, LOG2_BLOCK)
        dx = (y * (dy - dot)) * scale
        if ROUND_BF16:
            dx = round_to_bf16(dx)
        tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=inside)
    else:
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n_cols, BLOCK):
            inside = start + cols < n_cols
            y = tl.load(y_row + start + cols, mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + start + cols, mask=inside, other=0.0).to(tl.float32)
            acc = acc + dy * y
        dot = fold_lanes(acc, LOG2_BLOCK)
        for start in range(0, n_cols, BLOCK):
            inside = start + cols < n_cols
            y = tl.load(y_row + start + cols, mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + start + cols, mask=inside, other=0.0).to(tl.float32)
            dx = (y * (dy - dot)) * scale
            if ROUND_BF16:
                dx = round_to_bf16(dx)
            tl.store(dx_row + start + cols, dx.to(DX.dtype.element_ty), mask=inside)


def softmax_forward(x: torch.Tensor, scale: float, causal: bool, n_queries: int, lanes: int) -> torch.Tensor:
    """x: contiguous (rows, cols). Returns softmax(scale * x) over cols, same dtype; the block
    width is the lane count (a power of two; policy.triton_lanes)."""
    rows, cols = x.shape
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    block = lanes
    _softmax_fwd[(rows,)](
        x, y, cols, scale, max(n_queries, 1),
        CAUSAL=causal, BLOCK=block, LOG2_BLOCK=log2(block), ROUND_BF16=needs_bf16_rounding(x.dtype),
        num_warps=triton_row_warps(block), **LAUNCH_OPTIONS,
    )
    return y


def softmax_backward(grad_y: torch.Tensor, y: torch.Tensor, scale: float, lanes: int) -> torch.Tensor:
    """grad_y, y: contiguous (rows, cols), same dtype. Returns dx."""
    rows, cols = y.shape
    dx = torch.empty_like(y)
    if y.numel() == 0:
        return dx
    block = lanes
    _softmax_bwd[(rows,)](
        grad_y, y, dx, cols, scale,
        BLOCK=block, LOG2_BLOCK=log2(block), ROUND_BF16=needs_bf16_rounding(y.dtype),
        num_warps=triton_row_warps(block), **LAUNCH_OPTIONS,
    )
    return dx
