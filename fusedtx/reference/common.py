"""The building blocks every algorithm shares: fusedtx's exp and log, the lane sum, the row-group sum,
correctly rounded square root and fused multiply-add, and FMA-chain matmuls.
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
# log: the same bits on every backend
# ---------------------------------------------------------------------------------------------
SQRT2_F32 = 1.41421356  # rounds to float32 0x3FB504F3, just below sqrt(2)
LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
            -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
SUBNORMAL_SCALE = 8388608.0  # 2**23: a subnormal times this is normal, exactly


def log_f32(x: torch.Tensor) -> torch.Tensor:
    """Natural log of float32 x, faithfully rounded (error below 1 ulp of the exact value) for
    every positive normal or subnormal x: Cephes' logf, written with separately rounded float32
    operations. Measured against float64 torch.log (docs/design.md, "exp, log and erf"): at
    most 0.83 ulp over every float32 in [1, 4) and every 7th in [1, 2**31), 0.80 ulp over every
    127th positive float32; 2 % of the arguments in [1, 2**31) are one ulp off the correctly
    rounded value. tests/test_log_softmax.py holds it below 0.85 ulp.

    x = 2**e * m with m in [1, 2) from the bits (integer operations only: no float->int cast,
    which is undefined for NaN in C++); subnormals are first multiplied by 2**23 (exact) and
    e lowered by 23. Where m > SQRT2_F32, m = m * 0.5 and e = e + 1 (exact), so that
    f = m - 1 (exact, Sterbenz) lies in about [-0.293, 0.414]. Then, each step rounded to float32:

        z = f * f
        p = LOG_POLY[0];  p = p * f + c  for c in LOG_POLY[1:]      (Horner in f)
        y = f * (z * p)
        y = y + e * LN2_LO                                          (e * LN2_LO rounded once)
        y = y + (-0.5) * z                                          (exact product)
        r = f + y
        r = r + e * LN2_HI                                          (exact product)

    Special values as torch.log: log(+-0) = -inf, log(x < 0) = NaN, log(+inf) = +inf,
    log(NaN) = NaN. log_softmax calls it on a row sum s >= 1 (or +inf / NaN).
    """
    assert x.dtype == torch.float32
    f32 = lambda c: torch.tensor(c, dtype=torch.float32, device=x.device)  # noqa: E731
    subnormal = x < f32(2.0 ** -126)
    scaled = torch.where(subnormal, x * f32(SUBNORMAL_SCALE), x)
    bits = scaled.view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127 - torch.where(subnormal, 23, 0).to(torch.int32)
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    big = m > f32(SQRT2_F32)
    m = torch.where(big, m * f32(0.5), m)
    e = torch.where(big, e + 1, e)
    fe = e.to(torch.float32)  # |e| <= 152: exact
    f = m - f32(1.0)
    z = f * f
    p = f32(LOG_POLY[0])
    for c in LOG_POLY[1:]:
        p = p * f + f32(c)
    y = f * (z * p)
    y = y + fe * f32(LN2_LO)
    y = y + f32(-0.5) * z
    r = f + y
    r = r + fe * f32(LN2_HI)
    r = torch.where(x == f32(0.0), f32(float("-inf")), r)
    r = torch.where(x < f32(0.0), f32(float("nan")), r)
    r = torch.where(x == f32(float("inf")), x, r)
    return torch.where(x != x, x, r)


# ---------------------------------------------------------------------------------------------
# lane_sum: a reduction order that every kernel can reproduce
# ---------------------------------------------------------------------------------------------
def _lane_blocks(x: torch.Tensor, lanes: int) -> torch.Tensor:
    """x's last dim cut into blocks of `lanes` (the last one padded with +0): (..., blocks, lanes)."""
    assert x.dtype in (torch.float32, torch.float64)
    if lanes < 1 or lanes & (lanes - 1):
        raise ValueError(f"lanes must be a power of two, got {lanes}")
    n = x.shape[-1]
    n_blocks = max(1, -(-n // lanes))
    padded = torch.zeros(*x.shape[:-1], n_blocks * lanes, dtype=x.dtype, device=x.device)
    padded[..., :n] = x
    return padded.view(*x.shape[:-1], n_blocks, lanes)


def lane_sum(x: torch.Tensor, lanes: int) -> torch.Tensor:
    """Sum float32 (or float64) `x` over its last dim in fusedtx's fixed order (module docstring)."""
    blocks = _lane_blocks(x, lanes)
    n_blocks = blocks.shape[-2]
    acc = torch.zeros(*x.shape[:-1], lanes, dtype=x.dtype, device=x.device)
    for b in range(n_blocks):
        acc = acc + blocks[..., b, :]
    width = lanes
    while width > 1:
        width //= 2
        acc = acc[..., :width] + acc[..., width : 2 * width]
    return acc[..., 0]


def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, err) with s = a + b rounded and s + err == a + b exactly (Knuth's TwoSum: six
    correctly rounded operations, no branch, any magnitudes; err is NaN once s overflows)."""
    s = a + b
    b_virtual = s - a
    err = (a - (s - b_virtual)) + (b - b_virtual)
    return s, err


def lane_sum_compensated(x: torch.Tensor, lanes: int) -> torch.Tensor:
    """Sum float32 (or float64) `x` over its last dim in lane_sum's order, each addition's
    rounding error kept: lane l holds a pair (s, e) from (+0, +0); adding v takes
    (s, err) = two_sum(s, v), e = e + err. The fold adds pairs: (s, err) = two_sum(s_l, s_{l+w}),
    e = (e_l + e_{l+w}) + err. The total is s + e, or s where s is not finite (an overflowed
    sum stays inf rather than inf - inf = NaN). The error is about one rounding of the exact
    sum plus N^2 u^2 sum|x| (Ogita, Rump and Oishi's Sum2), where lane_sum's grows with
    N / lanes and log2(lanes).
    """
    blocks = _lane_blocks(x, lanes)
    n_blocks = blocks.shape[-2]
    s = torch.zeros(*x.shape[:-1], lanes, dtype=x.dtype, device=x.device)
    e = torch.zeros_like(s)
    for b in range(n_blocks):
        s, err = two_sum(s, blocks[..., b, :])
        e = e + err
    width = lanes
    while width > 1:
        width //= 2
        s, err = two_sum(s[..., :width], s[..., width : 2 * width])
        e = (e[..., :width] + e[..., width : 2 * width]) + err
    s, e = s[..., 0], e[..., 0]
    return torch.where(torch.isfinite(s), s + e, s)


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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and arithmetic: float64 for float64 tensors, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_length(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """N = x.shape[1] as a tensor of the compute dtype, the divisor of a row mean. A tensor, not a
    Python number: PyTorch's CUDA kernels turn division by a Python number into multiplication
    by its reciprocal, which is not the correctly rounded division the kernels do."""
    return torch.tensor(x.shape[1], dtype=acc, device=x.device)


def rstd_of(var: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt_rn(var + eps), eps rounded to var's dtype: LayerNorm's and RMSNorm's rstd."""
    return 1.0 / sqrt_rn(var + torch.tensor(eps, dtype=var.dtype, device=var.device))


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


def fma_matmul(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b for float32 (..., M, K) @ (..., K, N), batch dims broadcast: each element one
    accumulator from +0 taking fma(a[.., i, k], b[.., k, j], acc) for k ascending.

    valid (bool, broadcastable to (..., M, K)): the terms k with valid[.., i, k] False are left
    out of row i's chains: the accumulator is kept as it is. Adding them as fma(0, b, acc) would
    not be the same: 0 * inf and 0 * NaN are NaN, and acc = -0 plus +0 * b (b >= +0) is +0, so a
    left-out b could still reach the result."""
    acc = torch.zeros(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]),
                      dtype=torch.float32, device=a.device)
    for k in range(a.shape[-1]):
        term = fma_f32(a[..., :, k:k + 1], b[..., k:k + 1, :], acc)
        acc = term if valid is None else torch.where(valid[..., :, k:k + 1], term, acc)
    return acc


def blocked_fma_matmul(a: torch.Tensor, b: torch.Tensor, block: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b like fma_matmul (valid likewise), with the reduction cut into blocks of `block` from
    index 0: each block an FMA chain from +0 (+0 itself when it has no valid term), the block
    sums added in ascending order (as reference.linear_matmul)."""
    total = None
    for start in range(0, a.shape[-1], block):
        part = fma_matmul(a[..., start:start + block], b[..., start:start + block, :],
                          None if valid is None else valid[..., start:start + block])
        total = part if total is None else total + part
    return total
