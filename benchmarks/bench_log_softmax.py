"""Benchmark fusedtx.log_softmax against PyTorch: eager and torch.compile.

    python benchmarks/bench_log_softmax.py                    # full sweep on cuda (or cpu)
    python benchmarks/bench_log_softmax.py --device cpu --quick --out /tmp/bench_test.csv

One kernel (the CSV's `kernel` column), log_softmax: the row log_softmax of a (rows, N) tensor,
N swept (the shapes of bench_softmax.py's plain softmax, and a (tokens, vocab) one: the
log-probabilities of a language model's logits). Providers: fusedtx_native, fusedtx_triton (only
compiled Triton on a CUDA GPU, never under the interpreter), torch (torch.log_softmax eager),
torch_compile (torch.compile of it).

Modes, metric and byte counts as bench_softmax.py: forward reads x and writes y (2 tensors),
backward reads dy and y and writes dx (3), full 5; GB/s at 1e9 bytes per GB. The summary prints
fusedtx_native's ratio to the torch peers for every case and the headline targets (printed, not
asserted).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import finish, parse_args  # noqa: E402
from results_csv import MODES, fusedtx, shape_str  # noqa: E402
from runner import Case, OpBench, run_benchmark  # noqa: E402
from summary import print_bandwidth_targets, print_ratio_table, print_summary_header, print_target  # noqa: E402

KERNEL = "log_softmax"
BYTES_MOVED = {"forward": 2, "backward": 3, "full": 5}  # tensors of x's size read + written
PROVIDERS = ("fusedtx_native", "fusedtx_triton", "torch", "torch_compile")

# Headline targets, printed in the summary (not asserted).
CPU_HEADLINE = ("float32", (4096, 4096), "torch", 1.0)
GPU_COPY_FRACTION = 0.85
GPU_HEADLINE_COLS = (1024, 65536)


def make_cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type == "cuda"
    dtypes = (torch.float32, torch.bfloat16) if cuda else (torch.float32,)
    if quick:
        shapes = [(64, 256), (64, 1024)]
    elif cuda:
        shapes = [(4096, n) for n in (1024, 2048, 4096, 8192, 16384, 32768, 65536)] + [(2048, 151936)]
    else:
        shapes = [(min(4096, (1 << 24) // n), n) for n in (256, 1024, 4096, 16384)] + [(128, 49152)]
    return [Case(KERNEL, s, dtype, "N", s[-1], PROVIDERS) for dtype in dtypes for s in shapes]


def torch_log_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x, -1)


class LogSoftmaxBench(OpBench):
    name = "log_softmax"

    def make_inputs(self, case, device, requires_grad):
        x = torch.randn(case.shape, device=device, dtype=torch.float32).to(case.dtype)
        return [x.requires_grad_(requires_grad)]

    def make_fn(self, provider, case, device):
        if provider.startswith("fusedtx_"):
            backend = provider.removeprefix("fusedtx_")
            return lambda x: fusedtx.log_softmax(x, backend=backend)
        if provider == "torch":
            return torch_log_softmax
        if provider == "torch_compile":
            return torch.compile(torch_log_softmax, dynamic=False)
        raise ValueError(f"unknown provider {provider!r}")

    def expected(self, inputs, case):
        return torch_log_softmax(inputs[0].double())

    def tolerance(self, case):
        return 1e-5 if case.dtype == torch.float32 else 2e-2

    def bytes_moved(self, case, mode):
        return BYTES_MOVED[mode] * math.prod(case.shape) * case.dtype.itemsize


def summarize(rows: list[dict], ceilings: dict, args) -> None:
    """Print p50 GB/s per case with fusedtx's ratios to its peers, then the headlines."""
    print_summary_header(ceilings, args)
    bw = print_ratio_table(rows, KERNEL, "torch", "torch_compile")
    print()
    print("Headline targets (printed, not asserted):")
    if args.device.type == "cpu":
        dtype, shape, peer, target = CPU_HEADLINE
        for mode in MODES:
            print_target(f"CPU {KERNEL} {dtype} {shape_str(shape)} {mode:8s}: fusedtx_native >= {target:.1f}x {peer}",
                         bw.get((KERNEL, dtype, shape_str(shape), mode, "fusedtx_native")),
                         bw.get((KERNEL, dtype, shape_str(shape), mode, peer)), target)
    else:
        print_bandwidth_targets(bw, KERNEL, {mode: GPU_COPY_FRACTION for mode in MODES}, ceilings.get("copy_bandwidth"),
                                GPU_HEADLINE_COLS)
    if args.quick:
        print("  (--quick: tiny sizes, so the headline shapes were not measured)")


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    rec, ceilings = run_benchmark(LogSoftmaxBench(), make_cases(args.device, args.quick), args)
    summarize(rec.rows, ceilings, args)
    finish(args, kernels=(KERNEL,))


if __name__ == "__main__":
    main()
