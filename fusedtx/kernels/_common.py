"""@triton.jit building blocks shared by the kernels, each the twin of a reference.py function.

Kernels are launched with LAUNCH_OPTIONS (no fused multiply-add) so that `a * b + c` rounds
twice, as in the reference; the sums use reference.lane_sum's order with the block width as the
lane count: accumulate whole blocks lane by lane, then fold the block in halves.
"""
import triton
import triton.language as tl

from . import INTERPRETED

# enable_fp_fusion=False: keep a*b+c as two roundings (bitwise parity with reference.py).
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
def fold_lanes(acc, LOG2_LANES: tl.constexpr):
    """reference.lane_sum's last step: fold a (2**LOG2_LANES,) vector in halves to a scalar.

    Each step views the vector as (2, w) and adds the two rows: a[l] + a[l + w], one rounding,
    whatever layout the compiler picks."""
    for _ in tl.static_range(LOG2_LANES):
        acc = tl.sum(tl.reshape(acc, (2, acc.shape[0] // 2)), axis=0)
    return tl.sum(acc, axis=0)


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
