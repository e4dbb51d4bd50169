"""Lower every Triton kernel of fusedtx to PTX for sm_80 and sm_90, without a GPU.

Run by tests/test_build.py in a subprocess without TRITON_INTERPRET (the interpreter would
replace the kernels). Each fusedtx/kernels/<op>.py lists its kernels' specialisations in
compile_specs(); every @triton.jit kernel of such a module must appear there (helpers that
kernels call are listed in the module's JIT_HELPERS).
"""
import importlib
import os
import pkgutil
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import fusedtx.kernels  # noqa: E402
from fusedtx.kernels._common import LAUNCH_OPTIONS  # noqa: E402

failures, lowered = [], 0
for info in pkgutil.iter_modules(fusedtx.kernels.__path__):
    if info.name.startswith("_"):
        continue  # shared @jit helpers: inlined into the kernels below
    module = importlib.import_module(f"fusedtx.kernels.{info.name}")
    helpers = set(getattr(module, "JIT_HELPERS", ()))  # @jit functions called by kernels, never launched
    kernels = {name for name, obj in vars(module).items()
               if isinstance(obj, triton.runtime.JITFunction) and obj.__module__ == module.__name__} - helpers
    specs = module.compile_specs()
    missing = kernels - {fn.__name__ for fn, *_ in specs}
    if missing:
        failures.append(f"{info.name}: kernels without a compile spec: {sorted(missing)}")
    for fn, signature, constexprs, options in specs:
        for arch in (80, 90):
            try:
                compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                          options={**LAUNCH_OPTIONS, **options})
                assert ".entry" in compiled.asm["ptx"]
                lowered += 1
            except Exception as exc:  # report every failure, not just the first
                failures.append(f"{info.name}.{fn.__name__} sm_{arch} {constexprs}: {type(exc).__name__}: {exc}")
print(f"lowered {lowered} kernel specialisations to PTX")
if failures:
    print("\n".join(failures))
    sys.exit(1)
