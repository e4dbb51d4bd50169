"""Loading the C++/CUDA extension `fusedtx._C`: built ahead of time, or just in time.

`fusedtx._C` registers the native kernels as `torch.ops.fusedtx_native.*`, and its functions are
the native backend's eager fast paths (csrc/eager.cpp; `module()`). If `pip install
--no-build-isolation` built it, it is imported; otherwise it is compiled on first use with
`torch.utils.cpp_extension.load` (ninja, cached under TORCH_EXTENSIONS_DIR, and guarded by a
file lock so that two processes building at once wait for each other instead of colliding).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from . import _build_config


@dataclasses.dataclass(frozen=True)
class ExtensionStatus:
    loaded: bool
    how: str  # "ahead-of-time", "just-in-time" or "not loaded"
    with_cuda: bool
    error: str | None = None
    # The instruction set the CPU kernels were compiled for (csrc/cpu/isa.h): "avx512", "avx2",
    # "neon" or "scalar". Every one computes the same bits; only the speed differs. None when not loaded.
    cpu_isa: str | None = None
    # Why an ahead-of-time fusedtx._C was passed over for the just-in-time build, if it was.
    note: str | None = None


_lock = threading.Lock()
_status: ExtensionStatus | None = None
_module = None  # the loaded Python module (fusedtx._C, or the just-in-time build under its name)


def _cuda_wanted() -> bool:
    from torch.utils import cpp_extension

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _ninja_on_path() -> None:
    """torch's just-in-time build runs `ninja` from PATH. The `ninja` package (a dependency)
    installs it beside the interpreter, which is not on PATH when a virtual environment's python
    runs without the environment being activated: put the package's binary directory there."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return  # torch's own error then says that ninja is required
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _jit_name(with_cuda: bool) -> str:
    # The cache directory is per name: tie it to what the binary depends on, so switching torch
    # versions or toggling CUDA never picks up a stale build.
    key = f"{torch.__version__}|{with_cuda}|{_build_config.cxx_flags(with_cuda)}"
    return "fusedtx_C_" + hashlib.sha1(key.encode()).hexdigest()[:10]


def _load() -> ExtensionStatus:
    global _module
    note = None
    if importlib.util.find_spec(f"{__package__}._C") is not None:
        target = _build_config.read_target(Path(__file__).resolve().parent)
        mismatch = _build_config.target_mismatch(target) if target else None
        if mismatch is None:
            try:
                from . import _C  # ahead-of-time build; registers the ops on import

                _module = _C
                return ExtensionStatus(True, "ahead-of-time", _has_cuda_kernels(), cpu_isa=_cpu_isa())
            except ImportError as exc:  # e.g. built against another torch
                note = f"the ahead-of-time fusedtx._C did not import ({exc}): built just in time instead"
        else:
            note = f"the ahead-of-time fusedtx._C was not loaded ({mismatch}): built just in time instead"
    try:
        with_cuda = _cuda_wanted()  # imports torch.utils.cpp_extension, which needs setuptools
        from torch.utils import cpp_extension

        kwargs = dict(
            name=_jit_name(with_cuda),
            sources=_build_config.sources(with_cuda),
            extra_cflags=_build_config.cxx_flags(with_cuda),
            extra_ldflags=list(_build_config.LD_FLAGS),
            with_cuda=with_cuda,
            is_python_module=True,  # imported under its own name: csrc/eager.cpp's PyInit
            verbose=False,
        )
        if with_cuda:
            kwargs["extra_cuda_cflags"] = _build_config.nvcc_flags()
        _ninja_on_path()
        build_dir = Path(cpp_extension._get_build_directory(kwargs["name"], verbose=False))
        with _build_lock(build_dir):
            if not (build_dir / f"{kwargs['name']}.so").exists():
                print(f"fusedtx: compiling the C++ extension into {build_dir} (first use only; about a minute)",
                      file=sys.stderr, flush=True)
            module = cpp_extension.load(**kwargs)
    except Exception as exc:  # a compiler error is reported through status(), not raised at import
        return ExtensionStatus(False, "not loaded", False, f"{type(exc).__name__}: {exc}", note=note)
    _module = module
    return ExtensionStatus(True, "just-in-time", _has_cuda_kernels(), cpu_isa=_cpu_isa(), note=note)


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold an exclusive flock on build_dir/fusedtx.lock while loading (and building). torch's own
    lock there is a file created and deleted, which a builder killed mid-build (a timeout, OOM)
    leaves behind, and every later load then waits on it forever. The flock dies with its
    process, and whoever holds it is the only fusedtx process in the directory, so a torch lock
    file found then is stale and is removed."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "fusedtx.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _has_cuda_kernels() -> bool:
    return bool(torch.ops.fusedtx_native.built_with_cuda())


def _cpu_isa() -> str:
    return str(torch.ops.fusedtx_native.cpu_isa())


def status() -> ExtensionStatus:
    """Load the extension once (building it if needed) and report how that went."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                _status = _load()
    return _status


def module():
    """The loaded extension's Python module (its eager fast paths), or None when it is not loaded."""
    return _module if status().loaded else None


def ops():
    """torch.ops.fusedtx_native, after making sure the extension is loaded."""
    st = status()
    if not st.loaded:
        raise RuntimeError(f"fusedtx._C is not available: {st.error}")
    return torch.ops.fusedtx_native
