"""@triton.jit building blocks shared by the kernels, each the twin of a fusedtx.reference function.

Kernels are launched with LAUNCH_OPTIONS (no fused multiply-add) so that `a * b + c` rounds
twice, as in the reference; the sums use reference.lane_sum's order with the block width as the
lane count: accumulate whole blocks lane by lane, then fold the block in halves.
"""
import triton
import triton.language as tl

from . import INTERPRETED

# enable_fp_fusion=False: keep a*b+c as two roundings (bitwise parity with fusedtx.reference).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def exp_f32(x):
    """reference.exp_f32: Cody-Waite reduction, degree-6 polynomial, 2**n from exponent bits."""
    t = x * 1.44269504088896341
    shifted = t + 12582912.0
    n = shifted - 12582912.0
    r = x - n * 0.693359375
    r = r - n * -2.12194440e-4
    p = r * 1.9875691500e-4 + 1.3981999507e-3
    p = p * r + 8.3334519073e-3
    p = p * r + 4.1665795894e-2
    p = p * r + 1.6666665459e-1
    p = p * r + 5.0000001201e-1
    y = (p * (r * r) + r) + 1.0
    n_int = shifted.to(tl.int32, bitcast=True) - 0x4B400000
    pow2n = ((n_int + 127) << 23).to(tl.float32, bitcast=True)
    y = y * pow2n
    return tl.where(x < -87.0, 0.0, y)


@triton.jit
def log_f32(x):
    """reference.log_f32: Cephes' logf from the exponent bits, degree-8 polynomial in f = m - 1."""
    subnormal = x < 1.17549435e-38  # 2**-126: scaled by 2**23 (exact) first
    bits = tl.where(subnormal, x * 8388608.0, x).to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 - tl.where(subnormal, 23, 0)
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > 1.41421356
    m = tl.where(big, m * 0.5, m)
    fe = tl.where(big, e + 1, e).to(tl.float32)  # |e| <= 152: exact
    f = m - 1.0
    z = f * f
    p = f * 7.0376836292e-2 + -1.1514610310e-1
    p = p * f + 1.1676998740e-1
    p = p * f + -1.2420140846e-1
    p = p * f + 1.4249322787e-1
    p = p * f + -1.6668057665e-1
    p = p * f + 2.0000714765e-1
    p = p * f + -2.4999993993e-1
    p = p * f + 3.3333331174e-1
    y = f * (z * p)
    y = y + fe * -2.12194440e-4
    y = y + -0.5 * z
    r = f + y
    r = r + fe * 0.693359375
    r = tl.where(x == 0.0, float("-inf"), r)
    r = tl.where(x < 0.0, float("nan"), r)
    return tl.where((x != x) | (x == float("inf")), x, r)


# How a fold step takes the two halves of a (2w,) vector: both ways extract them exactly, so the
# bits are the same. Compiled: sums over the (2, w) view's rows, no layout change (a permute +
# split made Triton 3.6 emit megabytes of PTX at 16384 lanes). Interpreted: permute + split, which
# are builtins, while tl.sum is itself a nested @jit function that the interpreter re-patches on
# every call. tests/test_layer_norm.py runs the compiled form under the interpreter too.
HALVES_BY_SPLIT = tl.constexpr(INTERPRETED)


@triton.jit
def fold_lanes(acc, LOG2_LANES: tl.constexpr):
    """reference.lane_sum's last step: fold a (2**LOG2_LANES,) vector in halves to a scalar.

    Each step adds the vector's halves, a[l] + a[l + w]: one rounding, whatever layout the
    compiler picks."""
    for _ in tl.static_range(LOG2_LANES):
        if HALVES_BY_SPLIT:
            lo, hi = tl.split(tl.permute(tl.reshape(acc, (2, acc.shape[0] // 2)), (1, 0)))
            acc = lo + hi
        else:
            acc = tl.sum(tl.reshape(acc, (2, acc.shape[0] // 2)), axis=0)
    return tl.sum(acc, axis=0)


@triton.jit
def two_sum(a, b):
    """reference.two_sum: (s, err), s = a + b rounded and s + err == a + b exactly."""
    s = a + b
    b_virtual = s - a
    err = (a - (s - b_virtual)) + (b - b_virtual)
    return s, err


@triton.jit
def fold_lanes_compensated(s, e, LOG2_LANES: tl.constexpr):
    """reference.lane_sum_compensated's fold and total: fold the (sum, error) lane pairs in halves,
    (s, r) = two_sum(s[l], s[l + w]), e = (e[l] + e[l + w]) + r, then s + e (s where s is inf
    or NaN).

    The steps are written out, not calls to two_sum: the interpreter pays for every nested @jit
    call. TwoSum needs both halves of s; where compiled, each is a sum over the (2, w) view's rows
    with the other row replaced by -0, exact for every x (x + -0 == x, -0 and NaN included)."""
    top = (tl.arange(0, 2) == 0)[:, None]
    for _ in tl.static_range(LOG2_LANES):
        if HALVES_BY_SPLIT:
            a, b = tl.split(tl.permute(tl.reshape(s, (2, s.shape[0] // 2)), (1, 0)))
            e_lo, e_hi = tl.split(tl.permute(tl.reshape(e, (2, e.shape[0] // 2)), (1, 0)))
            e = e_lo + e_hi
        else:
            rows = tl.reshape(s, (2, s.shape[0] // 2))
            a = tl.sum(tl.where(top, rows, -0.0), axis=0)
            b = tl.sum(tl.where(top, -0.0, rows), axis=0)
            e = tl.sum(tl.reshape(e, (2, e.shape[0] // 2)), axis=0)  # e[l] + e[l + w]
        s = a + b
        b_virtual = s - a
        e = e + ((a - (s - b_virtual)) + (b - b_virtual))  # + TwoSum's error of a + b
    total = tl.sum(s, axis=0)  # one element: exact
    err = tl.sum(e, axis=0)
    return tl.where(total - total == 0.0, total + err, total)  # total - total is NaN unless finite


@triton.jit
def round_to_bf16(x):
    """Round float32 to the nearest bfloat16 (ties to even), returned as float32.

    The interpreter's float32 -> bfloat16 cast truncates; after this the cast is exact. GPUs
    round correctly, so kernels only call it when interpreting (a constexpr flag)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))


def needs_bf16_rounding(dtype) -> bool:
    import torch

    return INTERPRETED and dtype == torch.bfloat16


def log2(n: int) -> int:
    assert n > 0 and n & (n - 1) == 0, n
    return n.bit_length() - 1


# ---------------------------------------------------------------------------------------------
# GELU epilogues (reference.erf_f32 / activation_forward / activation_derivative), operation for
# operation: float literals are float32 constants, `/` is div_rn (Triton's `/` is approximate on
# GPUs), no FMA (LAUNCH_OPTIONS), and the clamps are written `where(x > C, C, x)` so NaN stays NaN.
# ---------------------------------------------------------------------------------------------
from .. import reference as _reference  # noqa: E402

# reference's activation codes as tl.constexpr: @triton.jit code may only read constexpr globals
ACT_NONE = tl.constexpr(_reference.ACT_NONE)
ACT_GELU = tl.constexpr(_reference.ACT_GELU)
ACT_GELU_TANH = tl.constexpr(_reference.ACT_GELU_TANH)
ACT_SWIGLU = tl.constexpr(_reference.ACT_SWIGLU)
ACT_SILU = tl.constexpr(_reference.ACT_SILU)


@triton.jit
def copysign_f32(x, sign):
    """torch.copysign for float32: x's magnitude with sign's sign bit (NaN signs included)."""
    magnitude = x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    return (magnitude | (sign.to(tl.uint32, bitcast=True) & 0x80000000)).to(tl.float32, bitcast=True)


@triton.jit
def erf_f32(t):
    """reference.erf_f32: t + t P(t^2) below |t| = 0.9, else sign(t) (1 - exp_f32(Q(min(|t|, 4))))."""
    a = tl.abs(t)
    a = tl.where(a > 4.0, 4.0, a)
    t2 = t * t
    p = t2 * -6.1112584e-04 + 5.0161984e-03
    p = p * t2 + -2.6781915e-02
    p = p * t2 + 1.1282228e-01
    p = p * t2 + -3.761253e-01
    p = p * t2 + 1.2837915e-01
    small = t + t * p
    q = a * -5.805502e-08 + 1.3905425e-06
    q = q * a + -1.3021138e-05
    q = q * a + 4.3403546e-05
    q = q * a + 2.4704504e-04
    q = q * a + -3.844943e-03
    q = q * a + 2.4801595e-02
    q = q * a + -1.0816315e-01
    q = q * a + -6.332778e-01
    q = q * a + -1.129598e+00
    q = q * a + 1.9802191e-04
    large = copysign_f32(1.0 - exp_f32(q), t)
    return tl.where(a < 0.9, small, large)


@triton.jit
def sigmoid_of_neg(z):
    """reference._sigmoid_of_neg: (s, e), e = exp(min(z, 88)), s = z > 88 ? +0 : 1 / (1 + e)."""
    beyond = z > 88.0
    e = exp_f32(tl.where(beyond, 88.0, z))
    return tl.where(beyond, 0.0, tl.math.div_rn(1.0, 1.0 + e)), e


@triton.jit
def gelu_tanh_sigmoid(h):
    """reference._gelu_tanh_sigmoid: sigmoid_of_neg(z), z = -2 sqrt(2/pi) (h + 0.044715 h^3)."""
    h3 = (h * h) * h
    z = (h + 0.044715 * h3) * -1.5957691216057308
    return sigmoid_of_neg(z)


@triton.jit
def swiglu_forward(g, u):
    """reference.swiglu_forward on gate/up pairs: (g s) u, s = sigmoid_of_neg(-g)."""
    s, e = sigmoid_of_neg(-g)
    return (g * s) * u


@triton.jit
def swiglu_grads(dy, g, u):
    """reference.swiglu_grad_preact on pairs: (dg, du) = ((dy u)(s + (g s)(e s)), dy (g s))."""
    s, e = sigmoid_of_neg(-g)
    gs = g * s
    return (dy * u) * (s + gs * (e * s)), dy * gs


@triton.jit
def activation_forward(h, ACTIVATION: tl.constexpr):
    """reference.activation_forward on float32 h (ACT_NONE returns h)."""
    if ACTIVATION == ACT_GELU:
        y = (0.5 * h) * (1.0 + erf_f32(h * 0.70710678118654752))
    elif ACTIVATION == ACT_GELU_TANH:
        s, e = gelu_tanh_sigmoid(h)
        y = h * s
    elif ACTIVATION == ACT_SILU:
        s, e = sigmoid_of_neg(-h)
        y = h * s
    else:
        y = h
    return y


@triton.jit
def activation_derivative(h, ACTIVATION: tl.constexpr):
    """reference.activation_derivative on float32 h (gelu, gelu_tanh or silu)."""
    if ACTIVATION == ACT_GELU:
        cdf = 0.5 * (1.0 + erf_f32(h * 0.70710678118654752))
        pdf = exp_f32(-0.5 * (h * h)) * 0.39894228040143268
        d = cdf + h * pdf
    elif ACTIVATION == ACT_SILU:
        s, e = sigmoid_of_neg(-h)
        d = s + (h * s) * (e * s)
    else:
        tl.static_assert(ACTIVATION == ACT_GELU_TANH)
        s, e = gelu_tanh_sigmoid(h)
        slope = 1.5957691216057308 * (1.0 + 0.134145 * (h * h))
        d = s + ((h * s) * (e * s)) * slope
    return d


# The interpreter's float32 <-> bfloat16 casts also mangle subnormals (|x| < 2**-126), in both
# directions (measured on triton 3.9). bfloat16 is the top half of a float32, so bit moves are
# exact; kernels use them where they use round_to_bf16 (only when interpreting).
@triton.jit
def bf16_to_f32(x):
    """bfloat16 -> float32 exactly: the bf16 bits become the float32's top 16 bits."""
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_bf16_rn(x):
    """float32 -> bfloat16, round to nearest even, subnormals included; NaN stays NaN."""
    bits = round_to_bf16(x).to(tl.uint32, bitcast=True) >> 16
    bits = tl.where(x != x, bits | 0x40, bits)  # a NaN whose payload sat in the low half
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
