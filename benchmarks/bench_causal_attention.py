"""Benchmark fusedtx causal attention against PyTorch's scaled_dot_product_attention.

    python benchmarks/bench_causal_attention.py           # full sweep on cuda (or cpu)
    python benchmarks/bench_causal_attention.py --device cpu --quick --out /tmp/bench_test.csv

Kernels (the CSV's `kernel` column, and the names of the plots):
  * `attention_prefill`: causal attention over q, k, v (B, H, T, D), T swept (CSV shape
    B x H x T x D). Modes forward, backward (dq, dk, dv), full. TFLOP/s counting the causal half:
    2 B H T^2 D flops forward (two matmuls over half the scores), 2.5x that backward.
  * `attention_decode`: one new query per sequence against a KV cache holding L keys
    (B x H x L x D), forward only. GB/s counting the keys and values read once.
Providers: fusedtx_native, fusedtx_triton (compiled, CUDA only), torch
(F.scaled_dot_product_attention, is_causal=True for prefill, the cache's first L keys for
decode), torch_compile (torch.compile of the same); on CUDA also sdpa_flash (SDPA held to its
FlashAttention-2 backend: the FA2 kernel PyTorch ships) and flash_attn (flash_attn_func, where
the flash-attn package is installed). fusedtx uses the default split size. The cost of
invariance is read off two variants of each fusedtx backend: `_unsplit` (one chunk per
sequence: split size >= its length) and, on CUDA, `_batchsplit` (the split size a split-KV
kernel would pick from the batch: enough chunks for B H (chunks) to fill the GPU twice over,
see batch_chosen_split). The invariant kernel must not be much slower than either.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import finish, parse_args  # noqa: E402
from results_csv import device_name, fusedtx  # noqa: E402
from runner import Case, OpBench, run_benchmark  # noqa: E402
from summary import print_ratio_table, print_target  # noqa: E402

KERNELS = ("attention_prefill", "attention_decode")
FLOP_FACTOR = {"forward": 1.0, "backward": 2.5, "full": 3.5}


def make_cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type == "cuda"
    providers = ("fusedtx_native", "fusedtx_native_unsplit", "torch", "torch_compile")
    if cuda:
        providers += ("fusedtx_triton", "fusedtx_triton_unsplit", "fusedtx_triton_batchsplit",
                      "fusedtx_native_batchsplit", "sdpa_flash", "flash_attn")
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


def parallel_workers(device: torch.device) -> int:
    """What a split-KV kernel fills: the GPU's multiprocessors, or the CPU's threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return torch.get_num_threads()


def split_covering(keys: int) -> int:
    """The smallest split size fusedtx takes (a power of two >= 16) that holds `keys` keys."""
    return max(16, 1 << (keys - 1).bit_length())


def fusedtx_variant(provider: str) -> tuple[str, str]:
    """"fusedtx_triton_batchsplit" -> ("triton", "batchsplit"); "fusedtx_native" -> ("native", "")."""
    backend, _, variant = provider.removeprefix("fusedtx_").partition("_")
    return backend, variant


def batch_chosen_split(batch: int, heads: int, length: int, device: torch.device) -> int:
    """The split size a batch-dependent split-KV heuristic gives (what fusedtx refuses to do):
    as many chunks per sequence as it takes for batch x heads x chunks to cover the device's
    workers twice, at least 16 keys a chunk, rounded up to the power of two fusedtx takes. A
    lone sequence gets many small chunks, a full batch one chunk, so a sequence's reduction order
    depends on who else is in the batch."""
    chunks = max(1, min(math.ceil(2 * parallel_workers(device) / (batch * heads)), math.ceil(length / 16)))
    return split_covering(math.ceil(length / chunks))


class CausalAttentionBench(OpBench):
    name = "causal_attention"
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
        b, h, length, _ = case.shape
        if provider.startswith("fusedtx_"):
            backend, variant = fusedtx_variant(provider)
            split = {"": None, "unsplit": split_covering(length),
                     "batchsplit": batch_chosen_split(b, h, length, device)}[variant]
            if decode:
                return lambda q, k, v, lengths: fusedtx.attention_with_kv_cache(q, k, v, lengths, split_size=split,
                                                                                backend=backend)
            return lambda q, k, v: fusedtx.causal_attention(q, k, v, split_size=split, backend=backend)
        if provider == "flash_attn":
            from flash_attn import flash_attn_func  # (B, T, H, D) views of our (B, H, T, D): no copies

            if decode:
                return lambda q, k, v, lengths: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                                                v.transpose(1, 2)).transpose(1, 2)
            return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   causal=True).transpose(1, 2)
        if decode:
            eager = lambda q, k, v, lengths: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        else:
            eager = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        if provider == "torch":
            return eager
        if provider == "sdpa_flash":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def flash(*args):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return eager(*args)
            return flash
        if provider == "torch_compile":
            return torch.compile(eager, dynamic=False)
        raise ValueError(f"unknown provider {provider!r}")

    def unavailable_reason(self, provider, device):
        if provider in ("sdpa_flash", "flash_attn") and device.type != "cuda":
            return "FlashAttention-2 runs on CUDA only"
        if provider == "flash_attn":
            try:
                import flash_attn  # noqa: F401
            except ImportError as exc:
                return f"flash-attn is not installed ({exc})"
        return super().unavailable_reason(provider, device)

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


class DecodeBench(CausalAttentionBench):
    metric, unit = "bandwidth", "GB/s"


def summarize(rows: list[dict], ceilings: dict, args) -> None:
    print()
    print(f"Summary on {device_name(args.device)} (prefill TFLOP/s, decode GB/s)")
    rates = print_ratio_table(rows, "attention_prefill", "torch", "torch_compile", metric="throughput")
    decode = print_ratio_table(rows, "attention_decode", "torch", "torch_compile", metric="bandwidth")
    both = {**rates, **decode}
    print("\nCost of invariance: fusedtx with the default split size / the same kernel with one chunk per "
          "sequence (unsplit) or with the split a batch-dependent heuristic picks (batchsplit); < 1 = slower")
    for (kernel, dtype, shape, mode, provider), other in sorted(both.items()):
        backend, variant = fusedtx_variant(provider)
        invariant = both.get((kernel, dtype, shape, mode, f"fusedtx_{backend}"))
        if provider.startswith("fusedtx_") and variant and invariant:
            print(f"  {kernel:18s} {dtype:9s} {shape:>14s} {mode:8s} {backend:7s} vs {variant:10s} "
                  f"{invariant / other:.2f}x")
    print()
    print("Headline targets (printed, not asserted):")
    if args.device.type == "cpu":
        for (kernel, dtype, shape, mode, provider), ours in sorted(rates.items()):
            if provider == "fusedtx_native" and mode == "forward" and int(shape.split("x")[2]) >= 1024:
                print_target(f"CPU {kernel} {dtype} {shape} forward: fusedtx_native >= 1.0x SDPA", ours,
                             rates.get((kernel, dtype, shape, mode, "torch")), 1.0)
    else:
        for (kernel, dtype, shape, mode, provider), ours in sorted(rates.items()):
            if provider == "fusedtx_triton" and dtype == "bfloat16":
                flash = max((rates.get((kernel, dtype, shape, mode, p)) or 0.0) for p in ("sdpa_flash", "flash_attn"))
                print_target(f"GPU {kernel} {shape} {mode}: fusedtx_triton >= 0.9x FlashAttention-2", ours,
                             flash, 0.9)
        copy_bw = ceilings.get("copy_bandwidth")
        for (kernel, dtype, shape, mode, provider), ours in sorted(decode.items()):
            if provider == "fusedtx_triton":
                print_target(f"GPU {kernel} {shape}: fusedtx_triton >= 80% of copy bandwidth", ours, copy_bw,
                             0.8, unit="%")
                print_target(f"GPU {kernel} {shape}: cost of invariance <= 10% (vs batchsplit)", ours * 1.1,
                             decode.get((kernel, dtype, shape, mode, "fusedtx_triton_batchsplit")), 1.0)
    if args.quick:
        print("  (--quick: tiny sizes)")


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    cases = make_cases(args.device, args.quick)
    rec, ceilings = run_benchmark(CausalAttentionBench(), [c for c in cases if c.kernel == "attention_prefill"], args)
    args.skip_ceilings = True
    decode_rec, _ = run_benchmark(DecodeBench(), [c for c in cases if c.kernel == "attention_decode"], args)
    summarize(rec.rows + decode_rec.rows, ceilings, args)
    finish(args, kernels=KERNELS)


if __name__ == "__main__":
    main()
