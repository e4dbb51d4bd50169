"""The CUDA kernels (csrc/cuda/*.cu), run on the CPU under a thread-per-CUDA-thread emulator
(tests/cuda_emu), compared bit for bit with fusedtx/reference.py.

Without a GPU, nvcc only proves the kernels compile; this proves what they compute: the lane
assignment, the fold order, the masks, the group partials and the barriers. It cannot see
timing, memory-model or occupancy problems, and it runs the host compiler's float arithmetic,
so a GPU run remains the final word (benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from fusedtx import reference
from fusedtx.ops.softmax import native_cuda_lanes
from helpers import assert_bitwise_equal

from cuda_emu.build import build

CUDA_INCLUDE = Path(cpp_extension.CUDA_HOME or "/usr/local/cuda") / "include"
pytestmark = pytest.mark.skipif(not (CUDA_INCLUDE / "cuda_fp16.h").exists() or not shutil.which("g++"),
                                reason=f"needs g++ and the CUDA headers (looked in {CUDA_INCLUDE})")

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
P, I64, INT, F32, F64, BOOL = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_double,
                               ctypes.c_bool)

SOFTMAX_WRAPPERS = """
extern "C" int emu_softmax_forward(const void* x, void* y, int64_t rows, int64_t cols, float scale, bool causal,
                                   int64_t n_queries, int lanes, int dtype) {
  return (int)fusedtx::cuda::softmax_forward(x, y, rows, cols, scale, causal, n_queries, lanes,
                                             (fusedtx::cuda::DType)dtype, nullptr);
}
extern "C" int emu_softmax_backward(const void* dy, const void* y, void* dx, int64_t rows, int64_t cols, float scale,
                                    int lanes, int dtype) {
  return (int)fusedtx::cuda::softmax_backward(dy, y, dx, rows, cols, scale, lanes, (fusedtx::cuda::DType)dtype, nullptr);
}
"""
LAYER_NORM_WRAPPERS = """
extern "C" int emu_layer_norm_forward(const void* x, const void* w, const void* b, void* y, void* mean, void* rstd,
                                      int64_t rows, int64_t n, double eps, int lanes, int dtype, int pdtype) {
  return (int)fusedtx::cuda::layer_norm_forward(x, w, b, y, mean, rstd, rows, n, eps, lanes,
                                                (fusedtx::cuda::DType)dtype, (fusedtx::cuda::DType)pdtype, nullptr);
}
extern "C" int emu_layer_norm_backward(const void* dy, const void* x, const void* mean, const void* rstd, const void* w,
                                       void* dx, void* dw, void* db, void* ws, int64_t rows, int64_t n, bool need,
                                       int lanes, int groups, int dtype, int pdtype) {
  return (int)fusedtx::cuda::layer_norm_backward(dy, x, mean, rstd, w, dx, dw, db, ws, rows, n, need, lanes, groups,
                                                 (fusedtx::cuda::DType)dtype, (fusedtx::cuda::DType)pdtype, nullptr);
}
"""


@pytest.fixture(scope="module")
def softmax_lib(tmp_path_factory):
    lib = build("softmax.cu", SOFTMAX_WRAPPERS, tmp_path_factory.mktemp("emu"), CUDA_INCLUDE)
    lib.emu_softmax_forward.argtypes = [P, P, I64, I64, F32, BOOL, I64, INT, INT]
    lib.emu_softmax_backward.argtypes = [P, P, P, I64, I64, F32, INT, INT]
    return lib


@pytest.fixture(scope="module")
def layer_norm_lib(tmp_path_factory):
    lib = build("layer_norm.cu", LAYER_NORM_WRAPPERS, tmp_path_factory.mktemp("emu"), CUDA_INCLUDE)
    lib.emu_layer_norm_forward.argtypes = [P, P, P, P, P, P, I64, I64, F64, INT, INT, INT]
    lib.emu_layer_norm_backward.argtypes = [P, P, P, P, P, P, P, P, P, I64, I64, BOOL, INT, INT, INT, INT]
    return lib


def nan_like(shape, dtype):
    """Outputs start as NaN, so an element the kernel never writes is caught."""
    return torch.full(shape, float("nan"), dtype=dtype)


def ptr(t):
    return None if t is None else t.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("rows,cols,causal,n_queries", [
    (3, 100, False, 1),       # 32 lanes, registers
    (2, 300, True, 2),        # 64 lanes, causal
    (4, 37, True, 4),         # four queries over 37 keys
    (40, 20, True, 40),       # more queries than keys: rows that see nothing
    (2, 9000, False, 1),      # 1024 lanes, more than 8 per thread: the re-reading path
], ids=["small", "causal", "short-causal", "tq>tk", "wide"])
def test_softmax_kernels_match_reference(softmax_lib, dtype, rows, cols, causal, n_queries):
    g = torch.Generator().manual_seed(rows * cols)
    x = (torch.randn(rows, cols, generator=g) * 3).to(dtype)
    dy = torch.randn(rows, cols, generator=g).to(dtype)
    lanes = native_cuda_lanes(cols)
    y, dx = nan_like((rows, cols), dtype), nan_like((rows, cols), dtype)
    assert softmax_lib.emu_softmax_forward(ptr(x), ptr(y), rows, cols, 0.5, causal, n_queries, lanes, DTYPE_CODE[dtype]) == 0
    assert_bitwise_equal(y, reference.softmax_forward(x, 0.5, causal, n_queries, lanes=lanes), f"forward, {lanes} lanes")
    assert softmax_lib.emu_softmax_backward(ptr(dy), ptr(y), ptr(dx), rows, cols, 0.5, lanes, DTYPE_CODE[dtype]) == 0
    assert_bitwise_equal(dx, reference.softmax_backward(dy, y, 0.5, lanes=lanes), f"backward, {lanes} lanes")


def test_negative_control_a_reordered_sum_is_caught(tmp_path):
    """The same comparison fails for a kernel whose threads take contiguous elements instead of
    strided ones: the same math, another summation order."""
    strided = "const int64_t j = t + static_cast<int64_t>(k) * lanes;"
    blocked = "const int64_t j = static_cast<int64_t>(t) * kPerThread + k;"

    def mutate(source):
        assert source.count(strided) == 3
        return source.replace(strided, blocked)

    lib = build("softmax.cu", SOFTMAX_WRAPPERS, tmp_path, CUDA_INCLUDE, mutate=mutate)
    lib.emu_softmax_forward.argtypes = [P, P, I64, I64, F32, BOOL, I64, INT, INT]
    x = torch.randn(16, 200, generator=torch.Generator().manual_seed(0)) * 3
    y = nan_like((16, 200), torch.float32)
    assert lib.emu_softmax_forward(ptr(x), ptr(y), 16, 200, 1.0, False, 1, 32, 0) == 0
    torch.testing.assert_close(y, torch.softmax(x, -1))  # still a correct softmax...
    assert not torch.equal(y, reference.softmax_forward(x, 1.0, False, 1, lanes=32))  # ...in another order


def test_softmax_rows_that_see_no_key(softmax_lib):
    """Causal with more queries than keys: the first rows are all zero, never NaN."""
    x = torch.randn(5, 3)
    y = nan_like((5, 3), torch.float32)
    assert softmax_lib.emu_softmax_forward(ptr(x), ptr(y), 5, 3, 1.0, True, 5, 32, 0) == 0
    assert_bitwise_equal(y, reference.softmax_forward(x, 1.0, True, 5, lanes=32), "Tq > Tk")
    assert (y[:2] == 0).all()


@pytest.mark.parametrize("dtype,pdtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
    (torch.float64, torch.float64),
], ids=["f32", "bf16-f32params", "f16", "f64"])
@pytest.mark.parametrize("rows,n,groups,affine", [
    (5, 70, 128, "both"),       # fewer rows than groups
    (300, 40, 128, "both"),     # three rows per group, the last groups empty
    (9, 300, 4, "weight"),      # uneven groups, no bias
    (3, 9000, 2, "none"),       # 1024 lanes, more than 8 per thread: global partials, no affine
], ids=["few-rows", "3-per-group", "uneven", "wide"])
def test_layer_norm_kernels_match_reference(layer_norm_lib, dtype, pdtype, rows, n, groups, affine):
    g = torch.Generator().manual_seed(rows + n)
    x = (torch.randn(rows, n, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)
    dy = torch.randn(rows, n, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(n, generator=g, dtype=torch.float64).to(pdtype) if affine != "none" else None
    b = torch.randn(n, generator=g, dtype=torch.float64).to(pdtype) if affine == "both" else None
    acc = reference.compute_dtype(dtype)
    lanes = native_cuda_lanes(n)
    code, pcode = DTYPE_CODE[dtype], DTYPE_CODE[pdtype if affine != "none" else dtype]
    y, mean, rstd = nan_like((rows, n), dtype), nan_like((rows,), acc), nan_like((rows,), acc)
    assert layer_norm_lib.emu_layer_norm_forward(ptr(x), ptr(w), ptr(b), ptr(y), ptr(mean), ptr(rstd), rows, n, 1e-5,
                                                 lanes, code, pcode) == 0
    y_ref, mean_ref, rstd_ref = reference.layer_norm_forward(x, w, b, 1e-5, lanes)
    for ours, ref, name in ((y, y_ref, "y"), (mean, mean_ref, "mean"), (rstd, rstd_ref, "rstd")):
        assert_bitwise_equal(ours, ref, f"forward {name}, {lanes} lanes")
    dx, dw, db = nan_like((rows, n), dtype), nan_like((n,), acc), nan_like((n,), acc)
    workspace = nan_like((2 * groups * n,), acc)
    assert layer_norm_lib.emu_layer_norm_backward(ptr(dy), ptr(x), ptr(mean), ptr(rstd), ptr(w), ptr(dx), ptr(dw), ptr(db),
                                                  ptr(workspace), rows, n, True, lanes, groups, code, pcode) == 0
    dx_ref, dw_ref, db_ref = reference.layer_norm_backward(dy, x, mean_ref, rstd_ref, w, lanes, groups)
    for ours, ref, name in ((dx, dx_ref, "dx"), (dw, dw_ref, "dweight"), (db, db_ref, "dbias")):
        assert_bitwise_equal(ours, ref, f"backward {name}, {lanes} lanes, {groups} groups")
