"""csrc/cuda/activation.cu run on the CPU under a thread-per-CUDA-thread emulator (tests/cuda_emu),
compared bit for bit with the reference (fusedtx/reference/activation.py).

What the emulator proves and what it cannot see: tests/cuda_emu/glue.py.
"""
from __future__ import annotations

import pytest
import torch

from fusedtx import reference
from helpers import assert_bitwise_equal

from cuda_emu.build import build
from cuda_emu.glue import DTYPE_CODE, I64, INT, P, CUDA_INCLUDE, nan_like, ptr, requires_emulator

pytestmark = requires_emulator

WRAPPERS = """
extern "C" int emu_activation_forward(const void* x, void* y, int64_t n, int act, int dtype) {
  return (int)fusedtx::cuda::activation_forward(x, y, n, act, (fusedtx::cuda::DType)dtype, nullptr);
}
extern "C" int emu_activation_backward(const void* dy, const void* x, void* dx, int64_t n, int act, int dtype) {
  return (int)fusedtx::cuda::activation_backward(dy, x, dx, n, act, (fusedtx::cuda::DType)dtype, nullptr);
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    built = build("activation.cu", WRAPPERS, tmp_path_factory.mktemp("emu"), CUDA_INCLUDE)
    built.emu_activation_forward.argtypes = [P, P, I64, INT, INT]
    built.emu_activation_backward.argtypes = [P, P, P, I64, INT, INT]
    return built


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("kind", sorted(reference.ELEMENTWISE))
def test_activation_kernels_match_reference(lib, dtype, kind):
    code = reference.ELEMENTWISE[kind]
    g = torch.Generator().manual_seed(code)
    n = 1000  # several blocks of 256 threads and a partial one
    x = (torch.randn(n, generator=g) * 6).to(dtype)
    x[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0], dtype=dtype)
    dy = torch.randn(n, generator=g).to(dtype)
    y, dx = nan_like((n,), dtype), nan_like((n,), dtype)
    assert lib.emu_activation_forward(ptr(x), ptr(y), n, code, DTYPE_CODE[dtype]) == 0
    assert_bitwise_equal(y, reference.activation_forward(x, code), f"{kind} forward")
    assert lib.emu_activation_backward(ptr(dy), ptr(x), ptr(dx), n, code, DTYPE_CODE[dtype]) == 0
    assert_bitwise_equal(dx, reference.activation_backward(dy, x, code), f"{kind} backward")


def test_unknown_activation_code_is_refused(lib):
    x = torch.randn(4)
    y = nan_like((4,), torch.float32)
    assert lib.emu_activation_forward(ptr(x), ptr(y), 4, reference.ACT_SWIGLU, 0) != 0
