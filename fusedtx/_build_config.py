"""The one list of C++/CUDA sources and flags behind `fusedtx._C`.

Both build paths read it: `setup.py` (ahead of time, `pip install --no-build-isolation -e .`)
and `fusedtx/_extension.py` (just in time, on first use). It imports nothing beyond the
standard library so that `setup.py` can execute it without importing the package.
"""
from __future__ import annotations

import os
from pathlib import Path

# Schemas (TORCH_LIBRARY) and the Python module stub live in one file; each op adds a CPU file
# and, for CUDA builds, a kernel file (raw pointers + cudaStream_t, no torch headers) and the
# torch glue that calls it.
CPU_SOURCES = [
    "registration.cpp",
    "cpu/activation.cpp",
    "cpu/softmax.cpp",
    "cpu/log_softmax.cpp",
    "cpu/layer_norm.cpp",
    "cpu/rms_norm.cpp",
    "cpu/linear.cpp",
    "cpu/causal_attention.cpp",
    "cpu/causal_attention_backward.cpp",
    "cpu/rope.cpp",
]
CUDA_SOURCES = [
    "cuda/activation.cu",
    "cuda/activation_glue.cpp",
    "cuda/softmax.cu",
    "cuda/softmax_glue.cpp",
    "cuda/log_softmax.cu",
    "cuda/log_softmax_glue.cpp",
    "cuda/layer_norm.cu",
    "cuda/layer_norm_glue.cpp",
    "cuda/rms_norm.cu",
    "cuda/rms_norm_glue.cpp",
    "cuda/linear.cu",
    "cuda/linear_glue.cpp",
    "cuda/causal_attention.cu",
    "cuda/causal_attention_glue.cpp",
    "cuda/causal_attention_backward.cu",
    "cuda/causal_attention_backward_glue.cpp",
    "cuda/rope.cu",
    "cuda/rope_glue.cpp",
]

# -ffp-contract=off: a fused multiply-add rounds once where the reference rounds twice, so
# contraction would break bitwise parity with fusedtx/reference/. -march=native is safe
# because the extension is always compiled on the machine that runs it.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-march=native", "-fno-math-errno"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
DEFINE_WITH_CUDA = "FUSEDTX_WITH_CUDA"


def csrc_dir() -> Path:
    """Where the C++ sources are: inside the package for an installed wheel, else the repo."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "registration.cpp").is_file():
            return candidate
    raise FileNotFoundError(
        f"fusedtx C++ sources not found (looked in {here / '_csrc'} and {here.parent / 'csrc'})"
    )


def sources(with_cuda: bool) -> list[str]:
    root = csrc_dir()
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])
    return [str(root / n) for n in names]


def all_cuda_kernel_files() -> list[Path]:
    """Every .cu file: what the nvcc compile test checks on CPU-only machines."""
    return sorted(csrc_dir().glob("cuda/*.cu"))


def cxx_flags(with_cuda: bool) -> list[str]:
    flags = list(CXX_FLAGS)
    if os.environ.get("FUSEDTX_NO_MARCH_NATIVE"):
        flags.remove("-march=native")
    if with_cuda:
        flags.append(f"-D{DEFINE_WITH_CUDA}")
    return flags


def nvcc_flags() -> list[str]:
    return list(NVCC_FLAGS)
