"""Benchmark fusedtx.swiglu_ffn against the Hugging Face LlamaMLP in PyTorch (eager and torch.compile).

    python benchmarks/bench_swiglu.py                  # full sweep on cuda (or cpu)
    python benchmarks/bench_swiglu.py --device cpu --quick --out /tmp/bench_test.csv

Kernel `swiglu_ffn`: y = down(silu(gate(x)) * up(x)), no biases, x (M, D), gate and up (H, D),
down (D, H), for the feed-forward shapes D -> H of SmolLM2-135M (576 -> 1536) and Qwen2.5-0.5B
(896 -> 4864), M swept from decode (1, 16) to prefill / training (128, 512). CSV shape = M x D x H.
Providers: fusedtx_native, fusedtx_triton (compiled, CUDA only): fusedtx.nn.SwiGLUFFN, the drop-in
module, on the same weights (its packed gate/up weight is made once per weight set when no
gradient flows to the weights, as in inference, and on every call in training); torch (what
LlamaMLP runs: F.linear x 3 and F.silu), torch_compile (torch.compile of the same).

Modes: forward (no autograd graph), backward (dx and the three weight gradients; forward once
outside the timer), full. Metric: TFLOP/s counting 2 M D H flops per matmul (forward three,
backward six); silu and the product are not counted. float32 on CPU; bfloat16 and float32 on CUDA.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_linear import summarize  # noqa: E402
from cli import finish, parse_args  # noqa: E402
from results_csv import fusedtx  # noqa: E402
from runner import Case, OpBench, run_benchmark  # noqa: E402

KERNELS = ("swiglu_ffn",)
MODEL_SHAPES = ((576, 1536), (896, 4864))  # (D, H): SmolLM2-135M, Qwen2.5-0.5B
BATCH_ROWS = (1, 16, 128, 512)
GPU_BATCH_ROWS = (1, 16, 1024, 4096)
CPU_TARGET = 1.0  # fusedtx_native / torch (HF's LlamaMLP), float32, M >= 128
GPU_TARGET = 0.9  # fusedtx_triton / torch (cuBLAS), bf16, M >= 1024
MATMULS = {"forward": 3, "backward": 6, "full": 9}


def make_cases(device: torch.device, quick: bool) -> list[Case]:
    providers = ("fusedtx_native", "fusedtx_triton", "torch", "torch_compile")
    if quick:
        sweeps = [(torch.float32, (1, 32), ((64, 96),))]
    elif device.type == "cuda":
        sweeps = [(torch.bfloat16, GPU_BATCH_ROWS, MODEL_SHAPES), (torch.float32, (4096,), MODEL_SHAPES)]
    else:
        sweeps = [(torch.float32, BATCH_ROWS, MODEL_SHAPES)]
    return [Case("swiglu_ffn", (m, d, h), dtype, "M", m,
                 providers if device.type != "cuda" or m >= 1024 else providers[:-1])
            for dtype, rows, shapes in sweeps for d, h in shapes for m in rows]


def hf_llama_mlp(x, gate, up, down):
    """LlamaMLP.forward: down_proj(act_fn(gate_proj(x)) * up_proj(x)), act_fn = silu."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _module_call(backend: str):
    """fn(x, gate, up, down) = fusedtx.nn.SwiGLUFFN on these weights (shared, not copied): one
    module per weight set, as a model has one per layer; the gradients reach gate, up and down."""
    modules = {}

    def call(x, gate, up, down):
        key = (id(gate), id(up), id(down))
        if key not in modules:
            h, d = gate.shape
            mod = fusedtx.nn.SwiGLUFFN(d, h, bias=False, device=x.device, dtype=x.dtype, backend=backend)
            for proj, weight in ((mod.gate_proj, gate), (mod.up_proj, up), (mod.down_proj, down)):
                del proj.weight  # the benchmark's tensor itself, so that autograd reaches it
                proj.weight = weight
            modules[key] = (mod, (gate, up, down))  # the tensors kept alive: their ids stay theirs
        return modules[key][0](x)

    return call


class SwigluBench(OpBench):
    name = "swiglu_ffn"
    metric, unit = "throughput", "TFLOP/s"

    def make_inputs(self, case, device, requires_grad):
        m, d, h = case.shape
        x = torch.randn(m, d, device=device).to(case.dtype)
        gate = (torch.randn(h, d, device=device) * d ** -0.5).to(case.dtype)
        up = (torch.randn(h, d, device=device) * d ** -0.5).to(case.dtype)
        down = (torch.randn(d, h, device=device) * h ** -0.5).to(case.dtype)
        return [t.requires_grad_(requires_grad) for t in (x, gate, up, down)]

    def make_fn(self, provider, case, device):
        if provider.startswith("fusedtx_"):
            return _module_call(provider.removeprefix("fusedtx_"))
        if provider == "torch":
            return hf_llama_mlp
        if provider == "torch_compile":
            return torch.compile(hf_llama_mlp, dynamic=False)
        raise ValueError(f"unknown provider {provider!r}")

    def expected(self, inputs, case):
        return hf_llama_mlp(*(t.double() for t in inputs))

    def amount(self, case, mode):
        m, d, h = case.shape
        return MATMULS[mode] * 2 * m * d * h / 1e12

    def bytes_moved(self, case, mode):  # sizes the rotating input copies (cold caches)
        m, d, h = case.shape
        return (2 * m * d + 3 * d * h + 3 * m * h) * case.dtype.itemsize * (2 if mode != "forward" else 1)

    def grad_shape(self, case):
        m, d, _ = case.shape
        return (m, d)

    def tolerance(self, case):
        return 1e-4 if case.dtype == torch.float32 else 5e-2


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    rec, ceilings = run_benchmark(SwigluBench(), make_cases(args.device, args.quick), args)
    summarize(rec.rows, ceilings, args, KERNELS, {"swiglu_ffn": CPU_TARGET}, GPU_TARGET)
    finish(args, kernels=KERNELS)


if __name__ == "__main__":
    main()
