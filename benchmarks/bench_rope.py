"""Benchmark fusedtx.rope against HF transformers' rotary embedding: eager and torch.compile.

    python benchmarks/bench_rope.py                    # full sweep on cuda (or cpu)
    python benchmarks/bench_rope.py --device cpu --quick --out /tmp/bench_test.csv

One kernel (the CSV's `kernel` column), `rope`: q or k of shape (B, H, T, D) rotated by Llama's
table (D = 128, theta 500000, llama3 scaling) at each token's position, T swept (prefill) and a
batch of one-token decode steps. Providers: fusedtx_native, fusedtx_triton, hf_eager (HF
apply_rotary_pos_emb's formula for one tensor, `x * cos + rotate_half(x) * sin`, with HF's
rotate_half and the (B, T, D) cos/sin in x's dtype gathered once outside the timer, as
LlamaRotaryEmbedding hands them to every layer), hf_compile (torch.compile of it).
fusedtx_triton runs only with compiled Triton on a CUDA GPU, never under the interpreter.

Modes: forward, backward (the gradient alone), full (both); see bench_softmax.py. Metric: GB/s,
counting the bytes the op must move once: forward reads x and writes y, backward reads dy and
writes dx, full all four (the table rows are small beside them and not counted).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import rotate_half

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import finish, parse_args  # noqa: E402
from results_csv import MODES, fusedtx, shape_str  # noqa: E402
from runner import Case, OpBench, run_benchmark  # noqa: E402
from summary import print_ratio_table, print_summary_header, print_target  # noqa: E402

KERNEL = "rope"
HEAD_DIM, THETA, MAX_POSITIONS = 128, 500000.0, 8192
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
BYTES_MOVED = {"forward": 2, "backward": 2, "full": 4}  # tensors of x's size read + written
CPU_HEADLINE = ("float32", (1, 32, 512, HEAD_DIM), "hf_eager", 1.0)


def make_cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type == "cuda"
    dtypes = (torch.float32, torch.bfloat16) if cuda else (torch.float32,)
    providers = ("fusedtx_native", "fusedtx_triton", "hf_eager", "hf_compile")
    if quick:
        shapes = [(1, 4, 16, 64), (4, 4, 1, 64)]
    elif cuda:
        shapes = [(1, 32, t, HEAD_DIM) for t in (512, 2048, 8192)] + [(64, 32, 1, HEAD_DIM), (64, 8, 1, HEAD_DIM)]
    else:
        shapes = [(1, 32, t, HEAD_DIM) for t in (128, 512, 2048)] + [(16, 32, 1, HEAD_DIM)]
    return [Case(KERNEL, s, dtype, "T", s[2], providers) for dtype in dtypes for s in shapes]


def positions_of(shape, device) -> torch.Tensor:
    """Each sequence's tokens at consecutive positions from a per-sequence offset (decode-like)."""
    batch, _, tokens, _ = shape
    start = (torch.arange(batch) * 37) % (MAX_POSITIONS - tokens)
    return (start[:, None] + torch.arange(tokens)).to(device)


def hf_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class RopeBench(OpBench):
    name = "rope"

    def make_inputs(self, case, device, requires_grad):
        x = torch.randn(case.shape, device=device, dtype=torch.float32).to(case.dtype)
        return [x.requires_grad_(requires_grad)]

    def make_fn(self, provider, case, device):
        cos, sin = fusedtx.rope_table(case.shape[-1], MAX_POSITIONS, THETA, LLAMA3, device=device)
        positions = positions_of(case.shape, device)
        if provider.startswith("fusedtx_"):
            backend = provider.removeprefix("fusedtx_")
            return lambda x: fusedtx.rope(x, positions, cos, sin, backend=backend)
        # HF's (B, 1, T, D) cos/sin in x's dtype (its cat of the half table with itself)
        full_cos = torch.cat([cos, cos], -1)[positions][:, None].to(case.dtype)
        full_sin = torch.cat([sin, sin], -1)[positions][:, None].to(case.dtype)
        if provider == "hf_eager":
            return lambda x: hf_rotate(x, full_cos, full_sin)
        if provider == "hf_compile":
            compiled = torch.compile(hf_rotate, dynamic=False)
            return lambda x: compiled(x, full_cos, full_sin)
        raise ValueError(f"unknown provider {provider!r}")

    def expected(self, inputs, case):
        (x,) = inputs
        cos, sin = fusedtx.rope_table(case.shape[-1], MAX_POSITIONS, THETA, LLAMA3, device=x.device)
        return fusedtx.rope(x.double(), positions_of(case.shape, x.device), cos, sin, backend="reference")

    def tolerance(self, case):
        return 1e-5 if case.dtype == torch.float32 else 2e-2

    def bytes_moved(self, case, mode):
        return BYTES_MOVED[mode] * math.prod(case.shape) * case.dtype.itemsize


def summarize(rows: list[dict], ceilings: dict, args) -> None:
    print_summary_header(ceilings, args)
    bw = print_ratio_table(rows, KERNEL, "hf_eager", "hf_compile")
    print()
    print("Headline targets (printed, not asserted):")
    dtype, shape, peer, target = CPU_HEADLINE
    for mode in MODES:
        key = (KERNEL, dtype, shape_str(shape), mode)
        print_target(f"{KERNEL} {dtype} {shape_str(shape)} {mode:8s}: fusedtx_native >= {target:.1f}x {peer}",
                     bw.get((*key, "fusedtx_native")), bw.get((*key, peer)), target)
    if args.quick:
        print("  (--quick: tiny sizes, so the headline shape was not measured)")


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    rec, ceilings = run_benchmark(RopeBench(), make_cases(args.device, args.quick), args)
    summarize(rec.rows, ceilings, args)
    finish(args, kernels=(KERNEL,))


if __name__ == "__main__":
    main()
