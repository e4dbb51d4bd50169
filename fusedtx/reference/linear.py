"""Linear: the blocked FMA matmul with a fused bias + GELU epilogue, and its backward.
"""
from __future__ import annotations

import torch

from .common import compute_dtype, exp_f32, fma_matmul, row_group_sum

# Activation codes shared by every backend (the native schemas take the int).
ACT_NONE, ACT_GELU, ACT_GELU_TANH = 0, 1, 2
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
GELU_TANH_MAX_EXP_ARG = 88.0             # exp_f32 stays finite below ~88.7


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


def _gelu_tanh_sigmoid(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, e): z = -2u, u = sqrt(2/pi) (h + 0.044715 h^3), e = exp_f32(min(z, 88)) and
    s = 1 / (1 + e) = 0.5 (1 + tanh u) without the cancellation of 1 + tanh for negative u; s = +0
    where z > 88 (h below ~ -9.96), where the true s < 1 / exp(88) ~ 6e-39 and h s rounds to 0 or
    lies within 1e-37 of it. So gelu_tanh is -0 for large negative h and NaN at -inf (0 * -inf),
    as PyTorch's; the exponent clamp keeps e finite for the derivative. NaN stays NaN."""
    h3 = (h * h) * h
    z = (h + _f32(GELU_TANH_CUBIC, h) * h3) * _f32(-GELU_TANH_TWO_K, h)
    beyond = z > _f32(GELU_TANH_MAX_EXP_ARG, h)
    e = exp_f32(torch.where(beyond, _f32(GELU_TANH_MAX_EXP_ARG, h), z))
    return torch.where(beyond, _f32(0.0, h), _f32(1.0, h) / (_f32(1.0, h) + e)), e


def activation_forward(h: torch.Tensor, activation: int) -> torch.Tensor:
    """The epilogue on the float32 pre-activation h:
        gelu:      (0.5 h) (1 + erf_f32(h / sqrt 2))
        gelu_tanh: h / (1 + exp_f32(-2 sqrt(2/pi) (h + 0.044715 h^3)))   (= 0.5 h (1 + tanh u))
    float64 h (the reference's float64 path, for gradcheck) uses torch's erf / tanh."""
    if activation == ACT_NONE:
        return h
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
    (e s is 1 - s without its cancellation as s -> 1)
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
        grad_preact = dy * act'(h) in float32, stored in dy's dtype   (dy itself when no activation)
        grad_bias   = row_group_sum(grad_preact as stored, in float32)  (None unless need_bias_grad)
    grad_bias is in float32 (float64 for float64); the caller casts it to the bias dtype."""
    if activation == ACT_NONE:
        grad_preact = grad_y
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
