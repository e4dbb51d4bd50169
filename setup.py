"""Build script: pure-Python install, plus `fusedtx._C` ahead of time when torch is importable.

`pip install -e .` (build isolation, no torch in the build environment) installs the Python
package in seconds and leaves the extension to the just-in-time path. `pip install
--no-build-isolation -e .` sees the installed torch and compiles `fusedtx._C` now, with the
CUDA sources when that torch has CUDA. Both paths take their source list and flags from
fusedtx/_build_config.py.
"""
import importlib.util
import json
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load_build_config():
    spec = importlib.util.spec_from_file_location("_fusedtx_build_config", ROOT / "fusedtx" / "_build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (as fusedtx/_csrc) so a wheel can still build just in time."""

    def run(self):
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib) / "fusedtx" / "_csrc"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ROOT / "csrc", target)


def _extensions():
    if os.environ.get("FUSEDTX_SKIP_BUILD"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    cfg = _load_build_config()
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    sources = [os.path.relpath(s, ROOT) for s in cfg.sources(with_cuda)]
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "fusedtx._C", sources,
            extra_compile_args={"cxx": cfg.cxx_flags(True), "nvcc": cfg.nvcc_flags()},
            extra_link_args=cfg.LD_FLAGS,
        )
    else:
        ext = cpp_extension.CppExtension(
            "fusedtx._C", sources,
            extra_compile_args={"cxx": cfg.cxx_flags(False)},
            extra_link_args=cfg.LD_FLAGS,
        )

    class BuildExtWithTarget(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """Records beside the module the CPU it was built for (-march), so that a machine
        lacking that instruction set builds just in time instead of loading it."""

        def run(self):
            super().run()
            for e in self.extensions:
                target = Path(self.get_ext_fullpath(e.name)).parent / cfg.TARGET_FILE
                target.write_text(json.dumps(cfg.build_target()) + "\n")

    return [ext], {"build_ext": BuildExtWithTarget}


ext_modules, cmdclass = _extensions()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
