"""Lower every Triton kernel of fusedtx to PTX for sm_80 and sm_90, without a GPU, and check that
each fits the shared memory of every device it may run on (SHARED_MEMORY_LIMIT) and spills no
more registers than its budget (SPILL_BUDGETS).

Run by tests/test_build.py in a subprocess without TRITON_INTERPRET (the interpreter would
replace the kernels); run it by hand (`PYTHONPATH=. python tests/_lower_triton.py --table`) to
print every kernel's worst spills and registers per target under the Triton installed, e.g. a
second Triton version in its own virtual environment (`--only fusedtx.kernels.<op>`: one
module's kernels). tests/triton_specs.py lists the
specialisations of each fusedtx/kernels/<op>.py; every @triton.jit kernel of such a module must
appear there (helpers that kernels call are listed in the module's JIT_HELPERS).

Spills are read from Triton's own build: its backend's make_cubin runs the ptxas Triton bundles
for the target (sm_80, sm_90a) with Triton's flags and `-v`, and prints the log when asked
(knobs.nvidia.dump_ptxas_log); we parse that. A compile that Triton's cache answers runs no
ptxas, so then we run make_cubin on the cached PTX once more. (The compiled kernel's metadata
carries no register or spill counts until it is loaded on a device, and the ptxas of a system
CUDA may not read the PTX version a newer Triton emits.)

The (specialisation, arch) compilations, from a cold Triton cache on CI, are spread over one
worker process per core, or per core left to this pytest-xdist worker
(PYTEST_XDIST_WORKER_COUNT, inherited from the test): the other workers keep their cores busy,
and more compiling processes than cores spend more CPU on the same work. With one process left,
this process compiles them itself.
"""
import concurrent.futures
import contextlib
import importlib
import io
import multiprocessing
import os
import pkgutil
import re
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

import fusedtx.kernels  # noqa: E402
from fusedtx.kernels._common import LAUNCH_OPTIONS  # noqa: E402
from triton_specs import SPECS  # noqa: E402

ARCHS = (80, 90)
# Shared memory one block may use (bytes), the strictest device of each compile target: sm_80
# code also runs on sm_86 / sm_89 (RTX 30 / 40, L40: 99 KiB, below the A100's 163 KiB), sm_90 on
# the H100 / H200 (227 KiB). A kernel above it compiles but raises OutOfResources at launch.
SHARED_MEMORY_LIMIT = {80: 101_376, 90: 232_448}

# Register spills a thread may have, bytes of spill stores + spill loads (ptxas -v), the worst
# specialisation of the kernel per target, under every Triton version the project supports
# (3.6 and 3.9). A kernel not listed may spill nothing. Spilled registers go to local memory
# (L1, else L2 / DRAM): in a hot loop they cost bandwidth that the kernel is bound by.
# The matmul and the attention forward (prefill and decode) are the hot kernels: zero.
SPILL_BUDGETS = {
    # kernel: ({arch: bytes}, why)
    "_layer_norm_bwd_dx_fused": ({80: 3280, 90: 3592}, (
        "16384-column rows only: the row's x, dy, w, xhat, g and the dw/db partials, 16 float32 each "
        "a thread at 1024 threads, where the register file gives 1024 threads 64 registers each")),
    "_rms_norm_bwd_dx_fused": ({80: 2332, 90: 2280}, (
        "16384-column rows only: layer_norm's backward body without the mean (kernels/_row_norm.py): "
        "x, dy, w, xhat, g and the dw partial, 16 float32 each a thread at 1024 threads, 64 registers "
        "(Triton 3.6 spills most)")),
    "_layer_norm_fwd": ({80: 128, 90: 252}, (
        "16384-column rows only, worst on the looped path: the block of x, the deviation sum and the "
        "compensated square sum's (sum, error) lanes, 16 float32 each a thread at 1024 threads, 64 "
        "registers")),
    "_softmax_fwd": ({90: 88}, "16384-column rows only: 32 float32 of each row vector a thread, 128 registers"),
    "_softmax_bwd": ({90: 432}, "16384-column rows only: y and dy, 32 float32 each a thread, 128 registers"),
    "_log_softmax_bwd": ({90: 80}, "16384-column rows only: softmax's backward body, y and dy, 32 float32 each a "
                                   "thread, 128 registers (measured under Triton 3.9; loading y after the row sum "
                                   "changed nothing)"),
    "_attn_bwd_dkdv": ({80: 80, 90: 128}, (
        "float32 D = 64 (sm_80 Triton 3.9, sm_90 Triton 3.6) and bf16/fp16 D = 128 (Triton 3.6): the "
        "program's dk and dv accumulators, the FMA dot's whole operand slices, and masked_dot's select "
        "and non-finite test on the streamed q and dO tiles")),
}


def kernel_modules():
    """fusedtx.kernels.<op> modules (not the shared _helpers, which are inlined into kernels)."""
    return [f"fusedtx.kernels.{info.name}" for info in pkgutil.iter_modules(fusedtx.kernels.__path__)
            if not info.name.startswith("_")]


@contextlib.contextmanager
def ptxas_log(into: io.StringIO):
    """Triton's make_cubin prints its ptxas -v log (to sys.stdout) while this is open."""
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(into):
            yield
    finally:
        knobs.nvidia.dump_ptxas_log = False


def ptxas_usage(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) a thread of the one kernel in a ptxas -v log."""
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.findall(r"Used (\d+) registers", log)
    if len(spills) != 1 or len(regs) != 1:
        raise RuntimeError(f"cannot read one kernel's registers and spills from the ptxas log:\n{log}")
    return int(regs[0]), int(spills[0][0]), int(spills[0][1])


def lower(module_name: str, index: int, arch: int) -> dict:
    """Compile SPECS[module_name]()[index] for sm_<arch>: its resources, or what went wrong."""
    fn, signature, constexprs, options, *attrs = SPECS[module_name]()[index]
    options = {**LAUNCH_OPTIONS, **options}
    attrs = attrs[0] if attrs else None
    pointers = ",".join(dict.fromkeys(t for t in signature.values() if t.startswith("*")))
    odd = [name for i, name in enumerate(signature) if signature[name] == "i32" and (i,) not in (attrs or {})]
    result = {"kernel": fn.__name__, "arch": arch,
              "where": (f"{module_name}.{fn.__name__}({pointers}{'' if attrs is None else ' aligned'}"
                        f"{', not: ' + ' '.join(odd) if attrs is not None and odd else ''}) sm_{arch} "
                        f"{constexprs} {options}"),
              "error": None}
    try:
        target = GPUTarget("cuda", arch, 32)
        log = io.StringIO()
        with ptxas_log(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
            assert ".entry" in compiled.asm["ptx"]
            if "spill stores" not in log.getvalue():  # from Triton's cache: its ptxas did not run, run it
                backend = make_backend(target)
                backend.make_cubin(compiled.asm["ptx"], {}, backend.parse_options(options), arch)
        regs, stores, loads = ptxas_usage(log.getvalue())
        result.update(shared=compiled.metadata.shared, registers=regs, spills=stores + loads)
    except Exception as exc:  # report every failure, not just the first
        result["error"] = f"{result['where']}: {type(exc).__name__}: {exc}"
    return result


def check(result: dict) -> list[str]:
    """What in one lowering breaks a limit."""
    if result["error"]:
        return [result["error"]]
    arch, problems = result["arch"], []
    if result["shared"] > SHARED_MEMORY_LIMIT[arch]:
        problems.append(f"{result['where']}: needs {result['shared']} bytes of shared memory a block, over the "
                        f"{SHARED_MEMORY_LIMIT[arch]} of the smallest sm_{arch} target: it cannot launch")
    budgets, why = SPILL_BUDGETS.get(result["kernel"], ({}, "none"))
    budget = budgets.get(arch, 0)
    if result["spills"] > budget:
        problems.append(f"{result['where']}: spills {result['spills']} bytes of registers a thread (ptxas -v "
                        f"stores + loads, {result['registers']} registers), over its budget of {budget} "
                        f"(SPILL_BUDGETS, reason: {why})")
    return problems


def table(results: list[dict]) -> str:
    """Per kernel and target: the worst spills over its specialisations, and the most registers."""
    rows, worst = [], {}
    for r in results:
        if r["error"] is None:
            key = (r["kernel"], r["arch"])
            spills, regs = worst.get(key, (-1, 0))
            worst[key] = (max(spills, r["spills"]), max(regs, r["registers"]))
    rows.append(f"Triton {triton.__version__}: spill bytes a thread (stores + loads, worst specialisation) / "
                "registers (most), budget")
    for (kernel, arch), (spills, regs) in sorted(worst.items()):
        budget = SPILL_BUDGETS.get(kernel, ({}, ""))[0].get(arch, 0)
        rows.append(f"  {kernel:28s} sm_{arch}  {spills:6d} / {regs:3d}   budget {budget}")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    failures, tasks = [], []
    # --only MODULE[,MODULE...]: lower those kernel modules alone (e.g. fusedtx.kernels.log_softmax)
    only = set(argv[argv.index("--only") + 1].split(",")) if "--only" in argv else None
    for module_name in kernel_modules():
        if only is not None and module_name not in only:
            continue
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
    for r in results:
        failures += check(r)
    lowered = sum(r["error"] is None for r in results)
    print(f"lowered {lowered} kernel specialisations to PTX and ptxas ({workers} processes)")
    if "--all" in argv:
        for r in results:
            if r["error"] is None:
                print(f"{r['spills']:6d} {r['registers']:3d}  {r['where']}")
    if "--table" in argv or "--all" in argv:
        print(table(results))
    if failures:
        print("\n".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
