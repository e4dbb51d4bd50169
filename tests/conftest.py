"""Test setup: Triton's interpreter on CPU-only machines, the (device, backend) matrix, and a
report of which (op, backend, dtype) combinations are bit-exact against fusedtx.reference."""
import os

import torch

# @triton.jit reads this when our kernels are first imported: set it before anything imports
# triton, so that the Triton kernels run (slowly) on CPU tensors when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import BITEXACT_LOG  # noqa: E402
from properties_gen import FUZZ_LOG  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Without -n, run on every logical CPU (pytest-xdist's `-n logical`: 2 workers on the 2-core
    CI host) when pytest-xdist is installed; -n0 runs serially (e.g. to debug one test). Set
    here rather than in addopts, so that an environment without pytest-xdist still runs the
    suite (serially) instead of rejecting -n. Runs before xdist's own hook, which resolves it."""
    if hasattr(config, "workerinput"):  # a worker: xdist resets its -n to None, keep it so
        return
    if getattr(config.option, "numprocesses", 0) is None:
        config.option.numprocesses = "logical"
    if getattr(config.option, "maxschedchunk", 0) is None:
        # xdist hands each worker a quarter of its share at the start (~300 tests here), so one
        # worker got the build tests' subprocesses (the extension build race, nvcc, the Triton
        # lowering) all together; chunks of at most 8 deal them out as workers free up.
        config.option.maxschedchunk = 8


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        # The pytest-xdist controller, before it starts the workers (which inherit the
        # environment): each worker keeps torch's default thread count, so that the native
        # kernels run threaded as they do in a serial run, but idle OpenMP threads sleep
        # instead of spinning. With N workers of N threads each on N cores, spinning threads
        # would take the cores from the other workers' work.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True)
def _emulated_cuda_threads_share_one_core(request):
    """Under pytest-xdist, run each CUDA-emulator test's threads on one core, a different core per
    worker. The emulator runs a block as one OS thread per CUDA thread, meeting at barriers
    thousands of times; spread over two cores while another worker's process holds one of them,
    every barrier waited for that core's time slice (a test ran many times slower). Threads inherit
    the affinity of the thread that starts them, so pinning the test's thread pins the block's
    threads; the other worker's processes, not pinned, move to the other core. Scheduling only:
    the emulated kernels compute the same bits."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if (not request.module.__name__.endswith("_cuda_emulated") or not worker.startswith("gw")
            or not hasattr(os, "sched_setaffinity")):
        yield
        return
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[int(worker[2:]) % len(cpus)]})
    try:
        yield
    finally:  # every thread of the process, so that no thread started meanwhile (OpenMP's) stays pinned
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:  # a thread that has exited since
                pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session):
    """Under pytest-xdist each worker keeps its own log: hand it to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["bitexact"] = [[*key, *counts] for key, counts in BITEXACT_LOG.items()]
        workeroutput["fuzz"] = {name: list(entry) for name, entry in FUZZ_LOG.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist controller: add a finished worker's bit-exactness counts to the report."""
    for *key, exact, total in getattr(node, "workeroutput", {}).get("bitexact", []):
        entry = BITEXACT_LOG[tuple(key)]
        entry[0] += exact
        entry[1] += total
    FUZZ_LOG.update(getattr(node, "workeroutput", {}).get("fuzz", {}))


def pytest_terminal_summary(terminalreporter):
    _fuzz_summary(terminalreporter)
    if not BITEXACT_LOG:
        return
    tr = terminalreporter
    tr.section("bitwise equality with fusedtx.reference (same algorithm, backend's lane count)")
    rows = sorted(BITEXACT_LOG.items())
    tr.write_line(f"{'op':<18}{'device':<8}{'backend':<11}{'dtype':<16}{'bit-exact':>10}{'cases':>7}")
    for (op, device, backend, dtype), (exact, total) in rows:
        mark = "yes" if exact == total else f"{exact}/{total}"
        tr.write_line(f"{op:<18}{device:<8}{backend:<11}{dtype:<16}{mark:>10}{total:>7}")


def _fuzz_summary(tr):
    """The property-based suite's seed and case count per property (tests/test_properties.py)."""
    if not FUZZ_LOG:
        return
    tr.section("property-based suite: cases per property (reproduce with FUSEDTX_FUZZ_SEED, FUSEDTX_FUZZ_CASE)")
    tr.write_line(f"{'property':<42}{'seed':>12}{'cases':>9}{'seconds':>9}  outcome")
    total = 0
    for name, (seed, cases, seconds, outcome) in sorted(FUZZ_LOG.items()):
        total += cases
        tr.write_line(f"{name:<42}{seed:>12}{cases:>9}{seconds:>9.1f}  {outcome}")
    tr.write_line(f"{'total':<42}{'':>12}{total:>9}")
