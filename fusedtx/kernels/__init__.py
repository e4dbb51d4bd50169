"""Triton kernels and their launchers: the "triton" backend (one module per op).

Importing this package imports triton. `@triton.jit` decides at decoration time whether a kernel
is compiled for a GPU or run by the interpreter (TRITON_INTERPRET=1, CPU tensors), so the mode
is fixed by the environment when this package is first imported; INTERPRETED records it.
fusedtx/ops imports this package lazily, so `import fusedtx` alone never imports triton.
"""
import os

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
