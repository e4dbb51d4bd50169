"""fusedtx.linear / gelu_ffn / nn.Linear / nn.GeluFFN on every backend: accuracy of the output and
of every gradient, gradcheck, reference parity, batch invariance (with F.linear as the negative
control), thread-count invariance, run-to-run determinism, the drop-in tests, errors, opcheck and
torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusedtx import policy
import fusedtx
from fusedtx import reference
from fusedtx.ops import linear as linear_op
from helpers import (
    DEVICE_BACKENDS,
    DTYPES,
    assert_accuracy,
    assert_bitwise_equal,
    assert_compiled_grads_equal,
    assert_rows_alone_equal,
    batch_invariance_failures,
    bitwise_equal,
    poisoned_outputs,
    record_bitexact,
    repeats,
    require,
    seeded_randn as make,
    under_each_thread_count,
)

ACTIVATIONS = [None, "gelu", "gelu_tanh"]
TORCH_GELU = {None: None, "gelu": "none", "gelu_tanh": "tanh"}
# (x shape, out_features, bias): odd K and N, leading dims, a vocabulary-sized N, empty batches
CASES = [
    ((3, 1), 5, True),
    ((17, 7), 50, True),
    ((2, 3, 769), 33, False),
    ((4, 64), 1, True),
    ((2, 7), 50257, True),
    ((0, 16), 8, True),
]
CASE_IDS = ["K1", "K7-N50", "K769-lead-noBias", "N1", "N50257", "0rows"]


def make_layer(k, n, has_bias, dtype, device, seed=10):
    weight = make((n, k), dtype, device, seed, scale=k ** -0.5)
    return weight, (make((n,), dtype, device, seed + 1, 0.5) if has_bias else None)


def torch_linear(x, weight, bias, activation=None):
    y = F.linear(x, weight, bias)
    return y if activation is None else F.gelu(y, approximate=TORCH_GELU[activation])


def outputs_and_grads(fn, x, weight, bias, dy):
    """(y, dx, dweight[, dbias]) of fn(x, weight, bias) for the upstream gradient dy."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y = fn(*leaves)
    inputs = [t for t in leaves if t is not None]
    if y.numel() == 0:
        return (y, *[torch.zeros_like(t) for t in inputs])
    return (y, *torch.autograd.grad(y, inputs, dy))


# ---------------------------------------------------------------------------------------------
# accuracy (contract point 1), gradcheck
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape,n,has_bias", CASES, ids=CASE_IDS)
def test_accuracy_output_and_gradients(device, backend, dtype, activation, shape, n, has_bias):
    require(device, backend)
    if backend == "reference" and shape[-1] * n > 20000:
        pytest.skip("the reference's emulated FMA loop is slow at this size; native/triton cover it")
    if backend == "triton" and device == "cpu" and n > 20000 and (activation is not None or dtype != torch.float32):
        pytest.skip("the interpreter takes seconds per vocabulary-sized case: the float32 LM head (no "
                    "activation) covers the width; the other dtypes run at the other shapes")
    x = make(shape, dtype, device)
    weight, bias = make_layer(shape[-1], n, has_bias, dtype, device)
    dy = make((*shape[:-1], n), dtype, device, seed=3)
    with poisoned_outputs():
        ours = outputs_and_grads(lambda a, w, b: fusedtx.linear(a, w, b, activation=activation, backend=backend),
                                 x, weight, bias, dy)
    eager = outputs_and_grads(lambda a, w, b: torch_linear(a, w, b, activation), x, weight, bias, dy)
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    exact = outputs_and_grads(lambda a, w, b: torch_linear(a, w, b, activation), as64(x), as64(weight), as64(bias),
                              dy.double())
    assert ours[0].dtype == dtype and ours[0].shape == (*shape[:-1], n)
    for name, o, e, r, like in zip(("y", "dx", "dweight", "dbias"), ours, eager, exact, (dy, x, weight, bias)):
        assert o.dtype == like.dtype and o.shape == like.shape, name
        if o.numel():
            assert_accuracy(o, e, r, f"{backend} {dtype} {activation} {name}")


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["none", "gelu", "gelu_tanh"])
def test_gradcheck_float64_reference(activation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    fn = lambda *a: fusedtx.linear(*a, activation=activation, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_reference_fma_is_correctly_rounded():
    """reference.fma_f32 against exact rational arithmetic: the spec of every kernel's FMA."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4000, generator=g), torch.randn(4000, generator=g)
    c = torch.randn(4000, generator=g) * torch.rand(4000, generator=g)
    a[:8] = torch.tensor([1 + 2 ** -12, 1 + 2 ** -23, 3.0, 0.0, -0.0, 1e-30, 2 ** 64, 1.5])
    b[:8] = torch.tensor([1 + 2 ** -12, 1 - 2 ** -24, 1 / 3, -1.0, 0.0, 1e-30, 2 ** 64, 2 ** -149])
    c[:8] = torch.tensor([-1.0, -1.0, -1.0, 0.0, -0.0, 0.0, -(2 ** 128) * 0.5, 0.0])
    got = reference.fma_f32(a, b, c)
    for i in list(range(8)) + list(range(8, 4000, 13)):
        exact = Fraction(a[i].item()) * Fraction(b[i].item()) + Fraction(c[i].item())
        nearest = torch.tensor(float(exact), dtype=torch.float64).float()  # double -> float: may double-round
        candidates = [torch.nextafter(nearest, torch.tensor(-float("inf"))), nearest,
                      torch.nextafter(nearest, torch.tensor(float("inf")))]
        best = min(candidates, key=lambda v: (abs(Fraction(v.item()) - exact), v.view(torch.int32).item() & 1))
        if best.item() == 0.0 and exact == 0:
            continue  # the sign of an exact zero is checked by bitwise kernel parity
        assert got[i].item() == best.item(), f"fma({a[i].item()}, {b[i].item()}, {c[i].item()})"


# ---------------------------------------------------------------------------------------------
# reference parity (point 6)
# ---------------------------------------------------------------------------------------------
PARITY_CASES = [((17, 769), 50, True), ((3, 1), 7, False), ((2, 5, 40), 33, True), ((257, 12), 20, True)]


@pytest.mark.parametrize("device,backend", [p for p in DEVICE_BACKENDS if "reference" not in p.id])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["none", "gelu", "gelu_tanh"])
def test_bitwise_equal_to_reference(device, backend, dtype, activation):
    """native (CPU and CUDA) computes reference.linear_matmul's ascending FMA chain exactly. Triton's
    tl.dot chooses its own order inside a K block (and the interpreter uses numpy's matmul): it
    is held to the accuracy bound instead, and the table reports what it gets."""
    require(device, backend)
    act = linear_op.activation_code(activation)
    exact_cases = []
    for shape, n, has_bias in PARITY_CASES:
        x = make(shape, dtype, device, seed=n)
        weight, bias = make_layer(shape[-1], n, has_bias, dtype, device)
        dy = make((*shape[:-1], n), dtype, device, seed=4)
        with poisoned_outputs():
            y, h = linear_op.linear.impl(x, weight, bias, act, True, backend)
            dx, dw, db, _ = torch.ops.fusedtx.linear_backward(dy, x, weight, h, act, True, True, has_bias, backend)
        x2, dy2 = x.reshape(-1, shape[-1]).cpu(), dy.reshape(-1, n).cpu()
        w, b = weight.cpu(), None if bias is None else bias.cpu()
        y_ref, h_ref = reference.linear_matmul(x2, w.t(), b, act, True, policy.MATMUL_K_BLOCK)
        dx_ref, dw_ref, db_ref = reference.linear_backward(dy2, x2, w, h_ref, act, True, True, has_bias,
                                                               policy.MATMUL_K_BLOCK, policy.ROW_GROUPS)
        pairs = [(y.reshape(-1, n), y_ref), (dx.reshape(-1, shape[-1]), dx_ref), (dw, dw_ref)]
        pairs += [(h.reshape(-1, n), h_ref)] if act else []
        pairs += [(db, db_ref)] if has_bias else []
        exact_cases.append(all(bitwise_equal(o.cpu(), r) for o, r in pairs))
        if backend == "native":
            for (o, r), name in zip(pairs, ("y", "dx", "dweight", "preact" if act else "dbias", "dbias")):
                assert_bitwise_equal(o.cpu(), r, f"{backend} {name} {shape}x{n} vs reference")
    for exact in exact_cases:
        record_bitexact(f"linear/{activation or 'none'}", device, backend, dtype, exact)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_gelu_at_the_extremes_is_pytorchs(device, backend, activation):
    """Pre-activations at the ends of the float32 range (K = 1, weight 1: h is the input) give
    PyTorch's float64 GELU rounded to float32: -0 for large negative h (the tanh form's sigmoid
    is cut to +0 past exponent 88, where it used to leave h / exp(88), -1.8 at h = -3e38), NaN at
    -inf, and +inf at +inf (PyTorch's float32 CPU kernel alone gives NaN there, docs/design.md)."""
    require(device, backend)
    h = torch.tensor([float("inf"), float("-inf"), 3e38, -3e38, -1e20, -1e10, -20.0, -10.5, -9.0, 10.0,
                      float("nan")])
    y = fusedtx.linear(h[:, None].to(device), torch.ones(1, 1, device=device), activation=activation,
                       backend=backend)[:, 0].cpu()
    expected = F.gelu(h.double(), approximate=TORCH_GELU[activation]).float()
    assert torch.equal(y.isnan(), expected.isnan()), f"NaN at {y.isnan().tolist()}, PyTorch {expected.isnan().tolist()}"
    finite = ~expected.isnan()
    exact = (h.abs() > 10.4) | h.isinf()  # where the float64 GELU rounds to 0 or to h itself in float32
    assert_bitwise_equal(y[finite & exact], expected[finite & exact], f"{activation} at the extremes")
    # atol: at h = -9 PyTorch's float64 1 + tanh(u) is already 0; fusedtx's sigmoid form keeps the
    # true -1.3e-28.
    torch.testing.assert_close(y[finite], expected[finite], rtol=1e-6, atol=1e-27)


# ---------------------------------------------------------------------------------------------
# batch invariance (point 4), thread counts and determinism (point 5), negative controls
# ---------------------------------------------------------------------------------------------
BATCH_SIZES = (1, 2, 3, 17, 64, 257, 1000)


def invariance_failures(fn, device, dtype, k=96, n=80, batches=BATCH_SIZES):
    """(batch, index) pairs where a row's output inside a batch differs from the row alone; the
    other rows are garbage (inf, NaN, huge), so a row that read them would show it."""
    weight, bias = make_layer(k, n, True, dtype, device)
    return batch_invariance_failures(lambda x: fn(x, weight, bias), make((1, k), dtype, device, seed=7), batches,
                                     torch.Generator().manual_seed(5))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("activation", [None, "gelu_tanh"], ids=["none", "gelu_tanh"])
def test_batch_invariance_of_output(device, backend, dtype, activation):
    require(device, backend)
    batches = BATCH_SIZES if backend != "reference" else (1, 2, 17, 257)  # the reference is slow
    fn = lambda x, w, b: fusedtx.linear(x, w, b, activation=activation, backend=backend)  # noqa: E731
    assert invariance_failures(fn, device, dtype, batches=batches) == []


def test_negative_control_batch_invariance():
    """The same check flags torch's own F.linear on CPU (MKL blocks by the batch size)."""
    failures = invariance_failures(lambda x, w, b: F.linear(x, w, b), "cpu", torch.float32, k=768, n=768)
    assert failures, "the check missed F.linear's batch dependence"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_batch_invariance_with_leading_dims_and_input_gradient(device, backend):
    """A (B, T, K) input: row (b, t) of y and of dx equals the same row computed alone."""
    require(device, backend)
    k, n = 40, 24
    weight, bias = make_layer(k, n, True, torch.float32, device)
    x, dy = make((3, 7, k), torch.float32, device, seed=1), make((3, 7, n), torch.float32, device, seed=2)
    assert_rows_alone_equal(lambda x: fusedtx.linear(x, weight, bias, activation="gelu", backend=backend), x, dy,
                            ((0, 0), (1, 3), (2, 6)))


def test_native_thread_count_invariance():
    require("cpu", "native")
    x, dy = make((300, 768), torch.float32, "cpu"), make((300, 3072), torch.float32, "cpu", seed=1)
    weight, bias = make_layer(768, 3072, True, torch.float32, "cpu")
    fn = lambda a, w, b: fusedtx.linear(a, w, b, activation="gelu", backend="native")  # noqa: E731
    runs = under_each_thread_count(lambda: outputs_and_grads(fn, x, weight, bias, dy))
    for run in runs[1:]:
        for ours, first, name in zip(run, runs[0], ("y", "dx", "dweight", "dbias")):
            assert_bitwise_equal(ours, first, f"{name}: 1 vs 2 vs 3 threads")


# (M, K, N): at 1 thread one task takes all N in several column sub-blocks, its packed a kept
# across them; 1024 x 2100 is too much a to keep in one task: row groups or narrow columns.
TASK_PLAN_CASES = [(40, 300, 700), (1024, 2100, 600)]


@pytest.mark.parametrize("m,k,n", TASK_PLAN_CASES, ids=["sub-blocks", "row-groups"])
def test_native_task_plans_equal_reference(m, k, n):
    """The native GEMM's task plans (wide column blocks cut into sub-blocks sharing one packed a,
    row groups) leave each row reference.linear_matmul's bits, at 1 and 3 threads: rows at the
    start, across a 6-row panel and a 96-row block boundary and at the end, against the
    reference run on those rows alone."""
    require("cpu", "native")
    x = make((m, k), torch.float32, "cpu")
    weight, bias = make_layer(k, n, True, torch.float32, "cpu")
    act = linear_op.activation_code("gelu")
    rows = sorted(r for r in {0, 1, 5, 6, 95, 96, m // 2, m - 1} if r < m)
    y_ref, h_ref = reference.linear_matmul(x[rows], weight.t(), bias, act, True, policy.MATMUL_K_BLOCK)
    for y, h in under_each_thread_count(lambda: linear_op.linear.impl(x, weight, bias, act, True, "native"),
                                        counts=(1, 3)):
        assert_bitwise_equal(y[rows], y_ref, f"y {m}x{k}x{n} vs reference")
        assert_bitwise_equal(h[rows], h_ref, f"preact {m}x{k}x{n} vs reference")


# (K, N) of the native one-row kernel with a row-major b (a Conv1D weight; the backward's dx):
# K with tail rows past the 4-row steps and several chains; N with a masked tail and, at 1
# thread, several 1536-column passes.
ONE_ROW_CASES = [(300, 3100), (517, 40), (3, 1000), (1, 17)]


@pytest.mark.parametrize("k,n", ONE_ROW_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_native_one_row_with_row_major_weight_equals_reference(k, n, dtype):
    """One row times b (K, N) row-major, every epilogue (bias, GELU with the pre-activation, the
    SwiGLU pair), b as one tensor and as a pair of row-interleaved halves: the reference's bits at
    1 and 3 threads."""
    require("cpu", "native")
    kernel = linear_op.matmul_kernel("native", torch.device("cpu"))
    k_block = policy.MATMUL_K_BLOCK
    x = make((1, k), dtype, "cpu", seed=k)
    b, bias = make((k, n), dtype, "cpu", seed=1, scale=0.1), make((n,), dtype, "cpu", seed=2)
    even, odd = make((k, n), dtype, "cpu", seed=3, scale=0.1), make((k, n), dtype, "cpu", seed=4, scale=0.1)
    x2 = make((1, 2 * k), dtype, "cpu", seed=5)
    swiglu = reference.ACT_SWIGLU
    cases = [(x, b, None, 0, None), (x, b, bias, reference.ACT_GELU_TANH, None),
             (x2, even, None, 0, odd)] + ([(x, b, bias, swiglu, None)] if n % 2 == 0 else [])
    for a, operand, bias_, act, b_odd in cases:
        extra = (b_odd, 0) if b_odd is not None else ()
        want = reference.linear_matmul(a, operand, bias_, act, True, k_block, *extra)
        for y, h in under_each_thread_count(lambda: kernel(a, operand, bias_, act, True, k_block, *extra),
                                            counts=(1, 3)):
            what = f"1x{a.shape[1]} @ {k}x{n} {dtype} act={act} pair={b_odd is not None}"
            assert_bitwise_equal(y, want[0], f"{what}: y")
            if act:
                assert_bitwise_equal(h, want[1], f"{what}: preact")


def split_k_linear(x, weight):
    """x @ weight.T with K cut into one slice per thread and the partial products added: the
    shape of a GEMM parallelised over its reduction axis (F.linear itself was thread-invariant
    in every shape tried with torch 2.13's MKL). The negative control for the thread check."""
    slices = torch.arange(x.shape[1]).tensor_split(torch.get_num_threads())
    return sum(x[:, s] @ weight[:, s].t() for s in slices)


def test_negative_control_thread_count():
    x, weight = make((300, 768), torch.float32, "cpu"), make((768, 768), torch.float32, "cpu", seed=1)
    runs = under_each_thread_count(lambda: split_k_linear(x, weight))
    assert any(not bitwise_equal(run, runs[0]) for run in runs[1:]), "thread check missed a split-K matmul"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gradients_bitwise_run_to_run(device, backend):
    require(device, backend)
    shape, k, n = ((5, 33) if device == "cpu" and backend == "triton" else (300, 33)), 33, 70
    x, dy = make(shape, torch.bfloat16, device), make((shape[0], n), torch.bfloat16, device, seed=1)
    weight, bias = make_layer(k, n, True, torch.bfloat16, device)
    fn = lambda a, w, b: fusedtx.linear(a, w, b, activation="gelu", backend=backend)  # noqa: E731
    runs = [outputs_and_grads(fn, x, weight, bias, dy) for _ in range(repeats(device, backend))]
    for run in runs[1:]:
        for ours, first, name in zip(run, runs[0], ("y", "dx", "dweight", "dbias")):
            assert_bitwise_equal(ours, first, f"{name}, repeated")


def test_negative_control_run_to_run():
    """The repeat check flags a weight gradient summed in a run-dependent row order (what
    atomics or a split count chosen at run time give)."""
    x, dy = make((200, 16), torch.float32, "cpu"), make((200, 8), torch.float32, "cpu", seed=1)
    g = torch.Generator().manual_seed(0)

    def scattered_dweight():
        order = torch.randperm(200, generator=g)
        total = torch.zeros(8, 16)
        for r in order:
            total = total + dy[r][:, None] * x[r][None, :]
        return total

    runs = [scattered_dweight() for _ in range(20)]
    assert any(not bitwise_equal(run, runs[0]) for run in runs[1:]), "the repeat check missed an order-dependent sum"


# ---------------------------------------------------------------------------------------------
# the modules: drop-ins for torch.nn.Linear and for a GPT-2 MLP
# ---------------------------------------------------------------------------------------------
class TorchMLP(torch.nn.Module):
    """The GPT-2 MLP in plain PyTorch, with the same child names as fusedtx.nn.GeluFFN."""

    def __init__(self, d_model, d_hidden, approximate):
        super().__init__()
        self.c_fc, self.c_proj = torch.nn.Linear(d_model, d_hidden), torch.nn.Linear(d_hidden, d_model)
        self.approximate = approximate

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_drop_in_modules(device, backend, approximate):
    require(device, backend)
    torch.manual_seed(0)
    ref = TorchMLP(48, 96, approximate).to(device)
    ours = fusedtx.nn.GeluFFN(48, 96, approximate=approximate, backend=backend).to(device)
    assert ours.load_state_dict(ref.state_dict()) is not None
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert isinstance(ours.c_fc, torch.nn.Linear) and ours.c_fc.weight.shape == (96, 48)
    x = make((2, 5, 48), torch.float32, device)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)

    lin_ref = torch.nn.Linear(48, 7, bias=False).to(device)
    lin = fusedtx.nn.Linear(48, 7, bias=False, backend=backend).to(device)
    lin.load_state_dict(lin_ref.state_dict())
    assert lin.bias is None and lin.state_dict().keys() == lin_ref.state_dict().keys()
    torch.testing.assert_close(lin(x), lin_ref(x), rtol=1e-5, atol=1e-5)
    assert fusedtx.nn.GeluFFN(8).c_fc.out_features == 32  # d_hidden defaults to 4 d_model


# ---------------------------------------------------------------------------------------------
# errors (point 7), torch.library integration
# ---------------------------------------------------------------------------------------------
def test_bad_input_errors():
    x, w, b = torch.randn(4, 8), torch.randn(5, 8), torch.randn(5)
    with pytest.raises(ValueError, match=r"x's last dim \(7\) must equal weight's in_features.*= 8"):
        fusedtx.linear(torch.randn(4, 7), w)
    with pytest.raises(ValueError, match=r"bias must have shape \[5\] \(out_features\), got \[4\]"):
        fusedtx.linear(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="activation must be None, 'gelu' or 'gelu_tanh', got 'relu'"):
        fusedtx.linear(x, w, b, activation="relu")
    with pytest.raises(ValueError, match="activation must be"):
        fusedtx.nn.Linear(8, 5, activation="GELU")
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        fusedtx.linear(x, w.to("meta"))
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        fusedtx.linear(x, w, b.to("meta"))
    with pytest.raises(TypeError, match="weight must have x's dtype torch.float32, got torch.bfloat16"):
        fusedtx.linear(x, w.bfloat16())
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16.*int64"):
        fusedtx.linear(torch.ones(4, 8, dtype=torch.long), w)
    with pytest.raises(TypeError, match=r"float64 only with backend='reference'"):
        fusedtx.linear(x.double(), w.double(), backend="native")
    with pytest.raises(ValueError, match=r"weight must be 2-D \(out_features, in_features\), got shape \[8\]"):
        fusedtx.linear(x, torch.randn(8))
    with pytest.raises(ValueError, match="at least 1 dim"):
        fusedtx.linear(torch.tensor(1.0), w)
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'erf'"):
        fusedtx.gelu_ffn(x, torch.randn(16, 8), None, torch.randn(8, 16), None, approximate="erf")
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        fusedtx.nn.GeluFFN(8, approximate="exact")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    require(device, backend)
    x = make((2, 3, 24), torch.float32, device).requires_grad_()
    weight, bias = (t.requires_grad_() for t in make_layer(24, 10, True, torch.float32, device))
    for act, save in ((0, False), (1, True), (2, True)):
        torch.library.opcheck(torch.ops.fusedtx.linear.default, (x, weight, bias, act, save, backend))
    torch.library.opcheck(torch.ops.fusedtx.linear.default, (x, weight, None, 0, False, backend))
    y, h = linear_op.linear.impl(x.detach(), weight.detach(), bias.detach(), 2, True, backend)
    torch.library.opcheck(torch.ops.fusedtx.linear_backward.default,
                          (torch.randn_like(y), x.detach(), weight.detach(), h, 2, True, True, True, backend))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    require(device, backend)
    m = fusedtx.nn.GeluFFN(16, 32, approximate="tanh", backend=backend).to(device)
    x = make((3, 4, 16), torch.float32, device).requires_grad_()
    assert_compiled_grads_equal(lambda x: m(x * 2.0).square().sum(), x, list(m.parameters()))


def test_torch_compile_inductor():
    require("cpu", "native")
    torch._dynamo.reset()
    x = make((8, 32), torch.float32, "cpu")
    weight, bias = make_layer(32, 24, True, torch.float32, "cpu")
    compiled = torch.compile(lambda t: fusedtx.linear(t, weight, bias, activation="gelu") + 1.0, fullgraph=True)
    assert_bitwise_equal(compiled(x), fusedtx.linear(x, weight, bias, activation="gelu") + 1.0, "inductor")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
def test_empty_dimensions_as_torch(device, backend, activation):
    """K = 0: the output is the activation of the bias, as torch's (an empty sum is 0), and the
    bias gets the gradient; M = 0 or N = 0: empty outputs."""
    require(device, backend)
    act = {None: lambda z: z, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}[activation]
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(s, generator=g).to(device).requires_grad_() for s in ((3, 0), (4, 0), (4,)))
    y = fusedtx.linear(x, w, b, activation=activation, backend=backend)
    expected = act(F.linear(x, w, b))
    torch.testing.assert_close(y, expected)
    grads = torch.autograd.grad(y.sum(), (x, w, b))
    torch.testing.assert_close(grads[2], torch.autograd.grad(expected.sum(), b)[0])
    assert grads[0].shape == (3, 0) and grads[1].shape == (4, 0)
    assert fusedtx.linear(torch.randn(0, 5, device=device), torch.randn(4, 5, device=device),
                          activation=activation, backend=backend).shape == (0, 4)
    assert fusedtx.linear(torch.randn(3, 5, device=device), torch.randn(0, 5, device=device),
                          activation=activation, backend=backend).shape == (3, 0)
