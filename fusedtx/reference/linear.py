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

from .common import compute_dtype, exp_f32, fma_matmul, row_group_sum

# Activation codes shared by every backend (the native schemas take the int). ACTIVATIONS are
# the elementwise ones a plain linear takes; ACT_SWIGLU halves the width (swiglu_ffn's epilogue).
ACT_NONE, ACT_GELU, ACT_GELU_TANH, ACT_SWIGLU = 0, 1, 2, 3
ACTIVATIONS = {None: ACT_NONE, "none": ACT_NONE, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH}

# erf(t) = t + t * P(t^2) for |t| < ERF_SPLIT, else sign(t) * (1 - exp_f32(Q(min(|t|, 4)))).
# Fitted for fusedtx (least squares reweighted towards minimax against math.erf); evaluated in
# float32 without FMA the result is within 1.32 ulp of erf everywhere (torch.erf: 0.69 ulp).
ERF_SPLIT = 0.9
ERF_SMALL_POLY = (-6.1112584e-04, 5.0161984e-03, -2.6781915e-02, 1.1282228e-01, -3.761253e-01, 1.2837915e-01)
ERF_LARGE_POLY = (-5.805502e-08, 1.3905425e-06, -1.3021138e-05, 4.3403546e-05, 2.4704504e-04, -3.844943e-03,
                  2.4801595e-02, -1.0816315e-01, -6.332778e-01, -1.129598e+00, 1.9802191e-04)
ERF_CLAMP = 4.0              # erf(4) rounds to 1 in float32
SQRT1_2 = 0.70710678118654752
INV_SQRT_2PI = 0.39894228040143268
GELU_TANH_CUBIC = 0.044715
GELU_TANH_CUBIC3 = 0.134145              # 3 * 0.044715, for the derivative
GELU_TANH_TWO_K = 1.5957691216057308     # 2 * sqrt(2 / pi)
MAX_EXP_ARG = 88.0                       # exp_f32 stays finite below ~88.7


def _f32(c: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(c, dtype=torch.float32, device=like.device)


def _horner(coeffs, x: torch.Tensor) -> torch.Tensor:
    p = _f32(coeffs[0], x)
    for c in coeffs[1:]:
        p = p * x + _f32(c, x)
    return p


def erf_f32(t: torch.Tensor) -> torch.Tensor:
    """erf for float32 t, ~1.3 ulp, the same formula (no FMA) on every backend. NaN gives NaN.

    Both branches are computed and one is selected, as the vector kernels do."""
    assert t.dtype == torch.float32
    a = t.abs()
    a = torch.where(a > _f32(ERF_CLAMP, t), _f32(ERF_CLAMP, t), a)  # written so NaN stays NaN
    small = t + t * _horner(ERF_SMALL_POLY, t * t)
    large = torch.copysign(_f32(1.0, t) - exp_f32(_horner(ERF_LARGE_POLY, a)), t)
    return torch.where(a < _f32(ERF_SPLIT, t), small, large)


def _sigmoid_of_neg(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, e) = (1 / (1 + exp(z)), exp(z)) for float32 z, with e = exp_f32(min(z, 88)) and s = +0
    where z > 88, where the true s < 1 / exp(88) ~ 6e-39: the product of s with a finite value
    then rounds to a signed zero or lies within ~1e-36 of it, and with an infinite one is NaN, as
    PyTorch's. The exponent clamp keeps e finite for the derivatives (e s = 1 - s without its
    cancellation as s -> 1). NaN stays NaN."""
    beyond = z > _f32(MAX_EXP_ARG, z)
    e = exp_f32(torch.where(beyond, _f32(MAX_EXP_ARG, z), z))
    return torch.where(beyond, _f32(0.0, z), _f32(1.0, z) / (_f32(1.0, z) + e)), e


def _gelu_tanh_sigmoid(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, e) = _sigmoid_of_neg(z), z = -2u, u = sqrt(2/pi) (h + 0.044715 h^3): s = 0.5 (1 + tanh u)
    without the cancellation of 1 + tanh for negative u; s = +0 for h below ~ -9.96. So gelu_tanh
    is -0 for large negative h and NaN at -inf (0 * -inf), as PyTorch's."""
    h3 = (h * h) * h
    z = (h + _f32(GELU_TANH_CUBIC, h) * h3) * _f32(-GELU_TANH_TWO_K, h)
    return _sigmoid_of_neg(z)


def _silu_sigmoid(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, e) = _sigmoid_of_neg(-g): s = sigmoid(g), +0 for g < -88 (silu(g) = g s is then -0,
    within 2e-36 of the true value, and NaN at -inf, as PyTorch's F.silu)."""
    return _sigmoid_of_neg(-g)


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


def activation_forward(h: torch.Tensor, activation: int) -> torch.Tensor:
    """The epilogue on the float32 pre-activation h:
        gelu:      (0.5 h) (1 + erf_f32(h / sqrt 2))
        gelu_tanh: h / (1 + exp_f32(-2 sqrt(2/pi) (h + 0.044715 h^3)))   (= 0.5 h (1 + tanh u))
        swiglu:    swiglu_forward(h): (..., 2H) -> (..., H)
    float64 h (the reference's float64 path, for gradcheck) uses torch's erf / tanh."""
    if activation == ACT_NONE:
        return h
    if activation == ACT_SWIGLU:
        return swiglu_forward(h)
    if h.dtype == torch.float64:
        if activation == ACT_GELU:
            return torch.nn.functional.gelu(h)
        return torch.nn.functional.gelu(h, approximate="tanh")
    if activation == ACT_GELU:
        return (_f32(0.5, h) * h) * (_f32(1.0, h) + erf_f32(h * _f32(SQRT1_2, h)))
    if activation == ACT_GELU_TANH:
        return h * _gelu_tanh_sigmoid(h)[0]
    raise ValueError(f"unknown activation code {activation}")


def activation_derivative(h: torch.Tensor, activation: int) -> torch.Tensor:
    """d activation / dh on the float32 pre-activation:
        gelu:      0.5 (1 + erf_f32(h / sqrt 2)) + h (exp_f32(-h^2 / 2) / sqrt(2 pi))
        gelu_tanh: s + ((h s)(e s)) (2 sqrt(2/pi) (1 + 0.134145 h^2)),  (s, e) = _gelu_tanh_sigmoid(h)
    (e s is 1 - s without its cancellation as s -> 1). Not for ACT_SWIGLU, whose gradient
    mixes columns: swiglu_grad_preact.
    """
    if h.dtype == torch.float64:  # the textbook derivatives, for gradcheck
        if activation == ACT_GELU:
            return 0.5 * (1.0 + torch.erf(h * SQRT1_2)) + h * torch.exp(-0.5 * h * h) * INV_SQRT_2PI
        t = torch.tanh(0.5 * GELU_TANH_TWO_K * (h + GELU_TANH_CUBIC * h ** 3))
        return 0.5 * (1.0 + t) + 0.25 * GELU_TANH_TWO_K * h * (1.0 - t * t) * (1.0 + GELU_TANH_CUBIC3 * h * h)
    if activation == ACT_GELU:
        cdf = _f32(0.5, h) * (_f32(1.0, h) + erf_f32(h * _f32(SQRT1_2, h)))
        pdf = exp_f32(_f32(-0.5, h) * (h * h)) * _f32(INV_SQRT_2PI, h)
        return cdf + h * pdf
    if activation == ACT_GELU_TANH:
        s, e = _gelu_tanh_sigmoid(h)
        slope = _f32(GELU_TANH_TWO_K, h) * (_f32(1.0, h) + _f32(GELU_TANH_CUBIC3, h) * (h * h))
        return s + ((h * s) * (e * s)) * slope
    raise ValueError(f"unknown activation code {activation}")



def linear_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, activation: int, save_preact: bool,
                  k_block: int):
    """y = act(a @ b + bias) for a (M, K) and b (K, N); also the pre-activation h = a @ b + bias
    when save_preact (what the backward reads), else None.

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
    if a.dtype == torch.float64:
        h = a @ b
        if bias is not None:
            h = h + bias
        return activation_forward(h, activation), (h if save_preact else None)
    a32, b32 = a.float(), b.float()
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    for start in range(0, a.shape[1], k_block):
        acc = acc + fma_matmul(a32[:, start:start + k_block], b32[start:start + k_block])
    h = acc + bias.float() if bias is not None else acc
    return activation_forward(h, activation).to(a.dtype), (h.to(a.dtype) if save_preact else None)


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
        acc = compute_dtype(grad_y.dtype)
        grad_preact = (grad_y.to(acc) * activation_derivative(preact.to(acc), activation)).to(grad_y.dtype)
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
