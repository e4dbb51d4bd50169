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

import dataclasses
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import fusedtx  # noqa: E402
from fusedtx import backends  # noqa: E402

KERNEL_PLAIN = "softmax"
KERNEL_CAUSAL = "softmax_causal"
CAUSAL_SCALE = 0.125
BYTES_MOVED = {"forward": 2, "backward": 3, "full": 5}  # tensors of x's size read + written

# Headline targets, printed in the summary (not asserted).
CPU_PLAIN_HEADLINE = (KERNEL_PLAIN, "float32", (4096, 4096), "torch", 1.0)
CPU_CAUSAL_HEADLINE = (KERNEL_CAUSAL, "float32", (12, 1024, 1024), "torch_unfused", 2.0)
GPU_COPY_FRACTION = 0.85
GPU_HEADLINE_COLS = (1024, 65536)


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str
    shape: tuple
    dtype: torch.dtype
    scale: float | None
    causal: bool
    x_name: str
    x_value: int
    providers: tuple


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
        cases += [Case(KERNEL_PLAIN, s, dtype, None, False, "N", s[-1], plain) for s in plain_shapes]
        cases += [Case(KERNEL_CAUSAL, s, dtype, CAUSAL_SCALE, True, "T", s[-1], causal) for s in causal_shapes]
    return cases


# ---------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------
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


def unavailable_reason(provider: str, device: torch.device) -> str | None:
    if provider == "fusedtx_native" and not backends.is_available("native", device):
        return "fusedtx native backend unavailable"
    if provider == "fusedtx_triton":
        if device.type != "cuda":
            return "Triton is benchmarked only compiled on CUDA (the CPU interpreter is far too slow)"
        mode = backends.triton_mode()
        if mode != "compiled":
            return f"Triton mode is {mode!r}, not compiled (unset TRITON_INTERPRET)"
        if not backends.is_available("triton", device):
            return "fusedtx triton backend unavailable"
    return None


def make_provider(name: str, case: Case, device: torch.device):
    """The function x -> y that provider `name` runs for this case."""
    scale, causal = case.scale, case.causal
    mask = causal_mask(case.shape[-2], case.shape[-1], device) if causal else None
    unfused_scale = 1.0 if scale is None else scale
    if name == "fusedtx_native":
        return lambda x: fusedtx.softmax(x, scale=scale, causal=causal, backend="native")
    if name == "fusedtx_triton":
        return lambda x: fusedtx.softmax(x, scale=scale, causal=causal, backend="triton")
    if name == "torch":
        assert scale is None and not causal, "torch.softmax has no scale or mask"
        return torch_softmax
    if name == "torch_unfused":
        return lambda x: torch_unfused(x, unfused_scale, mask)
    if name == "torch_compile":
        return torch.compile(torch_softmax, dynamic=False)
    if name == "torch_compile_unfused":
        return torch.compile(lambda x: torch_unfused(x, unfused_scale, mask), dynamic=False)
    raise ValueError(f"unknown provider {name!r}")


def expected(x: torch.Tensor, case: Case) -> torch.Tensor:
    """float64 reference output, to check every provider computes the same function."""
    mask = causal_mask(x.shape[-2], x.shape[-1], x.device) if case.causal else None
    return torch_unfused(x.double(), 1.0 if case.scale is None else case.scale, mask)


def check_output(fn, x: torch.Tensor, ref: torch.Tensor, case: Case) -> str | None:
    """First call of a provider (compiles it) and a correctness check against ref = expected(x);
    a message if the output is wrong."""
    y = fn(x)
    tol = 1e-5 if case.dtype == torch.float32 else 2e-2
    err = (y.double() - ref).abs().max().item()
    if y.shape != x.shape or y.dtype != x.dtype or not err <= tol:
        return f"output differs from the float64 reference: max abs err {err:.3g} > {tol} (shape {tuple(y.shape)}, {y.dtype})"
    return None


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
def make_input(case: Case, device: torch.device, requires_grad: bool = False) -> torch.Tensor:
    x = torch.randn(case.shape, device=device, dtype=torch.float32).to(case.dtype)
    return x.requires_grad_(requires_grad)


def timed_call(fn, case: Case, mode: str, device: torch.device, n_copies: int):
    """(call, inputs): call(inputs[i]) is what one repetition of `mode` runs."""
    if mode == "forward":
        return fn, [make_input(case, device) for _ in range(n_copies)]
    inputs = []
    for _ in range(n_copies):
        x = make_input(case, device, requires_grad=True)
        dy = torch.randn(case.shape, device=device, dtype=torch.float32).to(case.dtype)
        inputs.append((x, fn(x) if mode == "backward" else None, dy))
    if mode == "backward":
        return (lambda xyd: torch.autograd.grad(xyd[1], xyd[0], xyd[2], retain_graph=True)), inputs
    return (lambda xyd: torch.autograd.grad(fn(xyd[0]), xyd[0], xyd[2])), inputs


def measure(rec: common.Recorder, case: Case, provider: str, fn, mode: str, args) -> dict:
    numel = math.prod(case.shape)
    nbytes = BYTES_MOVED[mode] * numel * case.dtype.itemsize
    n_copies = common.rotation_copies(nbytes, args.device)
    call, inputs = timed_call(fn, case, mode, args.device, n_copies)
    timing = common.time_fn(call, inputs, device=args.device, config=args.timing)
    row = rec.add(case.kernel, provider, mode, "bandwidth", "GB/s", case.x_name, case.x_value,
                  common.rate(nbytes / 1e9, timing), case.dtype, case.shape)
    peak = common.peak_memory_mb(lambda: call(inputs[0]), args.device)
    if peak is not None:
        rec.add(case.kernel, provider, mode, "peak_memory", "MB", case.x_name, case.x_value,
                common.same(peak), case.dtype, case.shape)
    del inputs
    return row


def run(args) -> common.Recorder:
    cases = make_cases(args.device, args.quick)
    known = {p for c in cases for p in c.providers}
    if args.providers and not set(args.providers) <= known:
        raise SystemExit(f"--providers: unknown {sorted(set(args.providers) - known)}; known: {sorted(known)}")
    rec = common.Recorder(args.out, args.device)
    ceilings = common.get_ceilings(args, rec)
    tasks = [(c, p, m) for c in cases for p in c.providers for m in common.MODES
             if not args.providers or p in args.providers]
    unavailable: dict[str, str] = {}  # provider -> why it cannot run here (all cases)
    current, fns, wrong, check = None, {}, set(), None
    for k, (case, provider, mode) in enumerate(common.progress(tasks, desc="softmax"), 1):
        if case is not current:
            rec.flush()
            current, fns, wrong, check = case, {}, set(), None
            torch._dynamo.reset()  # fresh compile caches: no recompile-limit fallback to eager
        if provider in unavailable or provider in wrong:
            continue
        if provider not in fns:
            reason, mismatch = unavailable_reason(provider, args.device), None
            if reason is None:
                try:
                    if check is None:
                        x = make_input(case, args.device)
                        check = (x, expected(x, case))
                    fns[provider] = make_provider(provider, case, args.device)
                    mismatch = check_output(fns[provider], *check, case)
                except Exception as exc:  # e.g. torch.compile without a C++ compiler, out of memory
                    mismatch = f"{type(exc).__name__}: {(str(exc).strip() or '?').splitlines()[0]}"
            if reason is not None:
                unavailable[provider] = reason
                common.note(f"skipping {provider}: {reason}")
                continue
            if mismatch is not None:  # failed, or a wrong answer: never record a figure for it
                wrong.add(provider)
                common.note(f"skipping {provider} for {case.kernel} {common.dtype_str(case.dtype)} "
                            f"{common.shape_str(case.shape)}: {mismatch}")
                continue
        try:
            row = measure(rec, case, provider, fns[provider], mode, args)
        except Exception as exc:  # out of memory, a compile error in backward, ...: go on
            wrong.add(provider)
            common.note(f"skipping {provider} for {case.kernel} {common.dtype_str(case.dtype)} "
                        f"{common.shape_str(case.shape)} from mode {mode} on: {type(exc).__name__}: "
                        f"{(str(exc).strip() or '?').splitlines()[0]}")
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        common.note(f"[{k}/{len(tasks)}] {case.kernel:15s} {row['dtype']:9s} {row['shape']:>14s} {provider:22s} "
                    f"{mode:8s} {float(row['p50']):9.1f} GB/s")
    rec.flush()
    summarize(rec.rows, ceilings, args)
    return rec


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
def summarize(rows: list[dict], ceilings: dict, args) -> None:
    """Print p50 GB/s per case with fusedtx_native's ratios to its peers, then the headlines."""
    bw = {(r["kernel"], r["dtype"], r["shape"], r["mode"], r["provider"]): float(r["p50"])
          for r in rows if r["metric"] == "bandwidth"}
    copy_bw = ceilings.get("copy_bandwidth")
    print()
    print(f"Summary: p50 GB/s on {common.device_name(args.device)}"
          + (f"; copy bandwidth (copy_) {copy_bw:.1f} GB/s" if copy_bw else "; copy bandwidth unknown"))
    for kernel, eager, compiled in ((KERNEL_PLAIN, "torch", "torch_compile"),
                                    (KERNEL_CAUSAL, "torch_unfused", "torch_compile_unfused")):
        keys = sorted({k[1:4] for k in bw if k[0] == kernel},
                      key=lambda k: (k[0], [int(s) for s in k[1].split("x")], common.MODES.index(k[2])))
        if not keys:
            continue
        print(f"\n{kernel}: eager = {eager}, compile = {compiled}; nat = fusedtx_native, tri = fusedtx_triton")
        print(f"  {'dtype':9s} {'shape':>14s} {'mode':8s} {'nat':>8s} {'tri':>8s} {'eager':>8s} {'compile':>8s} "
              f"{'nat/eager':>9s} {'nat/comp':>9s} {'nat/copy':>8s} {'tri/copy':>8s}")
        for dtype, shape, mode in keys:
            get = lambda p: bw.get((kernel, dtype, shape, mode, p))  # noqa: E731
            nat, tri, eag, com = get("fusedtx_native"), get("fusedtx_triton"), get(eager), get(compiled)
            print(f"  {dtype:9s} {shape:>14s} {mode:8s} {_num(nat):>8s} {_num(tri):>8s} {_num(eag):>8s} "
                  f"{_num(com):>8s} {_ratio(nat, eag):>9s} {_ratio(nat, com):>9s} {_pct(nat, copy_bw):>8s} "
                  f"{_pct(tri, copy_bw):>8s}")
    print()
    print("Headline targets (printed, not asserted):")
    if args.device.type == "cpu":
        for kernel, dtype, shape, peer, target in (CPU_PLAIN_HEADLINE, CPU_CAUSAL_HEADLINE):
            shape_s = common.shape_str(shape)
            for mode in common.MODES:
                nat = bw.get((kernel, dtype, shape_s, mode, "fusedtx_native"))
                ref = bw.get((kernel, dtype, shape_s, mode, peer))
                verdict = "not measured" if nat is None or ref is None else (
                    f"{nat / ref:.2f}x -> {'met' if nat / ref >= target else 'NOT met'}")
                print(f"  CPU {kernel} {dtype} {shape_s} {mode:8s}: fusedtx_native >= {target:.1f}x {peer}: {verdict}")
    else:
        lo, hi = GPU_HEADLINE_COLS
        for provider in ("fusedtx_native", "fusedtx_triton"):
            for dtype in sorted({k[1] for k in bw if k[0] == KERNEL_PLAIN}):
                for mode in common.MODES:
                    pts = [(int(k[2].split("x")[-1]), v) for k, v in bw.items()
                           if k[0] == KERNEL_PLAIN and k[1] == dtype and k[3] == mode and k[4] == provider
                           and lo <= int(k[2].split("x")[-1]) <= hi]
                    if not pts or not copy_bw:
                        verdict = "not measured"
                    else:
                        n_min, v_min = min(pts, key=lambda p: p[1])
                        frac = v_min / copy_bw
                        verdict = (f"min {frac:.0%} (N={n_min}) over {len(pts)} sizes -> "
                                   f"{'met' if frac >= GPU_COPY_FRACTION else 'NOT met'}")
                    print(f"  GPU {KERNEL_PLAIN} {dtype} {mode:8s}: {provider} >= {GPU_COPY_FRACTION:.0%} of copy "
                          f"bandwidth for N {lo}..{hi}: {verdict}")
    if args.quick:
        print("  (--quick: tiny sizes, so the headline shapes were not measured)")


def _num(v):
    return "-" if v is None else f"{v:.1f}"


def _ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def _pct(a, b):
    return "-" if a is None or not b else f"{a / b:.0%}"


def main(argv=None) -> None:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    run(args)
    common.finish(args, kernels=(KERNEL_PLAIN, KERNEL_CAUSAL))


if __name__ == "__main__":
    main()
