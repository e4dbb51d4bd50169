"""csrc/cuda/rope.cu run on the CPU under a thread-per-CUDA-thread emulator (tests/cuda_emu),
compared bit for bit with the reference (fusedtx/reference/rope.py).

What the emulator proves and what it cannot see: tests/cuda_emu/glue.py.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

import fusedtx
from fusedtx import reference
from helpers import assert_bitwise_equal, bitwise_equal

from cuda_emu.build import build
from cuda_emu.glue import BOOL, CUDA_INCLUDE, DTYPE_CODE, I64, INT, P, nan_like, ptr, requires_emulator

pytestmark = requires_emulator

ROPE_WRAPPERS = """
extern "C" int emu_rope(const void* x, const int64_t* strides, const int64_t* positions, const float* cos,
                        const float* sin, void* y, int64_t batch, int64_t heads, int64_t tokens, int64_t dim,
                        int64_t n_positions, bool transposed, int dtype) {
  const auto launch = transposed ? fusedtx::cuda::rope_backward : fusedtx::cuda::rope_forward;
  return (int)launch(x, strides, positions, cos, sin, y, batch, heads, tokens, dim, n_positions,
                     (fusedtx::cuda::DType)dtype, nullptr);
}
"""
ARGTYPES = [P, P, P, P, P, P, I64, I64, I64, I64, I64, BOOL, INT]


def _load(lib):
    lib.emu_rope.argtypes = ARGTYPES
    return lib


@pytest.fixture(scope="module")
def rope_lib(tmp_path_factory):
    return _load(build("rope.cu", ROPE_WRAPPERS, tmp_path_factory.mktemp("emu"), CUDA_INCLUDE))


def run(lib, x, positions, cos, sin, transposed):
    """The kernel on x (any strides, unit head-dim stride), as the glue launches it."""
    strides = (ctypes.c_int64 * 3)(*x.stride()[:3])
    y = nan_like(x.shape, x.dtype)
    rc = lib.emu_rope(ptr(x), strides, ptr(positions), ptr(cos), ptr(sin), ptr(y), *x.shape, cos.shape[0],
                      transposed, DTYPE_CODE[x.dtype])
    assert rc == 0
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["f32", "bf16", "f16", "f64"])
def test_rope_kernel_matches_reference(rope_lib, dtype):
    g = torch.Generator().manual_seed(0)
    cos, sin = fusedtx.rope_table(66, 50)
    base = (torch.randn(2, 5, 3, 66, generator=g) * 3).to(dtype)
    x = base.transpose(1, 2)  # (B, H, T, D) view of a (B, T, H, D) buffer: strided rows
    positions = torch.randint(0, 50, (2, 5), generator=g)
    for transposed, spec in ((False, reference.rope_forward), (True, reference.rope_backward)):
        assert_bitwise_equal(run(rope_lib, x, positions, cos, sin, transposed), spec(x, positions, cos, sin),
                             f"transposed={transposed}")


def test_positions_outside_the_table_give_nan_rows(rope_lib):
    cos, sin = fusedtx.rope_table(8, 16)
    x = torch.randn(1, 2, 4, 8)
    positions = torch.tensor([[3, -1, 16, 1 << 40]])
    y = run(rope_lib, x, positions, cos, sin, False)
    assert y[:, :, 1:].isnan().all()
    assert_bitwise_equal(y[:, :, :1], reference.rope_forward(x[:, :, :1], positions[:, :1], cos, sin), "valid row")


def test_negative_control_a_fused_multiply_add_is_caught(tmp_path):
    """The same comparison fails for a kernel that fuses x1 c - x2 s into one FMA: the same
    rotation, one rounding fewer."""
    plain = "y1 = sub_rn(mul_rn(x1, c), mul_rn(x2, s));"
    fused = "y1 = fmaf(x1, c, -mul_rn(x2, s));"

    def mutate(source):
        assert source.count(plain) == 1
        return source.replace(plain, fused)

    lib = _load(build("rope.cu", ROPE_WRAPPERS, tmp_path, CUDA_INCLUDE, mutate=mutate))
    cos, sin = fusedtx.rope_table(64, 512)
    x = torch.randn(2, 2, 8, 64, generator=torch.Generator().manual_seed(1)) * 3
    positions = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(2))
    y = run(lib, x, positions, cos, sin, False)
    expected = reference.rope_forward(x, positions, cos, sin)
    torch.testing.assert_close(y, expected)  # still a correct rotation...
    assert not bitwise_equal(y, expected)  # ...rounded differently
