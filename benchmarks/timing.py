"""Timing one call: percentiles over repetitions, cold inputs, peak memory.

    timing = time_fn(fn, inputs, device=device)          # Timing(p50, p20, p80) in ms
    values = rate(nbytes / 1e9, timing)                  # (p50, p20, p80) in GB/s

The conventions, the same on every device:
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
  * OtherLoad: the CPU time other processes took while a timing ran; on a shared machine a
    figure measured beside them is theirs as much as the code's.
"""
from __future__ import annotations

import dataclasses
import math
import os
import resource
import statistics
import time
from typing import Callable, Iterable, Sequence

import torch

MB = 1 << 20
# Below this many bytes touched per call, inputs are rotated (see rotation_copies): ~the L2 of
# an H100/H200 (50 MB) and the L3 of a typical server CPU core complex (32 MB) both fit.
ROTATE_BELOW_BYTES = 64 * MB
# ... and the copies together then touch at least this much, so a copy is evicted before reuse.
ROTATION_TARGET_BYTES = 128 * MB
MAX_COPIES = 64


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


class OtherLoad:
    """The CPU time other processes used while it was open, as a share of the machine (Linux:
    /proc/stat's busy time minus this process's own). On a shared machine a figure measured
    while others ran is not this code's speed: each parallel region waits for descheduled threads."""

    def __init__(self):
        self.share = None

    @staticmethod
    def _sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime

    def __enter__(self):
        try:
            self._start = self._sample()
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def __exit__(self, *exc):
        if self._start is not None:
            (t0, busy0, own0), (t1, busy1, own1) = self._start, self._sample()
            self.share = max(0.0, (busy1 - busy0) - (own1 - own0)) / max((t1 - t0) * (os.cpu_count() or 1), 1e-9)
        return False
