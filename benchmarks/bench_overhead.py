"""Benchmark the host time of one fusedtx call on tiny inputs: Python, dispatch and autograd.

    python benchmarks/bench_overhead.py                  # on cuda (or cpu)
    python benchmarks/bench_overhead.py --device cpu --quick --out /tmp/bench_test.csv

On inputs this small the kernels have almost nothing to do, so what a call costs is the host's
work around them — which on a GPU decides whether the kernels are fed fast enough, and on a
CPU is added to every layer of every step. Kernels `overhead_<op>` (softmax 4x256, layer_norm
4x768 with weight and bias, linear 4x768 -> 768 with bias and the tanh GELU, causal_attention
1x2x16x64), modes forward (a training forward: inputs require gradients, so autograd records)
and backward (torch.autograd.grad of a retained graph). Metric: latency in microseconds of host
time per call, timed without synchronising (on CUDA the GPU work is queued, not waited for).
Providers: fusedtx_<backend> (the functional API: in eager code the op's body under an
autograd.Function, see fusedtx/ops/_eager.py), fusedtx_<backend>_registered (the torch.library
op called directly: the path of torch.compile and dispatch modes) and torch (PyTorch's eager ops).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import finish, parse_args  # noqa: E402
from results_csv import Recorder, device_name, fusedtx  # noqa: E402
from runner import fusedtx_unavailable, note  # noqa: E402
from timing import TimingConfig  # noqa: E402
from fusedtx.ops.linear import activation_code  # noqa: E402

MODES = ("forward", "backward")
GELU_TANH = activation_code("gelu_tanh")

# op -> (input shapes, functional call, registered-op call, torch call); calls take (*inputs, backend)
OPS = {
    "softmax": (
        [(4, 256)],
        lambda x, b: fusedtx.softmax(x, backend=b),
        lambda x, b: torch.ops.fusedtx.softmax(x, -1, 1.0, False, b),
        lambda x, b: torch.softmax(x, -1),
    ),
    "layer_norm": (
        [(4, 768), (768,), (768,)],
        lambda x, w, bias, b: fusedtx.layer_norm(x, 768, w, bias, backend=b),
        lambda x, w, bias, b: torch.ops.fusedtx.layer_norm(x, [768], w, bias, 1e-5, b)[0],
        lambda x, w, bias, b: F.layer_norm(x, (768,), w, bias),
    ),
    "linear": (
        [(4, 768), (768, 768), (768,)],
        lambda x, w, bias, b: fusedtx.linear(x, w, bias, activation="gelu_tanh", backend=b),
        lambda x, w, bias, b: torch.ops.fusedtx.linear(x, w, bias, GELU_TANH, True, b)[0],
        lambda x, w, bias, b: F.gelu(F.linear(x, w, bias), approximate="tanh"),
    ),
    "causal_attention": (
        [(1, 2, 16, 64)] * 3,
        lambda q, k, v, b: fusedtx.causal_attention(q, k, v, backend=b),
        lambda q, k, v, b: torch.ops.fusedtx.causal_attention(q, k, v, 0.125, fusedtx.get_split_size(), b)[0],
        lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    ),
}


def providers(device: torch.device) -> list[tuple[str, str | None, int]]:
    """(provider, backend, which call of OPS: 1 functional, 2 registered op, 3 torch)."""
    backends = ["native"] + (["triton"] if device.type == "cuda" else [])
    out = []
    for backend in backends:
        reason = fusedtx_unavailable(f"fusedtx_{backend}", device)
        if reason is None:
            out += [(f"fusedtx_{backend}", backend, 1), (f"fusedtx_{backend}_registered", backend, 2)]
        else:
            note(f"skipping fusedtx_{backend}: {reason}")
    return out + [("torch", None, 3)]


def host_time_us(call, config: TimingConfig) -> tuple[float, float, float]:
    """(p50, p20, p80) microseconds of call(), timed one call at a time after a warm-up."""
    for _ in range(20):
        call()
    times = []
    started = time.perf_counter()
    while len(times) < config.min_reps or time.perf_counter() - started < config.min_time:
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return statistics.median(times), times[len(times) // 5], times[4 * len(times) // 5]


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    rec = Recorder(args.out, args.device)
    config = args.timing
    rows = {}
    chosen = [p for p in providers(args.device) if not args.providers or p[0] in args.providers]
    for op, (shapes, *calls) in OPS.items():
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randn(s, generator=g).to(args.device).requires_grad_() for s in shapes]
        expected = calls[2](*[t.detach().double() for t in inputs], None)
        for provider, backend, which in chosen:
            fn = calls[which - 1]
            out = fn(*inputs, backend)
            if not torch.allclose(out.double(), expected, rtol=1e-4, atol=1e-4):  # never time a wrong result
                note(f"skipping {provider} for {op}: max error {(out.double() - expected).abs().max():.2e}")
                continue
            grad_out = torch.randn_like(out)
            for mode in MODES:
                call = ((lambda: fn(*inputs, backend)) if mode == "forward" else
                        (lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True)))
                values = host_time_us(call, config)
                rec.add(f"overhead_{op}", provider, mode, "latency", "us", "rows", shapes[0][0], values,
                        torch.float32, tuple(shapes[0]))
                rows[op, mode, provider] = values[0]
                note(f"overhead_{op:17s} {provider:26s} {mode:8s} {values[0]:8.1f} us")
    rec.flush()
    print(f"\nHost time per call on {device_name(args.device)}, p50 microseconds (lower is better)")
    names = [p for p, _, _ in chosen]
    print(f"  {'op':17s} {'mode':8s} " + " ".join(f"{p:>26s}" for p in names))
    for op in OPS:
        for mode in MODES:
            print(f"  {op:17s} {mode:8s} " + " ".join(f"{rows.get((op, mode, p), float('nan')):26.1f}" for p in names))
    finish(args, kernels=[f"overhead_{op}" for op in OPS])


if __name__ == "__main__":
    main()
