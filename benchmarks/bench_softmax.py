"""Benchmark fusedtx.softmax against PyTorch: eager, unfused, torch.compile.

    python benchmarks/bench_softmax.py                    # full sweep on cuda (or cpu)
    python benchmarks/bench_softmax.py --device cpu --quick --out /tmp/bench_test.csv

Two kernels (the CSV's `kernel` column):
  softmax         plain row softmax of a (rows, N) tensor, N swept; scale=None, causal=False.
                  Providers: fusedtx_native, fusedtx_triton, torch (torch.softmax eager),
                  torch_compile (torch.compile of torch.softmax). The unfused sequence is not run
                  here: without scale and mask it *is* torch.softmax.
  softmax_causal  attention-score softmax of a (B*H, T, T) tensor with scale=0.125, causal=True.
                  Providers: fusedtx_native, fusedtx_triton, torch_unfused (what users write
                  without fusedtx: `(x * scale).masked_fill(mask, -inf).softmax(-1)` with a
                  precomputed mask, as in nanoGPT), torch_compile_unfused (torch.compile of it).

fusedtx_triton runs only with compiled Triton on a CUDA GPU, never under the interpreter.

Modes:
  forward   y = f(x) on an x that does not require grad (inference; no autograd graph).
  backward  the gradient only: forward runs once per input copy outside the timer, then each
            repetition times torch.autograd.grad(y, x, dy, retain_graph=True). retain_graph keeps
            the graph for the next repetition; autograd.grad returns a fresh dx each time, so
            there is nothing to accumulate or clear.
  full      torch.autograd.grad(f(x), x, dy): forward and backward together.

Metric: GB/s, counting the bytes the op must move once (1e9 bytes per GB): forward reads x and
writes y (2 tensors), backward reads dy and y and writes dx (3), full 5. The masked half of a
causal input is counted too, and unfused providers are credited the same bytes even though
they move more, so the figures compare time on equal work. On CUDA the peak extra memory of one
call is recorded as well (metric peak_memory, MB).

At the end a summary prints fusedtx_native's ratio to the torch peers for every case and the
headline targets (printed, not asserted).
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

KERNEL_PLAIN = "softmax"
KERNEL_CAUSAL = "softmax_causal"
CAUSAL_SCALE = 0.125
BYTES_MOVED = {"forward": 2, "backward": 3, "full": 5}  # tensors of x's size read + written

# Headline targets, printed in the summary (not asserted).
CPU_PLAIN_HEADLINE = (KERNEL_PLAIN, "float32", (4096, 4096), "torch", 1.0)
CPU_CAUSAL_HEADLINE = (KERNEL_CAUSAL, "float32", (12, 1024, 1024), "torch_unfused", 2.0)
GPU_COPY_FRACTION = 0.85
GPU_HEADLINE_COLS = (1024, 65536)


def make_cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type == "cuda"
    dtypes = (torch.float32, torch.bfloat16) if cuda else (torch.float32,)
    plain = ("fusedtx_native", "fusedtx_triton", "torch", "torch_compile")
    causal = ("fusedtx_native", "fusedtx_triton", "torch_unfused", "torch_compile_unfused")
    if quick:
        plain_shapes = [(64, 256), (64, 1024)]
        causal_shapes = [(2, 128, 128)]
    elif cuda:
        plain_shapes = [(4096, n) for n in (1024, 2048, 4096, 8192, 16384, 32768, 65536)]
        causal_shapes = [(12, t, t) for t in (512, 1024, 2048, 4096)]
    else:
        # CPU: 4096 rows up to the 4096x4096 headline; beyond, fewer rows (64 MB of fp32 per
        # tensor) so the CPU run stays within a few minutes.
        plain_shapes = [(min(4096, (1 << 24) // n), n) for n in (256, 1024, 4096, 16384)]
        causal_shapes = [(12, 1024, 1024)]
    cases = []
    for dtype in dtypes:
        cases += [Case(KERNEL_PLAIN, s, dtype, "N", s[-1], plain) for s in plain_shapes]
        cases += [Case(KERNEL_CAUSAL, s, dtype, "T", s[-1], causal, (("scale", CAUSAL_SCALE), ("causal", True)))
                  for s in causal_shapes]
    return cases


def causal_mask(t_q: int, t_k: int, device) -> torch.Tensor:
    """True where query i must not see key j (j > i + t_k - t_q): fusedtx's causal convention."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).triu(t_k - t_q + 1)


def torch_unfused(x: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """The unfused sequence users write without fusedtx (nanoGPT's attention scores)."""
    s = x * scale
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    return s.softmax(-1)


def torch_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, -1)


class SoftmaxBench(OpBench):
    name = "softmax"

    def make_inputs(self, case, device, requires_grad):
        x = torch.randn(case.shape, device=device, dtype=torch.float32).to(case.dtype)
        return [x.requires_grad_(requires_grad)]

    def make_fn(self, provider, case, device):
        scale, causal = case.opt("scale"), case.opt("causal", False)
        mask = causal_mask(case.shape[-2], case.shape[-1], device) if causal else None
        unfused_scale = 1.0 if scale is None else scale
        if provider.startswith("fusedtx_"):
            backend = provider.removeprefix("fusedtx_")
            return lambda x: fusedtx.softmax(x, scale=scale, causal=causal, backend=backend)
        if provider == "torch":
            assert scale is None and not causal, "torch.softmax has no scale or mask"
            return torch_softmax
        if provider == "torch_unfused":
            return lambda x: torch_unfused(x, unfused_scale, mask)
        if provider == "torch_compile":
            return torch.compile(torch_softmax, dynamic=False)
        if provider == "torch_compile_unfused":
            return torch.compile(lambda x: torch_unfused(x, unfused_scale, mask), dynamic=False)
        raise ValueError(f"unknown provider {provider!r}")

    def expected(self, inputs, case):
        (x,) = inputs
        mask = causal_mask(x.shape[-2], x.shape[-1], x.device) if case.opt("causal") else None
        return torch_unfused(x.double(), case.opt("scale") or 1.0, mask)

    def tolerance(self, case):
        return 1e-5 if case.dtype == torch.float32 else 2e-2

    def bytes_moved(self, case, mode):
        return BYTES_MOVED[mode] * math.prod(case.shape) * case.dtype.itemsize


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
def summarize(rows: list[dict], ceilings: dict, args) -> None:
    """Print p50 GB/s per case with fusedtx's ratios to its peers, then the headlines."""
    copy_bw = ceilings.get("copy_bandwidth")
    print_summary_header(ceilings, args)
    bw = print_ratio_table(rows, KERNEL_PLAIN, "torch", "torch_compile")
    bw.update(print_ratio_table(rows, KERNEL_CAUSAL, "torch_unfused", "torch_compile_unfused"))
    print()
    print("Headline targets (printed, not asserted):")
    if args.device.type == "cpu":
        for kernel, dtype, shape, peer, target in (CPU_PLAIN_HEADLINE, CPU_CAUSAL_HEADLINE):
            shape_s = shape_str(shape)
            for mode in MODES:
                print_target(f"CPU {kernel} {dtype} {shape_s} {mode:8s}: fusedtx_native >= {target:.1f}x {peer}",
                             bw.get((kernel, dtype, shape_s, mode, "fusedtx_native")),
                             bw.get((kernel, dtype, shape_s, mode, peer)), target)
    else:
        print_bandwidth_targets(bw, KERNEL_PLAIN, {mode: GPU_COPY_FRACTION for mode in MODES},
                                copy_bw, GPU_HEADLINE_COLS)
    if args.quick:
        print("  (--quick: tiny sizes, so the headline shapes were not measured)")


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    rec, ceilings = run_benchmark(SoftmaxBench(), make_cases(args.device, args.quick), args)
    summarize(rec.rows, ceilings, args)
    finish(args, kernels=(KERNEL_PLAIN, KERNEL_CAUSAL))


if __name__ == "__main__":
    main()
