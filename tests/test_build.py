"""CI's proof that the GPU paths compile on a CPU-only machine: every .cu file with nvcc for
sm_80 and sm_90, every CUDA glue file against the torch headers, every Triton kernel to PTX."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from fusedtx import _build_config

CSRC = _build_config.csrc_dir()
CU_FILES = _build_config.all_cuda_kernel_files()
NVCC = shutil.which("nvcc") or (cpp_extension.CUDA_HOME and str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"))


def test_source_lists_are_complete():
    listed = set(_build_config.CPU_SOURCES + _build_config.CUDA_SOURCES)
    on_disk = {str(p.relative_to(CSRC)) for p in CSRC.rglob("*") if p.suffix in (".cpp", ".cu")}
    assert listed == on_disk, f"not in fusedtx/_build_config.py: {on_disk - listed}; missing: {listed - on_disk}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("cu_file", CU_FILES, ids=lambda p: p.name)
def test_cuda_kernels_compile_with_nvcc(cu_file, arch, tmp_path):
    if not NVCC or not Path(NVCC).exists():
        pytest.skip("nvcc not found (install the CUDA toolkit or put nvcc on PATH)")
    cmd = [NVCC, "-c", f"-arch={arch}", *_build_config.nvcc_flags(), "-Xptxas", "-v", str(cu_file), "-o", str(tmp_path / "k.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stderr}"
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", out.stderr)]
    assert spills and not any(spills), f"register spills in {cu_file.name} ({arch}):\n{out.stderr}"


def test_cuda_glue_parses_against_torch_headers(tmp_path):
    """The glue is only built where torch has CUDA; parse it here to catch mistakes early. All
    glue files in one translation unit: torch's headers are most of the work, parsed once (a
    glue file that leans on another's includes would pass here and fail the real build, which
    compiles each alone). torch's CPU wheel ships the c10/cuda headers, which need this define
    without CMake."""
    cuda_include = Path(cpp_extension.CUDA_HOME or "/usr/local/cuda") / "include"
    if not (cuda_include / "cuda_runtime.h").exists():
        pytest.skip(f"CUDA headers not found in {cuda_include}")
    import sysconfig

    glue = sorted(CSRC.glob("cuda/*_glue.cpp"))
    assert glue, "no csrc/cuda/*_glue.cpp"
    unit = tmp_path / "all_glue.cpp"
    unit.write_text("".join(f'#include "{p.resolve()}"\n' for p in glue))
    cxx = os.environ.get("CXX", "c++")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{cuda_include}", f"-I{sysconfig.get_paths()['include']}"]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *includes, str(unit)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


def test_triton_kernels_lower_to_ptx():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("_lower_triton.py")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "lowered" in out.stdout


def test_lowering_check_flags_spills_and_shared_memory():
    """Negative control for the lowering test's limits: a lowering over its kernel's spill budget
    (zero for the matmul) or over the shared memory of its target is reported, naming the kernel,
    the specialisation, the target, the measured value and the limit; one within both is not."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = """if True:
        import _lower_triton as L
        ok = {"kernel": "_matmul_fwd", "arch": 90, "where": "SPEC", "error": None,
              "shared": L.SHARED_MEMORY_LIMIT[90], "registers": 200, "spills": 0}
        assert L.check(ok) == [], L.check(ok)
        problems = L.check({**ok, "spills": 8, "shared": L.SHARED_MEMORY_LIMIT[90] + 1})
        assert len(problems) == 2, problems
        assert "SPEC" in problems[0] and str(L.SHARED_MEMORY_LIMIT[90]) in problems[0], problems
        assert "SPEC: spills 8 bytes" in problems[1] and "budget of 0" in problems[1], problems
        budgets, _ = L.SPILL_BUDGETS["_layer_norm_bwd_dx_fused"]
        ln = {**ok, "kernel": "_layer_norm_bwd_dx_fused", "spills": budgets[90]}
        assert L.check(ln) == [] and len(L.check({**ln, "spills": budgets[90] + 1})) == 1
        print("checked")
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).parent)
    assert out.returncode == 0 and "checked" in out.stdout, out.stdout[-4000:] + out.stderr[-4000:]
