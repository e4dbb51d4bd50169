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
  halves (`a[l] += a[l + w]` for w = lanes/2, lanes/4, ..., 1). The lane count is an argument:
  fusedtx/policy.py chooses it per backend and device from the row length, never from the batch.

Every such number (lanes, row groups, the matmul's K block, the attention split size) is an
argument here; this file holds the algorithms only (docs/design.md, "Reduction orders").
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
    """Sum float32 (or float64) `x` over its last dim in fusedtx's fixed order (module docstring)."""
    assert x.dtype in (torch.float32, torch.float64)
    if lanes < 1 or lanes & (lanes - 1):
        raise ValueError(f"lanes must be a power of two, got {lanes}")
    n = x.shape[-1]
    n_blocks = max(1, -(-n // lanes))
    padded = torch.zeros(*x.shape[:-1], n_blocks * lanes, dtype=x.dtype, device=x.device)
    padded[..., :n] = x
    blocks = padded.view(*x.shape[:-1], n_blocks, lanes)
    acc = torch.zeros(*x.shape[:-1], lanes, dtype=x.dtype, device=x.device)
    for b in range(n_blocks):
        acc = acc + blocks[..., b, :]
    width = lanes
    while width > 1:
        width //= 2
        acc = acc[..., :width] + acc[..., width : 2 * width]
    return acc[..., 0]


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root (IEEE 754), as the kernels' sqrt instructions give.

    torch.sqrt on CPU is not: measured on torch 2.13, it is off by one ulp for ~17 % of float32
    and ~1 % of float64 inputs. A float64 square root rounded to float32 is correctly rounded
    (53 >= 2 * 24 + 2 bits); for float64 on CPU, numpy's sqrt is the hardware instruction.
    """
    if x.dtype == torch.float32:
        return torch.sqrt(x.double()).float()
    assert x.dtype == torch.float64
    if x.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.sqrt(x.numpy()))
    return torch.sqrt(x)  # CUDA's double sqrt is correctly rounded


def row_group_sum(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum a (rows, N) tensor over its rows in fusedtx's fixed order for weight gradients.

    The rows are cut into `groups` consecutive groups of ceil(rows / groups) rows (the last
    ones may be short or empty); each group's partial starts at +0 and adds its rows in
    ascending order; then the partials are added in ascending group order, starting at +0. The
    group count is a constant, never the thread count or the GPU's SM count, so the result is
    the same on any machine; it is one fixed-size buffer of partials, no atomics.
    """
    rows, n = x.shape
    per_group = max(1, -(-rows // groups))
    padded = torch.zeros(groups * per_group, n, dtype=x.dtype, device=x.device)
    padded[:rows] = x
    blocks = padded.view(groups, per_group, n)
    partial = torch.zeros(groups, n, dtype=x.dtype, device=x.device)
    for r in range(per_group):
        partial = partial + blocks[:, r, :]
    total = torch.zeros(n, dtype=x.dtype, device=x.device)
    for g in range(groups):
        total = total + partial[g]
    return total


# ---------------------------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------------------------
def causal_valid_counts(n_rows: int, n_cols: int, n_queries: int, device) -> torch.Tensor:
    """Keys visible to each row of a causal softmax over (..., Tq, Tk) flattened to rows.

    Row r is query i = r % Tq, which sees keys j <= i + (Tk - Tq): bottom-right aligned, as
    for the last Tq queries of a sequence of Tk tokens.
    """
    query = torch.arange(n_rows, device=device) % n_queries
    return (query + (n_cols - n_queries) + 1).clamp(0, n_cols)


def softmax_forward(x: torch.Tensor, scale: float, causal: bool, n_queries: int, lanes: int) -> torch.Tensor:
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


def softmax_backward(grad_y: torch.Tensor, y: torch.Tensor, scale: float, lanes: int) -> torch.Tensor:
    """dx = scale * y * (dy - sum(dy * y)) per row, float32 math, written in that order."""
    y32, dy32 = y.float(), grad_y.float()
    dot = lane_sum(dy32 * y32, lanes)[:, None]
    dx = (y32 * (dy32 - dot)) * torch.tensor(scale, dtype=torch.float32)
    return dx.to(y.dtype)


# ---------------------------------------------------------------------------------------------
# layer_norm
# ---------------------------------------------------------------------------------------------
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and arithmetic: float64 for float64 tensors, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                       lanes: int):
    """LayerNorm of each row of a 2-D (rows, N) tensor, two-pass statistics.

    Returns (y in x's dtype, mean, rstd), mean and rstd in the compute dtype:
        mean = lane_sum(x) / N
        var  = lane_sum((x - mean)^2) / N
        rstd = 1 / sqrt(var + eps)                  (sqrt_rn; / is correctly rounded)
        y    = ((x - mean) * rstd) * weight + bias
    """
    acc = compute_dtype(x.dtype)
    # N as a tensor: PyTorch's CUDA kernels turn division by a Python number into multiplication
    # by its reciprocal, which is not the correctly rounded division the kernels do.
    n = torch.tensor(x.shape[1], dtype=acc, device=x.device)
    xa = x.to(acc)
    mean = lane_sum(xa, lanes) / n
    d = xa - mean[:, None]
    var = lane_sum(d * d, lanes) / n
    rstd = 1.0 / sqrt_rn(var + torch.tensor(eps, dtype=acc, device=x.device))
    y = d * rstd[:, None]
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), mean, rstd


def layer_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        weight: torch.Tensor | None, need_param_grads: bool, lanes: int, groups: int):
    """Gradients of layer_norm_forward. Returns (dx in x's dtype, dweight, dbias) with dweight and
    dbias in the compute dtype (the caller casts them to the parameters' dtype), or None for both
    unless need_param_grads:
        xhat = (x - mean) * rstd,   g = dy * weight (dy without weight)
        dx   = (g - (xhat * (lane_sum(g * xhat) / N) + lane_sum(g) / N)) * rstd
        dweight = row_group_sum(dy * xhat),   dbias = row_group_sum(dy)
    """
    acc = mean.dtype
    n = torch.tensor(x.shape[1], dtype=acc, device=x.device)  # a tensor: see layer_norm_forward
    dy = grad_y.to(acc)
    xhat = (x.to(acc) - mean[:, None]) * rstd[:, None]
    g = dy * weight.to(acc) if weight is not None else dy
    mean_g = lane_sum(g, lanes) / n
    mean_gx = lane_sum(g * xhat, lanes) / n
    dx = (g - (xhat * mean_gx[:, None] + mean_g[:, None])) * rstd[:, None]
    if not need_param_grads:
        return dx.to(x.dtype), None, None
    dweight = row_group_sum(dy * xhat, groups)
    dbias = row_group_sum(dy, groups)
    return dx.to(x.dtype), dweight, dbias


# ---------------------------------------------------------------------------------------------
# matmul (Linear) with the fused bias + GELU epilogue
# ---------------------------------------------------------------------------------------------
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
    """(s, e): e = exp(-2u), u = sqrt(2/pi) (h + 0.044715 h^3), and s = 1 / (1 + e) = 0.5 (1 + tanh u)
    without the cancellation of 1 + tanh for negative u. The exponent is clamped to stay finite
    (written so that NaN stays NaN)."""
    h3 = (h * h) * h
    z = (h + _f32(GELU_TANH_CUBIC, h) * h3) * _f32(-GELU_TANH_TWO_K, h)
    z = torch.where(z > _f32(GELU_TANH_MAX_EXP_ARG, h), _f32(GELU_TANH_MAX_EXP_ARG, h), z)
    e = exp_f32(z)
    return _f32(1.0, h) / (_f32(1.0, h) + e), e


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


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c for float32 tensors with one rounding, as the kernels' FMA instructions do.

    The product of two float32 is exact in float64; the float64 sum is rounded to odd (a sticky
    last bit, restored from the exact TwoSum error), and rounding a round-to-odd value with
    53 >= 24 + 2 bits to float32 is correct rounding (Boldo & Melquiond)."""
    p = a.double() * b.double()
    c64 = c.double()
    s = p + c64
    bv = s - p
    err = (p - (s - bv)) + (c64 - bv)              # s + err == p + c exactly (finite s)
    inexact = (err != 0) & torch.isfinite(err) & ((s.view(torch.int64) & 1) == 0)
    toward = torch.where(err > 0, torch.tensor(float("inf"), dtype=torch.float64, device=s.device),
                         torch.tensor(float("-inf"), dtype=torch.float64, device=s.device))
    s = torch.where(inexact, torch.nextafter(s, toward), s)
    return s.float()


def fma_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for float32 (..., M, K) @ (..., K, N), batch dims broadcast: each element one
    accumulator from +0 taking fma(a[.., i, k], b[.., k, j], acc) for k ascending."""
    acc = torch.zeros(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]),
                      dtype=torch.float32, device=a.device)
    for k in range(a.shape[-1]):
        acc = fma_f32(a[..., :, k:k + 1], b[..., k:k + 1, :], acc)
    return acc


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


# ---------------------------------------------------------------------------------------------
# causal attention with a fixed split size
# ---------------------------------------------------------------------------------------------
def causal_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor, scale: float,
                      split_size: int):
    """Causal attention of the last q.shape[2] tokens of each sequence, cut into fixed-size chunks.

    q (B, H, Tq, D); k, v (B, Hkv, Tmax, D) with H a multiple of Hkv (query head h reads KV head
    h // (H / Hkv)); seqlens (B,) ints: sequence b has seqlens[b] valid keys (Tq <= seqlens[b] <=
    Tmax; whatever lies beyond is never read) and its queries sit at positions
    seqlens[b] - Tq ... seqlens[b] - 1. A full causal pass is seqlens = T = Tq = Tmax.

    A query at position t sees keys 0 ... t, cut at multiples of S = split_size counted from
    position 0. Chunk c (keys cS ... min(cS + S - 1, t)) is reduced on its own, in float32:
        s_j   = fma_matmul(q, k_j) * scale          (each dot: an FMA chain over d ascending)
        m_c   = max_j s_j
        p_j   = exp_f32(s_j - m_c)
        l_c   = sum_j p_j                           (ascending j, from +0)
        acc_c = fma_matmul(p, v)                    (an FMA chain over j ascending, from +0)
    and the chunks are merged in ascending order, starting from chunk 0's (m, l, acc):
        m'  = max(m, m_c),  a = exp_f32(m - m'),  b = exp_f32(m_c - m')
        l   = l * a + l_c * b,   acc = acc * a + acc_c * b,   m = m'
    o = acc / l. Nothing here depends on Tq, on the other sequences or on how the queries are
    grouped: a query's bits are the same in a full pass, in any chunked prefill and in a decode
    step. Returns (o in q's dtype, m, l) with m and l float32 (B, H, Tq) for the backward.
    """
    batch, heads, n_queries, _ = q.shape
    group = heads // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    m_out = torch.empty(batch, heads, n_queries, dtype=torch.float32, device=q.device)
    l_out = torch.empty_like(m_out)
    f32 = lambda c: torch.tensor(c, dtype=torch.float32, device=q.device)  # noqa: E731
    for b in range(batch):
        length = int(seqlens[b])
        qb = q[b].float()                                                    # (H, Tq, D)
        kb = k[b].float().repeat_interleave(group, dim=0)                    # (H, Tmax, D)
        vb = v[b].float().repeat_interleave(group, dim=0)
        positions = torch.arange(length - n_queries, length, device=q.device)
        m = l = acc = None
        for start in range(0, length, split_size):
            stop = min(start + split_size, length)
            keys = torch.arange(start, stop, device=q.device)
            valid = keys[None, :] <= positions[:, None]                      # (Tq, Sc)
            sees = valid.any(dim=1)[None, :]                                 # (1, Tq)
            s = fma_matmul(qb, kb[:, start:stop].transpose(1, 2)) * f32(scale)
            s = torch.where(valid, s, f32(float("-inf")))
            m_c = s.amax(dim=2)                                              # (H, Tq)
            p = torch.where(valid, exp_f32(s - torch.where(sees, m_c, f32(0.0))[..., None]), f32(0.0))
            l_c = torch.zeros_like(m_c)
            for j in range(stop - start):
                l_c = l_c + p[..., j]
            acc_c = fma_matmul(p, vb[:, start:stop])
            if m is None:  # chunk 0: every query sees key 0
                m, l, acc = m_c, l_c, acc_c
                continue
            m_new = torch.maximum(m, m_c)
            alpha, beta = exp_f32(m - m_new), exp_f32(torch.where(sees, m_c - m_new, f32(0.0)))
            l = torch.where(sees, l * alpha + l_c * beta, l)
            acc = torch.where(sees[..., None], acc * alpha[..., None] + acc_c * beta[..., None], acc)
            m = torch.where(sees, m_new, m)
        out[b], m_out[b], l_out[b] = acc / l[..., None], m, l
    return out.to(q.dtype), m_out, l_out


def blocked_fma_matmul(a: torch.Tensor, b: torch.Tensor, block: int) -> torch.Tensor:
    """a @ b like fma_matmul, with the reduction cut into blocks of `block` from index 0: each
    block an FMA chain from +0, the block sums added in ascending order (as reference.linear_matmul)."""
    total = None
    for start in range(0, a.shape[-1], block):
        part = fma_matmul(a[..., start:start + block], b[..., start:start + block, :])
        total = part if total is None else total + part
    return total


def causal_attention_backward(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       m: torch.Tensor, l: torch.Tensor, scale: float, split_size: int):
    """Gradients of a full causal causal_attention_forward (Tq = Tk = T, every sequence of length T).

    From the forward's final row statistics (m, l), in float32 with the forward's dot products:
        s_ij = fl(dotFMA(q_i, k_j) * scale),   P_ij = exp_f32(s_ij - m_i) / l_i   (j <= i, else 0)
        dP_ij = dotFMA(dO_i, v_j),   D_i = sum_j P_ij dP_ij,   dS_ij = P_ij * (dP_ij - D_i)
        dq_i = (sum_j dS_ij k_j) * scale      sums over keys j in blocks of S from 0
        dk_j = (sum_i dS_ij q_i) * scale      sums over queries i in blocks of S from 0
        dv_j =  sum_i P_ij dO_i
    D_i, like dq_i, is summed over keys j in blocks of S. It is the softmax backward's own row
    sum rather than the shortcut dO_i . o_i (equal in exact arithmetic): summing the same rounded
    P_ij dP_ij that dS uses keeps sum_j dS_ij near 0, where o_i's rounding does not, and at short
    rows (T = 2, 3) that shortcut made dq and dk up to 3.3x less accurate than PyTorch's eager
    backward in float32 (this form: <= 1.7x); it costs one more pass over the keys.
    Each block sum is an FMA chain from +0 (masked terms add exactly +0), blocks added in
    ascending order; with grouped KV heads, each query head's sum is formed so and the group's
    heads are added in ascending head order from +0. Fixed orders, no atomics: the same bits run
    after run and for any thread count. Returns (dq, dk, dv) in the inputs' dtypes.
    """
    heads, kv_heads, length = q.shape[1], k.shape[1], q.shape[2]
    group = heads // kv_heads
    f32 = lambda c: torch.tensor(c, dtype=torch.float32, device=q.device)  # noqa: E731
    qf, dof = q.float(), grad_o.float()
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    s = fma_matmul(qf, kf.transpose(-1, -2)) * f32(scale)
    p = torch.where(causal, exp_f32(torch.where(causal, s - m[..., None], f32(0.0))) / l[..., None], f32(0.0))
    dp = fma_matmul(dof, vf.transpose(-1, -2))
    d_row = blocked_fma_matmul(p[..., None, :], dp[..., :, None], split_size)[..., 0]  # (B, H, T, 1)
    ds = p * (dp - d_row)
    dq = blocked_fma_matmul(ds, kf, split_size) * f32(scale)
    dk_heads = blocked_fma_matmul(ds.transpose(-1, -2), qf, split_size) * f32(scale)
    dv_heads = blocked_fma_matmul(p.transpose(-1, -2), dof, split_size)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for h in range(group):  # ascending head order within each KV group
        dk = dk + dk_heads[:, h::group]
        dv = dv + dv_heads[:, h::group]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
