"""Benchmark fusedtx causal attention against PyTorch's scaled_dot_product_attention.

    python benchmarks/bench_attention.py                  # full sweep on cuda (or cpu)
    python benchmarks/bench_attention.py --device cpu --quick --out /tmp/bench_test.csv

Kernels:
  * `attention_prefill`: causal attention over q, k, v (B, H, T, D), T swept (CSV shape
    B x H x T x D). Modes forward, backward (dq, dk, dv), full. TFLOP/s counting the causal half:
    2 B H T^2 D flops forward (two matmuls over half the scores), 2.5x that backward.
  * `attention_decode`: one new query per sequence against a KV cache holding L keys
    (B x H x L x D), forward only. GB/s counting the keys and values read once.
Providers: fusedtx_native, fusedtx_triton (compiled, CUDA only), torch
(F.scaled_dot_product_attention, is_causal=True for prefill, the cache's first L keys for
decode), torch_compile (torch.compile of the same). fusedtx uses the default split size; `fusedtx_native_unsplit` is the same kernel
with one chunk per sequence (split size >= its length), so fusedtx_native_unsplit / fusedtx_native
is the cost of invariance on CPU (on a GPU, where decode parallelism comes from the chunks, the
comparison that matters is with a split count chosen from the batch).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Case, fusedtx  # noqa: E402

KERNELS = ("attention_prefill", "attention_decode")
FLOP_FACTOR = {"forward": 1.0, "backward": 2.5, "full": 3.5}


def make_cases(device: torch.device, quick: bool) -> list[Case]:
    providers = ("fusedtx_native", "fusedtx_native_unsplit", "fusedtx_triton", "torch", "torch_compile")
    cuda = device.type == "cuda"
    if quick:
        prefill, decode, dtypes = [(1, 2, 64, 32)], [(2, 2, 128, 32)], (torch.float32,)
    elif cuda:
        prefill = [(4, 12, t, d) for d in (64, 128) for t in (256, 1024, 4096)]
        decode = [(b, 12, length, 128) for b, length in ((1, 4096), (16, 4096), (16, 32768))]
        dtypes = (torch.bfloat16,)
    else:
        prefill = [(1, 12, t, d) for d in (64, 128) for t in (256, 1024)] + [(1, 12, 4096, 64)]
        decode = [(b, 12, length, 64) for b, length in ((1, 2048), (8, 2048))]
        dtypes = (torch.float32,)
    cases = [Case("attention_prefill", s, dtype, "T", s[2], providers) for dtype in dtypes for s in prefill]
    cases += [Case("attention_decode", s, dtype, "L", s[2], providers, (("modes", ("forward",)),))
              for dtype in dtypes for s in decode]
    return cases


class AttentionBench(common.OpBench):
    name = "attention"
    metric, unit = "throughput", "TFLOP/s"

    def make_inputs(self, case, device, requires_grad):
        b, h, t, d = case.shape
        if case.kernel == "attention_decode":
            q = torch.randn(b, h, 1, d, device=device).to(case.dtype)
            cache = [torch.randn(b, h, t, d, device=device).to(case.dtype) for _ in range(2)]
            return [q, *cache, torch.full((b,), t, dtype=torch.int64, device=device)]
        return [torch.randn(b, h, t, d, device=device).to(case.dtype).requires_grad_(requires_grad) for _ in range(3)]

    def make_fn(self, provider, case, device):
        decode = case.kernel == "attention_decode"
        if provider.startswith("fusedtx_"):
            backend = provider.removeprefix("fusedtx_").removesuffix("_unsplit")
            split = max(16, 1 << (case.shape[2] - 1).bit_length()) if provider.endswith("_unsplit") else None
            if decode:
                return lambda q, k, v, lengths: fusedtx.attention_with_kv_cache(q, k, v, lengths, split_size=split,
                                                                                backend=backend)
            return lambda q, k, v: fusedtx.causal_attention(q, k, v, split_size=split, backend=backend)
        if decode:
            eager = lambda q, k, v, lengths: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        else:
            eager = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        if provider == "torch":
            return eager
        if provider == "torch_compile":
            return torch.compile(eager, dynamic=False)
        raise ValueError(f"unknown provider {provider!r}")

    def expected(self, inputs, case):
        q, k, v = (t.double() for t in inputs[:3])
        return F.scaled_dot_product_attention(q, k, v, is_causal=case.kernel == "attention_prefill")

    def amount(self, case, mode):
        b, h, t, d = case.shape
        if case.kernel == "attention_decode":
            return self.bytes_moved(case, mode) / 1e9
        return FLOP_FACTOR[mode] * 2 * b * h * t * t * d / 1e12

    def bytes_moved(self, case, mode):
        b, h, t, d = case.shape
        if case.kernel == "attention_decode":
            return 2 * b * h * t * d * case.dtype.itemsize
        return 4 * b * h * t * d * case.dtype.itemsize * (1 if mode == "forward" else 2)


class DecodeBench(AttentionBench):
    metric, unit = "bandwidth", "GB/s"


def summarize(rows: list[dict], ceilings: dict, args) -> None:
    print()
    print(f"Summary on {common.device_name(args.device)} (prefill TFLOP/s, decode GB/s)")
    rates = common.print_ratio_table(rows, "attention_prefill", "torch", "torch_compile", metric="throughput")
    decode = common.print_ratio_table(rows, "attention_decode", "torch", "torch_compile", metric="bandwidth")
    both = {**rates, **decode}
    print("\nCost of invariance: fusedtx_native with the default split size / with one chunk per sequence")
    for (kernel, dtype, shape, mode, provider), unsplit in sorted(both.items()):
        split = both.get((kernel, dtype, shape, mode, "fusedtx_native"))
        if provider == "fusedtx_native_unsplit" and split:
            print(f"  {kernel:18s} {dtype:9s} {shape:>14s} {mode:8s} {split / unsplit:.2f}x")
    print()
    print("Headline targets (printed, not asserted):")
    if args.device.type == "cpu":
        for (kernel, dtype, shape, mode, provider), ours in sorted(rates.items()):
            if provider == "fusedtx_native" and mode == "forward" and int(shape.split("x")[2]) >= 1024:
                common.print_target(f"CPU {kernel} {dtype} {shape} forward: fusedtx_native >= 1.0x SDPA", ours,
                                    rates.get((kernel, dtype, shape, mode, "torch")), 1.0)
    else:
        print("  GPU: prefill >= 0.9x FlashAttention-2 (bf16), decode >= 80% of copy bandwidth: compare by hand "
              "with the ceilings above (flash-attn is not a provider yet)")
    if args.quick:
        print("  (--quick: tiny sizes)")


def main(argv=None) -> None:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    cases = make_cases(args.device, args.quick)
    rec, ceilings = common.run_benchmark(AttentionBench(), [c for c in cases if c.kernel == "attention_prefill"], args)
    args.skip_ceilings = True
    decode_rec, _ = common.run_benchmark(DecodeBench(), [c for c in cases if c.kernel == "attention_decode"], args)
    summarize(rec.rows + decode_rec.rows, ceilings, args)
    common.finish(args, kernels=KERNELS)


if __name__ == "__main__":
    main()
