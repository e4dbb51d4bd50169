"""Rotary position embeddings (Llama's rotate-half layout): the cos/sin table and the rotation.

The table (docs/design.md, "Rotary embeddings"). For head dim D and positions p < P:

    inv_freq[i] = 1 / theta ** (float32(2 i) / D)           i < D/2, float32, as HF transformers
                                                           computes it (llama3 scaling on top)
    angle[p, i] = float32(float32(p) * inv_freq[i])         one float32 rounding
    cos[p, i]   = float32(cos_float64(angle[p, i]))         sin likewise

float64 cos and sin are faithful (within an ulp of the exact value) in PyTorch's CPU kernels,
glibc and numpy alike, so rounding them to float32 gives the correctly rounded float32 value
except where the exact value lies within ~2**-53 (relative) of a float32 halfway point (double
rounding): deterministic, and the same bits whichever faithful library computes them. inv_freq
is PyTorch's float32 CPU pow and division, exactly HF's (the bits HF models were trained with).
The table is built on the CPU once and moved to the device, so every backend reads the same bits,
and a token's cos/sin depend on its position alone: the same in a full pass, a chunked prefill
and a decode step.

The rotation, per (batch, head, token) row x of D elements, h = D/2, c = cos[pos, i], s = sin[pos, i]:

    y[i]     = x[i] * c - x[i + h] * s
    y[i + h] = x[i + h] * c + x[i] * s

in float32 (float64 for float64 x), each product rounded, then the sum: no fused multiply-add.
The backward (the transposed rotation) is dx[i] = g[i] c + g[i+h] s, dx[i+h] = g[i+h] c - g[i] s.
A position outside [0, P) reads nothing and gives a NaN row (the ops reject it before that).
"""
from __future__ import annotations

import math

import torch

from .common import compute_dtype

ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_type(rope_scaling) -> str:
    """The scaling type of a HF-style rope_scaling dict ("rope_type", or the older "type"); None
    is "default". Any other type raises ValueError naming it."""
    if rope_scaling is None:
        return "default"
    if not isinstance(rope_scaling, dict):
        raise TypeError(f"rope_table: rope_scaling must be a dict or None, got {type(rope_scaling).__name__}")
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_table: rope_scaling type {kind!r} is not supported (supported: {ROPE_TYPES})")
    if kind == "llama3":
        missing = [key for key in LLAMA3_KEYS if key not in rope_scaling]
        if missing:
            raise ValueError(f"rope_table: llama3 rope_scaling needs {list(LLAMA3_KEYS)}, missing {missing}")
    return kind


def rope_inv_freq(head_dim: int, theta: float, rope_scaling=None) -> torch.Tensor:
    """(head_dim / 2,) float32 inverse frequencies, on the CPU, operation for operation as HF
    transformers' _compute_default_rope_parameters / _compute_llama3_parameters."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if rope_type(rope_scaling) == "default":
        return inv_freq
    factor = rope_scaling["factor"]
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    old_context_len = rope_scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rope_table(head_dim: int, max_positions: int, theta: float = 10000.0,
               rope_scaling=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each float32 (max_positions, head_dim / 2) on the CPU (see the module docstring)."""
    inv_freq = rope_inv_freq(head_dim, theta, rope_scaling)
    positions = torch.arange(max_positions, dtype=torch.int64).float()
    angle = positions[:, None] * inv_freq[None, :]  # float32 products: one rounding each
    return angle.double().cos().float(), angle.double().sin().float()


def _gather(table: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """table[positions] as (B, 1, T, D/2) in `dtype`; NaN where a position is outside the table."""
    valid = (positions >= 0) & (positions < table.shape[0])
    rows = table[torch.where(valid, positions, 0).to(table.device)].to(dtype)
    return torch.where(valid.to(table.device)[..., None], rows, torch.full((), math.nan, dtype=dtype,
                                                                           device=table.device))[:, None]


def _rotate(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            transposed: bool) -> torch.Tensor:
    dtype = compute_dtype(x.dtype)
    c, s = _gather(cos, positions, dtype), _gather(sin, positions, dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].to(dtype), x[..., half:].to(dtype)
    if transposed:
        y1, y2 = x1 * c + x2 * s, x2 * c - x1 * s
    else:
        y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


def rope_forward(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) of any strides, positions (B, T) int64, cos and sin (P, D/2) float32 on x's
    device: the rotated x, contiguous, in x's dtype."""
    return _rotate(x, positions, cos, sin, transposed=False)


def rope_backward(grad_y: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of rope_forward with respect to x: the transposed rotation of grad_y."""
    return _rotate(grad_y, positions, cos, sin, transposed=True)
