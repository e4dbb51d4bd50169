"""Benchmark fusedtx.rms_norm against PyTorch: F.rms_norm eager and torch.compile.

    python benchmarks/bench_rms_norm.py                  # full sweep on cuda (or cpu)
    python benchmarks/bench_rms_norm.py --device cpu --quick --out /tmp/bench_test.csv

Kernel `rms_norm`: a (rows, N) activation normalised over N with a weight (of the activation's
dtype), N swept as bench_layer_norm.py sweeps it (its cases and summary). Headline targets on CPU:
fusedtx_native >= 1.0x F.rms_norm forward and backward, its forward >= 90 % of copy bandwidth.
Providers: fusedtx_native, fusedtx_triton (compiled on CUDA only), torch (F.rms_norm eager),
torch_compile (torch.compile of F.rms_norm).

Modes: forward (no autograd graph), backward (dx and dweight only; the forward runs once per
input copy outside the timer), full (both). Metric: GB/s counting every tensor read or written
once: forward reads x and weight and writes y and rstd; backward reads dy, x, weight and rstd
and writes dx and dweight.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layer_norm import make_cases, summarize  # noqa: E402
from cli import finish, parse_args  # noqa: E402
from results_csv import fusedtx  # noqa: E402
from runner import OpBench, run_benchmark  # noqa: E402

KERNEL = "rms_norm"
EPS = 1e-6  # Llama's
CPU_RATIO = 1.0          # fusedtx_native / F.rms_norm eager, float32, forward and backward
CPU_COPY_FRACTION = 0.9  # the forward's GB/s of the copy bandwidth (it is memory-bound)


class RMSNormBench(OpBench):
    name = "rms_norm"

    def make_inputs(self, case, device, requires_grad):
        rows, n = case.shape
        x = torch.randn(rows, n, device=device).to(case.dtype)
        w = (1.0 + 0.1 * torch.randn(n, device=device)).to(case.dtype)
        return [t.requires_grad_(requires_grad) for t in (x, w)]

    def make_fn(self, provider, case, device):
        n = case.shape[-1]
        if provider.startswith("fusedtx_"):
            backend = provider.removeprefix("fusedtx_")
            return lambda x, w: fusedtx.rms_norm(x, n, w, EPS, backend=backend)
        eager = lambda x, w: F.rms_norm(x, (n,), w, EPS)  # noqa: E731
        if provider == "torch":
            return eager
        if provider == "torch_compile":
            return torch.compile(eager, dynamic=False)
        raise ValueError(f"unknown provider {provider!r}")

    def expected(self, inputs, case):
        x, w = (t.double() for t in inputs)
        return F.rms_norm(x, (case.shape[-1],), w, EPS)

    def bytes_moved(self, case, mode):
        rows, n = case.shape
        s = case.dtype.itemsize
        forward = 2 * rows * n * s + n * s + rows * 4
        backward = 3 * rows * n * s + 2 * n * s + rows * 4
        return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    rec, ceilings = run_benchmark(RMSNormBench(), make_cases(args.device, args.quick, KERNEL), args)
    summarize(rec.rows, ceilings, args, KERNEL, CPU_RATIO, CPU_COPY_FRACTION)
    finish(args, kernels=(KERNEL,))


if __name__ == "__main__":
    main()
