"""Benchmark GPT-2 (124M) end to end: fusedtx.models.GPT against HuggingFace transformers' GPT-2.

    python benchmarks/bench_gpt.py                        # GPT-2 124M on cuda (or cpu)
    python benchmarks/bench_gpt.py --device cpu --no-compile --kernels gpt2_prefill,gpt2_generate
    python benchmarks/bench_gpt.py --device cpu --quick --out /tmp/bench_test.csv

Every provider holds the same weights: a GPT2LMHeadModel built from transformers.GPT2Config()
defaults with random weights from a fixed seed (--seed; no network), loaded into fusedtx with
GPT.from_hf. float32 on CPU, bfloat16 on CUDA. All models are in eval() mode, also for the
training step: GPT-2's only train-mode difference is dropout, which fusedtx's model does not
have, so every provider computes the same function.

Kernels (CSV `kernel`), metric `throughput` in tokens/s:
  * gpt2_prefill (mode forward): logits for B x T tokens under no_grad; tokens/s = B T / time.
    x = tokens per call (B T), CSV shape B x T.
  * gpt2_generate (mode forward): greedy generation of N new tokens after B prompts of P tokens,
    with a KV cache: HF's model.generate(do_sample=False, use_cache=True) (its DynamicCache) vs
    fusedtx's GPT.generate. The prompts all have the same length (no padding, no attention-mask
    question) and no EOS stops generation early. new tokens/s = B N / time of the whole call,
    the prompt's prefill included. x = B, CSV shape B x P x N.
  * gpt2_train (mode full): forward + cross-entropy + backward + AdamW step + zero_grad (the same
    torch.optim.AdamW and loss for every provider). tokens/s = B T / time. x = B T, shape B x T.
hf_sdpa_compile also records `compile_time` (s): its first call at each shape, compilation
included (the timed calls come after it), with inductor's caches in a fresh directory (a cold
compile; set TORCHINDUCTOR_CACHE_DIR to use your own).

Providers:
  * fusedtx_native, fusedtx_triton (compiled, CUDA only): fusedtx.models.GPT with that backend.
    A profiled call checks that its linears, layer norms and attention are fusedtx ops
    (fusedtx_native::* on the native backend) and that no aten matmul / layer_norm / softmax /
    SDPA runs.
  * hf_sdpa: GPT2LMHeadModel with attn_implementation="sdpa", transformers' default and the main
    peer (aten::scaled_dot_product_attention is checked to run).
  * hf_eager: the same with attn_implementation="eager" (matmul + softmax attention; checked).
  * hf_sdpa_compile: torch.compile(hf_sdpa model, dynamic=False), prefill and training only (a
    compiled forward under HF generate's DynamicCache would recompile at every new length; HF's
    compiled decoding needs its static cache, not benchmarked here). --no-compile skips it.
    It runs by default, its compile cost recorded apart (compile_time, above).

Correctness guard, before any figure is recorded: every provider's output is compared with a
float64 copy of the HF model (eager attention). Prefill: the logits of the last positions
within a float32 (bf16) tolerance. Generation: every generated token must be the reference's
argmax given the same prefix, up to ties within the tolerance. Training: the first step's loss
and the gradients of a few weights (embedding, first c_attn, last mlp c_proj, ln_f).
A provider that fails the guard or errors is skipped for that shape, with the reason.

Timing: timing.time_fn, wall clock per call (on CUDA too: host overhead and syncs are part of
a model's cost). Median with 20th/80th percentiles over repetitions (CPU: at least
5 and 3 s of them; --min-reps / --min-time override). Each timing also measures the CPU time
other processes took meanwhile (/proc/stat): above 5% of the machine the figure is flagged
UNRELIABLE in the summary (on a shared machine every parallel region then waits for a
descheduled thread, so the figure is the other processes' as much as the model's).
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import get_ceilings  # noqa: E402
from cli import finish, parse_args  # noqa: E402
from results_csv import Recorder, device_name, dtype_str, fusedtx, shape_str  # noqa: E402,F401
from runner import first_line, fusedtx_unavailable, note  # noqa: E402
from summary import fmt_num, fmt_ratio, print_target  # noqa: E402
from timing import OtherLoad, peak_memory_mb, rate, same, synchronize, time_fn  # noqa: E402
from gpt_workloads import WORKLOADS, Models, Skip, is_fusedtx  # noqa: E402

KERNELS = ("gpt2_prefill", "gpt2_generate", "gpt2_train")
MODE = {"gpt2_prefill": "forward", "gpt2_generate": "forward", "gpt2_train": "full"}
PROVIDERS = ("fusedtx_native", "fusedtx_triton", "hf_eager", "hf_sdpa", "hf_sdpa_compile")
# Ops that must not run in a fusedtx model: every matmul, normalisation and softmax is fusedtx's.
TORCH_KERNEL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::native_layer_norm",
                    "aten::_softmax", "aten::scaled_dot_product_attention")
BUSY_SHARE = 0.05  # other processes' share of the CPU above which a figure is flagged as unreliable


@dataclasses.dataclass(frozen=True)
class Sizes:
    prefill: tuple      # (B, T)
    generate: tuple     # (B, P, N)
    train: tuple        # (B, T)


def sizes(device: torch.device, quick: bool) -> Sizes:
    if quick:
        return Sizes(prefill=((1, 32), (2, 48)), generate=((1, 8, 4), (2, 8, 4)), train=((2, 16),))
    if device.type == "cuda":
        return Sizes(prefill=((1, 1024), (8, 1024), (32, 1024)),
                     generate=((1, 128, 128), (16, 128, 128), (64, 128, 128)),
                     train=((8, 1024), (16, 1024)))
    return Sizes(prefill=((1, 128), (1, 512), (4, 256)), generate=((1, 64, 32), (8, 64, 32)),
                 train=((2, 128), (4, 128)))


def unavailable_reason(provider: str, kernel: str, args) -> str | None:
    if provider == "hf_sdpa_compile":
        if args.no_compile:
            return "--no-compile"
        if kernel == "gpt2_generate":
            return ("HF generate with a DynamicCache changes shapes at every step (a compiled forward "
                    "recompiles); its compiled decoding (static cache) is not benchmarked")
    return fusedtx_unavailable(provider, args.device)


# ---------------------------------------------------------------------------------------------
# Checks: the right code path, the right numbers
# ---------------------------------------------------------------------------------------------
def check_path(provider: str, fn) -> str:
    """Run fn() under torch.profiler and check the provider's own kernels ran; returns a note."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events()}
    if is_fusedtx(provider):
        torch_ops = sorted(names & set(TORCH_KERNEL_OPS))
        if torch_ops:
            raise Skip(f"torch kernels ran inside the fusedtx model: {torch_ops}")
        ours = sorted(n for n in names if n.startswith("fusedtx_native::"))
        needed = {"fusedtx_native::linear_matmul", "fusedtx_native::layer_norm_forward", "fusedtx_native::causal_attention_forward"}
        if provider == "fusedtx_native" and not needed <= set(ours):
            raise Skip(f"the native kernels did not run (fusedtx ops seen: {ours})")
        if provider != "fusedtx_native" and ours:
            raise Skip(f"{provider} ran native kernels: {ours}")
        return "fusedtx ops: " + (", ".join(o.split("::")[1] for o in ours) or "(triton launches)")
    sdpa = "aten::scaled_dot_product_attention" in names
    if provider == "hf_eager" and (sdpa or "aten::_softmax" not in names):
        raise Skip("attn_implementation='eager' did not run matmul + softmax attention")
    if provider == "hf_sdpa" and not sdpa:
        raise Skip("attn_implementation='sdpa' did not run aten::scaled_dot_product_attention")
    return "attention: " + ("aten::scaled_dot_product_attention" if sdpa else "matmul + softmax")


def compiled_note() -> str:
    from torch._dynamo.utils import counters

    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    if graphs < 1:
        raise Skip("torch.compile captured no graph")
    return f"{graphs} graph(s), {breaks} graph break(s)"


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def flops_per_call(config, kernel: str, shape: tuple) -> float | None:
    """Model FLOPs of one prefill forward (x3 for training): 2 per weight per token for the blocks
    and the LM head, plus causal attention's two matmuls over half the scores."""
    if kernel == "gpt2_generate":
        return None
    b, t = shape
    d, layers, vocab = config.n_embd, config.n_layer, config.vocab_size
    per_token = 2 * (layers * 12 * d * d + d * vocab)
    attention = layers * 2 * b * t * t * d
    forward = b * t * per_token + attention
    return forward * (3 if kernel == "gpt2_train" else 1)


def run(args) -> tuple[Recorder, dict, Models]:
    known = set(PROVIDERS)
    if args.providers and not set(args.providers) <= known:
        raise SystemExit(f"--providers: unknown {sorted(set(args.providers) - known)}; known: {sorted(known)}")
    providers = [p for p in PROVIDERS if not args.providers or p in args.providers]
    rec = Recorder(args.out, args.device)
    args.contended = []
    ceilings = get_ceilings(args, rec)
    print(f"building GPT-2 ({'tiny config, --quick' if args.quick else '124M'}) with seed {args.seed} ...", flush=True)
    models = Models(args)
    size = sizes(args.device, args.quick)
    cases = [(kernel, shape) for kernel, shapes in zip(KERNELS, (size.prefill, size.generate, size.train))
             for shape in shapes if kernel in args.kernels]
    skipped: set = set()
    for kernel, shape in cases:
        case = WORKLOADS[kernel](models, shape)
        what = f"{kernel} {shape_str(shape)}"
        for provider in providers:
            if (kernel, provider) in skipped:
                continue
            reason = unavailable_reason(provider, kernel, args)
            if reason is not None:
                skipped.add((kernel, provider))
                note(f"skipping {provider} for {kernel}: {reason}")
                continue
            torch._dynamo.reset()  # each compiled case compiles afresh: a comparable compile_time
            torch._dynamo.utils.counters.clear()
            try:
                row, notes = measure(rec, models, case, provider, args)
            except Skip as exc:
                note(f"skipping {provider} for {what}: {exc}")
                continue
            except Exception as exc:  # out of memory, a compile error, ...: go on with the others
                note(f"skipping {provider} for {what}: {first_line(exc)}")
                if args.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            note(f"{what:22s} {provider:16s} {float(row['p50']):10.1f} tokens/s  [{notes}]")
        rec.flush()
    return rec, ceilings, models


def measure(rec: Recorder, models: Models, case, provider: str, args) -> tuple[dict, str]:
    model = models.get(provider, fresh=case.fresh_model)
    fn = case.make_fn(provider, model)
    synchronize(args.device)
    t0 = time.perf_counter()
    out = case.first_call(provider, model, fn)  # the first call: compiles (torch.compile), and is the one checked
    synchronize(args.device)
    first_s = time.perf_counter() - t0
    notes = [case.check(out)]
    if provider == "hf_sdpa_compile":
        notes.append(compiled_note())
        notes.append(f"compile + first call {first_s:.1f} s")
    else:
        notes.append(check_path(provider, fn))
    with OtherLoad() as others:
        timing = time_fn(fn, device=args.device, config=args.timing, hide_launch_overhead=False)
    if others.share is not None:
        notes.append(f"other processes {others.share:.0%} of the CPU")
        if others.share > BUSY_SHARE:
            args.contended.append(f"{case.kernel} {shape_str(case.shape)} {provider} ({others.share:.0%})")
    mode, kernel = MODE[case.kernel], case.kernel
    row = rec.add(kernel, provider, mode, "throughput", "tokens/s", case.x_name, case.x_value,
                  rate(case.tokens, timing), models.dtype, case.shape)
    if provider == "hf_sdpa_compile":
        rec.add(kernel, provider, mode, "compile_time", "s", case.x_name, case.x_value, same(first_s),
                models.dtype, case.shape)
    peak = peak_memory_mb(fn, args.device)
    if peak is not None:
        rec.add(kernel, provider, mode, "peak_memory", "MB", case.x_name, case.x_value, same(peak),
                models.dtype, case.shape)
    return row, "; ".join(notes)


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
def summarize(rows: list[dict], ceilings: dict, models: Models, args) -> None:
    cpu = args.device.type == "cpu"
    ours = "fusedtx_native" if cpu else "fusedtx_triton"
    rates = {(r["kernel"], r["shape"], r["provider"]): float(r["p50"]) for r in rows if r["metric"] == "throughput"}
    compile_s = {(r["kernel"], r["shape"]): float(r["p50"]) for r in rows if r["metric"] == "compile_time"}
    mm = ceilings.get("matmul")
    print()
    print(f"Summary: p50 tokens/s on {device_name(args.device)}, {dtype_str(models.dtype)}"
          + (f"; matmul ceiling (torch.mm) {mm:.3f} TFLOP/s" if mm else ""))
    print("  nat = fusedtx_native, tri = fusedtx_triton, eager = hf_eager, sdpa = hf_sdpa (HF's default), "
          "comp = hf_sdpa_compile; ratios of " + ours)
    short = {"fusedtx_native": "nat", "fusedtx_triton": "tri", "hf_eager": "eager", "hf_sdpa": "sdpa",
             "hf_sdpa_compile": "comp"}
    for kernel in KERNELS:
        shapes = sorted({k[1] for k in rates if k[0] == kernel}, key=lambda s: [int(v) for v in s.split("x")])
        if not shapes:
            continue
        print(f"\n{kernel} ({'new tokens/s, shape B x prompt x new' if kernel == 'gpt2_generate' else 'tokens/s, shape B x T'})")
        print(f"  {'shape':>10s} " + " ".join(f"{short[p]:>8s}" for p in PROVIDERS)
              + f" {'/eager':>7s} {'/sdpa':>7s} {'/comp':>7s} {'compile':>8s} {'TFLOP/s':>8s} {'of mm':>6s}")
        for shape in shapes:
            get = lambda p: rates.get((kernel, shape, p))  # noqa: E731
            mine = get(ours)
            dims = tuple(int(v) for v in shape.split("x"))
            flops = flops_per_call(models.config, kernel, dims)
            tflops = mine * flops / (dims[0] * dims[1]) / 1e12 if mine and flops else None
            comp = compile_s.get((kernel, shape))
            print(f"  {shape:>10s} " + " ".join(f"{fmt_num(get(p)):>8s}" for p in PROVIDERS)
                  + f" {fmt_ratio(mine, get('hf_eager')):>7s} {fmt_ratio(mine, get('hf_sdpa')):>7s}"
                  + f" {fmt_ratio(mine, get('hf_sdpa_compile')):>7s} {(f'{comp:.0f} s' if comp else '-'):>8s}"
                  + f" {(f'{tflops:.3f}' if tflops else '-'):>8s} {(f'{tflops / mm:.0%}' if tflops and mm else '-'):>6s}")
    print()
    print("Headline targets (printed, not asserted):")
    for kernel in ("gpt2_prefill", "gpt2_generate"):
        for (kern, shape, provider), value in sorted(rates.items()):
            if kern != kernel or provider != ours:
                continue
            if cpu:
                print_target(f"CPU {kernel} float32 {shape:>9s}: fusedtx_native >= 1.0x hf_eager", value,
                             rates.get((kern, shape, "hf_eager")), 1.0)
            else:
                print_target(f"GPU {kernel} bf16 {shape:>9s}: fusedtx_triton vs hf_sdpa (no target set)", value,
                             rates.get((kern, shape, "hf_sdpa")), 1.0)
    if args.quick:
        print("  (--quick: a tiny model, so the headline sizes were not measured)")
    if args.contended:
        print(f"  UNRELIABLE: other processes used > {BUSY_SHARE:.0%} of the CPU while timing "
              + ", ".join(args.contended))


def extra_args(parser) -> None:
    parser.add_argument("--no-compile", action="store_true", help="skip hf_sdpa_compile (torch.compile of HF's model)")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random GPT-2 weights and inputs")


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv, extra_args)
    args.kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    if not args.kernels or not set(args.kernels) <= set(KERNELS):
        raise SystemExit(f"--kernels: expected a subset of {list(KERNELS)}, got {args.kernels}")
    if args.device.type == "cpu" and not args.quick:
        # A model call is long on CPU: at least 5 of them and 3 s, however long that takes.
        args.timing = dataclasses.replace(args.timing, min_reps=args.min_reps or 5, min_time=args.min_time or 3.0,
                                          max_time=120.0)
    if not args.no_compile and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # compile_time of a cold compile: with inductor's on-disk caches it would depend on what
        # earlier runs left there.
        cache = tempfile.mkdtemp(prefix="bench_gpt_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    rec, ceilings, models = run(args)
    summarize(rec.rows, ceilings, models, args)
    finish(args, kernels=KERNELS)


if __name__ == "__main__":
    main()
