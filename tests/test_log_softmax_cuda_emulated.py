"""csrc/cuda/log_softmax.cu run on the CPU under a thread-per-CUDA-thread emulator
(tests/cuda_emu), compared bit for bit with the reference (fusedtx/reference/), log_f32
included.

What the emulator proves and what it cannot see: tests/cuda_emu/glue.py.
"""
from __future__ import annotations

import pytest
import torch

from fusedtx import reference
from fusedtx.policy import cuda_lanes
from helpers import assert_bitwise_equal

from cuda_emu.build import build
from cuda_emu.glue import CUDA_INCLUDE, DTYPE_CODE, I64, INT, P, nan_like, ptr, requires_emulator

pytestmark = requires_emulator

WRAPPERS = """
extern "C" int emu_log_softmax_forward(const void* x, void* y, int64_t rows, int64_t cols, int lanes, int dtype) {
  return (int)fusedtx::cuda::log_softmax_forward(x, y, rows, cols, lanes, (fusedtx::cuda::DType)dtype, nullptr);
}
extern "C" int emu_log_softmax_backward(const void* dy, const void* y, void* dx, int64_t rows, int64_t cols, int lanes,
                                        int dtype) {
  return (int)fusedtx::cuda::log_softmax_backward(dy, y, dx, rows, cols, lanes, (fusedtx::cuda::DType)dtype, nullptr);
}
extern "C" void emu_log_f32(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = fusedtx::cuda::log_f32(x[i]);
}
"""
ARGTYPES = {"emu_log_softmax_forward": [P, P, I64, I64, INT, INT],
            "emu_log_softmax_backward": [P, P, P, I64, I64, INT, INT],
            "emu_log_f32": [P, P, I64]}


def load(out_dir, mutate=None):
    lib = build("log_softmax.cu", WRAPPERS, out_dir, CUDA_INCLUDE, mutate=mutate)
    for name, argtypes in ARGTYPES.items():
        getattr(lib, name).argtypes = argtypes
    return lib


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return load(tmp_path_factory.mktemp("emu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("rows,cols", [(3, 100), (2, 300), (4, 37), (2, 9000)],
                         ids=["small", "64-lanes", "short", "wide"])
def test_log_softmax_kernels_match_reference(lib, dtype, rows, cols):
    """32 to 1024 lanes; `wide` has more than 8 elements a thread: the re-reading path."""
    g = torch.Generator().manual_seed(rows * cols)
    x = (torch.randn(rows, cols, generator=g) * 3).to(dtype)
    x[0, 1] = float("-inf")
    dy = torch.randn(rows, cols, generator=g).to(dtype)
    lanes = cuda_lanes(cols)
    y, dx = nan_like((rows, cols), dtype), nan_like((rows, cols), dtype)
    assert lib.emu_log_softmax_forward(ptr(x), ptr(y), rows, cols, lanes, DTYPE_CODE[dtype]) == 0
    assert_bitwise_equal(y, reference.log_softmax_forward(x, lanes), f"forward, {lanes} lanes")
    assert lib.emu_log_softmax_backward(ptr(dy), ptr(y), ptr(dx), rows, cols, lanes, DTYPE_CODE[dtype]) == 0
    assert_bitwise_equal(dx, reference.log_softmax_backward(dy, y, lanes), f"backward, {lanes} lanes")


def test_edge_rows_match_reference(lib):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[inf, 1.0, 2.0], [-inf, -inf, -inf], [nan, 0.0, 1.0], [-inf, 0.5, -inf], [3e38, -3e38, 0.0]])
    y = nan_like(x.shape, torch.float32)
    assert lib.emu_log_softmax_forward(ptr(x), ptr(y), 5, 3, 32, 0) == 0
    assert_bitwise_equal(y, reference.log_softmax_forward(x, 32), "edge rows")


def test_log_f32_matches_reference(lib):
    """Every 4099th float32 bit pattern (both signs, subnormals, inf, NaN) and [1, 2) densely."""
    x = torch.cat([torch.arange(0, 2 ** 32 - 1, 4099, dtype=torch.int64).to(torch.int32).view(torch.float32),
                   torch.linspace(1.0, 2.0, 100_003),
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45])])
    y = nan_like(x.shape, torch.float32)
    lib.emu_log_f32(ptr(x), ptr(y), x.numel())
    assert_bitwise_equal(y, reference.log_f32(x), "log_f32")


def test_negative_control_a_reordered_sum_is_caught(tmp_path):
    """The same comparison fails for a kernel whose threads take contiguous elements instead of
    strided ones: the same math, another summation order."""
    strided = "const int64_t j = t + static_cast<int64_t>(k) * lanes;"
    blocked = "const int64_t j = static_cast<int64_t>(t) * kPerThread + k;"

    def mutate(source):
        assert source.count(strided) == 3
        return source.replace(strided, blocked)

    lib = load(tmp_path, mutate)
    x = torch.randn(16, 200, generator=torch.Generator().manual_seed(0)) * 3
    y = nan_like((16, 200), torch.float32)
    assert lib.emu_log_softmax_forward(ptr(x), ptr(y), 16, 200, 32, 0) == 0
    torch.testing.assert_close(y, torch.log_softmax(x, -1))  # still a correct log_softmax...
    assert not torch.equal(y, reference.log_softmax_forward(x, 32))  # ...in another order
