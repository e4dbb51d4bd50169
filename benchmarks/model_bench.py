"""What bench_gpt.py and bench_llama.py share: the run over workloads and providers, the checks
that the right code ran, the summary. Each script is its docstring and a Family
(model_workloads.py); run it, not this module.

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
from model_workloads import WORKLOADS, Family, Models, Skip, is_fusedtx  # noqa: E402
from results_csv import Recorder, device_name, dtype_str, fusedtx, shape_str  # noqa: E402,F401
from runner import first_line, fusedtx_unavailable, note  # noqa: E402
from summary import fmt_num, fmt_ratio, print_target  # noqa: E402
from timing import OtherLoad, peak_memory_mb, rate, same, synchronize, time_fn  # noqa: E402

KINDS = ("prefill", "generate", "train")
MODE = {"prefill": "forward", "generate": "forward", "train": "full"}
PROVIDERS = ("fusedtx_native", "fusedtx_triton", "hf_eager", "hf_sdpa", "hf_sdpa_compile", "hf_converted")
CONVERTED_TARGET = 0.9  # hf_converted / hf_eager on CPU: what invariance costs a user who keeps their HF code
# Ops that must not run in a fusedtx model: every matmul, normalisation and softmax is fusedtx's.
TORCH_KERNEL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::native_layer_norm",
                    "aten::rms_norm", "aten::_fused_rms_norm", "aten::_softmax", "aten::scaled_dot_product_attention")
BUSY_SHARE = 0.05  # other processes' share of the CPU above which a figure is flagged as unreliable
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def unavailable_reason(provider: str, kind: str, args) -> str | None:
    if provider == "hf_converted":  # fusedtx.convert's layers run the device's default backend
        return fusedtx_unavailable("fusedtx_native" if args.device.type == "cpu" else "fusedtx_triton", args.device)
    if provider == "hf_sdpa_compile":
        if args.no_compile:
            return "--no-compile"
        if kind == "generate":
            return ("HF generate with a DynamicCache changes shapes at every step (a compiled forward "
                    "recompiles); its compiled decoding (static cache) is not benchmarked")
    return fusedtx_unavailable(provider, args.device)


# ---------------------------------------------------------------------------------------------
# Checks: the right code path, the right numbers
# ---------------------------------------------------------------------------------------------
def check_path(provider: str, fn, family: Family) -> str:
    """Run fn() under torch.profiler and check the provider's own kernels ran; returns a note."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events()}
    if provider == "hf_converted":
        torch_ops = sorted(names & set(TORCH_KERNEL_OPS))
        if torch_ops:
            raise Skip(f"torch kernels ran inside the converted HF model: {torch_ops}")
        ours = sorted({n.split("::")[1] for n in names if n.startswith(("fusedtx_native::", "fusedtx::"))})
        if "causal_attention" not in " ".join(ours):
            raise Skip(f"fusedtx attention did not run in the converted HF model (fusedtx ops seen: {ours})")
        return "fusedtx.convert; fusedtx ops: " + ", ".join(ours)
    if is_fusedtx(provider):
        torch_ops = sorted(names & set(TORCH_KERNEL_OPS))
        if torch_ops:
            raise Skip(f"torch kernels ran inside the fusedtx model: {torch_ops}")
        ours = sorted(n for n in names if n.startswith("fusedtx_native::"))
        needed = {f"fusedtx_native::{op}" for op in family.native_ops}
        if provider == "fusedtx_native" and not needed <= set(ours):
            raise Skip(f"the native kernels did not run (fusedtx ops seen: {ours}; expected {sorted(needed)})")
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
def flops_per_call(models: Models, kind: str, shape: tuple) -> float | None:
    """Model FLOPs of one prefill forward (x3 for training): 2 per matmul weight per token (the
    blocks and the LM head), plus causal attention's two matmuls over half the scores."""
    if kind == "generate":
        return None
    b, t = shape
    c = models.config
    layers = c.num_hidden_layers
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    attention = layers * 2 * b * t * t * heads * head_dim
    forward = b * t * 2 * models.matmul_weights() + attention
    return forward * (3 if kind == "train" else 1)


def run(args, family: Family) -> tuple[Recorder, dict, Models]:
    known = set(PROVIDERS)
    if args.providers and not set(args.providers) <= known:
        raise SystemExit(f"--providers: unknown {sorted(set(args.providers) - known)}; known: {sorted(known)}")
    providers = [p for p in PROVIDERS if not args.providers or p in args.providers]
    rec = Recorder(args.out, args.device)
    args.contended = []
    ceilings = get_ceilings(args, rec)
    print(f"building {family.title if not args.quick else family.prefix + ' (tiny config, --quick)'} in "
          f"{dtype_str(args.dtype)} with seed {args.seed} ...", flush=True)
    models = Models(args, family)
    size = sizes(args.device, args.quick)
    cases = [(kind, shape) for kind, shapes in zip(KINDS, (size.prefill, size.generate, size.train))
             for shape in shapes if kind in args.kinds]
    skipped: set = set()
    for kind, shape in cases:
        case = WORKLOADS[kind](models, shape)
        what = f"{case.kernel} {shape_str(shape)}"
        for provider in providers:
            if (kind, provider) in skipped:
                continue
            reason = unavailable_reason(provider, kind, args)
            if reason is not None:
                skipped.add((kind, provider))
                note(f"skipping {provider} for {kind}: {reason}")
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
            note(f"{what:28s} {provider:16s} {float(row['p50']):10.1f} tokens/s  [{notes}]")
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
        notes.append(check_path(provider, fn, models.family))
    with OtherLoad() as others:
        timing = time_fn(fn, device=args.device, config=args.timing, hide_launch_overhead=False)
    if others.share is not None:
        notes.append(f"other processes {others.share:.0%} of the CPU")
        if others.share > BUSY_SHARE:
            args.contended.append(f"{case.kernel} {shape_str(case.shape)} {provider} ({others.share:.0%})")
    mode, kernel = MODE[case.kind], case.kernel
    row = rec.add(kernel, provider, mode, "throughput", "tokens/s", case.x_name, case.x_value,
                  rate(case.tokens, timing), models.dtype, case.shape)
    if case.kind == "generate":
        # Every decode step streams the weights once: a lower bound on the bandwidth reached (the
        # prompt's prefill is inside the timed call too).
        steps = case.shape[2]
        rec.add(kernel, provider, mode, "weight_bandwidth", "GB/s", case.x_name, case.x_value,
                rate(steps * models.weight_bytes() / 1e9, timing), models.dtype, case.shape)
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
    prefix = models.family.prefix
    rates = {(r["kernel"], r["shape"], r["provider"]): float(r["p50"]) for r in rows if r["metric"] == "throughput"}
    gbps = {(r["kernel"], r["shape"], r["provider"]): float(r["p50"]) for r in rows if r["metric"] == "weight_bandwidth"}
    compile_s = {(r["kernel"], r["shape"]): float(r["p50"]) for r in rows if r["metric"] == "compile_time"}
    mm, copy_bw = ceilings.get("matmul"), ceilings.get("copy_bandwidth")
    print()
    print(f"Summary: p50 tokens/s on {device_name(args.device)}, {models.family.title}, {dtype_str(models.dtype)}"
          + (f"; matmul ceiling (torch.mm) {mm:.3f} TFLOP/s" if mm else "")
          + (f"; copy bandwidth {copy_bw:.1f} GB/s" if copy_bw else ""))
    print("  nat = fusedtx_native, tri = fusedtx_triton, eager = hf_eager, sdpa = hf_sdpa (HF's default), "
          "comp = hf_sdpa_compile, conv = hf_converted (the HF model after fusedtx.convert); ratios of " + ours)
    short = {"fusedtx_native": "nat", "fusedtx_triton": "tri", "hf_eager": "eager", "hf_sdpa": "sdpa",
             "hf_sdpa_compile": "comp", "hf_converted": "conv"}
    for kind in KINDS:
        kernel = f"{prefix}_{kind}"
        shapes = sorted({k[1] for k in rates if k[0] == kernel}, key=lambda s: [int(v) for v in s.split("x")])
        if not shapes:
            continue
        generate = kind == "generate"
        print(f"\n{kernel} ({'new tokens/s, shape B x prompt x new' if generate else 'tokens/s, shape B x T'})")
        extra = f" {'GB/s':>6s} {'of copy':>7s} {'eagerGB':>7s}" if generate else \
            f" {'compile':>8s} {'TFLOP/s':>8s} {'of mm':>6s}"
        print(f"  {'shape':>10s} " + " ".join(f"{short[p]:>8s}" for p in PROVIDERS)
              + f" {'/eager':>7s} {'/sdpa':>7s} {'/comp':>7s}" + extra)
        for shape in shapes:
            get = lambda p: rates.get((kernel, shape, p))  # noqa: E731
            mine = get(ours)
            dims = tuple(int(v) for v in shape.split("x"))
            line = (f"  {shape:>10s} " + " ".join(f"{fmt_num(get(p)):>8s}" for p in PROVIDERS)
                    + f" {fmt_ratio(mine, get('hf_eager')):>7s} {fmt_ratio(mine, get('hf_sdpa')):>7s}"
                    + f" {fmt_ratio(mine, get('hf_sdpa_compile')):>7s}")
            if generate:
                bw, eager_bw = gbps.get((kernel, shape, ours)), gbps.get((kernel, shape, "hf_eager"))
                line += (f" {fmt_num(bw):>6s} {(f'{bw / copy_bw:.0%}' if bw and copy_bw else '-'):>7s}"
                         f" {fmt_num(eager_bw):>7s}")
            else:
                flops = flops_per_call(models, kind, dims)
                tflops = mine * flops / (dims[0] * dims[1]) / 1e12 if mine and flops else None
                comp = compile_s.get((kernel, shape))
                line += (f" {(f'{comp:.0f} s' if comp else '-'):>8s} {(f'{tflops:.3f}' if tflops else '-'):>8s}"
                         f" {(f'{tflops / mm:.0%}' if tflops and mm else '-'):>6s}")
            print(line)
    print()
    print("Headline targets (printed, not asserted):")
    for kind in ("prefill", "generate"):
        for (kern, shape, provider), value in sorted(rates.items()):
            if kern != f"{prefix}_{kind}" or provider != ours:
                continue
            if cpu:
                print_target(f"CPU {kern} {dtype_str(models.dtype)} {shape:>9s}: fusedtx_native >= 1.0x hf_eager",
                             value, rates.get((kern, shape, "hf_eager")), 1.0)
            else:
                print_target(f"GPU {kern} {dtype_str(models.dtype)} {shape:>9s}: fusedtx_triton vs hf_sdpa "
                             "(no target set)", value, rates.get((kern, shape, "hf_sdpa")), 1.0)
    for (kern, shape, provider), value in sorted(rates.items()):
        if cpu and provider == "hf_converted" and not kern.endswith("_train"):
            print_target(f"CPU {kern} {dtype_str(models.dtype)} {shape:>9s}: hf_converted >= {CONVERTED_TARGET}x "
                         "hf_eager", value, rates.get((kern, shape, "hf_eager")), CONVERTED_TARGET)
    if not cpu:
        for (kern, shape, provider), value in sorted(rates.items()):
            if kern == f"{prefix}_train" and provider == ours:
                print_target(f"GPU {kern} {dtype_str(models.dtype)} {shape:>9s}: fusedtx_triton >= 1.3x hf_eager",
                             value, rates.get((kern, shape, "hf_eager")), 1.3)
    if args.quick:
        print("  (--quick: a tiny model, so the headline sizes were not measured)")
    if args.contended:
        print(f"  UNRELIABLE: other processes used > {BUSY_SHARE:.0%} of the CPU while timing "
              + ", ".join(args.contended))


def extra_args(parser) -> None:
    parser.add_argument("--no-compile", action="store_true", help="skip hf_sdpa_compile (torch.compile of HF's model)")
    parser.add_argument("--kernels", default=",".join(KINDS),
                        help=f"comma-separated subset of {','.join(KINDS)} (with or without the model's prefix)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights and activations of every provider (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")


def main(family_of, doc: str, argv=None, add_args=None) -> None:
    """Parse the command line (the common flags, extra_args, and the script's own add_args), build
    the family (family_of(args)), run, summarize."""
    def all_args(parser):
        extra_args(parser)
        if add_args is not None:
            add_args(parser)

    args = parse_args(doc.splitlines()[0], argv, all_args)
    family = family_of(args)
    kinds = [k.strip().removeprefix(family.prefix + "_") for k in args.kernels.split(",") if k.strip()]
    if not kinds or not set(kinds) <= set(KINDS):
        raise SystemExit(f"--kernels: expected a subset of {list(KINDS)}, got {args.kernels!r}")
    args.kinds = kinds
    args.dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if args.device.type == "cpu" else torch.bfloat16)
    if args.device.type == "cpu" and not args.quick:
        # A model call is long on CPU: at least 5 of them and 3 s, however long that takes.
        args.timing = dataclasses.replace(args.timing, min_reps=args.min_reps or 5, min_time=args.min_time or 3.0,
                                          max_time=120.0)
    if not args.no_compile and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # compile_time of a cold compile: with inductor's on-disk caches it would depend on what
        # earlier runs left there.
        cache = tempfile.mkdtemp(prefix="bench_model_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    rec, ceilings, models = run(args, family)
    summarize(rec.rows, ceilings, models, args)
    finish(args, kernels=tuple(f"{family.prefix}_{k}" for k in KINDS))
