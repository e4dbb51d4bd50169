"""csrc/cuda/softmax.cu run on the CPU under a thread-per-CUDA-thread emulator (tests/cuda_emu),
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
from cuda_emu.glue import BOOL, CUDA_INCLUDE, DTYPE_CODE, F32, I64, INT, P, nan_like, ptr, requires_emulator

pytestmark = requires_emulator

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
@pytest.fixture(scope="module")
def softmax_lib(tmp_path_factory):
    lib = build("softmax.cu", SOFTMAX_WRAPPERS, tmp_path_factory.mktemp("emu"), CUDA_INCLUDE)
    lib.emu_softmax_forward.argtypes = [P, P, I64, I64, F32, BOOL, I64, INT, INT]
    lib.emu_softmax_backward.argtypes = [P, P, P, I64, I64, F32, INT, INT]
    return lib


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
    lanes = cuda_lanes(cols)
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
