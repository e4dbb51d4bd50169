"""What the emulator tests share: where the CUDA headers are (and the skip mark without them),
the ctypes argument types, the dtype codes of fusedtx::cuda::DType, and NaN-filled outputs.

Without a GPU, nvcc only proves the kernels compile; the emulator proves what they compute: the
lane assignment, the fold order, the masks, the group partials and the barriers. It cannot see
timing, memory-model or occupancy problems, and it runs the host compiler's float arithmetic,
so a GPU run remains the final word (benchmarks/gpu_check.sh)."""
from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

CUDA_INCLUDE = Path(cpp_extension.CUDA_HOME or "/usr/local/cuda") / "include"
# Every emulator test module sets `pytestmark = requires_emulator`.
requires_emulator = pytest.mark.skipif(not (CUDA_INCLUDE / "cuda_fp16.h").exists() or not shutil.which("g++"),
                                       reason=f"needs g++ and the CUDA headers (looked in {CUDA_INCLUDE})")

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
P, I64, INT, F32, F64, BOOL = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_double,
                               ctypes.c_bool)


def nan_like(shape, dtype):
    """Outputs start as NaN, so an element the kernel never writes is caught."""
    return torch.full(shape, float("nan"), dtype=dtype)


def ptr(t):
    return None if t is None else t.data_ptr()
