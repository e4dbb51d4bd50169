"""Every per-backend, per-device choice that decides a reduction order or a tile shape, in one place.

fusedtx/reference/ holds the algorithms with these numbers as arguments; the ops pass the
numbers chosen here to whichever backend runs, and each kernel either follows them (Triton) or
checks them against the values it was compiled for (the C++ and CUDA kernels refuse others).
The rule every function here obeys: it may depend on a row's length, the feature sizes (N, K,
head dim), the dtype, the split size and the backend/device — NEVER on the number of rows,
tokens or sequences in the batch (docs/design.md, "Backends and policy").

Changing a number here changes bits (the committed output hashes, tests/output_hashes.json,
say which), never invariance.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# ---------------------------------------------------------------------------------------------
# Row sums (reference.lane_sum): softmax, log_softmax, layer_norm
# ---------------------------------------------------------------------------------------------
CPU_LANES = 64             # native CPU kernels: four 16-float AVX-512 vectors (compiled in)
CUDA_MIN_LANES = 32        # native CUDA kernels: one thread block per row, one lane per thread
CUDA_MAX_LANES = 1024
CUDA_ELEMENTS_PER_LANE = 8
TRITON_MAX_BLOCK = 16384   # Triton kernels: the lane count is the block width, at most this


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def cuda_lanes(n: int) -> int:
    """Threads per row of the native CUDA row kernels: ~8 elements a thread, 32 to 1024."""
    threads = CUDA_MIN_LANES
    while threads < CUDA_MAX_LANES and threads * CUDA_ELEMENTS_PER_LANE < n:
        threads *= 2
    return threads


def triton_lanes(n: int) -> int:
    """The Triton row kernels' block width: the whole row in one block up to TRITON_MAX_BLOCK."""
    return min(next_power_of_2(max(n, 1)), TRITON_MAX_BLOCK)


def row_lanes(backend: str, n: int, device: torch.device) -> int:
    """Lane count of a softmax, log_softmax or layer_norm row sum over n elements on this backend and device.
    The reference backend uses the native CPU count, so that the two agree bit for bit on CPU."""
    if backend == "triton":
        return triton_lanes(n)
    if backend == "native" and device.type == "cuda":
        return cuda_lanes(n)
    return CPU_LANES


def triton_row_warps(block: int) -> int:
    """Warps of the Triton softmax and layer_norm forward kernels (and the softmax backward)."""
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def triton_layer_norm_forward_warps(block: int) -> int:
    """The layer_norm forward (and the rms_norm forward, with one vector fewer) keeps the row, its
    deviations and the compensated square sum's (sum, error) lanes live: 32 warps above 8192 columns, 16 float32 a thread per vector, the
    width that spills least under both Triton versions (tests/_lower_triton.py SPILL_BUDGETS).
    The lane fold is explicit (kernels/_common.py fold_lanes*), so the warp count changes no
    bits."""
    return 32 if block > 8192 else triton_row_warps(block)


def triton_layer_norm_backward_warps(block: int) -> int:
    """The layer_norm and rms_norm backward (one kernel, kernels/_row_norm.py) keeps ~7 block-wide
    float32 vectors live (x, dy, w, xhat, g and the
    dw/db partials): 8 elements per thread fit 128 registers up to 4096 columns (ptxas -v, sm_90);
    wider blocks spill some at any width, least with 1024 threads."""
    return min(max(block // 256, 4), 32)


# ---------------------------------------------------------------------------------------------
# Sums over rows (reference.row_group_sum): LayerNorm dweight/dbias, Linear dbias
# ---------------------------------------------------------------------------------------------
ROW_GROUPS = 128  # on every backend and device: a constant, never the thread or SM count

# ---------------------------------------------------------------------------------------------
# Matmul (reference.linear_matmul)
# ---------------------------------------------------------------------------------------------
MATMUL_K_BLOCK = 128  # K summed in FMA chains of this many k's, the chains added in order


class LinearTiles(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int


def _fit(n: int, block: int) -> int:
    """The table's block, shrunk (to a power of two >= 16, tl.dot's minimum) for small dims."""
    return max(16, min(block, next_power_of_2(max(n, 1))))


def triton_linear_tiles(n: int, k: int, dtype: torch.dtype, interpreted: bool) -> LinearTiles:
    """The one tile configuration of the Triton matmul for an (M, K) x (K, N) product: a function
    of (N, K, dtype) only, never of M (float32 uses the same tiles with and without TF32).

    GPU (not timed yet): the largest tiles with no register spills (ptxas -v, sm_80 and sm_90,
    Triton 3.6 and 3.9: tests/_lower_triton.py holds every specialisation to zero spills):
      * bf16/fp16: 64 x 128 x 64, 8 warps, 4 stages: 24 KiB of a and b tiles a stage, the
        float32 accumulator 32 registers a thread (128 x 128 tiles spilled with the erf-GELU
        epilogue and without cp.async, on unaligned launches);
      * float32 (TF32 or IEEE, the latter on the FMA units): 64 x 128 x 16, 8 warps, 2 stages.
        The blocked K sum keeps two accumulators (the K block's and the total: 64 registers a
        thread at this tile), and Triton's FMA dot holds a thread's whole BLOCK_K slice of both
        operands in registers, so BLOCK_K is small; 128 x 128 x 32 spilled 1.4-3.4 KB a thread.
      On the FMA units ("ieee") the tiles change no bits: Triton lowers tl.dot(a, b, acc) to one
      multiply-add chain (llvm.fmuladd) per output element over the tile's k in ascending order
      from acc, so a K block is one chain over its k's whatever BLOCK_M, BLOCK_N, BLOCK_K, warps
      or stages. On tensor cores (bf16/fp16, TF32) the instruction (mma / wgmma, its k width)
      can follow the tiles, so they may change bits there — never invariance: they are a
      function of (N, K, dtype) only.
    GROUP_M = 8 tile rows per L2 swizzle group. N or K below a block shrinks it (min 16).
    Interpreter: every operation costs Python time, so few programs and few K steps: about 8192
    outputs a tile and a (BLOCK_M, BLOCK_K, BLOCK_N) product of about 2**18 elements a K step."""
    if interpreted:
        block_n = _fit(n, 128)
        block_m = min(256, max(64, 8192 // block_n))
        return LinearTiles(block_m, block_n, _fit(k, min(128, 2 ** 18 // (block_m * block_n))), 8, 4, 1)
    if dtype in (torch.bfloat16, torch.float16):
        return LinearTiles(64, _fit(n, 128), _fit(k, 64), 8, 8, 4)
    return LinearTiles(64, _fit(n, 128), _fit(k, 16), 8, 8, 2)


TRITON_LINEAR_BACKWARD_BLOCK_N = 512  # columns a program of the backward's elementwise kernels
TRITON_LINEAR_BACKWARD_WARPS = 4
TRITON_LINEAR_INTERPRETER_BLOCK_N = 512  # interpreter: (rows x columns) tiles, few programs
TRITON_LINEAR_INTERPRETER_ROWS = 64

# ---------------------------------------------------------------------------------------------
# Causal attention (reference.causal_attention_forward / _backward)
# ---------------------------------------------------------------------------------------------
DEFAULT_SPLIT_SIZE = 256  # keys are cut at multiples of S from position 0 (fusedtx.config)
TRITON_ATTENTION_HEAD_DIMS = (16, 32, 64, 128)


class AttentionTiles(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


def triton_attention_tiles(head_dim: int, dtype: torch.dtype, split_size: int, interpreted: bool) -> AttentionTiles:
    """The one tile configuration of the Triton attention forward for (D, dtype, S): never a
    function of B, Tq or the sequence lengths.

    GPU (not timed yet): no register spills (ptxas -v, sm_80 and sm_90, Triton 3.6 and 3.9, on
    aligned launches — every stride of a (B, H, T, D) tensor is a multiple of D >= 16;
    tests/_lower_triton.py holds every specialisation to zero), as BLOCK_M x BLOCK_N / warps /
    stages:
      * bf16/fp16, D <= 64: 64 x 32 / 8 / 2;
      * bf16/fp16, D = 128: 32 x 32 / 8 / 1 (with masked_dot's select and non-finite test on
        the V tile, 32 x 64 spilled at 4 warps and on sm_90 under Triton 3.6 at 8; two stages of
        K and V tiles spilled on sm_90);
      * float32 (FMA units, "ieee"): 16 x 16 / 8 / 1 for D <= 64, 32 x 16 / 8 / 1 for D = 128.
        Triton's FMA dot holds a thread's whole K slice of both operands (q's D and k's, then
        p's and v's keys) in registers; 64-row tiles spilled up to 3 KB a thread, and 4 warps
        spilled up to 1.3 KB with masked_dot.
    num_warps and the tile shapes decide tl.dot's layout and so its order; the prefill and the
    split kernel of a call always get the same ones. Interpreter: few, large programs; 16-key
    sub-tiles so that S >= 32 runs the sub-tile loop."""
    if interpreted:
        return AttentionTiles(32, min(split_size, 16), 4, 1)
    if dtype == torch.float32:
        return AttentionTiles(16 if head_dim <= 64 else 32, min(split_size, 16), 8, 1)
    if head_dim == 128:
        return AttentionTiles(32, min(split_size, 32), 8, 1)
    return AttentionTiles(64, min(split_size, 32), 8, 2)


def triton_attention_merge_rows(interpreted: bool) -> int:
    """Rows a program of the split kernels' merge: elementwise per row, so any grouping gives the
    same bits; 16 keeps a decode step's padding (and registers) small on GPUs."""
    return 32 if interpreted else 16


TRITON_ATTENTION_MERGE_WARPS = 4


class AttentionBackwardTiles(NamedTuple):
    BLOCK_M1: int  # dk/dv kernel: queries per inner step
    BLOCK_N1: int  # dk/dv kernel: keys per program
    num_warps1: int
    BLOCK_M2: int  # dq kernel and the D_i preprocess: queries per program
    BLOCK_N2: int  # dq kernel: keys per inner step (the preprocess: up to split_size of them)
    num_warps2: int
    num_stages: int


def triton_attention_backward_tiles(head_dim: int, dtype: torch.dtype, interpreted: bool) -> AttentionBackwardTiles:
    """The one tile configuration of the Triton attention backward for (D, dtype): never a
    function of B, H or T.

    GPU (not timed yet): after the Triton fused-attention tutorial's backward, where the
    program's own block (it holds dk, dv or dq in registers) is the large one and the streamed
    block the small one; among 16x32/4, 16x64/8, 32x64/8, 16x64/4 (queries x keys / warps) for
    the dk/dv kernel the fewest spills in ptxas -v for sm_80. With masked_dot's select and
    non-finite test on the streamed tile, float32 takes 8 warps in both kernels and bf16/fp16
    D = 128 streams 16 keys a dq step: the dq kernel spills nothing (sm_80, sm_90, Triton 3.6
    and 3.9); the dk/dv kernel's spills are held by tests/_lower_triton.py. Interpreter: few, large
    programs, the program's own block twice the streamed one, so that the loops' start at the
    diagonal runs over several steps."""
    if interpreted:
        return AttentionBackwardTiles(16, 32, 4, 32, 16, 4, 1)
    if dtype == torch.float32:
        if head_dim == 128:
            return AttentionBackwardTiles(16, 32, 8, 32, 16, 8, 2)
        return AttentionBackwardTiles(16, 64, 8, 64, 16, 8, 2)
    if head_dim == 128:
        return AttentionBackwardTiles(16, 32, 4, 64, 16, 8, 2)
    if head_dim <= 32:
        return AttentionBackwardTiles(16, 64, 8, 64, 16, 4, 3)
    return AttentionBackwardTiles(16, 64, 8, 64, 32, 4, 3)


# ---------------------------------------------------------------------------------------------
# Rotary embeddings (reference.rope_forward / _backward): elementwise, no order to decide; the
# tiles below change the work per program, never a bit.
# ---------------------------------------------------------------------------------------------
TRITON_ROPE_PAIRS = 2048   # (head, pair) elements a Triton program rotates, at most (fewer for small H)
TRITON_ROPE_WARPS = 4


def triton_rope_tile(heads: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_H, HALF_BLOCK) of the Triton rope kernel: every pair of a row (HALF_BLOCK, the half
    head dim rounded up to a power of two) for BLOCK_H heads of one token, a function of the head
    count and head dim only."""
    half_block = next_power_of_2(max(head_dim // 2, 1))
    return min(next_power_of_2(max(heads, 1)), max(1, TRITON_ROPE_PAIRS // half_block)), half_block
