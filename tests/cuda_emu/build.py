"""Compile a csrc/cuda/*.cu file for the host emulator (emu.h) and load it with ctypes.

The .cu source, with the device headers it includes from csrc/cuda (*.cuh) pasted in, is rewritten
in two places only, then compiled by g++ with emu.h force-included:
  * `kernel<<<grid, block, smem, stream>>>(args)`  ->  `emu_launch(kernel, grid, block, smem, stream, args)`
  * `extern __shared__ T name[];`                 ->  `T* name = reinterpret_cast<T*>(emu_smem);`
`wrappers` is C++ appended to the file (extern "C" entry points for ctypes). nvcc still checks
the untouched file (tests/test_build.py); this checks what it computes.
"""
from __future__ import annotations

import ctypes
import hashlib
import re
import subprocess
from pathlib import Path

from fusedtx import _build_config

HERE = Path(__file__).resolve().parent
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\(", re.S)
SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?([\w:][\w: ]*?) (\w+)\[\];")
DEVICE_HEADER = re.compile(r'^#include "(\w+\.cuh)"$', re.M)


def _paste_device_headers(source: str, cuda_dir: Path, seen: set[str]) -> str:
    """Each csrc/cuda/*.cuh the source includes, pasted in place once (its shared memory must be
    rewritten too); the host headers (launchers.h) stay includes."""
    def paste(m: re.Match) -> str:
        name = m.group(1)
        if name in seen:
            return ""
        seen.add(name)
        text = (cuda_dir / name).read_text().replace("#pragma once\n", "")
        return _paste_device_headers(text, cuda_dir, seen)
    return DEVICE_HEADER.sub(paste, source)


def emulated_source(cu_name: str, wrappers: str, mutate=None) -> str:
    cuda_dir = _build_config.csrc_dir() / "cuda"
    source = (cuda_dir / cu_name).read_text()
    if mutate is not None:  # negative controls: a deliberately wrong kernel must be caught
        source = mutate(source)
    source = _paste_device_headers(source, cuda_dir, set())
    source, n_launches = LAUNCH.subn(lambda m: f"emu_launch({m.group(1)}, {m.group(2)}, ", source)
    source = SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = reinterpret_cast<{m.group(1)}*>(emu_smem);", source)
    assert n_launches, f"no kernel launch found in {cu_name}"
    return source + "\n" + wrappers


def build(cu_name: str, wrappers: str, out_dir: Path, cuda_include: Path, mutate=None) -> ctypes.CDLL:
    source = emulated_source(cu_name, wrappers, mutate)
    tag = hashlib.sha1(source.encode()).hexdigest()[:10]
    cpp, lib = out_dir / f"{cu_name}.{tag}.cpp", out_dir / f"{cu_name}.{tag}.so"
    cpp.write_text(source)
    cmd = ["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread",
           "-include", str(HERE / "emu.h"), f"-I{_build_config.csrc_dir() / 'cuda'}", f"-I{cuda_include}",
           "-x", "c++", str(cpp), "-o", str(lib)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"emulator build of {cu_name} failed:\n{out.stderr[-4000:]}")
    return ctypes.CDLL(str(lib))
