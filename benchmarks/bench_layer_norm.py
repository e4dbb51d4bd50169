"""Benchmark fusedtx.layer_norm against PyTorch: F.layer_norm eager and torch.compile.

    python benchmarks/bench_layer_norm.py                  # full sweep on cuda (or cpu)
    python benchmarks/bench_layer_norm.py --device cpu --quick --out /tmp/bench_test.csv

Kernel `layer_norm`: a (rows, N) activation normalised over N with an affine weight and bias
(all of one dtype), N swept. Providers: fusedtx_native, fusedtx_triton (compiled on CUDA only),
torch (F.layer_norm eager), torch_compile (torch.compile of F.layer_norm).

Modes: forward (no autograd graph), backward (dx, dweight and dbias only; the forward runs once
per input copy outside the timer), full (both). Metric: GB/s counting every tensor read or
written once: forward reads x, weight, bias and writes y, mean, rstd; backward reads dy, x,
weight, mean, rstd and writes dx, dweight, dbias.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import finish, parse_args  # noqa: E402
from results_csv import fusedtx, shape_str  # noqa: E402
from runner import Case, OpBench, run_benchmark  # noqa: E402
from summary import print_bandwidth_targets, print_ratio_table, print_summary_header, print_target  # noqa: E402

KERNEL = "layer_norm"
CPU_HEADLINE_SHAPES = ((4096, 768), (4096, 4096))
CPU_HEADLINE_RATIO = 2.0
GPU_FRACTIONS = {"forward": 0.85, "backward": 0.70}


def make_cases(device: torch.device, quick: bool, kernel: str = KERNEL) -> list[Case]:
    """The sweep of a row normalisation (bench_rms_norm.py takes it too)."""
    cuda = device.type == "cuda"
    providers = ("fusedtx_native", "fusedtx_triton", "torch", "torch_compile")
    if quick:
        shapes = [(64, 256), (64, 768)]
    elif cuda:
        shapes = [(4096, n) for n in (768, 1024, 2048, 4096, 8192, 16384)]
    else:
        shapes = [(4096, 768), (4096, 1024), (4096, 4096)]
    dtypes = (torch.float32, torch.bfloat16) if cuda else (torch.float32,)
    return [Case(kernel, s, dtype, "N", s[-1], providers) for dtype in dtypes for s in shapes]


class LayerNormBench(OpBench):
    name = "layer_norm"

    def make_inputs(self, case, device, requires_grad):
        rows, n = case.shape
        x = torch.randn(rows, n, device=device).to(case.dtype)
        w = (1.0 + 0.1 * torch.randn(n, device=device)).to(case.dtype)
        b = (0.1 * torch.randn(n, device=device)).to(case.dtype)
        return [t.requires_grad_(requires_grad) for t in (x, w, b)]

    def make_fn(self, provider, case, device):
        n = case.shape[-1]
        if provider.startswith("fusedtx_"):
            backend = provider.removeprefix("fusedtx_")
            return lambda x, w, b: fusedtx.layer_norm(x, n, w, b, backend=backend)
        eager = lambda x, w, b: F.layer_norm(x, (n,), w, b)  # noqa: E731
        if provider == "torch":
            return eager
        if provider == "torch_compile":
            return torch.compile(eager, dynamic=False)
        raise ValueError(f"unknown provider {provider!r}")

    def expected(self, inputs, case):
        x, w, b = (t.double() for t in inputs)
        return F.layer_norm(x, (case.shape[-1],), w, b)

    def bytes_moved(self, case, mode):
        rows, n = case.shape
        s = case.dtype.itemsize
        forward = 2 * rows * n * s + 2 * n * s + 2 * rows * 4
        backward = 3 * rows * n * s + 3 * n * s + 2 * rows * 4
        return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


def summarize(rows: list[dict], ceilings: dict, args, kernel: str = KERNEL, cpu_ratio: float = CPU_HEADLINE_RATIO,
              cpu_copy_fraction: float | None = None) -> None:
    """The ratio table and headline targets of a row normalisation (bench_rms_norm.py's too): on
    CPU fusedtx_native >= cpu_ratio x torch eager at the headline shapes, and, if given, its
    forward >= cpu_copy_fraction of the copy bandwidth there."""
    copy_bw = ceilings.get("copy_bandwidth")
    print_summary_header(ceilings, args)
    bw = print_ratio_table(rows, kernel, "torch", "torch_compile")
    print()
    print("Headline targets (printed, not asserted):")
    if args.device.type == "cpu":
        for shape in CPU_HEADLINE_SHAPES:
            shape_s = shape_str(shape)
            for mode in ("forward", "backward"):
                print_target(f"CPU {kernel} float32 {shape_s} {mode:8s}: fusedtx_native >= "
                             f"{cpu_ratio:.1f}x torch eager",
                             bw.get((kernel, "float32", shape_s, mode, "fusedtx_native")),
                             bw.get((kernel, "float32", shape_s, mode, "torch")), cpu_ratio)
            if cpu_copy_fraction is not None:
                print_target(f"CPU {kernel} float32 {shape_s} forward : fusedtx_native >= {cpu_copy_fraction:.0%} "
                             "of copy bandwidth", bw.get((kernel, "float32", shape_s, "forward", "fusedtx_native")),
                             copy_bw, cpu_copy_fraction, unit="%")
    else:
        print_bandwidth_targets(bw, kernel, GPU_FRACTIONS, copy_bw)
    if args.quick:
        print("  (--quick: tiny sizes, so the headline shapes were not measured)")


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    rec, ceilings = run_benchmark(LayerNormBench(), make_cases(args.device, args.quick), args)
    summarize(rec.rows, ceilings, args)
    finish(args, kernels=(KERNEL,))


if __name__ == "__main__":
    main()
