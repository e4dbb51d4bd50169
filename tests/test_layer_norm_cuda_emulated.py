"""csrc/cuda/layer_norm.cu run on the CPU under a thread-per-CUDA-thread emulator (tests/cuda_emu),
compared bit for bit with the reference (fusedtx/reference/).

What the emulator proves and what it cannot see: tests/cuda_emu/glue.py.
"""
from __future__ import annotations

import pytest
import torch

from fusedtx import reference
from fusedtx.policy import cuda_lanes
from helpers import assert_bitwise_equal

from cuda_emu.build import build
from cuda_emu.glue import BOOL, CUDA_INCLUDE, DTYPE_CODE, F64, I64, INT, P, nan_like, ptr, requires_emulator

pytestmark = requires_emulator

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
def layer_norm_lib(tmp_path_factory):
    lib = build("layer_norm.cu", LAYER_NORM_WRAPPERS, tmp_path_factory.mktemp("emu"), CUDA_INCLUDE)
    lib.emu_layer_norm_forward.argtypes = [P, P, P, P, P, P, I64, I64, F64, INT, INT, INT]
    lib.emu_layer_norm_backward.argtypes = [P, P, P, P, P, P, P, P, P, I64, I64, BOOL, INT, INT, INT, INT]
    return lib


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
    lanes = cuda_lanes(n)
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
    dx_ref, dw_ref, db_ref = reference.layer_norm_backward(dy, x, mean_ref, rstd_ref, w, True, lanes, groups)
    for ours, ref, name in ((dx, dx_ref, "dx"), (dw, dw_ref, "dweight"), (db, db_ref, "dbias")):
        assert_bitwise_equal(ours, ref, f"backward {name}, {lanes} lanes, {groups} groups")
