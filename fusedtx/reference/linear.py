"""Linear: the blocked FMA matmul with a fused bias + activation epilogue (GELU, or the SwiGLU
gate of a packed gate/up matmul), and its backward.

SwiGLU (ACT_SWIGLU) lives here as an activation of the linear epilogue rather than in a file of
its own: it is the same matmul with another epilogue. Its weight is the gate and up projections
packed row-interleaved, packed row 2j = gate row j, packed row 2j + 1 = up row j, so the
pre-activation h = x @ packed.T holds g_j = gate_j . x in column 2j and u_j = up_j . x in column
2j + 1 — each element's bits are those a separate gate or up matmul gives (an element's K order
depends on nothing else) — and the epilogue writes y[:, j] = silu(h[:, 2j]) * h[:, 2j + 1]: the
output has half of h's columns.
"""
from __future__ import annotations

import torch

from .activation import ACT_NONE, ACT_SWIGLU, _silu_sigmoid, activation_backward, activation_forward
from .common import compute_dtype, fma_matmul, row_group_sum

def swiglu_pairs(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, u): the gate and up pre-activations of a packed (..., 2H) h (columns 2j and 2j + 1)."""
    return h[..., 0::2], h[..., 1::2]


def swiglu_forward(h: torch.Tensor) -> torch.Tensor:
    """The SwiGLU epilogue on a packed (..., 2H) pre-activation, (..., H) out:
        y = (g s) u,   s = sigmoid(g) as _silu_sigmoid,   g = h[..., 2j], u = h[..., 2j + 1]
    float32 (two roundings after s: silu(g) = g s, then times u); float64 h (gradcheck) uses
    F.silu."""
    g, u = swiglu_pairs(h)
    if h.dtype == torch.float64:
        return torch.nn.functional.silu(g) * u
    return (g * _silu_sigmoid(g)[0]) * u


def swiglu_grad_preact(grad_y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """d loss / dh of y = swiglu_forward(h) for the upstream (..., H) grad_y, (..., 2H) out:
        dh[2j]     = (dy u) silu'(g),  silu'(g) = s + (g s)(e s)   ((s, e) = _silu_sigmoid(g))
        dh[2j + 1] = dy (g s)
    in h's dtype (float32; float64 with the textbook silu')."""
    g, u = swiglu_pairs(h)
    if h.dtype == torch.float64:
        s = torch.sigmoid(g)
        dg, du = (grad_y * u) * (s * (1.0 + g * (1.0 - s))), grad_y * (g * s)
    else:
        s, e = _silu_sigmoid(g)
        gs = g * s
        dg, du = (grad_y * u) * (s + gs * (e * s)), grad_y * gs
    return torch.stack((dg, du), dim=-1).flatten(-2)


def interleave_pair(b: torch.Tensor, b_odd: torch.Tensor, pair_dim: int) -> torch.Tensor:
    """The operand linear_matmul reads for a pair (b, b_odd) of one shape: b and b_odd interleaved
    along pair_dim, rows 2i / 2i + 1 = b[i] / b_odd[i] (pair_dim 0) or columns 2j / 2j + 1 =
    b[:, j] / b_odd[:, j] (pair_dim 1). With b = gate.T and b_odd = up.T (pair_dim 1) it is the
    packed SwiGLU operand; the packed weight's rows are interleave_pair(gate, up, 0). The result
    keeps b's layout: columns contiguous when b's are (b = weight.t(), as a packed weight's .t()),
    which matters to a kernel whose order follows the layout (Triton's tl.dot)."""
    if b.stride(0) == 1 and b.stride(1) != 1:
        return interleave_pair(b.t(), b_odd.t(), 1 - pair_dim).t()
    return torch.stack((b, b_odd), dim=pair_dim + 1).flatten(pair_dim, pair_dim + 1)


def _epilogue(h: torch.Tensor, activation: int) -> torch.Tensor:
    """The activation of the pre-activation h: SwiGLU's halves the width, the others are elementwise."""
    return swiglu_forward(h) if activation == ACT_SWIGLU else activation_forward(h, activation)


def linear_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, activation: int, save_preact: bool,
                  k_block: int, b_odd: torch.Tensor | None = None, pair_dim: int = 0):
    """y = act(a @ b + bias) for a (M, K) and b (K, N); also the pre-activation h = a @ b + bias
    when save_preact (what the backward reads), else None. With b_odd, the operand b is
    interleave_pair(b, b_odd, pair_dim) (the kernels read the two where they are).

    K is cut into blocks of k_block from k = 0. In each block, every element's partial is one
    float32 accumulator from +0 taking a[i, k] * b[k, j] with an FMA for k ascending; the block
    partials are added to a float32 total (from +0) in ascending block order; then
    h = total + bias[j] (one rounding), then the activation on float32 h. Nothing else enters:
    the bits of row i depend on a[i, :] and b alone — for any M, any tile shape, any thread count.
    (One FMA chain over all of K would be simpler but is up to ~4x less accurate than MKL's
    sgemm at K = 3072; blocks of 128 bring it to ~0.85x, inside contract point 1.)
    With ACT_SWIGLU, N is even, b's columns are the packed gate/up pairs and y is (M, N / 2)
    (swiglu_forward); h stays (M, N).
    bfloat16/float16 operands are converted to float32 first (their products are exact in
    float32). Returns (y, h) in a's dtype. float64 operands (for gradcheck) are multiplied by
    torch in float64.
    """
    if b_odd is not None:
        b = interleave_pair(b, b_odd, pair_dim)
    if a.dtype == torch.float64:
        h = a @ b
        if bias is not None:
            h = h + bias
        return _epilogue(h, activation), (h if save_preact else None)
    a32, b32 = a.float(), b.float()
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    for start in range(0, a.shape[1], k_block):
        acc = acc + fma_matmul(a32[:, start:start + k_block], b32[start:start + k_block])
    h = acc + bias.float() if bias is not None else acc
    return _epilogue(h, activation).to(a.dtype), (h.to(a.dtype) if save_preact else None)


def linear_bias_act_backward(grad_y: torch.Tensor, preact: torch.Tensor | None, activation: int,
                             need_bias_grad: bool, groups: int):
    """The elementwise part of the Linear backward, (M, N) -> (grad_preact, grad_bias):
        grad_preact = dy * act'(h) in float32, stored in dy's dtype   (dy itself when no activation;
                      swiglu_grad_preact for ACT_SWIGLU, where dy is (M, N / 2) and h (M, N))
        grad_bias   = row_group_sum(grad_preact as stored, in float32)  (None unless need_bias_grad)
    grad_bias is in float32 (float64 for float64); the caller casts it to the bias dtype."""
    if activation == ACT_NONE:
        grad_preact = grad_y
    elif activation == ACT_SWIGLU:
        acc = compute_dtype(grad_y.dtype)
        grad_preact = swiglu_grad_preact(grad_y.to(acc), preact.to(acc)).to(grad_y.dtype)
    else:
        grad_preact = activation_backward(grad_y, preact, activation)
    grad_bias = row_group_sum(grad_preact.to(compute_dtype(grad_y.dtype)), groups) if need_bias_grad else None
    return grad_preact, grad_bias


def linear_backward(grad_y, x, weight, preact, activation: int, need_dx: bool, need_dweight: bool,
                    need_dbias: bool, k_block: int, groups: int):
    """Gradients of y = act(x @ weight.T + bias), x (M, K), weight (N, K), through linear_matmul's
    order:
        g  = linear_bias_act_backward(dy, h)                          (M, N)
        dx = linear_matmul(g, weight)    each element sums over N ascending
        dweight = linear_matmul(g.T, x)  each element sums over the M rows ascending
        dbias   = row_group_sum(g)
    Returns (dx, dweight, dbias), None where not needed."""
    g, gb = linear_bias_act_backward(grad_y, preact, activation, need_dbias, groups)
    dx = linear_matmul(g, weight, None, ACT_NONE, False, k_block)[0] if need_dx else None
    dw = linear_matmul(g.t(), x, None, ACT_NONE, False, k_block)[0] if need_dweight else None
    return dx, dw, gb
