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


def assert_accuracy(out, eager, ref, what: str, slack: float = 0.0):
    """fusedtx's error vs float64 is at most 2x PyTorch eager's own error in the same dtype (plus
    `slack`, a relative allowance for sums whose terms cancel: docs/design.md, "Tests")."""
    ours, theirs = rel_error(out, ref), rel_error(eager, ref)
    bound = 2.0 * theirs + 1e-9 + slack
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


def make(shape, dtype, device, seed=0, scale=2.0, shift=0.5):
    """randn(shape) * scale + shift from its own generator, as dtype on device."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + shift).to(dtype).to(device)


def grads_of(fn, *inputs_and_dy):
    """(y, grads...) of y = fn(*inputs) for upstream gradient dy (the last argument): inputs that
    are None are passed as None and get no gradient. An empty first input gives zeros."""
    *inputs, dy = inputs_and_dy
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y = fn(*leaves)
    present = [t for t in leaves if t is not None]
    return (y, *torch.autograd.grad(y, present, dy)) if inputs[0].numel() else (y, *map(torch.zeros_like, present))


def scattered_row_sum(terms: torch.Tensor, generator) -> torch.Tensor:
    """A (rows, N) tensor summed over its rows in an order that changes from run to run, as with
    atomic adds from whichever block finishes first: the negative control of determinism checks."""
    total = torch.zeros(terms.shape[1], dtype=terms.dtype)
    for r in torch.randperm(terms.shape[0], generator=generator):
        total = total + terms[r]
    return total


# (x dtype, parameter dtype) of the row normalisations: plain precisions and the mix of a
# float16/bfloat16 x with float32 parameters (autocast, HF's float32 norm weights)
NORM_DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]
NORM_DTYPE_IDS = ["f32", "bf16", "f16", "bf16-f32params", "f16-f32params"]


def require_parity_case(device: str, backend: str, x_dtype) -> None:
    """Skip a reference-parity case that compares nothing: the reference itself (the determinism
    tests compare it with itself), float64 on Triton (which computes in float32)."""
    require(device, backend)
    if backend == "reference":
        pytest.skip("the reference is compared with itself by the determinism test")
    if backend == "triton" and x_dtype == torch.float64:
        pytest.skip("the triton backend computes in float32")


def row_invariance_failures(fn, n: int, dtype, device) -> list[tuple[int, int]]:
    """batch_invariance_failures of a seeded (1, n) probe row among 2, 3, 17 and 64 garbage rows."""
    probe = make((1, n), dtype, device, seed=7)
    return batch_invariance_failures(fn, probe, (2, 3, 17, 64), torch.Generator().manual_seed(5))


def assert_runs_equal(runs, names, what: str) -> None:
    """Every run's outputs (a tuple, named by `names`) are the bits of the first run's."""
    for run in runs[1:]:
        for ours, first, name in zip(run, runs[0], names):
            assert_bitwise_equal(ours, first, f"{name}, {what}")


class NormBlock(torch.nn.Module):
    """A tiny residual block of three norm layers around a Linear, for the drop-in tests of the
    nn norm modules: norm_cls(d), norm_cls(d, **second), norm_cls((3, d), **final)."""

    def __init__(self, norm_cls, second: dict, final: dict, d: int = 48):
        super().__init__()
        self.norm_1 = norm_cls(d)
        self.fc = torch.nn.Linear(d, d)
        self.norm_2 = norm_cls(d, **second)
        self.norm_f = norm_cls((3, d), **final)

    def forward(self, x):
        h = x + self.fc(self.norm_1(x))
        return self.norm_f(self.norm_2(h).view(-1, 3, h.shape[-1]))


def assert_drop_in(ours: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor) -> None:
    """`ours` takes `ref`'s state_dict and back (same keys), and computes its output and parameter
    gradients (of sum(out^2)) within 1e-5 / 1e-4: a drop-in replacement. ref's parameters are
    moved off their initial values first, so that a parameter left unused shows."""
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert ours.load_state_dict(ref.state_dict()) is not None
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert ref.load_state_dict(ours.state_dict()) is not None  # the round trip
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)


def seeded_randn(shape, dtype, device, seed=0, scale=1.0) -> torch.Tensor:
    """scale * randn(shape) from its own seeded generator, in dtype on device."""
    return make(shape, dtype, device, seed=seed, scale=scale, shift=0.0)


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


def adamw_trained(make_model, loss_of, threads: int, steps: int, lr: float = 1e-3) -> list[torch.Tensor]:
    """The parameters of make_model() (in training mode) after `steps` AdamW steps on
    loss_of(model), run on `threads` CPU threads (restored after): the training determinism and
    thread-count checks' recipe."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = make_model().train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        for _ in range(steps):
            loss = loss_of(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]
    finally:
        torch.set_num_threads(before)


def assert_compiled_equals_eager(f, x: torch.Tensor) -> None:
    """torch.compile(f, fullgraph=True) (aot_eager: the registered ops' fake and autograd
    registrations, no codegen) gives eager f's loss and input gradient bit for bit."""
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1, x2 = (x.detach().clone().requires_grad_() for _ in range(2))
    loss, loss2 = compiled(x1), f(x2)
    (dx,), (dx2,) = torch.autograd.grad(loss, x1), torch.autograd.grad(loss2, x2)
    assert_bitwise_equal(loss, loss2, "compiled loss")
    assert_bitwise_equal(dx, dx2, "compiled grad")


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


def repeats(device: str, backend: str) -> int:
    """How many runs a run-to-run determinism test compares: 20, but 3 under the Triton interpreter
    on CPU, a single-threaded Python loop over the programs with no atomics and no scheduler to
    vary, where each run costs seconds (a GPU gets the 20)."""
    return 3 if device == "cpu" and backend == "triton" else 20


def generation_mismatches(model, prompts, new_tokens, **sampling):
    """(generate()'s output, the steps where its logits differ from a full forward over the
    sequence so far) for a fusedtx language model (models.CausalLM) and its plain twins."""
    out = model.generate(prompts, new_tokens, return_logits=True, **sampling)
    device = model.lm_head.weight.device
    mismatches = 0
    for b, prompt in enumerate(prompts):
        full = torch.tensor(prompt + out.tokens[b].tolist()[:-1], device=device)[None]
        logits = model(full)[0, len(prompt) - 1:]
        mismatches += sum(not bitwise_equal(logits[t], out.logits[b, t]) for t in range(new_tokens))
    return out, mismatches
