"""Lower every Triton kernel of fusedtx to PTX for sm_80 and sm_90, without a GPU, and check that
each fits the shared memory of every device it may run on (SHARED_MEMORY_LIMIT).

Run by tests/test_build.py in a subprocess without TRITON_INTERPRET (the interpreter would
replace the kernels). tests/triton_specs.py lists the specialisations of each
fusedtx/kernels/<op>.py; every @triton.jit kernel of such a module must appear there (helpers
that kernels call are listed in the module's JIT_HELPERS).

The (specialisation, arch) compilations, from a cold Triton cache on CI, are spread over one
worker process per core, or per core left to this pytest-xdist worker
(PYTEST_XDIST_WORKER_COUNT, inherited from the test): the other workers keep their cores busy,
and more compiling processes than cores spend more CPU on the same work. With one process left,
this process compiles them itself.
"""
import concurrent.futures
import importlib
import multiprocessing
import os
import pkgutil
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import fusedtx.kernels  # noqa: E402
from fusedtx.kernels._common import LAUNCH_OPTIONS  # noqa: E402
from triton_specs import SPECS  # noqa: E402

ARCHS = (80, 90)
# Shared memory one block may use (bytes), the strictest device of each compile target: sm_80
# code also runs on sm_86 / sm_89 (RTX 30 / 40, L40: 99 KiB, below the A100's 163 KiB), sm_90 on
# the H100 / H200 (227 KiB). A kernel above it compiles but raises OutOfResources at launch.
SHARED_MEMORY_LIMIT = {80: 101_376, 90: 232_448}


def kernel_modules():
    """fusedtx.kernels.<op> modules (not the shared _helpers, which are inlined into kernels)."""
    return [f"fusedtx.kernels.{info.name}" for info in pkgutil.iter_modules(fusedtx.kernels.__path__)
            if not info.name.startswith("_")]


def lower(module_name: str, index: int, arch: int) -> str | None:
    """Compile SPECS[module_name]()[index] for sm_<arch>; None, or what went wrong."""
    fn, signature, constexprs, options = SPECS[module_name]()[index]
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                  options={**LAUNCH_OPTIONS, **options})
        assert ".entry" in compiled.asm["ptx"]
        if compiled.metadata.shared > SHARED_MEMORY_LIMIT[arch]:
            return (f"{module_name}.{fn.__name__} sm_{arch} {constexprs} {options}: needs "
                    f"{compiled.metadata.shared} bytes of shared memory a block, over the "
                    f"{SHARED_MEMORY_LIMIT[arch]} of the smallest sm_{arch} target: it cannot launch")
        return None
    except Exception as exc:  # report every failure, not just the first
        return f"{module_name}.{fn.__name__} sm_{arch} {constexprs}: {type(exc).__name__}: {exc}"


def main() -> int:
    failures, tasks = [], []
    for module_name in kernel_modules():
        module = importlib.import_module(module_name)
        helpers = set(getattr(module, "JIT_HELPERS", ()))  # @jit functions called by kernels, never launched
        kernels = {name for name, obj in vars(module).items()
                   if isinstance(obj, triton.runtime.JITFunction) and obj.__module__ == module.__name__} - helpers
        if module_name not in SPECS:
            failures.append(f"{module_name}: no compile specs in tests/triton_specs.py")
            continue
        specs = SPECS[module_name]()
        missing = kernels - {fn.__name__ for fn, *_ in specs}
        if missing:
            failures.append(f"{module_name}: kernels without a compile spec: {sorted(missing)}")
        tasks += [(module_name, i, arch) for i in range(len(specs)) for arch in ARCHS]
    cores = len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    workers = max(1, min(cores, len(tasks)))
    if workers == 1:
        results = [lower(*task) for task in tasks]
    else:
        # spawn, not fork: a forked child would inherit the parent's imported Triton state
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(lower, *zip(*tasks)))
    failures += [r for r in results if r is not None]
    print(f"lowered {results.count(None)} kernel specialisations to PTX ({workers} processes)")
    if failures:
        print("\n".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
