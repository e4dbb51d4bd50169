"""The one list of C++/CUDA sources and flags behind `fusedtx._C`.

Both build paths read it: `setup.py` (ahead of time, `pip install --no-build-isolation -e .`)
and `fusedtx/_extension.py` (just in time, on first use). It imports nothing beyond the
standard library so that `setup.py` can execute it without importing the package.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

# Schemas (TORCH_LIBRARY) and the Python module stub live in one file; each op adds a CPU file
# and, for CUDA builds, a kernel file (raw pointers + cudaStream_t, no torch headers) and the
# torch glue that calls it.
CPU_SOURCES = [
    "registration.cpp",
    "eager.cpp",
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
# contraction would break bitwise parity with fusedtx/reference/. No -march here: march_flags()
# adds the target (the host's own instruction set unless FUSEDTX_MARCH says otherwise).
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
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


def march() -> str | None:
    """The -march the CPU kernels are compiled for: FUSEDTX_MARCH (e.g. "x86-64", "x86-64-v3",
    "x86-64-v4", "armv8.2-a"), "native" when it is unset, None ("none", or the older
    FUSEDTX_NO_MARCH_NATIVE=1) for the compiler's default target: baseline x86-64, or armv8-a.

    "native" suits the just-in-time build, which always runs on the machine it was compiled on;
    an ahead-of-time build that other machines will load (a wheel) must name a target they all
    have. Every target computes the same bits (csrc/cpu/isa.h); only the speed differs."""
    value = os.environ.get("FUSEDTX_MARCH", "").strip()
    if not value:
        return None if os.environ.get("FUSEDTX_NO_MARCH_NATIVE") else "native"
    if value == "none":
        return None
    if not all(c.isalnum() or c in "-_.+" for c in value):
        raise ValueError(f"FUSEDTX_MARCH: expected a -march value such as x86-64-v3 or none, got {value!r}")
    return value


def march_flags() -> list[str]:
    target = march()
    return [] if target is None else [f"-march={target}"]


def cxx_flags(with_cuda: bool) -> list[str]:
    flags = CXX_FLAGS + march_flags()
    if with_cuda:
        flags.append(f"-D{DEFINE_WITH_CUDA}")
    return flags


def nvcc_flags() -> list[str]:
    return list(NVCC_FLAGS)


# What an ahead-of-time module needs of the CPU that loads it, written beside it by setup.py and
# checked before it is imported: a module built for an instruction set the CPU lacks would die
# of SIGILL on its first vector instruction.
TARGET_FILE = "_C_target.json"
_X86_V2 = ["pni", "ssse3", "sse4_1", "sse4_2", "popcnt", "cx16"]
_X86_V3 = _X86_V2 + ["avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"]
_X86_LEVELS = {"x86-64": [], "x86-64-v2": _X86_V2, "x86-64-v3": _X86_V3,
               "x86-64-v4": _X86_V3 + ["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]}
# The instruction-set flags of /proc/cpuinfo a -march=native build may use on x86.
_X86_ISA_PREFIXES = ("sse", "ssse", "pni", "avx", "amx", "fma", "f16c", "bmi", "abm", "movbe", "popcnt", "gfni",
                     "vaes", "vpclmulqdq", "sha_ni", "adx", "aes", "pclmulqdq")


def cpu_flags() -> set[str]:
    """This CPU's instruction-set flags (/proc/cpuinfo "flags" on x86, "Features" on Arm); empty
    where they cannot be read."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines
                 if line.lower().startswith(("flags", "features"))), set())


def build_target(target: str | None = None) -> dict:
    """The target of a build with -march=target (default: march()) on this machine, and the CPU
    flags a machine needs to run it: this CPU's for "native", the level's for x86-64-vN, none
    for the default target; a -march this table does not know is recorded, not checked."""
    target = march() if target is None else target
    machine = platform.machine()
    if target == "native":
        flags = cpu_flags()
        requires = sorted(flags if machine in ("aarch64", "arm64") else
                          {f for f in flags if f.startswith(_X86_ISA_PREFIXES)})
    else:
        requires = _X86_LEVELS.get(target, []) if machine == "x86_64" else []
    return {"machine": machine, "march": target, "requires": requires}


def target_mismatch(target: dict, flags: set[str] | None = None) -> str | None:
    """Why a module built for `target` (build_target()'s dict) cannot run on this CPU, or None."""
    machine = platform.machine()
    if target.get("machine") != machine:
        return f"built for {target.get('machine')}, this machine is {machine}"
    flags = cpu_flags() if flags is None else flags
    missing = sorted(set(target.get("requires", [])) - flags) if flags else []
    if missing:
        return f"built with -march={target.get('march')} for a CPU with {', '.join(missing)}, which this one lacks"
    return None


def read_target(directory: Path) -> dict | None:
    path = Path(directory) / TARGET_FILE
    return json.loads(path.read_text()) if path.is_file() else None
