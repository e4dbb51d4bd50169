"""Elementwise activations: GELU (exact and tanh) and SiLU, forward and backward.

The linear op's epilogue applies them to its float32 pre-activation; the activation op applies
them to a tensor of its own, where PyTorch's own kernels are not batch invariant on CPU: their
vector body and scalar tail compute silu / gelu / sigmoid differently in the last bit, and which
elements fall in the tail (the end of the tensor, the ends of the threads' ranges) depends on
the tensor's size, so on the batch. Here every element runs the same float32 operations, with
fusedtx's exp_f32 and erf_f32, and no fused multiply-add.
"""
from __future__ import annotations

import torch

from .common import compute_dtype, exp_f32

# Activation codes shared by every backend (the native schemas take the int). ACTIVATIONS are
# the elementwise ones a plain linear's epilogue takes; ACT_SWIGLU halves the width (swiglu_ffn's
# epilogue). ELEMENTWISE are those of the activation op, on a tensor of its own.
ACT_NONE, ACT_GELU, ACT_GELU_TANH, ACT_SWIGLU, ACT_SILU = 0, 1, 2, 3, 4
ACTIVATIONS = {None: ACT_NONE, "none": ACT_NONE, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH}
ELEMENTWISE = {"gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "silu": ACT_SILU}

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


def activation_forward(h: torch.Tensor, activation: int) -> torch.Tensor:
    """The activation of h, elementwise (the linear epilogue's, and the activation op's forward):
        gelu:      (0.5 h) (1 + erf_f32(h / sqrt 2))
        gelu_tanh: h / (1 + exp_f32(-2 sqrt(2/pi) (h + 0.044715 h^3)))   (= 0.5 h (1 + tanh u))
        silu:      h s,  s = sigmoid(h) as _silu_sigmoid
    in float32; float16 / bfloat16 h is widened, and the result rounded back to h's dtype.
    float64 h (the reference's float64 path, for gradcheck) uses torch's erf / tanh / sigmoid."""
    if h.dtype in (torch.float16, torch.bfloat16):
        return activation_forward(h.float(), activation).to(h.dtype)
    if activation == ACT_NONE:
        return h
    if h.dtype == torch.float64:
        if activation == ACT_SILU:
            return torch.nn.functional.silu(h)
        if activation == ACT_GELU:
            return torch.nn.functional.gelu(h)
        return torch.nn.functional.gelu(h, approximate="tanh")
    if activation == ACT_GELU:
        return (_f32(0.5, h) * h) * (_f32(1.0, h) + erf_f32(h * _f32(SQRT1_2, h)))
    if activation == ACT_GELU_TANH:
        return h * _gelu_tanh_sigmoid(h)[0]
    if activation == ACT_SILU:
        return h * _silu_sigmoid(h)[0]
    raise ValueError(f"unknown activation code {activation}")


def activation_derivative(h: torch.Tensor, activation: int) -> torch.Tensor:
    """d activation / dh on the float32 pre-activation:
        gelu:      0.5 (1 + erf_f32(h / sqrt 2)) + h (exp_f32(-h^2 / 2) / sqrt(2 pi))
        gelu_tanh: s + ((h s)(e s)) (2 sqrt(2/pi) (1 + 0.134145 h^2)),  (s, e) = _gelu_tanh_sigmoid(h)
        silu:      s + (h s)(e s),  (s, e) = _silu_sigmoid(h)   (swiglu_grad_preact's silu')
    (e s is 1 - s without its cancellation as s -> 1). Not for ACT_SWIGLU, whose gradient
    mixes columns: swiglu_grad_preact.
    """
    if h.dtype == torch.float64:  # the textbook derivatives, for gradcheck
        if activation == ACT_SILU:
            s = torch.sigmoid(h)
            return s * (1.0 + h * (1.0 - s))
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
    if activation == ACT_SILU:
        s, e = _silu_sigmoid(h)
        return s + (h * s) * (e * s)
    raise ValueError(f"unknown activation code {activation}")


def activation_backward(grad_y: torch.Tensor, x: torch.Tensor, activation: int) -> torch.Tensor:
    """d loss / dx of y = activation_forward(x): dy * act'(x) in float32 (float64 for float64),
    rounded to dy's dtype. Not for ACT_SWIGLU (swiglu_grad_preact) or ACT_NONE."""
    acc = compute_dtype(grad_y.dtype)
    return (grad_y.to(acc) * activation_derivative(x.to(acc), activation)).to(grad_y.dtype)
