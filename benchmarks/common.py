"""Shared benchmark harness: timing, the results CSV, device ceilings, plots and CLI flags.

Every `benchmarks/bench_<op>.py` uses this module so that all figures are measured, stored and
drawn the same way:

    timing = time_fn(fn, inputs, device=device)          # Timing(p50, p20, p80) in ms
    rec = Recorder(args.out, device)                     # one run = one timestamp
    rec.add("softmax", "fusedtx_native", "forward", "bandwidth", "GB/s", "N", 4096,
            rate(nbytes / 1e9, timing), dtype, shape)
    rec.flush()                                          # append to the CSV

Timing conventions (the same on every device):
  * The first call is untimed (torch.compile compiles, the C++ extension loads, Triton JITs),
    then a short warm-up, then repetitions until both `min_reps` and `min_time` are reached.
  * Each repetition is timed on its own, so p20/p50/p80 are percentiles over repetitions.
  * CUDA: CUDA events around each call. Before each call the GPU is given a head start of queued
    work (torch.cuda._sleep) long enough to cover the Python/launch overhead, so the events
    measure GPU time of the op, not host overhead (hide_launch_overhead=False to include it).
  * Memory-bound ops: inputs smaller than ~64 MB would be served from L2 (GPU) or L3 (CPU) on
    repeated calls; rotation_copies() says how many independent copies to rotate among so that
    each call reads cold data. The CPU gets the same treatment, for comparable numbers.
  * Gradients: benchmarks use torch.autograd.grad, which returns fresh gradients and
    accumulates nothing; for code that calls .backward(), pass grad_to_none= to reset .grad
    before every repetition (outside the timed region).

CSV conventions (benchmarks/results/results.csv, see CSV_COLUMNS): p50/p20/p80 hold the *metric*
computed from the 50th/20th/80th percentile of *time*. For a throughput metric (GB/s, TFLOP/s)
that means p20 >= p50 >= p80: p20 is the faster end. For time-like metrics (ms) p20 <= p80.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

try:
    import fusedtx
except ImportError:  # running from a checkout that is not pip-installed: use the repo's package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fusedtx

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_CSV = RESULTS_DIR / "results.csv"

CSV_COLUMNS = ("kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80",
               "dtype", "shape", "device", "fusedtx_version", "torch_version", "timestamp")
MODES = ("forward", "backward", "full")

MB = 1 << 20
# Below this many bytes touched per call, inputs are rotated (see rotation_copies): ~the L2 of
# an H100/H200 (50 MB) and the L3 of a typical server CPU core complex (32 MB) both fit.
ROTATE_BELOW_BYTES = 64 * MB
# ... and the copies together then touch at least this much, so a copy is evicted before reuse.
ROTATION_TARGET_BYTES = 128 * MB
MAX_COPIES = 64


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------
def device_name(device: torch.device | str) -> str:
    """What the CSV's `device` column holds: the GPU's name, or the CPU model and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if not model:
        import platform

        model = platform.processor() or platform.machine() or "unknown CPU"
    # torch's intra-op thread count is what the benchmarks run with (the native kernels use
    # at::parallel_for, so the same count).
    threads = torch.get_num_threads()
    return f"{model} ({threads} thread{'s' if threads != 1 else ''})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Timing:
    """Percentiles of the time of one call, in milliseconds, over `reps` repetitions."""
    p50: float
    p20: float
    p80: float
    reps: int

    def __str__(self) -> str:
        return f"{self.p50:.4g} ms [{self.p20:.4g}, {self.p80:.4g}] x{self.reps}"


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    """How long to measure. Small defaults: the CPU suite should take minutes, not hours."""
    warmup_time: float = 0.05   # seconds of warm-up calls after the first (untimed) call
    min_time: float = 0.5       # seconds of timed calls, at least (a shared 2-core VM is noisy)
    min_reps: int = 10
    max_reps: int = 10_000
    max_time: float = 10.0      # stop after this many seconds even if min_reps is not reached

    @classmethod
    def for_device(cls, device: torch.device, quick: bool = False, min_time: float | None = None,
                   min_reps: int | None = None) -> "TimingConfig":
        if quick:
            cfg = cls(warmup_time=0.01, min_time=0.02, min_reps=3, max_time=2.0)
        elif torch.device(device).type == "cuda":
            # GPU calls are short and cheap to repeat: more repetitions, steadier percentiles.
            cfg = cls(warmup_time=0.1, min_time=0.5, min_reps=20)
        else:
            cfg = cls()
        return dataclasses.replace(cfg, min_time=cfg.min_time if min_time is None else min_time,
                                   min_reps=cfg.min_reps if min_reps is None else min_reps)


def percentiles(times_ms: Sequence[float], reps: int | None = None) -> Timing:
    qs = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else [times_ms[0]] * 9
    return Timing(p50=statistics.median(times_ms), p20=qs[1], p80=qs[7], reps=reps or len(times_ms))


_cycles_per_ms: float | None = None


def _gpu_cycles_per_ms() -> float | None:
    """How many torch.cuda._sleep cycles make a millisecond (None: _sleep is not available)."""
    global _cycles_per_ms
    if _cycles_per_ms is None:
        try:
            torch.cuda._sleep(1000)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(20_000_000)
            end.record()
            end.synchronize()
            _cycles_per_ms = 20_000_000 / max(start.elapsed_time(end), 1e-3)
        except (AttributeError, RuntimeError):
            _cycles_per_ms = 0.0
    return _cycles_per_ms or None


def time_fn(fn: Callable, inputs: Sequence | None = None, *, device: torch.device | str,
            config: TimingConfig | None = None, grad_to_none: Iterable[torch.Tensor] = (),
            before_each: Callable[[], None] | None = None, hide_launch_overhead: bool = True) -> Timing:
    """Time fn(inputs[i % len(inputs)]) (or fn() when inputs is None), rotating through inputs.

    before_each() and resetting grad_to_none's .grad run before every repetition, outside the
    timed region. Returns Timing in milliseconds.
    """
    device = torch.device(device)
    config = config or TimingConfig.for_device(device)
    grad_to_none = list(grad_to_none)
    n_inputs = len(inputs) if inputs is not None else 0

    def call(i: int):
        if before_each is not None:
            before_each()
        for t in grad_to_none:
            t.grad = None
        return (lambda: fn(inputs[i % n_inputs])) if n_inputs else fn

    # First call: compilation, extension loading, allocator growth. Never timed.
    call(0)()
    synchronize(device)

    # Warm-up, also estimating the time per call (with sync, so it includes host overhead).
    warm_times, host_times = [], []
    deadline = time.perf_counter() + config.warmup_time
    i = 1
    while len(warm_times) < 2 or time.perf_counter() < deadline:
        f = call(i)
        t0 = time.perf_counter()
        f()
        t1 = time.perf_counter()
        synchronize(device)
        t2 = time.perf_counter()
        host_times.append(t1 - t0)
        warm_times.append(t2 - t0)
        i += 1
        if len(warm_times) >= 1000:
            break

    if device.type == "cuda":
        return _time_cuda(call, i, config, statistics.median(warm_times), statistics.median(host_times),
                          hide_launch_overhead)
    return _time_cpu(call, i, config)


def _time_cpu(call, start_index: int, config: TimingConfig) -> Timing:
    times = []
    total = 0.0
    started = time.perf_counter()
    i = start_index
    while len(times) < config.max_reps:
        enough = len(times) >= config.min_reps and total >= config.min_time
        if enough or (time.perf_counter() - started > config.max_time and len(times) >= 1):
            break
        f = call(i)
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
        total += times[-1]
        i += 1
    return percentiles([t * 1e3 for t in times])


def _time_cuda(call, start_index: int, config: TimingConfig, est_s: float, host_s: float,
               hide_launch_overhead: bool) -> Timing:
    # Events are recorded asynchronously, so decide the repetition count up front from the
    # warm-up estimate (as triton.testing.do_bench does) instead of syncing after each call.
    reps = max(config.min_reps, math.ceil(config.min_time / max(est_s, 1e-6)))
    reps = min(reps, config.max_reps, max(config.min_reps, math.ceil(config.max_time / max(est_s, 1e-6))))
    sleep_cycles = 0
    if hide_launch_overhead:
        cycles_per_ms = _gpu_cycles_per_ms()
        if cycles_per_ms:
            # Queue enough GPU work ahead of each call to cover the time Python takes to launch
            # it (twice the measured host time, 20 us at least, 20 ms at most).
            sleep_ms = min(max(2 * host_s * 1e3, 0.02), 20.0)
            sleep_cycles = int(sleep_ms * cycles_per_ms)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        f = call(start_index + r)
        if sleep_cycles:
            torch.cuda._sleep(sleep_cycles)
        starts[r].record()
        f()
        ends[r].record()
    torch.cuda.synchronize()
    return percentiles([s.elapsed_time(e) for s, e in zip(starts, ends)])


def rotation_copies(bytes_per_call: int, device: torch.device | str | None = None,
                    below: int = ROTATE_BELOW_BYTES, target: int = ROTATION_TARGET_BYTES) -> int:
    """How many independent input copies to rotate among so repeated calls do not hit in cache.

    bytes_per_call: the bytes one call reads and writes. 1 when that is already >= `below`;
    otherwise enough copies to touch `target` bytes (and 2x the GPU's L2) per rotation.
    """
    if bytes_per_call >= below:
        return 1
    if device is not None and torch.device(device).type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 0)
        target = max(target, 2 * l2)
    return max(1, min(MAX_COPIES, math.ceil(target / max(bytes_per_call, 1))))


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Memory one call of fn() allocates on top of what is already allocated (CUDA only, MB)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None  # the CPU allocator keeps no statistics
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / MB


def rate(amount: float, timing: Timing) -> tuple[float, float, float]:
    """(p50, p20, p80) of amount per second, e.g. rate(nbytes / 1e9, t) -> GB/s, computed from
    the p50, p20, p80 of time (so for a rate p20 is the highest of the three)."""
    return tuple(amount / (t * 1e-3) for t in (timing.p50, timing.p20, timing.p80))


def same(value: float) -> tuple[float, float, float]:
    """(p50, p20, p80) of a value measured once (e.g. peak memory)."""
    return (value, value, value)


# ---------------------------------------------------------------------------------------------
# The results CSV
# ---------------------------------------------------------------------------------------------
def now_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def append_rows(rows: Sequence[dict], path: str | Path = DEFAULT_CSV) -> None:
    """Append rows (dicts with CSV_COLUMNS keys) to the CSV, creating it with a header if missing."""
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if tuple(header or ()) != CSV_COLUMNS:
            raise ValueError(f"{path}: header {header} does not match the schema {list(CSV_COLUMNS)}; "
                             "write to another file with --out")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_COLUMNS})


def read_rows(path: str | Path = DEFAULT_CSV) -> list[dict]:
    """The CSV's rows as dicts, with x_value/p50/p20/p80 as floats."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("x_value", "p50", "p20", "p80"):
            row[key] = float(row[key])
    return rows


def fmt_value(v: float) -> str:
    return f"{v:.6g}"


def shape_str(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def dtype_str(dtype: torch.dtype | str) -> str:
    return str(dtype).replace("torch.", "")


class Recorder:
    """Collects the rows of one run (one device, one timestamp) and appends them to the CSV."""

    def __init__(self, out: str | Path | None, device: torch.device | str, timestamp: str | None = None):
        self.out = Path(out) if out else None
        self.device = torch.device(device)
        self.device_name = device_name(self.device)
        self.timestamp = timestamp or now_timestamp()
        self.rows: list[dict] = []   # every row of this run (for summaries)
        self._pending: list[dict] = []

    def add(self, kernel: str, provider: str, mode: str, metric: str, unit: str, x_name: str,
            x_value: float, values: tuple[float, float, float], dtype, shape) -> dict:
        p50, p20, p80 = values
        row = {
            "kernel": kernel, "provider": provider, "mode": mode, "metric": metric, "unit": unit,
            "x_name": x_name, "x_value": x_value, "p50": fmt_value(p50), "p20": fmt_value(p20),
            "p80": fmt_value(p80), "dtype": dtype_str(dtype),
            "shape": shape if isinstance(shape, str) else shape_str(shape),
            "device": self.device_name, "fusedtx_version": fusedtx.__version__,
            "torch_version": torch.__version__, "timestamp": self.timestamp,
        }
        self.rows.append(row)
        self._pending.append(row)
        return row

    def flush(self) -> None:
        """Append the rows added since the last flush (flushing often keeps partial runs)."""
        if self.out is not None:
            append_rows(self._pending, self.out)
        self._pending = []


# ---------------------------------------------------------------------------------------------
# Device ceilings: what the op is compared with besides its peers
# ---------------------------------------------------------------------------------------------
def measure_ceilings(rec: Recorder, config: TimingConfig | None = None, quick: bool = False) -> dict:
    """Measure copy bandwidth and matmul rate on rec.device, add them as kernel="ceiling" rows,
    and return {"copy_bandwidth": GB/s p50 of copy_, "matmul": TFLOP/s p50}.

    Copy: a large fp32 tensor (128 MB on CPU, 1 GB on CUDA: far beyond any cache),
    bytes read + written counted. `copy_` into a preallocated tensor is the device's bandwidth,
    the ceiling figures are compared with. `clone` allocates its output like the ops do and is
    recorded too: on CPU a fresh large allocation is mapped page by page, which costs more than
    the copy itself, and every op that returns a new large tensor pays it. Matmul: fp32 2048^3
    on CPU, bf16 8192^3 on CUDA.
    """
    device = rec.device
    config = config or TimingConfig.for_device(device, quick=quick)
    cuda = device.type == "cuda"
    result = {}

    nbytes = (1024 if cuda else 128) * MB
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for provider, fn in (("clone", src.clone), ("copy_", lambda: dst.copy_(src))):
        t = time_fn(fn, device=device, config=config)
        values = rate(2 * nbytes / 1e9, t)
        rec.add("ceiling", provider, "forward", "copy_bandwidth", "GB/s", "bytes", nbytes, values,
                src.dtype, src.shape)
        if provider == "copy_":
            result["copy_bandwidth"] = values[0]
    del src, dst

    n = (8192 if cuda else 2048) // (4 if quick else 1)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device=device, config=config)
    values = rate(2 * n ** 3 / 1e12, t)
    rec.add("ceiling", "torch.mm", "forward", "matmul", "TFLOP/s", "n", n, values, dtype, (n, n, n))
    result["matmul"] = values[0]
    rec.flush()
    return result


def latest_ceilings(path: str | Path, device: torch.device | str) -> dict:
    """The most recent ceiling measurements for this device in the CSV ({} if none)."""
    path = Path(path)
    if not path.exists():
        return {}
    name = device_name(device)
    rows = [r for r in read_rows(path) if r["kernel"] == "ceiling" and r["device"] == name]
    result = {}
    for metric, provider in (("copy_bandwidth", "copy_"), ("matmul", "torch.mm")):
        match = [r for r in rows if r["metric"] == metric and r["provider"] == provider]
        if match:
            result[metric] = max(match, key=lambda r: r["timestamp"])["p50"]
    return result


def get_ceilings(args, rec: Recorder) -> dict:
    """Measure the ceilings, or with --skip-ceilings (run_all measured them) read them back."""
    if args.skip_ceilings:
        return latest_ceilings(args.out, rec.device) if args.out else {}
    print(f"measuring device ceilings on {rec.device_name} ...", flush=True)
    ceilings = measure_ceilings(rec, quick=args.quick)
    print("  copy bandwidth {copy_bandwidth:.1f} GB/s, matmul {matmul:.2f} TFLOP/s".format(**ceilings), flush=True)
    return ceilings


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------
def progress(cases: Sequence, desc: str):
    """A tqdm bar over benchmark cases (inside the loop, print with note() to keep the bar)."""
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs), where note() lines show progress.
    return tqdm(cases, desc=desc, unit="case", dynamic_ncols=True, file=sys.stderr, disable=None)


def note(msg: str) -> None:
    """Print without breaking a progress bar."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def latest_run(rows: Sequence[dict]) -> list[dict]:
    """Of rows of one (kernel, device), those of the most recent run (its timestamp)."""
    if not rows:
        return []
    last = max(r["timestamp"] for r in rows)
    return [r for r in rows if r["timestamp"] == last]


def plot_results(csv_path: str | Path = DEFAULT_CSV, out_dir: str | Path = RESULTS_DIR,
                 kernels: Sequence[str] | None = None) -> list[Path]:
    """Draw one PNG per (kernel, device) from the CSV: metric vs x_value, one line per provider
    (p50, with a p20..p80 band), one subplot per (dtype, metric) row and mode column, and the
    device's copy-bandwidth / matmul ceilings as dashed lines. Only the latest run of each
    (kernel, device) is drawn. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ceilings = {}  # (device, metric unit) -> [(label, value)]
    for device in {r["device"] for r in rows}:
        for (metric, unit), group in _group(latest_run([r for r in rows if r["kernel"] == "ceiling" and r["device"] == device]),
                                            ("metric", "unit")).items():
            ceilings.setdefault((device, unit), []).extend(
                (f"{metric.replace('_', ' ')} ({r['provider']}, {r['dtype']})", r["p50"]) for r in group)

    written = []
    groups = _group([r for r in rows if r["kernel"] != "ceiling" and (not kernels or r["kernel"] in kernels)],
                    ("kernel", "device"))
    for (kernel, device), kernel_rows in sorted(groups.items()):
        run = latest_run(kernel_rows)
        modes = [m for m in MODES if any(r["mode"] == m for r in run)] or sorted({r["mode"] for r in run})
        panels = sorted({(r["dtype"], r["metric"], r["unit"], _layer(r)) for r in run},
                        key=lambda p: (p[1] not in ("bandwidth", "throughput"), p))
        fig, axes = plt.subplots(len(panels), len(modes), figsize=(max(5.0 * len(modes), 7.5), 3.6 * len(panels)),
                                 squeeze=False)
        providers = sorted({r["provider"] for r in run}, key=lambda p: (not p.startswith("fusedtx"), p))
        colors = {p: f"C{i}" for i, p in enumerate(providers)}
        for i, (dtype, metric, unit, layer) in enumerate(panels):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                cell = [r for r in run if (r["dtype"], r["metric"], r["mode"], _layer(r)) == (dtype, metric, mode, layer)]
                xs_all = sorted({r["x_value"] for r in cell})
                single = len(xs_all) == 1  # one size only: bars per provider instead of lines
                for k, provider in enumerate(providers):
                    pts = sorted((r["x_value"], r["p50"], r["p20"], r["p80"]) for r in cell if r["provider"] == provider)
                    if not pts:
                        continue
                    xs, p50, p20, p80 = zip(*pts)
                    lo, hi = [min(a, b) for a, b in zip(p20, p80)], [max(a, b) for a, b in zip(p20, p80)]
                    if single:
                        ax.bar([k], p50, color=colors[provider], label=provider,
                               yerr=[[m - a for m, a in zip(p50, lo)], [b - m for m, b in zip(p50, hi)]], capsize=3)
                    else:
                        ax.plot(xs, p50, marker="o", ms=3, color=colors[provider], label=provider)
                        ax.fill_between(xs, lo, hi, color=colors[provider], alpha=0.2, linewidth=0)
                for k, (label, value) in enumerate(ceilings.get((device, unit), [])):
                    ax.axhline(value, color="k", linestyle=("--", ":", "-.")[k % 3], linewidth=1, label=label)
                if single:
                    ax.set_xticks([])
                    ax.set_xlabel(f"{cell[0]['x_name']} = {xs_all[0]:g} ({cell[0]['shape']})")
                else:
                    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 4:
                        ax.set_xscale("log", base=2)
                    ax.set_xlabel(cell[0]["x_name"] if cell else "")
                ax.set_title(f"{mode} · {dtype}" + (f" · {layer}" if layer else ""), fontsize=10)
                ax.set_ylabel(f"{metric} ({unit})")
                ax.set_ylim(bottom=0)
                ax.grid(True, alpha=0.3)
        # One legend for the whole figure, below the panels, so no line is hidden behind it.
        legend = {}
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        n_legend_rows = math.ceil(len(legend) / 4) if legend else 0
        fig.legend(list(legend.values()), list(legend.keys()), loc="lower center", ncol=min(4, len(legend) or 1),
                   fontsize=8, frameon=False)
        r0 = run[0]
        fig.suptitle(f"{kernel} — {device}\nfusedtx {r0['fusedtx_version']}, torch {r0['torch_version']}, "
                     f"{r0['timestamp']} (p50, band p20–p80)", fontsize=11)
        fig.tight_layout(rect=(0, min(0.4, 0.05 * n_legend_rows / len(panels) + 0.02), 1, 1))
        path = out_dir / f"{kernel}_{_slug(device)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# Sweeps whose x-axis is one dim of a longer shape get one row of panels per value of the other
# dims: x name -> the swept dim (Linear's M of M x K x N, attention's T or L of B x H x T x D).
SWEPT_DIM = {"M": 0, "T": 2, "L": 2}


def _layer(row: dict) -> str:
    dims = row["shape"].split("x")
    at = SWEPT_DIM.get(row["x_name"])
    if at is None or at >= len(dims) or len(dims) < 3:
        return ""
    return "x".join(dims[:at] + ["·"] + dims[at + 1:])


def _group(rows: Iterable[dict], keys: Sequence[str]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every bench script (and run_all.py) takes."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device(),
                        help="device to benchmark (default: cuda if available, else cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repetitions: a smoke test, not a measurement")
    parser.add_argument("--out", default=str(DEFAULT_CSV),
                        help=f"CSV to append results to (default: {DEFAULT_CSV.relative_to(BENCH_DIR.parent)})")
    parser.add_argument("--no-plot", action="store_true", help="do not draw PNGs after the run (they go next to the --out CSV)")
    parser.add_argument("--providers", default=None,
                        help="comma-separated providers to run (default: all available here)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds of timed repetitions per measurement (default: 0.5)")
    parser.add_argument("--min-reps", type=int, default=None,
                        help="repetitions per measurement, at least (default: 10 CPU, 20 CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads; default: torch's default)")
    parser.add_argument("--fresh-pages", action="store_true",
                        help="CPU: let glibc return freed memory to the OS, so large outputs are page-faulted "
                             "in on every call (default: keep freed memory, see keep_freed_memory)")
    parser.add_argument("--skip-ceilings", action="store_true",
                        help="do not measure copy bandwidth / matmul ceilings; use the latest ones in --out")
    return parser


def parse_args(description: str, argv: Sequence[str] | None = None,
               extra_args: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The common flags (and those extra_args(parser) adds, for one script's own options)."""
    parser = add_common_args(argparse.ArgumentParser(description=description))
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    if argv is None and args.device == "cpu" and not args.fresh_pages:
        keep_freed_memory()
    return check_args(parser, args)


# glibc returns every freed block larger than 32 MB to the OS, and the next allocation of the
# same size is mapped again page by page: a 4096x4096 float32 softmax then spends ~80% of its
# time in page faults, and whether a given size hits that path depends on the allocation
# history (glibc adapts its threshold), which made CPU figures swing 5x between runs. Like
# PyTorch's CUDA caching allocator, keep freed memory: every provider then pays for its
# kernel, not for the kernel's page faults. --fresh-pages measures the other regime.
KEEP_FREED_MEMORY = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"


def keep_freed_memory() -> None:
    """Re-execute this script once with glibc's malloc set to keep freed memory (Linux only)."""
    if not sys.platform.startswith("linux") or os.environ.get("FUSEDTX_BENCH_MALLOC") == "keep":
        return
    tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), KEEP_FREED_MEMORY) if t)
    env = dict(os.environ, GLIBC_TUNABLES=tunables, FUSEDTX_BENCH_MALLOC="keep")
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available to this PyTorch "
                     f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
    args.device = torch.device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    args.timing = TimingConfig.for_device(args.device, quick=args.quick, min_time=args.min_time, min_reps=args.min_reps)
    return args


def forward_args(args: argparse.Namespace) -> list[str]:
    """The command-line flags that reproduce the common options of args (for subprocesses)."""
    argv = ["--device", args.device.type, "--out", str(args.out)]
    if args.quick:
        argv.append("--quick")
    if args.no_plot:
        argv.append("--no-plot")
    if args.providers:
        argv += ["--providers", ",".join(args.providers)]
    if args.min_time is not None:
        argv += ["--min-time", str(args.min_time)]
    if args.min_reps is not None:
        argv += ["--min-reps", str(args.min_reps)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.skip_ceilings:
        argv.append("--skip-ceilings")
    if args.fresh_pages:
        argv.append("--fresh-pages")
    return argv


def finish(args: argparse.Namespace, kernels: Sequence[str] | None = None) -> None:
    """End of a bench script: draw the plots unless --no-plot."""
    if args.no_plot or not args.out or not Path(args.out).exists():
        return
    out_dir = Path(args.out).resolve().parent
    for path in plot_results(args.out, out_dir, kernels=kernels):
        print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# Running an op's cases: one loop for every bench_<op>.py
# ---------------------------------------------------------------------------------------------
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


def _first_line(exc: Exception) -> str:
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
                mismatch = _first_line(exc)
            if mismatch is not None:
                wrong.add(provider)
                note(f"skipping {provider} for {what}: {mismatch}")
                continue
        try:
            row = _measure(bench, rec, case, provider, fns[provider], mode, args)
        except Exception as exc:  # out of memory, a compile error in backward, ...: go on
            wrong.add(provider)
            note(f"skipping {provider} for {what} from mode {mode} on: {_first_line(exc)}")
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        note(f"[{k}/{len(tasks)}] {case.kernel:15s} {row['dtype']:9s} {row['shape']:>14s} {provider:22s} "
             f"{mode:8s} {float(row['p50']):9.2f} {row['unit']}")
    rec.flush()
    return rec, ceilings


def print_summary_header(ceilings: dict, args) -> None:
    copy_bw = ceilings.get("copy_bandwidth")
    print()
    print(f"Summary: p50 GB/s on {device_name(args.device)}"
          + (f"; copy bandwidth (copy_) {copy_bw:.1f} GB/s" if copy_bw else "; copy bandwidth unknown"))


def print_ratio_table(rows: list[dict], kernel: str, eager: str, compiled: str, metric: str = "bandwidth") -> dict:
    """Print p50 `metric` (GB/s by default) per (dtype, shape, mode) for fusedtx native/triton and
    the two peers, with native's ratios; return {(kernel, dtype, shape, mode, provider): p50}."""
    bw = {(r["kernel"], r["dtype"], r["shape"], r["mode"], r["provider"]): float(r["p50"])
          for r in rows if r["metric"] == metric}
    keys = sorted({k[1:4] for k in bw if k[0] == kernel},
                  key=lambda k: (k[0], [int(s) for s in k[1].split("x")], MODES.index(k[2])))
    if keys:
        print(f"\n{kernel}: eager = {eager}, compile = {compiled}; nat = fusedtx_native, tri = fusedtx_triton")
        print(f"  {'dtype':9s} {'shape':>14s} {'mode':8s} {'nat':>8s} {'tri':>8s} {'eager':>8s} {'compile':>8s} "
              f"{'nat/eager':>9s} {'nat/comp':>9s} {'tri/eager':>9s}")
    for dtype, shape, mode in keys:
        get = lambda p: bw.get((kernel, dtype, shape, mode, p))  # noqa: E731
        nat, tri, eag, com = get("fusedtx_native"), get("fusedtx_triton"), get(eager), get(compiled)
        print(f"  {dtype:9s} {shape:>14s} {mode:8s} {_num(nat):>8s} {_num(tri):>8s} {_num(eag):>8s} {_num(com):>8s} "
              f"{_ratio(nat, eag):>9s} {_ratio(nat, com):>9s} {_ratio(tri, eag):>9s}")
    return bw


def print_bandwidth_targets(bw: dict, kernel: str, fractions: dict, copy_bw: float | None,
                            width_range: tuple[int, int] | None = None) -> None:
    """GPU headlines: for each fusedtx provider, dtype and mode, the worst p50 GB/s of the sweep
    (last dim within width_range, if given) as a fraction of copy bandwidth vs its target."""
    widths = f" for N {width_range[0]}..{width_range[1]}" if width_range else ""
    for provider in ("fusedtx_native", "fusedtx_triton"):
        for dtype in sorted({k[1] for k in bw if k[0] == kernel}):
            for mode, fraction in fractions.items():
                pts = [(k[2], v) for k, v in bw.items() if k[:2] == (kernel, dtype) and k[3:] == (mode, provider)
                       and (width_range is None or width_range[0] <= int(k[2].split("x")[-1]) <= width_range[1])]
                worst = min(pts, key=lambda p: p[1]) if pts else (None, None)
                print_target(f"GPU {kernel} {dtype} {mode:8s}: {provider} >= {fraction:.0%} of copy bandwidth"
                             f"{widths} (worst {worst[0]})", worst[1], copy_bw, fraction, unit="%")


def print_target(label: str, ours: float | None, reference: float | None, target: float, unit: str = "x") -> None:
    """One headline line: 'label: 1.23x -> met' (printed, never asserted)."""
    if ours is None or not reference:
        verdict = "not measured"
    else:
        value = ours / reference
        shown = f"{value:.0%}" if unit == "%" else f"{value:.2f}x"
        verdict = f"{shown} -> {'met' if value >= target else 'NOT met'}"
    print(f"  {label}: {verdict}")


def _num(v):
    return "-" if v is None else f"{v:.3g}"


def _ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}x"
