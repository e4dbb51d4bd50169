"""The specification: readable pure-PyTorch implementations of every fusedtx algorithm.

Each kernel in fusedtx (Triton, C++ CPU, CUDA) performs the arithmetic written here, in the
same order, so that its results can be compared with this file bit for bit. Everything is
float32 and uses only correctly rounded elementary operations (+, -, *, /, max, compare), so
the bits do not depend on the device, the thread count, or how PyTorch vectorises them.

Two building blocks carry the promise:

* `exp_f32` — fusedtx's own exponential (Cody-Waite range reduction and a degree-6 polynomial,
  no fused multiply-add). Library `exp` functions differ between CPU, CUDA and Triton in the
  last bit; this one is the same formula everywhere.
* `lane_sum` — a reduction with a fixed order: `lanes` accumulators starting at +0,
  accumulator `l` adding elements `l, l + lanes, l + 2*lanes, ...` in ascending order (elements
  past the end count as +0), then the accumulators folded in
  halves (`a[l] += a[l + w]` for w = lanes/2, lanes/4, ..., 1). The lane count is a property of a
  backend (`lanes_for(...)` in each backend), fixed per row length, never per batch.
"""
from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------
# exp: the same bits on every backend
# ---------------------------------------------------------------------------------------------
LOG2E = 1.44269504088896341
LN2_HI = 0.693359375  # few mantissa bits, so n * LN2_HI is exact for |n| < 2**12
LN2_LO = -2.12194440e-4
ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: (t + M) - M rounds t to the nearest integer, ties to even
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
# Below this the result would leave the normal range: it is returned as +0 (exp(-87) ~ 1.6e-38).
EXP_MIN_ARG = -87.0


def exp_f32(x: torch.Tensor) -> torch.Tensor:
    """exp(x) for float32 x <= 0 (the only arguments softmax-style code produces), ~1 ulp.

    Returns +0 below EXP_MIN_ARG (and for -inf), NaN for NaN. Positive arguments up to ~88 also
    work; larger ones are outside the contract of every caller.
    """
    assert x.dtype == torch.float32
    f32 = lambda c: torch.tensor(c, dtype=torch.float32, device=x.device)  # noqa: E731
    t = x * f32(LOG2E)
    shifted = t + f32(ROUND_MAGIC)
    n = shifted - f32(ROUND_MAGIC)
    r = x - n * f32(LN2_HI)
    r = r - n * f32(LN2_LO)
    p = f32(EXP_POLY[0])
    for c in EXP_POLY[1:]:
        p = p * r + f32(c)
    y = (p * (r * r) + r) + f32(1.0)
    # 2**n from the integer hidden in the low mantissa bits of `shifted` (no float->int cast,
    # which is undefined for NaN in C++).
    n_int = shifted.view(torch.int32) - 0x4B400000
    pow2n = ((n_int + 127).to(torch.int64) << 23).to(torch.int32).view(torch.float32)
    y = y * pow2n
    return torch.where(x < f32(EXP_MIN_ARG), f32(0.0), y)


# ---------------------------------------------------------------------------------------------
# lane_sum: a reduction order that every kernel can reproduce
# ---------------------------------------------------------------------------------------------
def lane_sum(x: torch.Tensor, lanes: int) -> torch.Tensor:
    """Sum float32 `x` over its last dim in fusedtx's fixed order (see the module docstring)."""
    assert x.dtype == torch.float32
    if lanes < 1 or lanes & (lanes - 1):
        raise ValueError(f"lanes must be a power of two, got {lanes}")
    n = x.shape[-1]
    n_blocks = max(1, -(-n // lanes))
    padded = torch.zeros(*x.shape[:-1], n_blocks * lanes, dtype=torch.float32, device=x.device)
    padded[..., :n] = x
    blocks = padded.view(*x.shape[:-1], n_blocks, lanes)
    acc = torch.zeros(*x.shape[:-1], lanes, dtype=torch.float32, device=x.device)
    for b in range(n_blocks):
        acc = acc + blocks[..., b, :]
    width = lanes
    while width > 1:
        width //= 2
        acc = acc[..., :width] + acc[..., width : 2 * width]
    return acc[..., 0]


# ---------------------------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------------------------
SOFTMAX_LANES = 64  # the native CPU backend's lane count, used when backend="reference"


def causal_valid_counts(n_rows: int, n_cols: int, n_queries: int, device) -> torch.Tensor:
    """Keys visible to each row of a causal softmax over (..., Tq, Tk) flattened to rows.

    Row r is query i = r % Tq, which sees keys j <= i + (Tk - Tq): bottom-right aligned, as
    for the last Tq queries of a sequence of Tk tokens.
    """
    query = torch.arange(n_rows, device=device) % n_queries
    return (query + (n_cols - n_queries) + 1).clamp(0, n_cols)


def softmax_forward(x: torch.Tensor, scale: float, causal: bool, n_queries: int,
                    lanes: int = SOFTMAX_LANES) -> torch.Tensor:
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


def softmax_backward(grad_y: torch.Tensor, y: torch.Tensor, scale: float,
                     lanes: int = SOFTMAX_LANES) -> torch.Tensor:
    """dx = scale * y * (dy - sum(dy * y)) per row, float32 math, written in that order."""
    y32, dy32 = y.float(), grad_y.float()
    dot = lane_sum(dy32 * y32, lanes)[:, None]
    dx = (y32 * (dy32 - dot)) * torch.tensor(scale, dtype=torch.float32)
    return dx.to(y.dtype)
