"""csrc/cuda/rms_norm.cu run on the CPU under a thread-per-CUDA-thread emulator (tests/cuda_emu),
compared bit for bit with the reference (fusedtx/reference/).

What the emulator proves and what it cannot see: tests/cuda_emu/glue.py.
"""
from __future__ import annotations

import pytest
import torch

from fusedtx import reference
from fusedtx.policy import cuda_lanes
from helpers import assert_bitwise_equal, bitwise_equal

from cuda_emu.build import build
from cuda_emu.glue import BOOL, CUDA_INCLUDE, DTYPE_CODE, F64, I64, INT, P, nan_like, ptr, requires_emulator

pytestmark = requires_emulator

RMS_NORM_WRAPPERS = """
extern "C" int emu_rms_norm_forward(const void* x, const void* w, void* y, void* rstd, int64_t rows, int64_t n,
                                    double eps, int lanes, int dtype, int pdtype) {
  return (int)fusedtx::cuda::rms_norm_forward(x, w, y, rstd, rows, n, eps, lanes, (fusedtx::cuda::DType)dtype,
                                              (fusedtx::cuda::DType)pdtype, nullptr);
}
extern "C" int emu_rms_norm_backward(const void* dy, const void* x, const void* rstd, const void* w, void* dx,
                                     void* dw, void* ws, int64_t rows, int64_t n, bool need, int lanes, int groups,
                                     int dtype, int pdtype) {
  return (int)fusedtx::cuda::rms_norm_backward(dy, x, rstd, w, dx, dw, ws, rows, n, need, lanes, groups,
                                               (fusedtx::cuda::DType)dtype, (fusedtx::cuda::DType)pdtype, nullptr);
}
"""


@pytest.fixture(scope="module")
def rms_norm_lib(tmp_path_factory):
    lib = build("rms_norm.cu", RMS_NORM_WRAPPERS, tmp_path_factory.mktemp("emu"), CUDA_INCLUDE)
    lib.emu_rms_norm_forward.argtypes = [P, P, P, P, I64, I64, F64, INT, INT, INT]
    lib.emu_rms_norm_backward.argtypes = [P, P, P, P, P, P, P, I64, I64, BOOL, INT, INT, INT, INT]
    return lib


def run_both(lib, x, dy, w, lanes, groups, need):
    """The emulated forward and backward, outputs NaN-filled before: (y, rstd, dx, dweight)."""
    rows, n = x.shape
    acc = reference.compute_dtype(x.dtype)
    code, pcode = DTYPE_CODE[x.dtype], DTYPE_CODE[x.dtype if w is None else w.dtype]
    y, rstd = nan_like((rows, n), x.dtype), nan_like((rows,), acc)
    assert lib.emu_rms_norm_forward(ptr(x), ptr(w), ptr(y), ptr(rstd), rows, n, 1e-5, lanes, code, pcode) == 0
    dx, dw, workspace = nan_like((rows, n), x.dtype), nan_like((n,), acc), nan_like((groups * n,), acc)
    assert lib.emu_rms_norm_backward(ptr(dy), ptr(x), ptr(rstd), ptr(w), ptr(dx), ptr(dw) if need else None,
                                     ptr(workspace) if need else None, rows, n, need, lanes, groups, code, pcode) == 0
    return y, rstd, dx, dw


@pytest.mark.parametrize("dtype,pdtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
    (torch.float64, torch.float64),
], ids=["f32", "bf16-f32weight", "f16", "f64"])
@pytest.mark.parametrize("rows,n,groups,affine", [
    (5, 70, 128, True),       # fewer rows than groups
    (300, 40, 128, True),     # three rows per group, the last groups empty
    (9, 300, 4, False),       # uneven groups, no weight
    (3, 9000, 2, True),       # 1024 lanes, more than 8 per thread: global partials
], ids=["few-rows", "3-per-group", "uneven-noweight", "wide"])
def test_rms_norm_kernels_match_reference(rms_norm_lib, dtype, pdtype, rows, n, groups, affine):
    g = torch.Generator().manual_seed(rows + n)
    x = (torch.randn(rows, n, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)
    dy = torch.randn(rows, n, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(n, generator=g, dtype=torch.float64).to(pdtype) if affine else None
    lanes = cuda_lanes(n)
    y, rstd, dx, dw = run_both(rms_norm_lib, x, dy, w, lanes, groups, True)
    y_ref, rstd_ref = reference.rms_norm_forward(x, w, 1e-5, lanes)
    dx_ref, dw_ref = reference.rms_norm_backward(dy, x, rstd_ref, w, True, lanes, groups)
    for ours, ref, name in ((y, y_ref, "y"), (rstd, rstd_ref, "rstd"), (dx, dx_ref, "dx"), (dw, dw_ref, "dweight")):
        assert_bitwise_equal(ours, ref, f"{name}, {lanes} lanes, {groups} groups")


def test_rms_norm_without_param_grads_and_garbage_rows(rms_norm_lib):
    """dx alone (one block per row), with NaN / inf rows beside finite ones: the finite rows get
    the reference's bits and the others the reference's NaN positions."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 500, generator=g)
    x[1, 7], x[3, 0], x[4] = float("nan"), float("inf"), 0.0
    dy = torch.randn(6, 500, generator=g)
    w = torch.randn(500, generator=g)
    lanes = cuda_lanes(500)
    y, rstd, dx, _ = run_both(rms_norm_lib, x, dy, w, lanes, 128, False)
    y_ref, rstd_ref = reference.rms_norm_forward(x, w, 1e-5, lanes)
    dx_ref, _ = reference.rms_norm_backward(dy, x, rstd_ref, w, False, lanes, 128)
    for ours, ref, name in ((y, y_ref, "y"), (rstd, rstd_ref, "rstd"), (dx, dx_ref, "dx")):
        assert_bitwise_equal(ours, ref, name)


def test_negative_control_emulator_sees_a_changed_order(tmp_path):
    """The comparison fails for a kernel that multiplies x * (rstd * w) instead of (x * rstd) * w."""
    original = "C v = mul_rn(xj, rs);\n    if (weight != nullptr) v = mul_rn(v, load_as<C>(weight + j));"
    changed = "C v = weight != nullptr ? mul_rn(xj, mul_rn(rs, load_as<C>(weight + j))) : mul_rn(xj, rs);"
    mutate = lambda src: src.replace(original, changed) if original in src else pytest.fail("nothing to mutate")  # noqa: E731
    lib = build("rms_norm.cu", RMS_NORM_WRAPPERS, tmp_path, CUDA_INCLUDE, mutate=mutate)
    lib.emu_rms_norm_forward.argtypes = [P, P, P, P, I64, I64, F64, INT, INT, INT]
    lib.emu_rms_norm_backward.argtypes = [P, P, P, P, P, P, P, I64, I64, BOOL, INT, INT, INT, INT]
    g = torch.Generator().manual_seed(2)
    x, dy, w = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g), torch.randn(64, generator=g)
    y, *_ = run_both(lib, x, dy, w, 32, 128, False)
    assert not bitwise_equal(y, reference.rms_norm_forward(x, w, 1e-5, 32)[0]), "the emulator check missed it"
