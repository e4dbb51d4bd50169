"""The loop every op benchmark (bench_<op>.py) runs: check each provider, then time it.

    class SoftmaxBench(OpBench): ...                     # inputs, providers, reference, bytes
    rec, ceilings = run_benchmark(SoftmaxBench(), cases, args)

A bench script supplies an OpBench (how to build inputs and each provider's function, the
float64 reference, the work per call) and a list of Cases; run_benchmark checks every provider
against the reference before timing it, times every (case, provider, mode) with timing.time_fn
on rotated input copies, and appends the rows to the CSV as it goes.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import get_ceilings  # noqa: E402
from results_csv import MODES, Recorder, dtype_str, shape_str  # noqa: E402
from timing import peak_memory_mb, rate, rotation_copies, same, time_fn  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: a kernel (CSV `kernel`), a shape and dtype, the x-axis value, the
    providers to run, and op-specific settings in `opts` (e.g. (("scale", 0.125),); ("modes",
    ("forward",)) limits the modes, e.g. for an inference-only op)."""
    kernel: str
    shape: tuple
    dtype: torch.dtype
    x_name: str
    x_value: int
    providers: tuple
    opts: tuple = ()

    def opt(self, name, default=None):
        return dict(self.opts).get(name, default)


class OpBench:
    """What a bench_<op>.py supplies to run_benchmark. Inputs are a list of tensors, the first
    being the activation; in backward/full modes every input gets a gradient (weights too).
    Memory-bound ops report GB/s (bytes_moved); compute-bound ones override metric, unit and
    amount (e.g. TFLOP/s from a FLOP count)."""

    name = "op"
    metric, unit = "bandwidth", "GB/s"

    def make_inputs(self, case: Case, device: torch.device, requires_grad: bool) -> list[torch.Tensor]:
        raise NotImplementedError

    def make_fn(self, provider: str, case: Case, device: torch.device) -> Callable:
        raise NotImplementedError

    def expected(self, inputs: list[torch.Tensor], case: Case) -> torch.Tensor:
        """The float64 output every provider is checked against before it is timed."""
        raise NotImplementedError

    def bytes_moved(self, case: Case, mode: str) -> int:
        raise NotImplementedError

    def amount(self, case: Case, mode: str) -> float:
        """Work per call in `unit`-seconds: GB by default."""
        return self.bytes_moved(case, mode) / 1e9

    def grad_shape(self, case: Case) -> tuple:
        """Shape of the upstream gradient of backward/full modes (the output's shape)."""
        return case.shape

    def tolerance(self, case: Case) -> float:
        return 1e-4 if case.dtype == torch.float32 else 3e-2

    def unavailable_reason(self, provider: str, device: torch.device) -> str | None:
        return fusedtx_unavailable(provider, device)


def fusedtx_unavailable(provider: str, device: torch.device) -> str | None:
    """Why provider "fusedtx_<backend>" cannot be benchmarked here (None: it can)."""
    if not provider.startswith("fusedtx_"):
        return None
    backend = provider.removeprefix("fusedtx_").split("_")[0]  # fusedtx_native_unsplit: a variant of native
    from fusedtx import backends

    if backend == "triton":
        if device.type != "cuda":
            return "Triton is benchmarked only compiled on CUDA (the CPU interpreter is far too slow)"
        mode = backends.triton_mode()
        if mode != "compiled":
            return f"Triton mode is {mode!r}, not compiled (unset TRITON_INTERPRET)"
    if not backends.is_available(backend, device):
        return f"fusedtx {backend} backend unavailable"
    return None


def _timed_call(bench: OpBench, fn, case: Case, mode: str, device: torch.device, n_copies: int):
    """(call, inputs): call(inputs[i]) is what one repetition of `mode` runs. Backward times the
    gradient alone (forward done once per input copy, graph retained); full runs both."""
    if mode == "forward":
        return (lambda xs: fn(*xs)), [bench.make_inputs(case, device, False) for _ in range(n_copies)]
    sets = []
    for _ in range(n_copies):
        xs = bench.make_inputs(case, device, True)
        dy = torch.randn(bench.grad_shape(case), device=device, dtype=torch.float32).to(case.dtype)
        sets.append((xs, fn(*xs) if mode == "backward" else None, dy))
    if mode == "backward":
        return (lambda s: torch.autograd.grad(s[1], s[0], s[2], retain_graph=True)), sets
    return (lambda s: torch.autograd.grad(fn(*s[0]), s[0], s[2])), sets


def _measure(bench: OpBench, rec: Recorder, case: Case, provider: str, fn, mode: str, args) -> dict:
    nbytes = bench.bytes_moved(case, mode)
    n_copies = rotation_copies(nbytes, args.device)
    call, inputs = _timed_call(bench, fn, case, mode, args.device, n_copies)
    timing = time_fn(call, inputs, device=args.device, config=args.timing)
    row = rec.add(case.kernel, provider, mode, bench.metric, bench.unit, case.x_name, case.x_value,
                  rate(bench.amount(case, mode), timing), case.dtype, case.shape)
    peak = peak_memory_mb(lambda: call(inputs[0]), args.device)
    if peak is not None:
        rec.add(case.kernel, provider, mode, "peak_memory", "MB", case.x_name, case.x_value, same(peak),
                case.dtype, case.shape)
    return row


def _check(bench: OpBench, fn, inputs, ref, case: Case) -> str | None:
    """First call of a provider (compiles it) and its error against the float64 reference."""
    y = fn(*inputs)
    err = (y.double() - ref).abs().max().item()
    tol = bench.tolerance(case)
    if y.shape != ref.shape or y.dtype != case.dtype or not err <= tol:
        return f"output differs from the float64 reference: max abs err {err:.3g} > {tol} (shape {tuple(y.shape)}, {y.dtype})"
    return None


def first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip() or '?').splitlines()[0]}"


def run_benchmark(bench: OpBench, cases: Sequence[Case], args) -> tuple[Recorder, dict]:
    """Check, then time every (case, provider, mode); append rows to the CSV as it goes.

    A provider that cannot run here is skipped for all cases; one that fails or gives a wrong
    answer is skipped for that case: no figure is ever recorded for a wrong result. Returns the
    recorder (its rows) and the device ceilings."""
    known = {p for c in cases for p in c.providers}
    if args.providers and not set(args.providers) <= known:
        raise SystemExit(f"--providers: unknown {sorted(set(args.providers) - known)}; known: {sorted(known)}")
    rec = Recorder(args.out, args.device)
    ceilings = get_ceilings(args, rec)
    tasks = [(c, p, m) for c in cases for p in c.providers for m in c.opt("modes", MODES)
             if not args.providers or p in args.providers]
    unavailable: dict[str, str] = {}
    current, fns, wrong, reference = None, {}, set(), None
    for k, (case, provider, mode) in enumerate(progress(tasks, desc=bench.name), 1):
        if case is not current:
            rec.flush()
            current, fns, wrong, reference = case, {}, set(), None
            torch._dynamo.reset()  # fresh compile caches: no recompile-limit fallback to eager
        if provider in unavailable or provider in wrong:
            continue
        what = f"{case.kernel} {dtype_str(case.dtype)} {shape_str(case.shape)}"
        if provider not in fns:
            reason = bench.unavailable_reason(provider, args.device)
            if reason is not None:
                unavailable[provider] = reason
                note(f"skipping {provider}: {reason}")
                continue
            try:
                if reference is None:
                    inputs = bench.make_inputs(case, args.device, False)
                    reference = (inputs, bench.expected(inputs, case))
                fns[provider] = bench.make_fn(provider, case, args.device)
                mismatch = _check(bench, fns[provider], *reference, case)
            except Exception as exc:  # e.g. torch.compile without a C++ compiler, out of memory
                mismatch = first_line(exc)
            if mismatch is not None:
                wrong.add(provider)
                note(f"skipping {provider} for {what}: {mismatch}")
                continue
        try:
            row = _measure(bench, rec, case, provider, fns[provider], mode, args)
        except Exception as exc:  # out of memory, a compile error in backward, ...: go on
            wrong.add(provider)
            note(f"skipping {provider} for {what} from mode {mode} on: {first_line(exc)}")
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        note(f"[{k}/{len(tasks)}] {case.kernel:15s} {row['dtype']:9s} {row['shape']:>14s} {provider:22s} "
             f"{mode:8s} {float(row['p50']):9.2f} {row['unit']}")
    rec.flush()
    return rec, ceilings


def progress(cases: Sequence, desc: str):
    """A tqdm bar over benchmark cases (inside the loop, print with note() to keep the bar)."""
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs), where note() lines show progress.
    return tqdm(cases, desc=desc, unit="case", dynamic_ncols=True, file=sys.stderr, disable=None)


def note(msg: str) -> None:
    """Print without breaking a progress bar."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)
