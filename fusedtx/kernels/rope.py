"""Rotary position embeddings in Triton (rotate-half layout): reference.rope_forward / rope_backward.

One program per (token, block of BLOCK_H heads): the token's position is read once, its table
row (HALF_BLOCK pairs) once, and each head's row x is rotated pair by pair, products rounded and
then summed (LAUNCH_OPTIONS: no FMA), the same operations as the reference. The tile
(policy.triton_rope_tile) depends on the head count and head dim only, and nothing is summed
across elements, so no bit depends on the batch. A position outside the table reads nothing: its
cos and sin are NaN, and so is its row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..policy import TRITON_ROPE_WARPS, triton_rope_tile
from ._common import LAUNCH_OPTIONS, f32_to_bf16_rn, needs_bf16_rounding
from .causal_attention import _load_f32


@triton.jit
def _rope(X, Positions, Cos, Sin, Y, n_heads, n_tokens, n_positions, half,
          stride_xb, stride_xh, stride_xt,
          TRANSPOSED: tl.constexpr, BLOCK_H: tl.constexpr, HALF_BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * n_tokens + t
    b = row // n_tokens
    t = row % n_tokens
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, HALF_BLOCK)
    pos = tl.full((HALF_BLOCK,), 0, tl.int64) + tl.load(Positions + row)  # the position, per pair
    valid = (pos >= 0) & (pos < n_positions) & (cols < half)
    table = tl.where(valid, pos, 0) * half + cols
    c = tl.load(Cos + table, mask=valid, other=float("nan"))[None, :]
    s = tl.load(Sin + table, mask=valid, other=float("nan"))[None, :]
    inside = (heads[:, None] < n_heads) & (cols[None, :] < half)
    x_ptrs = X + b * stride_xb + heads[:, None].to(tl.int64) * stride_xh + t * stride_xt + cols[None, :]
    x1 = _load_f32(x_ptrs, inside, ROUND_BF16)
    x2 = _load_f32(x_ptrs + half, inside, ROUND_BF16)
    if TRANSPOSED:
        y1 = x1 * c + x2 * s
        y2 = x2 * c - x1 * s
    else:
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
    y_ptrs = Y + ((b * n_heads + heads[:, None].to(tl.int64)) * n_tokens + t) * (2 * half) + cols[None, :]
    if ROUND_BF16:
        tl.store(y_ptrs, f32_to_bf16_rn(y1), mask=inside)
        tl.store(y_ptrs + half, f32_to_bf16_rn(y2), mask=inside)
    else:
        tl.store(y_ptrs, y1.to(Y.dtype.element_ty), mask=inside)
        tl.store(y_ptrs + half, y2.to(Y.dtype.element_ty), mask=inside)


def _launch(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            transposed: bool) -> torch.Tensor:
    batch, heads, tokens, dim = x.shape
    y = torch.empty((batch, heads, tokens, dim), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_h, half_block = triton_rope_tile(heads, dim)
    _rope[(batch * tokens, triton.cdiv(heads, block_h))](
        x, positions, cos, sin, y, heads, tokens, cos.shape[0], dim // 2,
        x.stride(0), x.stride(1), x.stride(2),
        TRANSPOSED=transposed, BLOCK_H=block_h, HALF_BLOCK=half_block, ROUND_BF16=needs_bf16_rounding(x.dtype),
        num_warps=TRITON_ROPE_WARPS, **LAUNCH_OPTIONS,
    )
    return y


def rope_forward(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), unit head-dim stride; positions (B, T) int64 contiguous on x's device; cos
    and sin (P, D/2) float32 contiguous. Returns the rotated x, contiguous."""
    return _launch(x, positions, cos, sin, transposed=False)


def rope_backward(grad_y: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The transposed rotation of grad_y (rope_forward's gradient with respect to x)."""
    return _launch(grad_y, positions, cos, sin, transposed=True)
