"""The activation op in Triton: y = act(x) and dx = dy * act'(x) elementwise, float32 math, as
reference.activation_forward / activation_backward (GELU, GELU-tanh, SiLU).

One program per BLOCK contiguous elements; every element runs the same operations
(_common.activation_forward / activation_derivative, no FMA), so its bits never depend on the
tensor's size or on which program it falls in.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, needs_bf16_rounding
# aliased: this module's launchers carry the reference's names
from ._common import activation_derivative as _derivative
from ._common import activation_forward as _act
from .causal_attention import _load_f32
from .causal_attention_backward import _store

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _activation_fwd(X, Y, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    _store(Y + offs, _act(_load_f32(X + offs, inside, ROUND_BF16), ACTIVATION), inside, ROUND_BF16)


@triton.jit
def _activation_bwd(DY, X, DX, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = _load_f32(X + offs, inside, ROUND_BF16)
    dy = _load_f32(DY + offs, inside, ROUND_BF16)
    _store(DX + offs, dy * _derivative(x, ACTIVATION), inside, ROUND_BF16)


def activation_forward(x: torch.Tensor, activation: int) -> torch.Tensor:
    """x: contiguous 1-D. Returns act(x), same dtype (activation: reference.ACT_GELU / _GELU_TANH / _SILU)."""
    y = torch.empty_like(x)
    if x.numel():
        _activation_fwd[(triton.cdiv(x.numel(), BLOCK),)](
            x, y, x.numel(), ACTIVATION=activation, BLOCK=BLOCK, ROUND_BF16=needs_bf16_rounding(x.dtype),
            num_warps=NUM_WARPS, **LAUNCH_OPTIONS)
    return y


def activation_backward(grad_y: torch.Tensor, x: torch.Tensor, activation: int) -> torch.Tensor:
    """grad_y, x: contiguous 1-D, same dtype. Returns grad_y * act'(x)."""
    dx = torch.empty_like(x)
    if x.numel():
        _activation_bwd[(triton.cdiv(x.numel(), BLOCK),)](
            grad_y, x, dx, x.numel(), ACTIVATION=activation, BLOCK=BLOCK, ROUND_BF16=needs_bf16_rounding(x.dtype),
            num_warps=NUM_WARPS, **LAUNCH_OPTIONS)
    return dx
