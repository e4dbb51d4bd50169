"""csrc/cuda/rms_norm.cu and csrc/cuda/layer_norm.cu run on the CPU under a thread-per-CUDA-thread
emulator (tests/cuda_emu), compared bit for bit with the reference (fusedtx/reference/).

What the emulator proves and what it cannot see: tests/cuda_emu/glue.py.
"""
from __future__ import annotations

import pytest
import torch

from fusedtx import reference
from fusedtx.policy import cuda_lanes
from helpers import assert_bitwise_equal, bitwise_equal
from row_norm_helpers import LAYER_NORM, RMS_NORM, RowNorm

from cuda_emu.build import build
from cuda_emu.glue import BOOL, CUDA_INCLUDE, DTYPE_CODE, F64, I64, INT, P, nan_like, ptr, requires_emulator

pytestmark = requires_emulator


def _entry_points(norm: RowNorm) -> tuple[list[str], list[str]]:
    """The pointer arguments of fusedtx::cuda::<name>_forward and _backward, inputs first."""
    grads = [f"d{p}" for p in norm.params]
    forward = [f"const void* {a}" for a in ("x", *norm.params)] + [f"void* {a}" for a in ("y", *norm.stats)]
    backward = ([f"const void* {a}" for a in ("dy", "x", *norm.stats, "weight")]
                + [f"void* {a}" for a in ("dx", *grads, "workspace")])
    return forward, backward


def wrappers(norm: RowNorm) -> str:
    """extern "C" entry points emu_<name>_forward / _backward for ctypes, the dtypes as ints."""
    forward, backward = _entry_points(norm)
    names = lambda args: ", ".join(a.split()[-1] for a in args)  # noqa: E731
    dtypes = "(fusedtx::cuda::DType)dtype, (fusedtx::cuda::DType)pdtype, nullptr"
    return f"""
extern "C" int emu_{norm.name}_forward({", ".join(forward)}, int64_t rows, int64_t n, double eps, int lanes,
                                      int dtype, int pdtype) {{
  return (int)fusedtx::cuda::{norm.name}_forward({names(forward)}, rows, n, eps, lanes, {dtypes});
}}
extern "C" int emu_{norm.name}_backward({", ".join(backward)}, int64_t rows, int64_t n, bool need, int lanes,
                                       int groups, int dtype, int pdtype) {{
  return (int)fusedtx::cuda::{norm.name}_backward({names(backward)}, rows, n, need, lanes, groups, {dtypes});
}}
"""


def build_lib(norm: RowNorm, out_dir, mutate=None):
    lib = build(f"{norm.name}.cu", wrappers(norm), out_dir, CUDA_INCLUDE, mutate=mutate)
    forward, backward = _entry_points(norm)
    getattr(lib, f"emu_{norm.name}_forward").argtypes = [P] * len(forward) + [I64, I64, F64, INT, INT, INT]
    getattr(lib, f"emu_{norm.name}_backward").argtypes = [P] * len(backward) + [I64, I64, BOOL, INT, INT, INT, INT]
    return lib


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """norm -> its emulated library, built once per module on first use."""
    libs = {}

    def lib(norm: RowNorm):
        if norm.name not in libs:
            libs[norm.name] = build_lib(norm, tmp_path_factory.mktemp("emu"))
        return libs[norm.name]
    return lib


def run_both(lib, norm, x, dy, params, lanes, groups, need):
    """The emulated forward and backward, outputs NaN-filled before: (y, *stats, dx, *param_grads)."""
    rows, n = x.shape
    acc = reference.compute_dtype(x.dtype)
    weight = params[0]
    code, pcode = DTYPE_CODE[x.dtype], DTYPE_CODE[x.dtype if weight is None else weight.dtype]
    y, stats = nan_like((rows, n), x.dtype), [nan_like((rows,), acc) for _ in norm.stats]
    forward, backward = getattr(lib, f"emu_{norm.name}_forward"), getattr(lib, f"emu_{norm.name}_backward")
    assert forward(ptr(x), *map(ptr, params), ptr(y), *map(ptr, stats), rows, n, 1e-5, lanes, code, pcode) == 0
    dx, param_grads = nan_like((rows, n), x.dtype), [nan_like((n,), acc) for _ in norm.params]
    workspace = nan_like((len(norm.params) * groups * n,), acc)
    assert backward(ptr(dy), ptr(x), *map(ptr, stats), ptr(weight), ptr(dx),
                    *(ptr(d) if need else None for d in param_grads), ptr(workspace) if need else None,
                    rows, n, need, lanes, groups, code, pcode) == 0
    return y, *stats, dx, *param_grads


# (id, rows, N, groups, {norm: its parameters there}): "both" is RMSNorm's weight and LayerNorm's
# weight and bias, "weight" no bias, "none" neither
SHAPES = [
    ("few-rows", 5, 70, 128, {"rms_norm": "both", "layer_norm": "both"}),        # fewer rows than groups
    ("3-per-group", 300, 40, 128, {"rms_norm": "both", "layer_norm": "both"}),   # the last groups empty
    ("uneven", 9, 300, 4, {"rms_norm": "none", "layer_norm": "weight"}),         # uneven groups
    # 1024 lanes, more than 8 per thread: global partials
    ("wide", 3, 9000, 2, {"rms_norm": "both", "layer_norm": "none"}),
]
AFFINE_IDS = {"both": "", "weight": "-nobias", "none": "-noaffine"}


@pytest.mark.parametrize("dtype,pdtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
    (torch.float64, torch.float64),
], ids=["f32", "bf16-f32params", "f16", "f64"])
@pytest.mark.parametrize("norm,rows,n,groups,affine", [
    pytest.param(norm, rows, n, groups, affine[norm.name], id=f"{norm.name}-{case}{AFFINE_IDS[affine[norm.name]]}")
    for norm in (RMS_NORM, LAYER_NORM) for case, rows, n, groups, affine in SHAPES
])
def test_kernels_match_reference(emulated, norm, dtype, pdtype, rows, n, groups, affine):
    g = torch.Generator().manual_seed(rows + n)
    x = (torch.randn(rows, n, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)
    dy = torch.randn(rows, n, generator=g, dtype=torch.float64).to(dtype)
    present = {"weight": affine != "none", "bias": affine == "both"}
    params = [torch.randn(n, generator=g, dtype=torch.float64).to(pdtype) if present[p] else None for p in norm.params]
    lanes = cuda_lanes(n)
    outputs = run_both(emulated(norm), norm, x, dy, params, lanes, groups, True)
    y_ref, *stats_ref = norm.ref_forward(x, *params, 1e-5, lanes)
    grads_ref = norm.ref_backward(dy, x, *stats_ref, params[0], True, lanes, groups)
    for ours, ref, name in zip(outputs, (y_ref, *stats_ref, *grads_ref), ("y", *norm.stats, *norm.grad_names)):
        assert_bitwise_equal(ours, ref, f"{name}, {lanes} lanes, {groups} groups")


def test_rms_norm_without_param_grads_and_garbage_rows(emulated):
    """dx alone (one block per row), with NaN / inf rows beside finite ones: the finite rows get
    the reference's bits and the others the reference's NaN positions."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 500, generator=g)
    x[1, 7], x[3, 0], x[4] = float("nan"), float("inf"), 0.0
    dy = torch.randn(6, 500, generator=g)
    w = torch.randn(500, generator=g)
    lanes = cuda_lanes(500)
    y, rstd, dx, _ = run_both(emulated(RMS_NORM), RMS_NORM, x, dy, [w], lanes, 128, False)
    y_ref, rstd_ref = reference.rms_norm_forward(x, w, 1e-5, lanes)
    dx_ref, _ = reference.rms_norm_backward(dy, x, rstd_ref, w, False, lanes, 128)
    for ours, ref, name in ((y, y_ref, "y"), (rstd, rstd_ref, "rstd"), (dx, dx_ref, "dx")):
        assert_bitwise_equal(ours, ref, name)


def test_negative_control_emulator_sees_a_changed_order(tmp_path):
    """The comparison fails for a kernel that multiplies x * (rstd * w) instead of (x * rstd) * w."""
    original = "C v = mul_rn(xj, rs);\n    if (weight != nullptr) v = mul_rn(v, load_as<C>(weight + j));"
    changed = "C v = weight != nullptr ? mul_rn(xj, mul_rn(rs, load_as<C>(weight + j))) : mul_rn(xj, rs);"
    mutate = lambda src: src.replace(original, changed) if original in src else pytest.fail("nothing to mutate")  # noqa: E731
    lib = build_lib(RMS_NORM, tmp_path, mutate=mutate)
    g = torch.Generator().manual_seed(2)
    x, dy, w = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g), torch.randn(64, generator=g)
    y, *_ = run_both(lib, RMS_NORM, x, dy, [w], 32, 128, False)
    assert not bitwise_equal(y, reference.rms_norm_forward(x, w, 1e-5, 32)[0]), "the emulator check missed it"
