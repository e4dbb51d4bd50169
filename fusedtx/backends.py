"""Backend selection: which implementation (triton, native, reference) runs an op.

Order of precedence, highest first:
  1. the `backend=` argument of a call,
  2. `fusedtx.use_backend(name)` (a context manager) or `fusedtx.set_backend(name)`,
  3. the FUSEDTX_BACKEND environment variable (as it was when fusedtx was imported),
  4. the per-device default: "triton" on CUDA, "native" on CPU.
A backend that cannot run on the tensors' device raises BackendUnavailableError, saying why and
what to do.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import threading

import torch

BACKENDS = ("triton", "native", "reference")
DEFAULT_BACKEND = {"cuda": "triton", "cpu": "native"}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine or on these tensors' device."""


# Plain module globals rather than a ContextVar: torch.compile reads (and guards on) globals, so a
# compiled function recompiles when the backend changes; it cannot trace a ContextVar. The
# choice is therefore process-wide, like torch.backends flags.
_global_backend: str | None = None
_context_backend: str | None = None
# FUSEDTX_BACKEND is read once, when fusedtx is imported (checked at first use): a compiled
# function cannot guard on os.environ, so a variable changed later would change eager results
# and not compiled ones. set_backend / use_backend change the selection at run time.
_env_backend: str | None = os.environ.get("FUSEDTX_BACKEND") or None
# The open use_backend blocks, oldest first, as (token, name): _context_backend is the newest's
# name. Each block removes its own entry on exit, so blocks that threads open and close out of
# order leave the selection to the blocks still open, and to none after the last.
_context_blocks: list[tuple[object, str | None]] = []
_context_lock = threading.Lock()


# The values of an op's backend= argument with which an op on CPU tensors runs the native backend,
# known without resolving: none until the native backend was found able to run on the CPU, then
# "native", and None too while nothing else is chosen (use_backend, set_backend, FUSEDTX_BACKEND).
# fusedtx.functional reads it on every call (its native lanes); it is kept up to date here.
native_on_cpu: tuple = ()


def _refresh_native_on_cpu() -> None:
    global native_on_cpu
    if "cpu" not in _NATIVE_RUNS_ON:
        native_on_cpu = ()
        return
    try:
        chosen = get_backend()
    except ValueError:  # a bad FUSEDTX_BACKEND: the resolving path raises it
        chosen = "invalid"
    native_on_cpu = ("native", None) if chosen in (None, "native") else ("native",)


def _check_name(name: str | None, what: str) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what}: expected one of {BACKENDS} or None, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Make `name` the backend for every op from now on (None: back to env var / default)."""
    global _global_backend
    _global_backend = _check_name(name, "set_backend(name)")
    _refresh_native_on_cpu()


def get_backend() -> str | None:
    """The backend chosen by use_backend / set_backend / FUSEDTX_BACKEND, or None for per-device default."""
    return _context_backend or _global_backend or _check_name(_env_backend, "FUSEDTX_BACKEND")


@contextlib.contextmanager
def use_backend(name: str | None):
    """Within the block, ops without an explicit backend= argument use `name`."""
    global _context_backend
    token = object()
    with _context_lock:
        _context_blocks.append((token, _check_name(name, "use_backend(name)")))
        _context_backend = name
        _refresh_native_on_cpu()
    try:
        yield
    finally:
        with _context_lock:
            _context_blocks[:] = [block for block in _context_blocks if block[0] is not token]
            _context_backend = _context_blocks[-1][1] if _context_blocks else None
            _refresh_native_on_cpu()


# ---------------------------------------------------------------------------------------------
# What can run here
# ---------------------------------------------------------------------------------------------
def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _release(version: str) -> tuple[int, int]:
    major, minor = (int(x) for x in re.findall(r"\d+", version)[:2])
    return major, minor


def interpreter_defect(triton_version: str, numpy_version: str) -> str | None:
    """Why this Triton's interpreter cannot run fusedtx's kernels with this numpy, or None.

    Triton 3.6's interpreter gives its tensors an __index__ that calls int() on a one-element
    array, which numpy 2.4 refuses: every kernel with a loop over runtime bounds then fails deep
    inside triton with "only 0-dimensional arrays can be converted to Python scalars". Triton
    3.7 squeezes the array first."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"the Triton {triton_version} interpreter cannot run with numpy {numpy_version} "
                "(its tensors' __index__ calls int() on a one-element array, which numpy >= 2.4 "
                "refuses); install numpy<2.4 or triton>=3.7")
    return None


def _interpreted() -> bool:
    # @triton.jit reads TRITON_INTERPRET when it decorates: once our kernels are imported, the
    # mode they were compiled for is what counts, whatever the variable says now.
    kernels = sys.modules.get("fusedtx.kernels")
    return kernels.INTERPRETED if kernels is not None else interpreter_requested()


def _broken_interpreter() -> str | None:
    """interpreter_defect of the installed triton and numpy when the interpreter is in use."""
    if not _interpreted():
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    return interpreter_defect(triton.__version__, numpy.__version__)


def triton_mode() -> str:
    """'interpreter' (TRITON_INTERPRET=1: kernels run on CPU tensors), 'compiled' (a CUDA GPU),
    or 'unavailable: <why>'."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"unavailable: triton is not installed ({exc})"
    if _interpreted():
        defect = _broken_interpreter()
        return f"unavailable: {defect}" if defect else "interpreter"
    if torch.cuda.is_available():
        return "compiled"
    return "unavailable: no CUDA GPU"


# Evaluated eagerly even while torch.compile traces (it imports triton and may build the C++
# extension, which cannot be traced); whether a backend can run does not change during a run.
# The device types the native backend was found able to run on: once the extension is loaded it
# stays loaded, so the check (an import and a status lookup, as long as a small kernel) runs once.
_NATIVE_RUNS_ON: set[str] = set()


@torch.compiler.assume_constant_result
def _unavailable_reason(backend: str, device_type: str) -> str | None:
    if backend == "reference" or (backend == "native" and device_type in _NATIVE_RUNS_ON):
        return None
    if backend == "triton":
        mode = triton_mode()
        if mode == "interpreter":
            return None
        if mode == "compiled":
            if device_type != "cuda":
                return (f"the triton backend runs on CUDA tensors, got a {device_type} tensor; move "
                        "the inputs to the GPU, or use backend='native' on CPU")
            return None
        defect = _broken_interpreter()
        if defect:
            return defect
        return (f"Triton needs a CUDA GPU ({mode}); set TRITON_INTERPRET=1 before importing "
                "triton to run its kernels on CPU for testing, or use backend='native'")
    if backend == "native":
        from . import _extension

        status = _extension.status()
        if not status.loaded:
            return f"the C++ extension fusedtx._C could not be built or loaded: {status.error}"
        if device_type == "cuda" and not status.with_cuda:
            return ("fusedtx._C was built without CUDA kernels (PyTorch without CUDA, or nvcc not "
                    "found when it was built); reinstall with `pip install --no-build-isolation -e .` "
                    "on a machine with CUDA, or use backend='triton'")
        if device_type not in ("cpu", "cuda"):
            return f"the native backend runs on cpu and cuda tensors, got {device_type}"
        _NATIVE_RUNS_ON.add(device_type)
        _refresh_native_on_cpu()
        return None
    raise AssertionError(backend)


def is_available(backend: str, device: torch.device | str = "cpu") -> bool:
    return _unavailable_reason(_check_name(backend, "backend"), torch.device(device).type) is None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    return [b for b in BACKENDS if is_available(b, device)]


def resolve(backend: str | None, device: torch.device) -> str:
    """The backend an op runs with, after the precedence rules; raises if it cannot run."""
    name = _check_name(backend, "backend") or get_backend() or DEFAULT_BACKEND.get(device.type)
    if name is None:
        raise BackendUnavailableError(f"fusedtx has no backend for {device.type} tensors (cpu and cuda are supported)")
    reason = _unavailable_reason(name, device.type)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}")
    return name
