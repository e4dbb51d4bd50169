"""Backend selection (argument > use_backend / set_backend > FUSEDTX_BACKEND > device default),
its errors, and `fusedtx.info()` / `python -m fusedtx info`."""
import io
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedtx
from fusedtx import backends
from helpers import bitwise_equal


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    monkeypatch.setattr(backends, "_env_backend", None)  # FUSEDTX_BACKEND as read at import
    fusedtx.set_backend(None)
    yield
    fusedtx.set_backend(None)


CPU = torch.device("cpu")


def test_device_default():
    assert backends.resolve(None, CPU) == "native"
    assert backends.DEFAULT_BACKEND["cuda"] == "triton"


def test_precedence(monkeypatch):
    monkeypatch.setattr(backends, "_env_backend", "reference")
    assert backends.resolve(None, CPU) == "reference"                  # env var > default
    fusedtx.set_backend("native")
    assert backends.resolve(None, CPU) == "native"                     # set_backend > env var
    with fusedtx.use_backend("reference"):
        assert backends.resolve(None, CPU) == "reference"              # use_backend > set_backend
        assert backends.resolve("native", CPU) == "native"             # argument > everything
        with fusedtx.use_backend(None):                                # None: fall through
            assert backends.resolve(None, CPU) == "native"
        assert backends.resolve(None, CPU) == "reference"
    assert backends.resolve(None, CPU) == "native"
    fusedtx.set_backend(None)
    assert backends.resolve(None, CPU) == "reference"
    assert fusedtx.get_backend() == "reference"


def test_use_backend_restores_on_error():
    with pytest.raises(KeyError):
        with fusedtx.use_backend("reference"):
            raise KeyError
    assert fusedtx.get_backend() is None


def test_unknown_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="set_backend.*expected one of .*'cuda'"):
        fusedtx.set_backend("cuda")
    with pytest.raises(ValueError, match="use_backend"):
        with fusedtx.use_backend("fast"):
            pass
    monkeypatch.setattr(backends, "_env_backend", "tritonn")
    with pytest.raises(ValueError, match="FUSEDTX_BACKEND.*'tritonn'"):
        backends.resolve(None, CPU)


def test_the_selected_backend_is_the_one_that_runs(monkeypatch):
    """The switch really switches: count calls into each backend's implementation."""
    from fusedtx.ops import softmax as op

    calls = []
    real = op.forward_kernel
    monkeypatch.setattr(op, "forward_kernel", lambda b, device: calls.append(b) or real(b, device))
    x = torch.randn(3, 5)
    fusedtx.softmax(x)
    with fusedtx.use_backend("reference"):
        fusedtx.softmax(x)
    fusedtx.softmax(x, backend="reference")
    assert calls == ["native", "reference", "reference"]


def test_compiled_function_follows_backend_switch():
    """torch.compile guards on the selection: switching backend recompiles, never reuses a graph."""
    if not backends.is_available("triton", "cpu"):
        pytest.skip("needs two backends whose bits differ (triton interpreter vs native)")
    torch._dynamo.reset()
    # triton sums with 4096 lanes here, native with 64: some rows' bits differ
    x = torch.randn(64, 3000, generator=torch.Generator().manual_seed(0)) * 4
    assert not bitwise_equal(fusedtx.softmax(x, backend="native"), fusedtx.softmax(x, backend="triton"))
    f = torch.compile(lambda t: fusedtx.softmax(t), fullgraph=True, backend="aot_eager")
    with fusedtx.use_backend("native"):
        native = f(x)
    with fusedtx.use_backend("triton"):
        triton = f(x)
    assert bitwise_equal(native, fusedtx.softmax(x, backend="native"))
    assert bitwise_equal(triton, fusedtx.softmax(x, backend="triton"))


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.6", True),
    ("3.6.0+git1a2b3c", "2.4.0rc1", True),
    ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.6", False),
    ("3.9.0", "2.4.0", False),
])
def test_interpreter_defect_by_version(triton_version, numpy_version, broken):
    reason = backends.interpreter_defect(triton_version, numpy_version)
    assert (reason is not None) == broken
    if broken:
        assert triton_version in reason and numpy_version in reason and "numpy<2.4" in reason


def test_a_broken_interpreter_is_reported_not_run(monkeypatch):
    """Triton 3.6's interpreter under numpy >= 2.4 would fail inside triton on the first loop with
    runtime bounds; fusedtx reports the backend unavailable, saying why and what to install."""
    triton = pytest.importorskip("triton")
    import numpy

    monkeypatch.setattr(backends, "_interpreted", lambda: True)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert backends.triton_mode() == "interpreter"  # control: the same triton with an older numpy
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert backends.triton_mode().startswith("unavailable: the Triton 3.6.0 interpreter cannot run")
    assert not backends.is_available("triton", "cpu")
    with pytest.raises(backends.BackendUnavailableError, match=r"numpy<2.4 or triton>=3.7"):
        fusedtx.softmax(torch.randn(2, 8), backend="triton")


def test_native_extension_is_loaded():
    from fusedtx import _extension

    status = _extension.status()
    assert status.loaded, status.error
    assert status.how in ("ahead-of-time", "just-in-time")
    assert status.with_cuda == (torch.version.cuda is not None and status.with_cuda)


def expected_cpu_isa(flags: set[str], machine: str, march: str | None) -> str:
    """The instruction set csrc/cpu/isa.h picks for a build with this -march (None: the compiler's
    default target) on a CPU of this machine type (platform.machine()) with these /proc/cpuinfo
    flags."""
    if machine in ("aarch64", "arm64"):
        return "neon"  # NEON is part of armv8-a: every aarch64 target has it
    if march == "native" and {"avx512f", "avx512bw", "avx512vl", "fma"} <= flags:
        return "avx512"
    if march == "native" and {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "scalar"


def test_expected_cpu_isa_tells_the_paths_apart():
    """Negative control for the next test: the flag sets of the paths map apart."""
    avx2 = {"sse4_2", "avx", "avx2", "fma", "f16c"}
    assert expected_cpu_isa(avx2, "x86_64", "native") == "avx2"
    assert expected_cpu_isa(avx2 | {"avx512f", "avx512bw", "avx512vl"}, "x86_64", "native") == "avx512"
    assert expected_cpu_isa(avx2 | {"avx512f"}, "x86_64", "native") == "avx2"  # no BW/VL: the AVX2 path
    assert expected_cpu_isa(avx2 - {"fma"}, "x86_64", "native") == "scalar"
    assert expected_cpu_isa(avx2 | {"avx512f", "avx512bw", "avx512vl"}, "x86_64", None) == "scalar"
    assert expected_cpu_isa({"asimd", "fphp"}, "aarch64", "native") == "neon"


def test_extension_reports_the_cpu_isa_of_this_host():
    """The extension reports which vector path its CPU kernels run (fusedtx.info()'s
    extension.isa); a just-in-time build for the host (-march=native) or for the compiler's
    default target (FUSEDTX_MARCH=none) picks the path this host's CPU flags call for."""
    from fusedtx import _build_config, _extension

    status = _extension.status()
    assert status.cpu_isa in ("avx512", "avx2", "neon", "scalar")
    assert fusedtx.info(file=io.StringIO())["extension"]["isa"] == status.cpu_isa
    flags = _build_config.cpu_flags()
    if status.how != "just-in-time" or not flags:
        pytest.skip("the ahead-of-time build's flags are the build machine's")
    march = _build_config.march()
    if march not in ("native", None):
        pytest.skip(f"FUSEDTX_MARCH={march}: the path is the named target's, not the host's")
    assert status.cpu_isa == expected_cpu_isa(flags, platform.machine(), march), (status.cpu_isa, sorted(flags))


def test_info_reports_everything(capsys):
    report = fusedtx.info()
    printed = capsys.readouterr().out
    for key in ("fusedtx", "torch", "triton", "devices", "backends", "extension", "triton_mode", "attention_split_size"):
        assert key in report and key in printed
    assert "native" in report["backends"]["cpu"]
    assert report["attention_split_size"] == fusedtx.get_split_size()


def test_cli_info_runs():
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "fusedtx", "info"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "triton_mode" in out.stdout and "extension" in out.stdout


def test_split_size_setting(monkeypatch):
    assert fusedtx.get_split_size() == 256
    fusedtx.set_split_size(64)
    try:
        assert fusedtx.get_split_size() == 64
    finally:
        fusedtx.set_split_size(None)
    monkeypatch.setattr(fusedtx.config, "_env_split_size", "128")  # as read at import
    assert fusedtx.get_split_size() == 128
    for bad, err in ((100, ValueError), (8, ValueError), (64.0, TypeError), (True, TypeError)):
        with pytest.raises(err, match="split size"):
            fusedtx.set_split_size(bad)
    monkeypatch.setattr(fusedtx.config, "_env_split_size", "abc")
    with pytest.raises(ValueError, match="FUSEDTX_SPLIT_SIZE"):
        fusedtx.get_split_size()


def _extension_objects_without_library(tmp_path) -> Path:
    """A fresh TORCH_EXTENSIONS_DIR holding this process's compiled objects (mtimes kept) and no
    library, so that a process started with it builds the extension by ninja's up-to-date check
    and the link; the build from nothing is what this session's first native test did."""
    from torch.utils import cpp_extension

    from fusedtx import _extension

    status = _extension.status()
    if status.how == "ahead-of-time":
        pytest.skip("fusedtx._C was built ahead of time: no just-in-time build to test")
    assert status.loaded, status.error
    name = _extension._jit_name(status.with_cuda)
    built = Path(cpp_extension._get_build_directory(name, verbose=False))
    shutil.copytree(built, tmp_path / "ext" / name, ignore=shutil.ignore_patterns("*.so", "lock"))
    return tmp_path / "ext"


def test_two_processes_building_the_extension_at_once(tmp_path):
    """The just-in-time build is cached and locked: two processes that find no built library both
    get a working extension, one building it while the other waits on the lock."""
    ext = _extension_objects_without_library(tmp_path)
    start = tmp_path / "start"  # a barrier: both look for the library once both have imported torch
    start.mkdir()
    code = ("import os, pathlib, time, torch, fusedtx\n"
            "from fusedtx import _extension\n"
            f"start = pathlib.Path({str(start)!r}); (start / str(os.getpid())).touch()\n"
            "deadline = time.monotonic() + 300\n"
            "while len(list(start.iterdir())) < 2 and time.monotonic() < deadline: time.sleep(0.005)\n"
            "s = _extension.status(); assert s.loaded and s.how == 'just-in-time', s\n"
            "x = torch.randn(3, 100)\n"
            "assert torch.equal(fusedtx.softmax(x, backend='native'), fusedtx.softmax(x, backend='reference'))\n"
            "print('ok')\n")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "ok", err[-3000:]
    assert any("compiling the C++ extension" in err for _, err in outs), "neither process built the library"


def test_a_build_killed_mid_way_does_not_hang_the_next_load(tmp_path):
    """torch's build lock is a file that a builder killed mid-build leaves behind; fusedtx's own
    flock (released by the kernel when its holder dies) makes it removable: the next load goes on.
    Negative control: torch's loader alone waits on the stale file."""
    from fusedtx import _extension

    ext = _extension_objects_without_library(tmp_path)
    name = _extension._jit_name(_extension.status().with_cuda)
    (ext / name / "lock").touch()  # what a SIGKILLed builder leaves
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext))
    waits = ("from torch.utils import cpp_extension\n"
             f"cpp_extension.load({name!r}, [], is_python_module=False)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", waits], env=env, capture_output=True, timeout=15)
    code = "from fusedtx import _extension\ns = _extension.status()\nassert s.loaded, s.error\nprint('ok')\n"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    assert not (ext / name / "lock").exists()


def test_extension_builds_without_ninja_on_path(tmp_path):
    """`ninja` is a dependency, and the build finds the ninja package's binary when it is not on
    PATH (a virtual environment's python run without activating it). Negative control: with the
    package hidden, the same environment cannot build."""
    pytest.importorskip("ninja")
    ext = _extension_objects_without_library(tmp_path)
    bin_dir = tmp_path / "bin"  # PATH: the C++ compiler, assembler and linker, nothing else
    bin_dir.mkdir()
    for tool in ("c++", "g++", "gcc", "cc", "ld", "as"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext), PATH=str(bin_dir))
    code = ("import sys\n{hide}import torch, fusedtx\nfrom fusedtx import _extension\n"
            "s = _extension.status(); print(s.loaded); print(s.error, file=sys.stderr)\n")

    def run(hide: str):
        return subprocess.run([sys.executable, "-c", code.format(hide=hide)], env=env, capture_output=True,
                              text=True, timeout=600)

    hidden = run("sys.modules['ninja'] = None\n")
    assert hidden.stdout.strip() == "False" and "inja" in hidden.stderr, hidden.stdout + hidden.stderr[-2000:]
    found = run("")
    assert found.stdout.strip() == "True", found.stderr[-3000:]


def test_use_backend_blocks_closed_out_of_order_leave_no_selection(monkeypatch):
    """Thread A opens a block, thread B opens one, A closes, B closes: inside B's block after A
    closed, B's backend; after both, no selection. Negative control: restoring the value seen
    on entry (a plain save/restore) drops B's backend inside B's block and leaves A's selected
    after both."""
    import contextlib
    import threading

    backends.set_backend(None)

    def interleave(use):
        a_open, b_open, a_closed = threading.Event(), threading.Event(), threading.Event()
        seen = {}

        def a():
            with use("reference"):
                a_open.set()
                b_open.wait(10)
            a_closed.set()

        def b():
            a_open.wait(10)
            with use("native"):
                b_open.set()
                a_closed.wait(10)
                seen["inside"] = backends.get_backend()

        threads = [threading.Thread(target=a), threading.Thread(target=b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        return seen.get("inside"), backends.get_backend()

    assert interleave(fusedtx.use_backend) == ("native", None)

    @contextlib.contextmanager
    def save_restore(name):
        previous, backends._context_backend = backends._context_backend, name
        try:
            yield
        finally:
            backends._context_backend = previous

    try:
        assert interleave(save_restore) == (None, "reference")
    finally:
        backends._context_backend = None


def test_environment_is_read_once_at_import(monkeypatch):
    """FUSEDTX_BACKEND and FUSEDTX_SPLIT_SIZE take effect as set before fusedtx is imported
    (a fresh process), and changing them later changes nothing, in eager and compiled code
    alike (a compiled function cannot guard on os.environ)."""
    code = ("import os, torch, fusedtx\n"
            "print(fusedtx.get_backend(), fusedtx.get_split_size())\n"
            "os.environ['FUSEDTX_BACKEND'] = 'native'; os.environ['FUSEDTX_SPLIT_SIZE'] = '64'\n"
            "print(fusedtx.get_backend(), fusedtx.get_split_size())\n")
    env = dict(os.environ, FUSEDTX_BACKEND="reference", FUSEDTX_SPLIT_SIZE="32")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["reference", "32", "reference", "32"]
    monkeypatch.setattr(fusedtx.config, "_env_split_size", None)  # as if unset at import
    monkeypatch.setenv("FUSEDTX_BACKEND", "reference")
    monkeypatch.setenv("FUSEDTX_SPLIT_SIZE", "16")
    assert fusedtx.get_backend() is None and fusedtx.get_split_size() == 256
