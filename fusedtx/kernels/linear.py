"""Linear in Triton: a batch-invariant matmul with a fused bias + GELU epilogue, and the
elementwise part of its backward (grad through the activation, bias gradient).

`_matmul_fwd` computes y = act(a @ b + bias) (and optionally the pre-activation h) for a (M, K),
b (K, N) of any strides — the op passes weight.t() in the forward, weight and grad.t() in the
backward. One program per BLOCK_M x BLOCK_N output tile reduces K in ascending order (the K tail
masked to +0, which adds nothing). float32 follows reference.linear_matmul's blocks: per block of
the K block, a fresh accumulator takes `tl.dot(a_tile, b_tile, acc)` for its BLOCK_K tiles
in order and is then added to the tile's total (one FMA chain over K = 3072 would be ~4x less
accurate than a blocked sgemm); bfloat16/float16 keep one tensor-core accumulator over all of K
(exact products, and the output's rounding dwarfs the sum's error). Then, in registers, h = total + bias and
the activation, written operation for operation as reference.activation_forward (helpers in
_common.py, launched without FMA contraction), so given the same h the epilogue is bit-exact.
With an activation the epilogue runs on the two column halves of the tile in turn (the same
elementwise bits, half the GELU temporaries live at once: tests/_lower_triton.py holds every
specialisation to zero register spills).

Why a row's bits never depend on the batch (docs/design.md, "The contract", point 4):
  * ONE tile configuration per (N, K, dtype) — `policy.triton_linear_tiles` never looks at M — and no split-K:
    every output element is reduced by the same sequence of tensor-core (or FMA) instructions
    over the same K blocks in the same order, whichever tile row it lands in and however many
    tiles there are. The order *inside* one tl.dot (how the hardware adds the BLOCK_K products)
    can depend on the tile shape and dtype, which is exactly why the shape is fixed.
  * M is not specialised (`do_not_specialize`): Triton would otherwise compile separate binaries
    for M == 1 and M % 16 == 0; with it, one binary serves every M for given strides/N/K.
  * Rows past M (and columns past N) are not masked on load but wrapped (`% M`, `% N`): they read
    valid rows whose results are simply not stored. A tile row never mixes with another row.
  * The program order is grouped (GROUP_M tile rows share a column sweep, for L2 reuse of b);
    it decides when a tile is computed, never how.

The decode regime (M = 1..16) is a memory-bound GEMV on a GPU: a 16-row tile would waste less
work, but tl.dot's internal summation order may depend on the tile shape, so switching tiles by
M could change a row's bits. We deliberately keep the M-independent tile (decode pays for a
mostly empty BLOCK_M tile; the bandwidth of reading b dominates anyway).

float32 uses input_precision="ieee" (no TF32) unless the user opted in with
torch.backends.cuda.matmul.allow_tf32 (then "tf32", a constexpr: a different binary and
different bits, the same invariance). bfloat16/float16 feed the tensor cores directly with
float32 accumulation.

Under the interpreter (TRITON_INTERPRET=1) tl.dot is numpy's BLAS, whose bits depend on a row's
position inside the tile (measured: OpenBLAS sgemm on a fixed 64x64x64 shape), so the kernel
takes another K loop there (SEQUENTIAL_SUM): the (BLOCK_M, BLOCK_K, BLOCK_N) products in float32
with acc added to the k = 0 slice, summed over k by numpy, which reduces a middle axis element
by element in ascending order, the K blocks added to the total as in reference.linear_matmul. That is
acc + p0 + p1 + ... — reference.linear_matmul bit for bit when the products are exact
(bfloat16/float16 operands), an unfused multiply-add chain for float32 (accuracy only),
batch-invariant either way. bf16 conversions are done by hand there
(the interpreter's casts truncate and mangle subnormals: _common.py).

`_bias_act_bwd`: one program per (row group, column block), with reference.row_group_sum's
groups of R = ceil(M / groups) consecutive rows (policy.ROW_GROUPS groups). It walks its rows in ascending
order, writes grad_preact = dy * act'(h) (float32 math, stored in dy's dtype) and adds the
*stored* value, back in float32, to a float32 partial that starts at +0; the partial is written
once to row `group` of a (groups, N) buffer that no other program touches. `_bias_grad_sum` then
adds the partial rows in ascending group order from +0. No atomics. As in layer_norm.py, only
the ceil(M / R) non-empty groups are launched and summed: an empty group's partial is +0, and
adding +0 to a sum that started at +0 changes nothing, so this is the reference's group sum.
Without a bias gradient the kernel is purely elementwise and runs one row per program. Under
the interpreter a program takes several groups as one (groups, rows, columns) tile and sums
the rows axis with numpy — the same additions in the same order, in far fewer Python steps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import policy, reference
from . import INTERPRETED
from ._common import (ACT_NONE, ACT_SWIGLU, LAUNCH_OPTIONS, activation_derivative, activation_forward, bf16_to_f32,
                      f32_to_bf16_rn, needs_bf16_rounding, swiglu_forward, swiglu_grads)

# @jit helpers inlined into the kernels, never launched on their own
JIT_HELPERS = ("_to_f32", "_from_f32", "_epilogue", "_grad_preact")


def k_blocking(k: int, block_k: int, k_block: int, dtype: torch.dtype) -> tuple[int, bool]:
    """(K_STEPS, K_BLOCKED): reference.linear_matmul sums K in blocks of k_block; a block is
    K_STEPS tiles of BLOCK_K (all of K when K is shorter). Followed for float32 on GPUs and for
    every dtype under the interpreter; bf16/fp16 GPU tiles keep one accumulator (_matmul_fwd)."""
    span = min(k_block, triton.next_power_of_2(max(k, 1)))
    if k_block % block_k:
        raise ValueError(f"linear_matmul: the K block ({k_block}) must be a multiple of BLOCK_K ({block_k})")
    return max(1, span // block_k), INTERPRETED or dtype == torch.float32


def input_precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input_precision: float32 is exact ("ieee") unless the user allowed TF32."""
    if dtype != torch.float32:
        return None  # 16-bit operands: the tensor cores' native bf16/fp16 path
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def _to_f32(x, ROUND_BF16: tl.constexpr):
    """Widen a loaded tile to float32 (by hand for bf16 under the interpreter: _common.py)."""
    if ROUND_BF16:
        return bf16_to_f32(x)
    return x.to(tl.float32)


@triton.jit
def _from_f32(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Narrow float32 to the output dtype, rounding to nearest even (by hand when interpreting bf16)."""
    if ROUND_BF16:
        return f32_to_bf16_rn(x)
    return x.to(dtype)


@triton.jit(do_not_specialize=["M"])
def _matmul_fwd(A, B, Bias, Y, H, M, N, K,
                stride_am, stride_ak, stride_bk, stride_bn,
                HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, SAVE_PREACT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, SEQUENTIAL_SUM: tl.constexpr,
                ROUND_BF16: tl.constexpr, EPILOGUE_HALVES: tl.constexpr, K_BLOCKED: tl.constexpr,
                K_STEPS: tl.constexpr):
    # Grouped ("swizzled") program order: GROUP_M tile rows walk the tile columns together so
    # that b's tiles are reused from L2. It only decides which tile a program computes.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows/columns past the end wrap onto valid ones (loads need no mask; results not stored).
    # 64-bit offsets: strides x indices may pass 2**31.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)

    ks = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None] * stride_am + ks.to(tl.int64)[None, :] * stride_ak
    b_ptrs = B + ks.to(tl.int64)[:, None] * stride_bk + cols[None, :] * stride_bn
    a_step = tl.cast(BLOCK_K, tl.int64) * stride_ak
    b_step = tl.cast(BLOCK_K, tl.int64) * stride_bk
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K in ascending order from k = 0, no split: the same sequence for every M.
    if not SEQUENTIAL_SUM and K_BLOCKED:
        # float32: reference.linear_matmul's blocks of K_STEPS * BLOCK_K (= MATMUL_K_BLOCK, or all of a
        # shorter K), each from a fresh accumulator, added to the total in order (accuracy).
        for kb in range(0, K, K_STEPS * BLOCK_K):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            # A loop, not static_range: unrolled, the pipeliner buffered the a and b tiles of all
            # K_STEPS steps per stage (256 KiB at 3 stages, more than any GPU has); as a loop it
            # buffers one step's per stage. The same operations in the same order.
            for step in range(K_STEPS):
                if EVEN_K:
                    a = tl.load(a_ptrs)
                    b = tl.load(b_ptrs)
                else:
                    k = kb + step * BLOCK_K
                    a = tl.load(a_ptrs, mask=ks[None, :] < K - k, other=0.0)
                    b = tl.load(b_ptrs, mask=ks[:, None] < K - k, other=0.0)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
                a_ptrs += a_step
                b_ptrs += b_step
            total = total + acc
    elif not SEQUENTIAL_SUM:
        # bfloat16/float16 on tensor cores: one accumulator over all of K (the products are exact
        # and the output's rounding dwarfs the float32 sum's; blocks would double the registers).
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=ks[None, :] < K - k, other=0.0)
                b = tl.load(b_ptrs, mask=ks[:, None] < K - k, other=0.0)
            total = tl.dot(a, b, total, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
            a_ptrs += a_step
            b_ptrs += b_step
    else:
        # Interpreter (module docstring): per K block, acc + p0 + p1 + ... element by element in
        # numpy; the block sums added to the total in order.
        first = (ks == 0)[None, :, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if k % (K_STEPS * BLOCK_K) == 0:
                total = total + acc
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            a = tl.load(a_ptrs, mask=ks[None, :] < K - k, other=0.0)
            b = tl.load(b_ptrs, mask=ks[:, None] < K - k, other=0.0)
            if ROUND_BF16:  # (not via _to_f32: each @jit call costs the interpreter ~1 ms)
                a = bf16_to_f32(a)
                b = bf16_to_f32(b)
            else:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            p = a[:, :, None] * b[None, :, :]  # (BLOCK_M, BLOCK_K, BLOCK_N)
            acc = tl.sum(tl.where(first, p + acc[:, None, :], p), axis=1)
            a_ptrs += a_step
            b_ptrs += b_step
        total = total + acc

    # Epilogue in registers, as reference.linear_matmul: h = acc + bias (one rounding), then act(h).
    if EPILOGUE_HALVES:
        # GELU's temporaries for the whole tile on top of the accumulator crowd the registers: do
        # it a half at a time (elementwise, so the same bits). acc[:, :BN/2] and acc[:, BN/2:]:
        left, right = tl.split(tl.permute(tl.reshape(total, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        offs_half = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        _epilogue(left, Bias, Y, H, offs_m, offs_half, M, N, HAS_BIAS, ACTIVATION, SAVE_PREACT, ROUND_BF16)
        _epilogue(right, Bias, Y, H, offs_m, offs_half + BLOCK_N // 2, M, N, HAS_BIAS, ACTIVATION, SAVE_PREACT,
                  ROUND_BF16)
    else:
        _epilogue(total, Bias, Y, H, offs_m, offs_n, M, N, HAS_BIAS, ACTIVATION, SAVE_PREACT, ROUND_BF16)


@triton.jit
def _epilogue(acc, Bias, Y, H, offs_m, offs_n, M, N, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
              SAVE_PREACT: tl.constexpr, ROUND_BF16: tl.constexpr):
    """h = acc + bias, y = act(h); store y (and h) for the tile's rows offs_m, columns offs_n.
    SwiGLU: offs_n starts even (every tile and half tile holds whole gate/up pairs), y has N / 2
    columns and column j of it is swiglu(h[:, 2j], h[:, 2j + 1])."""
    if HAS_BIAS:
        h = acc + _to_f32(tl.load(Bias + offs_n % N), ROUND_BF16)[None, :]
    else:
        h = acc
    out = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ACTIVATION == ACT_SWIGLU:
        g, u = tl.split(tl.reshape(h, (h.shape[0], h.shape[1] // 2, 2)))
        y_cols, _ = tl.split(tl.reshape(offs_n // 2, (offs_n.shape[0] // 2, 2)))
        y_out = offs_m.to(tl.int64)[:, None] * (N // 2) + y_cols[None, :]
        y_inside = (offs_m[:, None] < M) & (y_cols[None, :] < N // 2)
        tl.store(Y + y_out, _from_f32(swiglu_forward(g, u), Y.dtype.element_ty, ROUND_BF16), mask=y_inside)
    else:
        y = activation_forward(h, ACTIVATION)
        tl.store(Y + out, _from_f32(y, Y.dtype.element_ty, ROUND_BF16), mask=inside)
    if SAVE_PREACT:
        tl.store(H + out, _from_f32(h, H.dtype.element_ty, ROUND_BF16), mask=inside)


@triton.jit
def _grad_preact(DY, Hp, DH, offs, mask, ACTIVATION: tl.constexpr, ROUND_BF16: tl.constexpr):
    """grad_preact = dy * act'(h) at offs, stored in DH's dtype; returned as stored, in float32.
    SwiGLU: offs index the (rows, 2H) grad_preact; each element reads its gate/up pair and dy at
    offs // 2 (H columns), and keeps the pair gradient of its own parity."""
    if ACTIVATION == ACT_SWIGLU:
        pair = offs - offs % 2
        gate = _to_f32(tl.load(Hp + pair, mask=mask, other=0.0), ROUND_BF16)
        up = _to_f32(tl.load(Hp + pair + 1, mask=mask, other=0.0), ROUND_BF16)
        dg, du = swiglu_grads(_to_f32(tl.load(DY + offs // 2, mask=mask, other=0.0), ROUND_BF16), gate, up)
        stored = _from_f32(tl.where(offs % 2 == 0, dg, du), DH.dtype.element_ty, ROUND_BF16)
        tl.store(DH + offs, stored, mask=mask)
        g = _to_f32(stored, ROUND_BF16)
    else:
        g = _to_f32(tl.load(DY + offs, mask=mask, other=0.0), ROUND_BF16)
    if ACTIVATION != ACT_NONE and ACTIVATION != ACT_SWIGLU:
        h = _to_f32(tl.load(Hp + offs, mask=mask, other=0.0), ROUND_BF16)
        stored = _from_f32(g * activation_derivative(h, ACTIVATION), DH.dtype.element_ty, ROUND_BF16)
        tl.store(DH + offs, stored, mask=mask)
        g = _to_f32(stored, ROUND_BF16)
    return g


@triton.jit
def _bias_act_bwd(DY, Hp, DH, Partial, n_rows, n_cols, n_groups, rows_per_group,
                  ACTIVATION: tl.constexpr, BIAS_GRAD: tl.constexpr, BLOCK_N: tl.constexpr,
                  ROUND_BF16: tl.constexpr, SEQUENTIAL_SUM: tl.constexpr, GROUPS: tl.constexpr,
                  ROW_CHUNK: tl.constexpr):
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = cols < n_cols
    if not SEQUENTIAL_SUM:
        # GPU: one group per program, its rows one at a time in ascending order.
        group = tl.program_id(0).to(tl.int64)
        row_start = group * rows_per_group
        row_end = tl.minimum(row_start + rows_per_group, n_rows)
        partial = tl.zeros((BLOCK_N,), tl.float32)  # the group's partial starts at +0
        for row in range(row_start, row_end):
            g = _grad_preact(DY, Hp, DH, row * n_cols + cols, inside, ACTIVATION, ROUND_BF16)
            if BIAS_GRAD:
                partial = partial + g
        if BIAS_GRAD:
            tl.store(Partial + group * n_cols + cols, partial, mask=inside)
    else:
        # Interpreter (where every op costs Python time): GROUPS groups per program as a
        # (GROUPS, ROW_CHUNK, BLOCK_N) tile; numpy sums the middle axis element by element in
        # ascending order, and the running partial is added to each chunk's first row, so this
        # is the same chain of additions as the loop above.
        groups = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
        r = tl.arange(0, ROW_CHUNK)
        first = (r == 0)[None, :, None]
        partial = tl.zeros((GROUPS, BLOCK_N), tl.float32)
        for r0 in range(0, rows_per_group, ROW_CHUNK):
            rows = groups[:, None] * rows_per_group + (r0 + r)[None, :]
            valid = ((r0 + r)[None, :] < rows_per_group) & (rows < n_rows)
            mask = valid[:, :, None] & inside[None, None, :]
            g = _grad_preact(DY, Hp, DH, rows[:, :, None] * n_cols + cols[None, None, :], mask,
                             ACTIVATION, ROUND_BF16)
            if BIAS_GRAD:
                g = tl.where(mask, g, 0.0)  # rows past the group add +0: no change
                partial = tl.sum(tl.where(first, g + partial[:, None, :], g), axis=1)
        if BIAS_GRAD:
            tl.store(Partial + groups[:, None] * n_cols + cols[None, :], partial,
                     mask=(groups < n_groups)[:, None] & inside[None, :])


@triton.jit
def _bias_grad_sum(Partial, DB, n_groups, n_cols, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = cols < n_cols
    part = Partial + cols  # pointers advance by whole rows: 64-bit, no int overflow
    total = tl.zeros((BLOCK_N,), tl.float32)
    for _ in range(0, n_groups):  # ascending group order from +0, as reference.row_group_sum
        total = total + tl.load(part, mask=inside, other=0.0)
        part += n_cols
    tl.store(DB + cols, total, mask=inside)


def linear_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, activation: int, save_preact: bool,
                  k_block: int, b_odd: torch.Tensor | None = None, pair_dim: int = 0):
    """y = act(a @ b + bias) for 2-D a (M, K), b (K, N) of any strides, bias (N,) or None, all
    one dtype. Returns (y, preact or None): contiguous (M, N) in a's dtype; preact = a @ b + bias
    when save_preact and there is an activation. With b_odd the operand is
    reference.interleave_pair(b, b_odd, pair_dim), made here (a copy in b's layout) for the kernel
    to read."""
    if b_odd is not None:
        b = reference.interleave_pair(b, b_odd, pair_dim)
    m, k = a.shape
    n = b.shape[1]
    assert b.shape[0] == k and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert activation != reference.ACT_SWIGLU or n % 2 == 0, n
    y = torch.empty(m, n // 2 if activation == reference.ACT_SWIGLU else n, dtype=a.dtype, device=a.device)
    h = torch.empty(m, n, dtype=a.dtype, device=a.device) if save_preact and activation != reference.ACT_NONE else None
    if m == 0 or n == 0:
        return y, h
    if bias is not None:
        bias = bias.contiguous()
    precision = input_precision(a.dtype)
    cfg = policy.triton_linear_tiles(n, k, a.dtype, INTERPRETED)
    k_steps, k_blocked = k_blocking(k, cfg.BLOCK_K, k_block, a.dtype)
    grid = (triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N),)
    _matmul_fwd[grid](
        a, b, y if bias is None else bias, y, y if h is None else h, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        HAS_BIAS=bias is not None, ACTIVATION=activation, SAVE_PREACT=h is not None,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        EVEN_K=k % (k_steps * cfg.BLOCK_K if k_blocked else cfg.BLOCK_K) == 0, INPUT_PRECISION=precision,
        SEQUENTIAL_SUM=INTERPRETED, ROUND_BF16=needs_bf16_rounding(a.dtype),
        EPILOGUE_HALVES=activation != reference.ACT_NONE and not INTERPRETED, K_BLOCKED=k_blocked, K_STEPS=k_steps,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **LAUNCH_OPTIONS,
    )
    return y, h


def linear_bias_act_backward(grad_y: torch.Tensor, preact: torch.Tensor | None, activation: int, need_bias_grad: bool,
                             groups: int):
    """grad_y, preact: contiguous (M, N), one dtype (preact unused without an activation; for
    ACT_SWIGLU preact and grad_preact are (M, 2N)).

    Returns (grad_preact in grad_y's dtype, or None when activation is ACT_NONE — it would be
    grad_y itself; grad_bias float32 (N,) = reference.row_group_sum(grad_preact as stored), or
    None unless need_bias_grad)."""
    rows, cols = preact.shape if activation == reference.ACT_SWIGLU else grad_y.shape
    has_act = activation != reference.ACT_NONE
    grad_preact = torch.empty(rows, cols, dtype=grad_y.dtype, device=grad_y.device) if has_act else None
    grad_bias = torch.zeros(cols, dtype=torch.float32, device=grad_y.device) if need_bias_grad else None
    if rows == 0 or cols == 0 or not (has_act or need_bias_grad):
        return grad_preact, grad_bias
    if need_bias_grad:
        rows_per_group = -(-rows // groups)
        n_groups = -(-rows // rows_per_group)  # the non-empty groups (module docstring)
        partial = torch.empty(n_groups, cols, dtype=torch.float32, device=grad_y.device)
    else:  # purely elementwise: any grouping gives the same bits
        rows_per_group = policy.TRITON_LINEAR_INTERPRETER_ROWS if INTERPRETED else 1
        n_groups = -(-rows // rows_per_group)
        partial = grad_y  # never touched when BIAS_GRAD is False
    if INTERPRETED:
        block_n = min(triton.next_power_of_2(cols), policy.TRITON_LINEAR_INTERPRETER_BLOCK_N)
        row_chunk = min(triton.next_power_of_2(rows_per_group), policy.TRITON_LINEAR_INTERPRETER_ROWS)
        groups_per_program = policy.TRITON_LINEAR_INTERPRETER_ROWS // row_chunk
    else:
        block_n, row_chunk, groups_per_program = policy.TRITON_LINEAR_BACKWARD_BLOCK_N, 1, 1
    col_blocks = triton.cdiv(cols, block_n)
    _bias_act_bwd[(triton.cdiv(n_groups, groups_per_program), col_blocks)](
        grad_y, preact if has_act else grad_y, grad_preact if has_act else grad_y, partial,
        rows, cols, n_groups, rows_per_group,
        ACTIVATION=activation, BIAS_GRAD=need_bias_grad, BLOCK_N=block_n,
        ROUND_BF16=needs_bf16_rounding(grad_y.dtype), SEQUENTIAL_SUM=INTERPRETED,
        GROUPS=groups_per_program, ROW_CHUNK=row_chunk, num_warps=policy.TRITON_LINEAR_BACKWARD_WARPS, **LAUNCH_OPTIONS,
    )
    if need_bias_grad:
        _bias_grad_sum[(col_blocks,)](partial, grad_bias, n_groups, cols, BLOCK_N=block_n,
                                      num_warps=policy.TRITON_LINEAR_BACKWARD_WARPS, **LAUNCH_OPTIONS)
    return grad_preact, grad_bias
