"""Benchmark fusedtx.linear (and its fused GELU epilogue) against PyTorch: F.linear, F.gelu, torch.compile.

    python benchmarks/bench_linear.py                  # full sweep on cuda (or cpu)
    python benchmarks/bench_linear.py --device cpu --quick --out /tmp/bench_test.csv

Kernels: `linear` (y = x @ W.T + b) and `linear_gelu` (y = gelu(x @ W.T + b), the GPT-2 c_fc with
its tanh GELU); x (M, K), W (N, K) for the GPT-2 small shapes K -> N = 768 -> 768 (attention
c_proj), 768 -> 3072 (c_fc), 3072 -> 768 (mlp c_proj), M swept from the decode regime (1, 16)
to prefill/training (128 ... 2048). CSV shape = M x K x N.
Providers: fusedtx_native, fusedtx_triton (compiled, CUDA only), torch (F.linear, plus F.gelu
for linear_gelu: what an unfused model runs), torch_compile (torch.compile of the same).

Modes: forward (no autograd graph), backward (dx, dW, db; forward once outside the timer),
full. Metric: TFLOP/s counting 2 M N K flops per matmul (forward one, backward two); the bias
and GELU are not counted. float32 on CPU; float32 and bfloat16 on CUDA.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import finish, parse_args  # noqa: E402
from results_csv import device_name, fusedtx  # noqa: E402
from runner import Case, OpBench, run_benchmark  # noqa: E402
from summary import print_ratio_table, print_target  # noqa: E402

KERNELS = ("linear", "linear_gelu")
LAYER_SHAPES = ((768, 768), (768, 3072), (3072, 768))  # (K, N)
BATCH_ROWS = (1, 16, 128, 512, 2048)
GPU_BATCH_ROWS = (1, 16, 128, 1024, 4096)
CPU_TARGETS = {"linear": 0.7, "linear_gelu": 1.0}  # fusedtx_native / torch, float32, M >= 128
GPU_TARGET = 0.9                                      # fusedtx_triton / torch (cuBLAS), bf16, M >= 1024
MATMULS = {"forward": 1, "backward": 2, "full": 3}


def make_cases(device: torch.device, quick: bool) -> list[Case]:
    providers = ("fusedtx_native", "fusedtx_triton", "torch", "torch_compile")
    if quick:
        sweeps = [(torch.float32, (1, 32), ((64, 96),))]
    elif device.type == "cuda":  # sized for the few minutes a lent GPU gives every benchmark
        sweeps = [(torch.bfloat16, GPU_BATCH_ROWS, LAYER_SHAPES), (torch.float32, (128, 4096), LAYER_SHAPES)]
    else:
        sweeps = [(torch.float32, BATCH_ROWS, LAYER_SHAPES)]
    # On CUDA torch.compile runs at the headline sizes only: compiling every size would take the
    # lent GPU's time.
    return [Case(kernel, (m, k, n), dtype, "M", m,
                 providers if device.type != "cuda" or m >= 1024 else providers[:-1])
            for kernel in KERNELS for dtype, rows, layers in sweeps for k, n in layers for m in rows]


class LinearBench(OpBench):
    name = "linear"
    metric, unit = "throughput", "TFLOP/s"

    def make_inputs(self, case, device, requires_grad):
        m, k, n = case.shape
        x = torch.randn(m, k, device=device).to(case.dtype)
        w = (torch.randn(n, k, device=device) * k ** -0.5).to(case.dtype)
        b = (0.1 * torch.randn(n, device=device)).to(case.dtype)
        return [t.requires_grad_(requires_grad) for t in (x, w, b)]

    def make_fn(self, provider, case, device):
        activation = "gelu_tanh" if case.kernel == "linear_gelu" else None
        if provider.startswith("fusedtx_"):
            backend = provider.removeprefix("fusedtx_")
            return lambda x, w, b: fusedtx.linear(x, w, b, activation=activation, backend=backend)
        if activation:
            eager = lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh")  # noqa: E731
        else:
            eager = F.linear
        if provider == "torch":
            return eager
        if provider == "torch_compile":
            return torch.compile(eager, dynamic=False)
        raise ValueError(f"unknown provider {provider!r}")

    def expected(self, inputs, case):
        y = F.linear(*(t.double() for t in inputs))
        return F.gelu(y, approximate="tanh") if case.kernel == "linear_gelu" else y

    def amount(self, case, mode):
        m, k, n = case.shape
        return MATMULS[mode] * 2 * m * n * k / 1e12

    def bytes_moved(self, case, mode):  # sizes the rotating input copies (cold caches)
        m, k, n = case.shape
        return (m * k + n * k + m * n) * case.dtype.itemsize * MATMULS[mode]

    def grad_shape(self, case):
        m, _, n = case.shape
        return (m, n)

    def tolerance(self, case):
        return 1e-4 if case.dtype == torch.float32 else 5e-2


def summarize(rows: list[dict], ceilings: dict, args, kernels: tuple = KERNELS, cpu_targets: dict = CPU_TARGETS,
              gpu_target: float = GPU_TARGET) -> None:
    """The ratio tables and headline targets of matmul kernels (bench_swiglu.py's too): on CPU
    fusedtx_native >= cpu_targets[kernel] x torch in float32 from M = 128, on CUDA
    fusedtx_triton >= gpu_target x torch in bfloat16 from M = 1024."""
    mm = ceilings.get("matmul")
    print()
    print(f"Summary: p50 TFLOP/s on {device_name(args.device)}"
          + (f"; matmul ceiling (torch.mm) {mm:.3f} TFLOP/s" if mm else ""))
    rates = {}
    for kernel in kernels:
        rates.update(print_ratio_table(rows, kernel, "torch", "torch_compile", metric="throughput"))
    print()
    print("Headline targets (printed, not asserted):")
    cpu = args.device.type == "cpu"
    provider, dtype = ("fusedtx_native", "float32") if cpu else ("fusedtx_triton", "bfloat16")
    for kernel in kernels:
        target = cpu_targets[kernel] if cpu else gpu_target
        min_rows = 128 if cpu else 1024
        for (kern, dt, shape, mode, prov), ours in sorted(rates.items()):
            m = int(shape.split("x")[0])
            if (kern, dt, prov) != (kernel, dtype, provider) or m < min_rows:
                continue
            print_target(f"{'CPU' if cpu else 'GPU'} {kernel} {dtype} {shape:>14s} {mode:8s}: {provider} >= "
                         f"{target:.1f}x torch", ours, rates.get((kern, dt, shape, mode, "torch")), target)
    if args.quick:
        print("  (--quick: tiny sizes, so the headline shapes were not measured)")


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    rec, ceilings = run_benchmark(LinearBench(), make_cases(args.device, args.quick), args)
    summarize(rec.rows, ceilings, args)
    finish(args, kernels=KERNELS)


if __name__ == "__main__":
    main()
