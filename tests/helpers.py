"""Shared test utilities: the backend matrix, error measures, bitwise comparisons."""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch

import fusedtx
from fusedtx import backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITEXACT_LOG: dict = collections.defaultdict(lambda: [0, 0])


def _pairs():
    pairs = []
    for device in ("cpu", "cuda"):
        for backend in fusedtx.BACKENDS:
            marks = [pytest.mark.gpu] if device == "cuda" else []
            pairs.append(pytest.param(device, backend, marks=marks, id=f"{device}-{backend}"))
    return pairs


DEVICE_BACKENDS = _pairs()


def require(device: str, backend: str) -> None:
    """Skip (with the reason) when `backend` cannot run on `device` on this machine."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if not backends.is_available(backend, device):
        try:
            backends.resolve(backend, torch.device(device))
        except backends.BackendUnavailableError as exc:
            pytest.skip(str(exc))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (contract point 1)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    return (out - ref).norm().item() / denom if denom > 0 else (out - ref).norm().item()


def assert_accuracy(out, eager, ref, what: str):
    """fusedtx's error vs float64 is at most 2x PyTorch eager's own error in the same dtype."""
    ours, theirs = rel_error(out, ref), rel_error(eager, ref)
    bound = 2.0 * theirs + 1e-9
    assert ours <= bound, f"{what}: relative error {ours:.3e} > 2 x torch eager's {theirs:.3e}"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns the contract covers: every bit (-0.0 != +0.0), but one pattern for all
    NaNs, whose sign and payload are the hardware's (docs/design.md, point 6)."""
    int_type = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    raw = t.contiguous().view(int_type)
    if not t.is_floating_point():
        return raw
    return torch.where(t.contiguous().isnan(), torch.tensor(-1, dtype=int_type, device=t.device), raw)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str = ""):
    if bitwise_equal(a, b):
        return
    diff = (a.double() - b.double()).abs()
    n_diff = (bits(a) != bits(b)).sum().item() if a.shape == b.shape else "shape"
    raise AssertionError(f"{what}: not bitwise equal ({n_diff} elements differ, max |diff| {diff.max().item():.3e})")


def record_bitexact(op: str, device: str, backend: str, dtype: torch.dtype, exact: bool) -> None:
    entry = BITEXACT_LOG[(op, device, backend, str(dtype).replace("torch.", ""))]
    entry[0] += int(exact)
    entry[1] += 1


def seeded_randn(shape, dtype, device, seed=0, scale=1.0) -> torch.Tensor:
    """scale * randn(shape) from its own seeded generator, in dtype on device."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def garbage_like(t: torch.Tensor, generator=None) -> torch.Tensor:
    """Values that would poison a row that read them: huge, tiny, inf and NaN."""
    g = torch.randn(t.shape, generator=generator) * 1e4
    flat = g.view(-1)
    flat[::7] = float("nan")
    flat[3::11] = float("inf")
    flat[5::13] = float("-inf")
    return g.to(t.dtype).to(t.device)


@contextlib.contextmanager
def poisoned_outputs():
    """Every tensor allocated inside (torch.empty, at::empty_like in C++, the Triton launchers'
    outputs) starts out NaN, so an output element a kernel forgets to write shows up. This is
    PyTorch's deterministic mode, which fills uninitialised memory."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def under_each_thread_count(fn, counts=(1, 2, 3)):
    """fn() run with torch.set_num_threads(n) for each n (restored after): for thread-count
    invariance checks of the native CPU kernels."""
    results = []
    before = torch.get_num_threads()
    try:
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
    finally:
        torch.set_num_threads(before)
    return results


def batch_invariance_failures(fn, probe: torch.Tensor, batches, generator=None) -> list:
    """(batch, index) pairs where fn(x)[index] differs from fn(probe) (probe: one row, (1, ...)),
    x being `batch` rows of garbage (inf, NaN, huge) with the probe at `index` (first, middle,
    last): a row that read another row would show it."""
    alone = fn(probe)
    failures = []
    for batch in batches:
        for index in sorted({0, batch // 2, batch - 1}):
            x = garbage_like(torch.empty(batch, *probe.shape[1:], dtype=probe.dtype, device=probe.device), generator)
            x[index] = probe[0]
            if not bitwise_equal(fn(x)[index: index + 1], alone):
                failures.append((batch, index))
    return failures


def assert_rows_alone_equal(fn, x: torch.Tensor, dy: torch.Tensor, positions) -> None:
    """For a (B, T, ...) input: row (b, t) of y = fn(x) and of dx (for the upstream dy) equals
    the same row computed alone, for each (b, t) in positions."""
    def y_and_dx(x, dy):
        x = x.clone().requires_grad_()
        y = fn(x)
        return y.detach(), torch.autograd.grad(y, x, dy)[0]

    y_all, dx_all = y_and_dx(x, dy)
    for b, t in positions:
        y_one, dx_one = y_and_dx(x[b, t][None], dy[b, t][None])
        assert_bitwise_equal(y_all[b, t][None], y_one, f"y[{b}, {t}]")
        assert_bitwise_equal(dx_all[b, t][None], dx_one, f"dx[{b}, {t}]")


def assert_compiled_grads_equal(f, x: torch.Tensor, params) -> None:
    """The gradients of f(x) (a scalar) w.r.t. x and params: torch.compile(fullgraph=True,
    aot_eager) == eager, bit for bit."""
    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    grads = torch.autograd.grad(loss, (x, *params))
    expected = torch.autograd.grad(f(x), (x, *params))
    for ours, ref in zip(grads, expected):
        assert_bitwise_equal(ours, ref, "compiled vs eager")
