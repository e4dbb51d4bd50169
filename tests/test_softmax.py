"""fusedtx.softmax on every backend: accuracy, gradients, invariance, determinism, reference
parity, errors, NaN/Inf, opcheck and torch.compile."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fusedtx import policy
import fusedtx
from fusedtx import reference
from fusedtx.ops import softmax as softmax_op
from helpers import (
    DEVICE_BACKENDS,
    DTYPES,
    assert_accuracy,
    assert_bitwise_equal,
    assert_compiled_equals_eager,
    bitwise_equal,
    garbage_like,
    poisoned_outputs,
    record_bitexact,
    require,
    under_each_thread_count,
)

# (shape, dim, scale, causal): odd sizes, wide rows, empty tensors, other dims, causal masks
# with Tq < Tk, Tq == Tk and Tq > Tk (rows that see no key at all).
CASES = [
    ((1, 1), -1, None, False),
    ((3, 7, 1023), -1, 0.125, False),
    ((2, 65537), -1, 1.0, False),
    ((0, 16), -1, None, False),
    ((4, 0), -1, None, False),
    ((5, 33, 3), 1, 2.0, False),
    ((2, 3, 37, 64), -1, 0.125, True),
    ((2, 40, 24), -1, 0.3, True),
    ((1, 48, 48), -1, -1.5, True),
]
CASE_IDS = ["1x1", "3x7x1023", "2x65537", "0rows", "0cols", "dim1", "causal-sq", "causal-tq>tk", "causal-negscale"]


def torch_softmax(x, dim=-1, scale=None, causal=False):
    """What users write without fusedtx: scale, mask, softmax, in x's dtype."""
    z = x if scale is None else x * scale
    if causal:
        tq, tk = x.shape[-2], x.shape[-1]
        keep = torch.ones(tq, tk, dtype=torch.bool, device=x.device).tril(tk - tq)
        z = z.masked_fill(~keep, float("-inf"))
    # Rows that see no key are NaN in PyTorch; fusedtx defines them as 0.
    return torch.softmax(z, dim).nan_to_num(nan=0.0) if causal else torch.softmax(z, dim)


def make_input(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype).to(device)


# ---------------------------------------------------------------------------------------------
# accuracy (contract point 1) and reference parity (point 6)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape,dim,scale,causal", CASES, ids=CASE_IDS)
def test_forward_backward_accuracy(device, backend, dtype, shape, dim, scale, causal):
    require(device, backend)
    x = make_input(shape, dtype, device).requires_grad_()
    grad = make_input(shape, dtype, device, seed=1)
    with poisoned_outputs():
        y = fusedtx.softmax(x, dim, scale=scale, causal=causal, backend=backend)
        (dx,) = torch.autograd.grad(y, x, grad) if x.numel() else (torch.zeros_like(x),)

    x64 = x.detach().double().requires_grad_()
    y64 = torch_softmax(x64, dim, scale, causal)
    x_eager = x.detach().clone().requires_grad_()
    y_eager = torch_softmax(x_eager, dim, scale, causal)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert y.is_contiguous()
    if x.numel() == 0:
        return
    (dx64,) = torch.autograd.grad(y64, x64, grad.double())
    (dx_eager,) = torch.autograd.grad(y_eager, x_eager, grad)
    assert_accuracy(y, y_eager, y64, f"{backend} forward")
    assert_accuracy(dx, dx_eager, dx64, f"{backend} backward")
    if causal:  # masked entries, and whole rows that see nothing, are exactly 0
        tq, tk = shape[-2], shape[-1]
        masked = ~torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)
        assert (y.detach()[..., masked] == 0).all() and (dx[..., masked] == 0).all()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape,dim,scale,causal", CASES, ids=CASE_IDS)
def test_bitwise_equal_to_reference(device, backend, dtype, shape, dim, scale, causal):
    """Each backend computes reference.softmax_forward/backward with its own lane count."""
    require(device, backend)
    if backend == "reference":
        pytest.skip("the reference is compared with itself by the determinism test")
    x = make_input(shape, dtype, device)
    dy = make_input(shape, dtype, device, seed=1)
    with poisoned_outputs():
        y = fusedtx.softmax(x, dim, scale=scale, causal=causal, backend=backend)
        dx = torch.ops.fusedtx.softmax_backward(dy, y, dim, 1.0 if scale is None else scale, backend)

    rows_x = softmax_op.as_rows(x, dim)
    n_queries = shape[-2] if causal else 1
    lanes = policy.row_lanes(backend, rows_x.shape[1], x.device)
    y_ref = reference.softmax_forward(rows_x, 1.0 if scale is None else scale, causal, n_queries, lanes=lanes)
    y_ref = softmax_op.from_rows(y_ref, x, dim)
    dx_ref = reference.softmax_backward(softmax_op.as_rows(dy, dim), softmax_op.as_rows(y, dim),
                                        1.0 if scale is None else scale, lanes=lanes)
    dx_ref = softmax_op.from_rows(dx_ref, x, dim)
    exact = bitwise_equal(y, y_ref) and bitwise_equal(dx, dx_ref)
    record_bitexact("softmax", device, backend, dtype, exact)
    assert_bitwise_equal(y, y_ref, f"{backend} forward vs reference (lanes={lanes})")
    assert_bitwise_equal(dx, dx_ref, f"{backend} backward vs reference (lanes={lanes})")


def test_poisoning_reaches_kernel_outputs():
    """Control for the poisoning above: an output element no kernel wrote would read NaN."""
    with poisoned_outputs():
        assert torch.empty_like(torch.ones(2, 3, 37, 64)).isnan().all()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_million_element_rows(device, backend):
    """Rows up to 1,000,000 elements take the looped path and still match the reference."""
    require(device, backend)
    x = make_input((2, 1_000_000), torch.float32, device)
    y = fusedtx.softmax(x, scale=0.5, backend=backend)
    lanes = policy.row_lanes(backend, x.shape[1], x.device)
    assert_bitwise_equal(y, reference.softmax_forward(x, 0.5, False, 1, lanes=lanes), "1M-element rows")
    torch.testing.assert_close(y, torch.softmax(x * 0.5, -1), rtol=1e-5, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# batch invariance (point 2), with a negative control
# ---------------------------------------------------------------------------------------------
def matmul_softmax(x, dim=-1, scale=None, causal=False, backend=None):
    """A plausible softmax whose denominator is a matmul (`e @ ones`): PyTorch's CPU matmul picks
    its blocking from the batch, so this is NOT batch-invariant. The negative control."""
    z = x.float() * (1.0 if scale is None else scale)
    e = torch.exp(z - z.amax(-1, keepdim=True))
    w = torch.linspace(1.0, 1.0 + 1e-3, e.shape[-1], dtype=e.dtype, device=e.device)
    return (e / (e @ w[:, None])).to(x.dtype)


def fusedtx_softmax(x, dim=-1, scale=None, causal=False, backend=None):
    return fusedtx.softmax(x, dim, scale=scale, causal=causal, backend=backend)


def invariance_failures(fn, backend, device, dtype, n_cols=300, causal=False, n_queries=8):
    """Rows where fn(row inside a batch, with garbage around it) != fn(row alone), bitwise. A
    causal batch element is n_queries rows (queries at the end of n_cols keys)."""
    g = torch.Generator().manual_seed(7)
    failures = []
    shape = (n_queries, n_cols) if causal else (n_cols,)
    probe = (torch.randn((1,) + shape, generator=g) * 3).to(dtype).to(device)
    alone = fn(probe, -1, 0.125, causal, backend)
    for batch in (1, 2, 3, 17, 40):
        for index in sorted({0, batch // 2, batch - 1}):
            x = garbage_like(torch.empty((batch,) + shape, dtype=dtype, device=device), g)
            x[index] = probe[0]
            got = fn(x, -1, 0.125, causal, backend)[index : index + 1]
            if not bitwise_equal(got, alone):
                failures.append((batch, index))
    return failures


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_batch_invariance(device, backend, dtype, causal):
    require(device, backend)
    # The interpreter runs one program per row, each a Python loop: 2 causal query rows per
    # batch element (two masks, 299 and 300 of the 300 keys) make 370 programs over the 185
    # batch elements instead of 8 rows' 1,480. Every batch size and position is still checked.
    n_queries = 2 if backend == "triton" and device == "cpu" else 8
    assert invariance_failures(fusedtx_softmax, backend, device, dtype, causal=causal, n_queries=n_queries) == []


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_backward_batch_invariance(device, backend):
    require(device, backend)
    g = torch.Generator().manual_seed(3)
    probe_x, probe_dy = (torch.randn(1, 4, 257, generator=g).to(device) for _ in range(2))

    def grad_of(x, dy):
        x = x.clone().requires_grad_()
        y = fusedtx.softmax(x, scale=0.5, causal=True, backend=backend)
        return torch.autograd.grad(y, x, dy)[0]

    alone = grad_of(probe_x, probe_dy)
    for batch, index in ((2, 1), (9, 4), (33, 32)):
        x = torch.randn(batch, 4, 257, generator=g).to(device) * 10
        dy = torch.randn(batch, 4, 257, generator=g).to(device)
        x[index], dy[index] = probe_x[0], probe_dy[0]
        assert_bitwise_equal(grad_of(x, dy)[index : index + 1], alone, f"dx of row {index} in a batch of {batch}")


def test_negative_control_batch_invariance():
    """The same check catches a softmax that is not batch-invariant."""
    failures = invariance_failures(matmul_softmax, None, "cpu", torch.float32, n_cols=768)
    assert failures, "the invariance check failed to flag a matmul-based softmax"


# ---------------------------------------------------------------------------------------------
# thread-count invariance and run-to-run determinism (point 5)
# ---------------------------------------------------------------------------------------------
def torch_sum_softmax(x):
    """softmax with PyTorch's own row sum: for a single long row, torch.sum splits the row
    between threads, so its bits follow the thread count. The negative control."""
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [(96, 2049), (1, 4_000_000)], ids=["many-rows", "one-long-row"])
def test_native_thread_count_invariance(dtype, shape):
    require("cpu", "native")
    x = make_input(shape, dtype, "cpu").requires_grad_()
    dy = make_input(shape, dtype, "cpu", seed=1)

    def run():
        y = fusedtx.softmax(x, scale=0.7, backend="native")
        return torch.cat([y.detach(), torch.autograd.grad(y, x, dy)[0]])

    outs = under_each_thread_count(run)
    for out in outs[1:]:
        assert_bitwise_equal(out, outs[0], "1 vs 2 vs 3 threads")


def test_negative_control_thread_count():
    """The same thread check flags a softmax whose row sum is split between threads."""
    x = make_input((1, 4_000_000), torch.float32, "cpu")
    outs = under_each_thread_count(lambda: torch_sum_softmax(x))
    assert any(not bitwise_equal(o, outs[0]) for o in outs[1:]), "thread check failed to flag torch.sum"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_run_to_run_determinism(device, backend):
    require(device, backend)
    x = make_input((8, 3, 600), torch.bfloat16, device).requires_grad_()
    dy = make_input((8, 3, 600), torch.bfloat16, device, seed=2)
    outs = []
    for _ in range(5):
        y = fusedtx.softmax(x, scale=0.3, causal=True, backend=backend)
        outs.append((y.detach(), torch.autograd.grad(y, x, dy)[0]))
    for y, dx in outs[1:]:
        assert_bitwise_equal(y, outs[0][0], "forward, repeated")
        assert_bitwise_equal(dx, outs[0][1], "backward, repeated")


def scattered_sum_softmax(x, generator):
    """softmax whose row sum adds the elements in an order that changes from run to run (as a
    reduction through atomics would). The negative control for the repeat check."""
    e = torch.exp(x - x.amax(-1, keepdim=True))
    total = torch.zeros(x.shape[:-1])
    for j in torch.randperm(x.shape[-1], generator=generator):
        total = total + e[..., j]
    return e / total[..., None]


def test_negative_control_run_to_run():
    x = make_input((8, 600), torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    runs = [scattered_sum_softmax(x, g) for _ in range(5)]
    assert any(not bitwise_equal(run, runs[0]) for run in runs[1:]), "the repeat check missed an order-dependent sum"


# ---------------------------------------------------------------------------------------------
# NaN / Inf behave as in torch.softmax; bad input gets a clear error (point 7)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_inf_like_torch(device, backend):
    require(device, backend)
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([
        [1.0, 2.0, 3.0, 4.0],
        [nan, 1.0, 2.0, 3.0],
        [inf, 1.0, 2.0, 3.0],
        [-inf, 1.0, -inf, 3.0],
        [-inf, -inf, -inf, -inf],
        [1e30, -1e30, 0.0, 5.0],
    ], device=device)
    y = fusedtx.softmax(x, backend=backend)
    expected = torch.softmax(x, -1)
    assert torch.equal(y.isnan(), expected.isnan())
    finite = ~expected.isnan()
    torch.testing.assert_close(y[finite], expected[finite], rtol=1e-6, atol=1e-30)


def test_bad_input_errors():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16.*int64"):
        fusedtx.softmax(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="float64"):
        fusedtx.softmax(x.double())
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fusedtx.softmax([1.0, 2.0])
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\].*got 2"):
        fusedtx.softmax(x, dim=2)
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\].*got -3"):
        fusedtx.softmax(x, dim=-3)
    with pytest.raises(TypeError, match="dim must be an int"):
        fusedtx.softmax(x, dim=1.0)
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            fusedtx.softmax(x, scale=bad)
    with pytest.raises(TypeError, match="scale must be a real number"):
        fusedtx.softmax(x, scale="0.5")
    with pytest.raises(ValueError, match="causal .* dim must be -1"):
        fusedtx.softmax(x, dim=0, causal=True)
    with pytest.raises(ValueError, match="backend.*'cuda'"):
        fusedtx.softmax(x, backend="cuda")
    with pytest.raises(fusedtx.BackendUnavailableError, match="meta"):
        fusedtx.softmax(x.to("meta"))


def test_triton_on_cpu_without_interpreter_explains_what_to_do():
    code = (
        "import torch, fusedtx\n"
        "try:\n"
        "    fusedtx.softmax(torch.randn(2, 3), backend='triton')\n"
        "except fusedtx.BackendUnavailableError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if torch.cuda.is_available():
        assert "move the inputs to the GPU" in out.stdout, out.stdout + out.stderr
    else:
        assert "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


@pytest.mark.gpu
def test_wrong_device_mix_in_backward_is_rejected():
    y = torch.softmax(torch.randn(4, 8, device="cuda"), -1)
    with pytest.raises((RuntimeError, ValueError)):
        torch.ops.fusedtx.softmax_backward(torch.randn(4, 8), y, -1, 1.0, "native")


# ---------------------------------------------------------------------------------------------
# layouts, module, torch.library integration
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_non_contiguous_inputs(device, backend):
    require(device, backend)
    base = make_input((6, 40, 10), torch.float32, device)
    for x, dim in ((base.transpose(1, 2), -1), (base[:, ::2, :], 1), (base.expand(2, 6, 40, 10)[1], 0)):
        expected = fusedtx.softmax(x.contiguous(), dim, backend=backend)
        assert_bitwise_equal(fusedtx.softmax(x, dim, backend=backend), expected, "strided view")


def test_zero_dim_tensor():
    y = fusedtx.softmax(torch.tensor(3.0))
    assert y.shape == () and y.item() == 1.0


def test_module():
    m = fusedtx.nn.Softmax(dim=-1, scale=0.5, causal=True)
    x = make_input((2, 5, 5), torch.float32, "cpu")
    assert_bitwise_equal(m(x), fusedtx.softmax(x, scale=0.5, causal=True), "nn.Softmax")
    assert "causal=True" in repr(m)
    assert_bitwise_equal(fusedtx.nn.Softmax(1)(x), fusedtx.softmax(x, 1), "nn.Softmax(dim=1)")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    require(device, backend)
    x = make_input((3, 5, 17), torch.float32, device).requires_grad_()
    torch.library.opcheck(torch.ops.fusedtx.softmax.default, (x, -1, 0.5, True, backend))
    torch.library.opcheck(torch.ops.fusedtx.softmax.default, (x, 1, 1.0, False, backend))
    y = fusedtx.softmax(x.detach(), backend=backend)
    torch.library.opcheck(torch.ops.fusedtx.softmax_backward.default, (torch.randn_like(y), y, -1, 1.0, backend))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    require(device, backend)
    torch._dynamo.reset()

    def f(x):
        return fusedtx.softmax(x * 2.0, scale=0.5, causal=True, backend=backend).sum(-1).square().sum()

    assert_compiled_equals_eager(f, make_input((2, 6, 9), torch.float32, device))


def test_torch_compile_inductor():
    require("cpu", "native")
    torch._dynamo.reset()
    x = make_input((4, 64), torch.float32, "cpu")
    compiled = torch.compile(lambda t: fusedtx.softmax(t, scale=0.25) + 1.0, fullgraph=True)
    assert_bitwise_equal(compiled(x), fusedtx.softmax(x, scale=0.25) + 1.0, "inductor")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape,causal", [((2, 0, 5), True), ((2, 0, 5), False), ((2, 5, 0), False)])
def test_empty_inputs_give_empty_outputs_and_gradients(device, backend, shape, causal):
    """As torch.softmax: an input without elements gives an empty output and gradient, on every
    backend (the native kernel refused 0 causal query rows)."""
    require(device, backend)
    x = torch.randn(shape, device=device, requires_grad=True)
    y = fusedtx.softmax(x, causal=causal, backend=backend)
    assert y.shape == torch.softmax(x, -1).shape
    y.sum().backward()
    assert x.grad.shape == x.shape
