"""Portable builds: the C++ extension compiles for aarch64 and for every x86-64 level, each build
gives fusedtx.reference's bits, and a wheel installs and runs on a fresh machine.

The just-in-time build targets the host (-march=native); FUSEDTX_MARCH names another target
(fusedtx/_build_config.py). These tests build the other targets this host can run and run the
native backend's parity tests against them; aarch64 is cross-compiled (no Arm machine here) and
its bits are compared under qemu by benchmarks/arm_qemu_check.sh, whose result is committed.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from fusedtx import _build_config

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
CSRC = _build_config.csrc_dir()
CROSS_CXX = shutil.which("aarch64-linux-gnu-g++")

# The native backend's parity tests: every op, dtype and shape family against fusedtx.reference,
# bit for bit, and the committed output-hash table. Run against another build in a subprocess.
NATIVE_PARITY_FILES = [
    "test_activation.py", "test_softmax.py", "test_log_softmax.py", "test_layer_norm.py", "test_rms_norm.py",
    "test_row_norm.py", "test_linear.py", "test_swiglu_ffn.py", "test_rope.py", "test_causal_attention.py",
    "test_causal_attention_native.py", "test_output_hashes.py",
]
NATIVE_PARITY = "native and not cuda and not emulat"
# Prints (as its last line) fusedtx.info()'s report on the extension, building it first: how it
# was loaded, the vector path its CPU kernels take, why it failed.
ISA_SCRIPT = "import fusedtx, json, os; print(json.dumps(fusedtx.info(file=open(os.devnull, 'w'))['extension']))"


def _extension_report(python, **kwargs) -> dict:
    out = _run([python, "-c", ISA_SCRIPT], timeout=1200, what="building the extension", **kwargs)
    return json.loads(out.stdout.splitlines()[-1])


def _run(cmd, *, timeout, what, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert out.returncode == 0, f"{what} failed ({out.returncode}): {' '.join(map(str, cmd))}\n" \
                                f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


# ------------------------------------------------------------------------------------------------
# aarch64: every C++ source cross-compiles, on the portable path.

@pytest.fixture(scope="module")
def aarch64_compile(tmp_path_factory):
    """A function compiling one C++ file for aarch64 (GCC 12's default armv8-a target) with the
    extension's flags against torch's headers. torch's headers are most of the work: they are
    compiled once into a precompiled header that every source includes first."""
    if CROSS_CXX is None:
        pytest.skip("aarch64-linux-gnu-g++ not found (Debian: apt-get install g++-aarch64-linux-gnu; .ci/run installs it)")
    tmp = tmp_path_factory.mktemp("aarch64")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    # -O1 instead of the build's -O3: code generation runs (a construct the aarch64 back end
    # cannot lower fails here), in a fraction of the time.
    flags = [f for f in _build_config.CXX_FLAGS if not f.startswith("-O")] + ["-O1", "-fPIC", *includes]
    header = tmp / "torch_headers.h"
    header.write_text("#include <ATen/ATen.h>\n#include <ATen/Parallel.h>\n#include <torch/library.h>\n")
    _run([CROSS_CXX, *flags, "-x", "c++-header", header, "-o", f"{header}.gch"], timeout=600,
         what="precompiling torch's headers for aarch64")

    def compile_one(source: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [CROSS_CXX, *flags, "-include", header, "-Winvalid-pch", *extra, "-c", source, "-o", tmp / "out.o"]
        return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)

    return compile_one


def test_every_cpu_source_compiles_for_aarch64(aarch64_compile):
    sources = [CSRC / n for n in _build_config.CPU_SOURCES]
    failed = {}
    for source in sources:
        out = aarch64_compile(source, "-Werror")
        if out.returncode != 0:
            failed[source.name] = out.stderr[-3000:]
    assert not failed, f"{len(failed)} of {len(sources)} sources fail to compile for aarch64: {failed}"


def test_aarch64_build_takes_the_portable_path(aarch64_compile, tmp_path):
    """isa.h picks the NEON (portable) path on aarch64: no x86 kernel is compiled there."""
    probe = tmp_path / "probe.cpp"
    probe.write_text(f'#include "{CSRC / "cpu" / "isa.h"}"\n'
                     'static_assert(FUSEDTX_CPU_ISA[0] == \'n\', "not the neon path");\n'
                     "#if defined(FUSEDTX_AVX2) || defined(FUSEDTX_AVX512)\n#error an x86 path on aarch64\n#endif\n")
    out = aarch64_compile(probe)
    assert out.returncode == 0, out.stderr[-3000:]


def test_aarch64_compile_catches_x86_code(aarch64_compile, tmp_path):
    """Negative control: an x86 intrinsic outside the ISA guards fails the cross-compile."""
    leak = tmp_path / "leak.cpp"
    leak.write_text(f'#include "{CSRC / "cpu" / "common.h"}"\n'
                    "float leak(const float* p) { return _mm256_cvtss_f32(_mm256_loadu_ps(p)); }\n")
    out = aarch64_compile(leak)
    assert out.returncode != 0 and "_mm256" in out.stderr, out.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# x86-64: the AVX2 path on a host whose own build takes the AVX-512 one.

@pytest.mark.slow
def test_avx2_build_matches_the_reference_on_an_avx512_host():
    """The suite tests the path of this host's own build; the baseline path is tested by the
    wheel test below. On an AVX-512 host that leaves the AVX2 path (most users' x86 CPUs):
    build it (FUSEDTX_MARCH=x86-64-v3) and run the native parity tests against it."""
    from fusedtx import _extension

    status = _extension.status()
    if platform.machine() != "x86_64" or not {"avx2", "fma", "f16c"} <= _build_config.cpu_flags():
        pytest.skip("not an x86-64 host with AVX2")
    if status.how != "just-in-time":
        pytest.skip("the ahead-of-time extension takes precedence over FUSEDTX_MARCH")
    if status.cpu_isa == "avx2":
        pytest.skip("this host's own build takes the AVX2 path: the rest of the suite tests it")
    env = {**os.environ, "FUSEDTX_MARCH": "x86-64-v3"}
    report = _extension_report(sys.executable, env=env)
    assert report["isa"] == "avx2", json.dumps(report)
    _run([sys.executable, "-m", "pytest", "-q", "-n0", "-p", "no:cacheprovider", "-k", NATIVE_PARITY,
          *NATIVE_PARITY_FILES], cwd=TESTS, env=env, timeout=1800, what="the native parity tests on the AVX2 build")


# ------------------------------------------------------------------------------------------------
# A wheel on a fresh machine: a new virtual environment, the CPU torch wheel first, the wheel
# without extras, no ninja on PATH, built for the baseline target of this architecture.

def _path_without_ninja(scratch: Path) -> str:
    """PATH with every ninja hidden: a directory holding one (/usr/bin, a virtual environment's
    bin) is replaced by a mirror of its other entries, so the compiler is still found."""
    dirs = []
    for i, d in enumerate(p for p in os.environ.get("PATH", "").split(os.pathsep) if p):
        if (Path(d) / "ninja").exists():
            mirror = scratch / f"path{i}"
            mirror.mkdir(parents=True)
            for entry in Path(d).iterdir():
                if entry.name != "ninja":
                    (mirror / entry.name).symlink_to(entry)
            d = str(mirror)
        dirs.append(d)
    return os.pathsep.join(dirs)


@pytest.mark.slow
def test_wheel_installs_builds_and_keeps_the_bits_in_a_fresh_venv(tmp_path):
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not a source checkout")
    pytest.importorskip("build", reason="the test extra's `build` package makes the sdist and the wheel")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", dist, ROOT], timeout=900, what="python -m build",
         env={**os.environ, "FUSEDTX_SKIP_BUILD": "1"})
    (sdist,), (wheel,) = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert any(n.endswith("/csrc/cpu/linear.cpp") for n in names), "the sdist lacks csrc/"
    with zipfile.ZipFile(wheel) as whl:
        shipped = set(whl.namelist())
    missing = {f"fusedtx/_csrc/{n}" for n in _build_config.CPU_SOURCES + _build_config.CUDA_SOURCES} - shipped
    assert not missing, f"the wheel lacks sources the just-in-time build needs: {sorted(missing)}"
    assert not any(n.startswith("fusedtx/_C") for n in shipped), "a pure wheel must not carry a host-specific _C"

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, f"torch=={torch.__version__.split('+')[0]}"], timeout=900, what="installing torch")
    _run([*pip, wheel], timeout=900, what="installing the wheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FUSEDTX_", "PYTHON", "VIRTUAL_ENV", "TRITON"))}
    env.update(PATH=_path_without_ninja(tmp_path / "bin"), FUSEDTX_MARCH="none", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    assert shutil.which("ninja", path=env["PATH"]) is None
    report = _extension_report(python, cwd=tmp_path, env=env)
    expected_isa = "neon" if platform.machine() in ("aarch64", "arm64") else "scalar"
    assert report["how"] == "just-in-time" and report["isa"] == expected_isa, json.dumps(report)
    _run([python, "-m", "fusedtx", "check", "--quick", "--backends", "native,plain", "--no-progress"],
         cwd=tmp_path, env=env, timeout=900, what="python -m fusedtx check --quick")
    # The repository's parity tests against the installed package (tests/ is the working
    # directory, so `import fusedtx` finds the wheel's copy, not the checkout's).
    _run([*pip, "pytest"], timeout=600, what="installing pytest")
    out = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", NATIVE_PARITY, *NATIVE_PARITY_FILES],
               cwd=TESTS, env=env, timeout=1800, what="the native parity tests on the wheel's baseline build")
    assert " passed" in out.stdout and str(env_dir) in _run(
        [python, "-c", "import fusedtx; print(fusedtx.__file__)"], cwd=TESTS, env=env, timeout=120,
        what="locating the installed package").stdout


# ------------------------------------------------------------------------------------------------
# An ahead-of-time module records its target; a CPU without that instruction set never loads it.

def test_build_target_names_what_a_cpu_needs():
    v4 = _build_config.build_target("x86-64-v4")
    if platform.machine() == "x86_64":
        assert {"avx2", "fma", "avx512f", "avx512bw", "avx512vl"} <= set(v4["requires"])
        assert _build_config.build_target("x86-64")["requires"] == []
        assert not set(_build_config.build_target("x86-64-v3")["requires"]) & {"avx512f", "avx512bw"}
    native = _build_config.build_target("native")
    assert native["machine"] == platform.machine() and native["march"] == "native"
    assert _build_config.target_mismatch(native) is None, "a native build must run on its own host"


def test_target_mismatch_names_the_missing_instructions():
    target = {"machine": platform.machine(), "march": "x86-64-v4", "requires": ["avx2", "avx512f", "fma"]}
    assert _build_config.target_mismatch(target, {"avx2", "avx512f", "fma", "sse4_2"}) is None
    why = _build_config.target_mismatch(target, {"avx2", "fma"})
    assert why and "avx512f" in why and "x86-64-v4" in why and "avx2" not in why.split("with")[1], why
    other = _build_config.target_mismatch({**target, "machine": "sparc64"}, {"avx512f"})
    assert other and "sparc64" in other, other


def test_an_ahead_of_time_module_for_another_cpu_is_passed_over(monkeypatch):
    """_load() with an ahead-of-time module whose recorded target this CPU lacks: it is not
    imported (that could die of SIGILL); the just-in-time build runs and the status says why."""
    import importlib.util

    from fusedtx import _extension

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "fusedtx._C" else real_find_spec(name, *a))
    monkeypatch.setattr(_build_config, "read_target",
                        lambda d: {"machine": platform.machine(), "march": "future", "requires": ["no_such_flag"]})
    monkeypatch.setitem(sys.modules, "fusedtx._C", None)  # an import would raise, not load
    status = _extension._load()
    assert status.loaded and status.how == "just-in-time", status
    assert status.note and "no_such_flag" in status.note and "-march=future" in status.note, status.note


# ------------------------------------------------------------------------------------------------
# The ahead-of-time CUDA build, where this torch has CUDA.

@pytest.mark.slow
def test_ahead_of_time_cuda_build(tmp_path):
    """setup.py's ahead-of-time build with the CUDA kernels, against the installed CUDA torch, into
    a scratch directory; the built module loads and reports its CUDA kernels."""
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU build: the CUDA extension needs a CUDA build of torch")
    if cpp_extension.CUDA_HOME is None:
        pytest.skip("CUDA_HOME not set and no nvcc found: point CUDA_HOME at the CUDA toolkit")
    build = tmp_path / "build"
    _run([sys.executable, "setup.py", "build_ext", "--build-lib", build, "--build-temp", tmp_path / "tmp"],
         cwd=ROOT, timeout=1800, what="the ahead-of-time CUDA build", env={**os.environ, "FUSEDTX_MARCH": "none"})
    (module,) = list((build / "fusedtx").glob("_C*.so"))
    out = _run([sys.executable, "-c", f"import torch; torch.ops.load_library({str(module)!r}); "
                "print(torch.ops.fusedtx_native.built_with_cuda(), torch.ops.fusedtx_native.cpu_isa())"],
               timeout=300, what="loading the ahead-of-time module")
    assert out.stdout.split() == ["True", "scalar"], out.stdout
