"""fusedtx.swiglu_ffn / nn.SwiGLUFFN on every backend: accuracy of the output and of every
gradient against an HF-style eager reference, gradcheck, reference parity (the packed epilogue
against separate gate and up matmuls too), batch invariance (with the eager MLP as the negative
control), thread counts, run-to-run determinism, SwiGLU at the extremes, errors, opcheck,
torch.compile and the HF LlamaMLP drop-in."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedtx
from fusedtx import policy, reference
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
    require,
    seeded_randn as make,
    under_each_thread_count,
)

SWIGLU = reference.ACT_SWIGLU


def make_weights(d, hidden, dtype, device, bias=False, seed=10):
    """(gate, up, down, gate_bias, up_bias, down_bias), nn.Linear-scaled."""
    gate = make((hidden, d), dtype, device, seed, d ** -0.5)
    up = make((hidden, d), dtype, device, seed + 1, d ** -0.5)
    down = make((d, hidden), dtype, device, seed + 2, hidden ** -0.5)
    biases = tuple(make((n,), dtype, device, seed + 3 + i, 0.5) if bias else None
                   for i, n in enumerate((hidden, hidden, d)))
    return (gate, up, down, *biases)


def eager_swiglu(x, gate, up, down, gate_bias=None, up_bias=None, down_bias=None):
    """What Hugging Face's LlamaMLP runs: down(silu(gate(x)) * up(x))."""
    return F.linear(F.silu(F.linear(x, gate, gate_bias)) * F.linear(x, up, up_bias), down, down_bias)


def ours(backend):
    def fn(x, gate, up, down, gb=None, ub=None, db=None):
        return fusedtx.swiglu_ffn(x, gate, up, down, gate_bias=gb, up_bias=ub, down_bias=db, backend=backend)
    return fn


def outputs_and_grads(fn, tensors, dy):
    """(y, then the gradient of every tensor that is not None) of fn(*tensors) for upstream dy."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    y = fn(*leaves)
    inputs = [t for t in leaves if t is not None]
    return (y.detach(), *torch.autograd.grad(y, inputs, dy))


# ---------------------------------------------------------------------------------------------
# accuracy (contract point 1), gradcheck
# ---------------------------------------------------------------------------------------------
ACCURACY_CASES = [((2, 5, 48), 80, False), ((7, 33), 21, True), ((1, 64), 130, False)]
# A few float32 ulps (relative) beside 2x torch's error: one row's 64 outputs are a small sample,
# and torch's error on them depends on its host's kernel order, down to about 1 ulp.
ACCURACY_SLACK = 4 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape,hidden,bias", ACCURACY_CASES, ids=["lead-dims", "odd-bias", "one-row"])
def test_accuracy_output_and_gradients(device, backend, dtype, shape, hidden, bias):
    require(device, backend)
    x = make(shape, dtype, device)
    tensors = (x, *make_weights(shape[-1], hidden, dtype, device, bias))
    dy = make(shape, dtype, device, seed=3)
    with poisoned_outputs():
        got = outputs_and_grads(ours(backend), tensors, dy)
    eager = outputs_and_grads(eager_swiglu, tensors, dy)
    exact = outputs_and_grads(eager_swiglu, [None if t is None else t.double() for t in tensors], dy.double())
    names = ("y", "dx", "dgate", "dup", "ddown", "dgate_bias", "dup_bias", "ddown_bias")
    likes = [dy] + [t for t in tensors if t is not None]
    assert len(got) == len(likes)
    for name, o, e, r, like in zip(names, got, eager, exact, likes):
        assert o.dtype == like.dtype and o.shape == like.shape, name
        assert_accuracy(o, e, r, f"{backend} {dtype} {name}", slack=ACCURACY_SLACK)


def test_gradcheck_float64_reference():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, dtype=torch.float64, generator=g, requires_grad=True)
               for s in ((2, 3, 6), (5, 6), (5, 6), (4, 5), (5,), (5,), (4,))]
    assert torch.autograd.gradcheck(ours("reference"), tensors)


def test_silu_accuracy_and_extremes_against_float64():
    """reference.swiglu_forward's silu (u = 1) on a dense grid: within 3 ulp of float64, as close
    as F.silu in float32 (L2), and PyTorch's values at the extremes: +-inf, NaN, signed zeros,
    and -0 below g = -88 where F.silu gives a value under 1e-36 (the one documented difference)."""
    g = torch.linspace(-90, 90, 200001)
    exact = F.silu(g.double())
    got = reference.swiglu_forward(torch.stack((g, torch.ones_like(g)), -1).flatten()).double()
    ulp = (torch.nextafter(exact.float(), torch.tensor(float("inf"))).double() - exact.float().double()).abs()
    big = exact.abs() > 1e-30
    assert ((got - exact).abs()[big] / ulp[big]).max() < 3
    assert (got - exact).norm() <= 1.1 * (F.silu(g).double() - exact).norm()
    edge = torch.tensor([float("inf"), float("-inf"), 3e38, -3e38, -1e20, -100.0, -88.5, -0.0, 0.0, float("nan")])
    got = reference.swiglu_forward(torch.stack((edge, torch.ones_like(edge)), -1).flatten())
    expected = torch.tensor([float("inf"), float("nan"), 3e38, -0.0, -0.0, -0.0, -0.0, -0.0, 0.0, float("nan")])
    assert_bitwise_equal(got, expected, "silu at the extremes")
    assert (F.silu(edge[5:7].double()).abs() < 1e-36).all()


# ---------------------------------------------------------------------------------------------
# reference parity (point 6); the packed epilogue is the separate matmuls bit for bit
# ---------------------------------------------------------------------------------------------
PARITY_CASES = [((17, 130), 40, True), ((3, 7), 5, False), ((2, 5, 40), 33, True)]


@pytest.mark.parametrize("device,backend", [p for p in DEVICE_BACKENDS if "reference" not in p.id])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
def test_bitwise_equal_to_reference(device, backend, dtype):
    """The packed gate/up matmul with the SwiGLU epilogue and its backward are
    reference.linear_matmul / linear_backward bit for bit on native (CPU and CUDA); Triton is
    recorded (tl.dot, module docstring of test_linear.py)."""
    require(device, backend)
    for shape, hidden, bias in PARITY_CASES:
        k = shape[-1]
        x = make(shape, dtype, device, seed=hidden)
        w = make((2 * hidden, k), dtype, device, seed=1, scale=k ** -0.5)
        b = make((2 * hidden,), dtype, device, seed=2) if bias else None
        dy = make((*shape[:-1], hidden), dtype, device, seed=4)
        with poisoned_outputs():
            y, h = linear_op.linear.impl(x, w, b, SWIGLU, True, backend)
            dx, dw, db, _ = torch.ops.fusedtx.linear_backward(dy, x, w, h, SWIGLU, True, True, bias, backend)
        x2, dy2, wc = x.reshape(-1, k).cpu(), dy.reshape(-1, hidden).cpu(), w.cpu()
        y_ref, h_ref = reference.linear_matmul(x2, wc.t(), None if b is None else b.cpu(), SWIGLU, True,
                                               policy.MATMUL_K_BLOCK)
        dx_ref, dw_ref, db_ref = reference.linear_backward(dy2, x2, wc, h_ref, SWIGLU, True, True, bias,
                                                           policy.MATMUL_K_BLOCK, policy.ROW_GROUPS)
        pairs = [("y", y.reshape(-1, hidden), y_ref), ("preact", h.reshape(-1, 2 * hidden), h_ref),
                 ("dx", dx.reshape(-1, k), dx_ref), ("dweight", dw, dw_ref)] + ([("dbias", db, db_ref)] if bias else [])
        if backend == "native":
            for name, o, r in pairs:
                assert_bitwise_equal(o.cpu(), r, f"{backend} {name} {shape}x{hidden} vs reference")
        record_bitexact("linear/swiglu", device, backend, dtype, all(bitwise_equal(o.cpu(), r) for _, o, r in pairs))


@pytest.mark.parametrize("device,backend", [p for p in DEVICE_BACKENDS if "triton" not in p.id])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
def test_packed_epilogue_is_separate_gate_and_up_matmuls(device, backend, dtype):
    """g and u in the packed pre-activation are the bits of fusedtx.linear(x, gate) and
    fusedtx.linear(x, up) (for float32 then y is their SwiGLU; in 16 bits the epilogue reads the
    float32 h, before its rounding to the stored dtype), and the public output is y then the
    down matmul."""
    require(device, backend)
    x = make((9, 300), dtype, device)  # K = 128 + 128 + 44: every K block
    gate, up, down, *_ = make_weights(300, 24, dtype, device)
    y, h = linear_op.linear.impl(x, linear_op.pack_gate_up(gate, up), None, SWIGLU, True, backend)
    g, u = fusedtx.linear(x, gate, backend=backend), fusedtx.linear(x, up, backend=backend)
    assert_bitwise_equal(h[:, 0::2], g, "gate columns vs linear(x, gate)")
    assert_bitwise_equal(h[:, 1::2], u, "up columns vs linear(x, up)")
    if dtype == torch.float32:
        expected = reference.swiglu_forward(torch.stack((g, u), -1).flatten(-2).cpu())
        assert_bitwise_equal(y.cpu(), expected, "y vs swiglu of the separate matmuls")
    assert_bitwise_equal(fusedtx.swiglu_ffn(x, gate, up, down, backend=backend),
                         fusedtx.linear(y, down, backend=backend), "swiglu_ffn vs its two linears")


PAIR_ROWS = (1, 5, 8, 9, 40)  # both sides of the native few-rows kernel (at most 8 rows), K blocks: 300


@pytest.mark.parametrize("device,backend", [p for p in DEVICE_BACKENDS if "reference" not in p.id])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
def test_paired_operand_is_the_interleaved_one(device, backend, dtype):
    """linear_matmul(a, b, b_odd=...) reads the pair where it is: the bits of the kernel on
    reference.interleave_pair(b, b_odd, pair_dim) made as one tensor, columns paired (the SwiGLU
    forward, b = gate.T) and rows paired (its dx, b = gate), with the packed weight's layout and
    with the other one, any number of rows."""
    require(device, backend)
    kernel = linear_op.matmul_kernel(backend, torch.device(device))
    k_block = policy.MATMUL_K_BLOCK
    gate, up = (make((24, 300), dtype, device, seed=s, scale=0.06) for s in (1, 2))
    for m in PAIR_ROWS:
        x = make((m, 300), dtype, device, seed=m)
        g = make((m, 48), dtype, device, seed=m + 1)
        cases = [(x, gate.t(), up.t(), 1, SWIGLU), (x, gate.t().contiguous(), up.t().contiguous(), 1, 0),
                 (g, gate, up, 0, 0), (g.t().contiguous().t(), gate, up, 0, 0)]
        for a, b, b_odd, pair_dim, act in cases:
            one = reference.interleave_pair(b, b_odd, pair_dim)
            with poisoned_outputs():
                y, h = kernel(a, b, None, act, True, k_block, b_odd, pair_dim)
                y1, h1 = kernel(a, one, None, act, True, k_block)
            what = f"{backend} m={m} pair_dim={pair_dim} b strides {b.stride()}"
            assert_bitwise_equal(y, y1, f"{what}: y")
            if act:
                assert_bitwise_equal(h, h1, f"{what}: preact")
            if backend == "native":
                y_ref = reference.linear_matmul(a.cpu(), b.cpu(), None, act, False, k_block, b_odd.cpu(), pair_dim)[0]
                assert_bitwise_equal(y.cpu(), y_ref, f"{what}: vs reference")
            # Negative control: the halves swapped are another operand, and the comparison sees it.
            swapped = kernel(a, reference.interleave_pair(b_odd, b, pair_dim), None, act, False, k_block)[0]
            assert not bitwise_equal(y, swapped), f"{what}: swapped halves gave the same bits"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
def test_unpacked_weights_give_the_packed_bits(device, backend, dtype):
    """fusedtx.swiglu_ffn and nn.SwiGLUFFN (gate and up read where they are) give the output and
    every gradient of the packed weight's path bit for bit: dgate and dup are the packed
    gradient's even and odd rows, and the packing's memory is never needed."""
    require(device, backend)
    x = make((2, 5, 300), dtype, device)
    gate, up, down, gb, ub, _ = make_weights(300, 24, dtype, device, bias=True)
    dy = make((2, 5, 300), dtype, device, seed=3)

    def packed(x, gate, up, down, gb, ub):  # the packing made, as one (2H, K) weight
        hidden = linear_op.linear(x, linear_op.pack_gate_up(gate, up), linear_op.pack_gate_up(gb, ub), SWIGLU,
                                  True, backend, grad=True)[0]
        return fusedtx.linear(hidden, down, backend=backend)

    def unpacked(x, gate, up, down, gb, ub):
        return fusedtx.swiglu_ffn(x, gate, up, down, gate_bias=gb, up_bias=ub, backend=backend)

    tensors = (x, gate, up, down, gb, ub)
    with poisoned_outputs():
        got = outputs_and_grads(unpacked, tensors, dy)
    want = outputs_and_grads(packed, tensors, dy)
    for name, o, w in zip(("y", "dx", "dgate", "dup", "ddown", "dgate_bias", "dup_bias"), got, want):
        assert_bitwise_equal(o, w, f"{backend} {dtype} {name}: unpacked vs packed")
    module = fusedtx.nn.SwiGLUFFN(300, 24, bias=True, device=device, dtype=dtype, backend=backend)
    with torch.no_grad():
        for lin, w, b in ((module.gate_proj, gate, gb), (module.up_proj, up, ub), (module.down_proj, down, None)):
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.copy_(b if b is not None else torch.zeros_like(lin.bias))
        inference = module(x)
    training = module(x)
    assert_bitwise_equal(inference, want[0], f"{backend} {dtype}: SwiGLUFFN without autograd")
    assert_bitwise_equal(training.detach(), want[0], f"{backend} {dtype}: SwiGLUFFN")
    training.backward(dy)
    assert_bitwise_equal(module.gate_proj.weight.grad, want[2], f"{backend} {dtype}: SwiGLUFFN dgate")
    assert_bitwise_equal(module.up_proj.weight.grad, want[3], f"{backend} {dtype}: SwiGLUFFN dup")


def test_paired_operand_errors():
    """A b_odd that does not match b is refused by the native kernel, naming it; one whose
    strides differ only along a dim of size 1 is taken."""
    require("cpu", "native")
    kernel = linear_op.matmul_kernel("native", torch.device("cpu"))
    a, b = torch.randn(3, 8), torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="b_odd must have b's sizes and strides"):
        kernel(a, b, None, 0, False, policy.MATMUL_K_BLOCK, torch.randn(8, 5), 1)
    with pytest.raises(RuntimeError, match="b_odd must have b's dtype"):
        kernel(a, b, None, 0, False, policy.MATMUL_K_BLOCK, torch.randn(8, 4).double(), 1)
    with pytest.raises(RuntimeError, match="pair_dim must be 0 or 1"):
        kernel(a, b, None, 0, False, policy.MATMUL_K_BLOCK, torch.randn(8, 4), 2)
    with pytest.raises(RuntimeError, match="must agree in K"):
        kernel(a, b, None, 0, False, policy.MATMUL_K_BLOCK, torch.randn(8, 4), 0)  # rows paired: K = 16
    # A dim of size 1 is never stepped along: its strides may differ (K = 1: a (1, 31) view with
    # strides (1, 1) beside a contiguous one).
    x1, g1, u1 = torch.randn(3, 1), torch.randn(31, 1).t(), torch.randn(1, 31)
    y = kernel(x1, g1, None, SWIGLU, False, policy.MATMUL_K_BLOCK, u1, 1)[0]
    assert_bitwise_equal(y, kernel(x1, reference.interleave_pair(g1, u1, 1), None, SWIGLU, False,
                                   policy.MATMUL_K_BLOCK)[0], "size-1 dim with other strides")
    with pytest.raises(ValueError, match="weight_odd must have weight's shape"):
        linear_op.linear(torch.randn(3, 8), torch.randn(4, 8), None, SWIGLU, False, "native", torch.randn(5, 8))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_swiglu_at_the_extremes_is_pytorchs(device, backend):
    """x = 1 (K = 1) and a packed weight of chosen values: h holds them (the accumulator starts at
    +0, so -0 becomes +0). Infinities, NaN, huge values and zeros give F.silu(g) * u in float64,
    rounded: NaN at g = -inf (0 * -inf, as PyTorch's) and the signed zero of (-0) u below g = -88,
    where F.silu's value is under 1e-36 (the one documented difference)."""
    require(device, backend)
    g = torch.tensor([float("inf"), float("-inf"), 3e38, -3e38, -1e20, -100.0, -20.0, -1.0, -0.0, 0.0, 2.0,
                      float("nan"), 1.0, 1.0, -1e20])
    u = torch.tensor([1.0, 1.0, 0.5, 2.0, 1.0, 1.0, 3.0, -1.0, 1.0, -1.0, float("inf"), 1.0, float("nan"), -0.0, -2.0])
    packed = torch.stack((g, u), dim=1).reshape(-1, 1).to(device)
    y, h = linear_op.linear.impl(torch.ones(1, 1, device=device), packed, None, SWIGLU, True, backend)
    hg, hu = h[0, 0::2].cpu().double(), h[0, 1::2].cpu().double()
    expected = (F.silu(hg) * hu).float()
    cut = (hg < -88) & torch.isfinite(hg) & torch.isfinite(hu)
    expected[cut] = -0.0 * hu[cut].float()
    got = y[0].cpu()
    assert torch.equal(got.isnan(), expected.isnan()), f"NaN at {got.isnan().tolist()}, expected {expected.isnan().tolist()}"
    torch.testing.assert_close(got, expected, rtol=2e-7, atol=0, equal_nan=True)
    zeros = expected == 0
    assert_bitwise_equal(got[zeros], expected[zeros], "signed zeros")


# ---------------------------------------------------------------------------------------------
# batch invariance (point 4), thread counts and determinism (point 5), negative controls
# ---------------------------------------------------------------------------------------------
BATCH_SIZES = (1, 2, 3, 17, 64, 257)


def invariance_failures(fn, device, dtype, d=96, hidden=80, batches=BATCH_SIZES):
    """(batch, index) pairs where a row's output in a batch of garbage rows (inf, NaN, huge)
    differs from the row alone."""
    weights = make_weights(d, hidden, dtype, device)
    return batch_invariance_failures(lambda x: fn(x, *weights), make((1, d), dtype, device, seed=7), batches,
                                     torch.Generator().manual_seed(5))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
def test_batch_invariance_of_output(device, backend, dtype):
    require(device, backend)
    batches = BATCH_SIZES if backend == "native" else (1, 2, 17)  # the reference and interpreter are slow
    with torch.no_grad():
        assert invariance_failures(ours(backend), device, dtype, batches=batches) == []


def test_negative_control_batch_invariance():
    """The same check flags the eager HF MLP on CPU (MKL blocks by the batch size)."""
    with torch.no_grad():
        failures = invariance_failures(eager_swiglu, "cpu", torch.float32, d=768, hidden=768)
    assert failures, "the check missed the eager MLP's batch dependence"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_batch_invariance_of_input_gradient(device, backend):
    """A (B, T, D) input: row (b, t) of y and of dx equals the same row computed alone."""
    require(device, backend)
    weights = make_weights(40, 24, torch.float32, device)
    x, dy = make((3, 7, 40), torch.float32, device, seed=1), make((3, 7, 40), torch.float32, device, seed=2)
    assert_rows_alone_equal(lambda x: ours(backend)(x, *weights), x, dy, ((0, 0), (2, 6)))


def test_native_thread_count_invariance():
    require("cpu", "native")
    x, dy = make((300, 256), torch.float32, "cpu"), make((300, 256), torch.float32, "cpu", seed=1)
    tensors = (x, *make_weights(256, 640, torch.float32, "cpu", bias=True))
    runs = under_each_thread_count(lambda: outputs_and_grads(ours("native"), tensors, dy))
    for run in runs[1:]:
        for i, (o, first) in enumerate(zip(run, runs[0])):
            assert_bitwise_equal(o, first, f"output {i}: 1 vs 2 vs 3 threads")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gradients_bitwise_run_to_run(device, backend):
    require(device, backend)
    rows = 5 if backend != "native" else 300
    x, dy = make((rows, 33), torch.bfloat16, device), make((rows, 33), torch.bfloat16, device, seed=1)
    tensors = (x, *make_weights(33, 70, torch.bfloat16, device))
    runs = [outputs_and_grads(ours(backend), tensors, dy) for _ in range(20 if backend == "native" else 3)]
    for run in runs[1:]:
        for i, (o, first) in enumerate(zip(run, runs[0])):
            assert_bitwise_equal(o, first, f"output {i}, repeated")


# ---------------------------------------------------------------------------------------------
# the module: a drop-in for Hugging Face's LlamaMLP
# ---------------------------------------------------------------------------------------------
def llama_mlp(d, hidden, bias=False):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = transformers.LlamaConfig(hidden_size=d, intermediate_size=hidden, hidden_act="silu",
                                      num_attention_heads=1, num_key_value_heads=1, mlp_bias=bias)
    return LlamaMLP(config)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_loads_hf_llama_mlp(device, backend, bias):
    require(device, backend)
    torch.manual_seed(0)
    ref = llama_mlp(48, 96, bias).to(device)
    mod = fusedtx.nn.SwiGLUFFN(48, 96, bias=bias, backend=backend).to(device)
    assert mod.state_dict().keys() == ref.state_dict().keys()
    mod.load_state_dict(ref.state_dict())
    x = make((2, 5, 48), torch.float32, device)
    torch.testing.assert_close(mod(x), ref(x), rtol=1e-5, atol=1e-5)
    mod(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (name, p), q in zip(mod.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_module_sees_weight_updates_at_once():
    """The module keeps no packing of its weights: an in-place update of one, or a new one, is in
    the next forward's bits, with and without autograd; frozen weights (grad mode on, as a LoRA
    base) give x the trainable module's gradient bits."""
    torch.manual_seed(0)
    mod = fusedtx.nn.SwiGLUFFN(16, 24, backend="native")
    x = make((3, 16), torch.float32, "cpu")

    def expected():
        return fusedtx.swiglu_ffn(x, mod.gate_proj.weight, mod.up_proj.weight, mod.down_proj.weight,
                                  backend="native").detach()
    with torch.no_grad():
        y0 = mod(x)
        mod.up_proj.weight.mul_(2.0)
        y1 = mod(x)
        assert not torch.equal(y1, y0)
        assert_bitwise_equal(y1, expected(), "after an in-place update")
        mod.gate_proj.weight = torch.nn.Parameter(mod.gate_proj.weight * 0.5)
        assert_bitwise_equal(mod(x), expected(), "after a new weight")
    mod.down_proj.weight.data.mul_(0.5)
    assert_bitwise_equal(mod(x).detach(), expected(), "with autograd, after an update")
    xg = x.clone().requires_grad_()
    mod(xg).sum().backward()
    dx_trainable = xg.grad.clone()
    mod.requires_grad_(False)
    xg.grad = None
    mod(xg).sum().backward()
    assert_bitwise_equal(xg.grad, dx_trainable, "dx with frozen weights")


def test_module_calls_a_swapped_or_hooked_child():
    """A child replaced by another module (an adapter) or given a hook after construction is
    called as a module: its forward and hooks run. Negative control: the plain module's output
    is not the adapter's."""
    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    mod = fusedtx.nn.SwiGLUFFN(16, 24, backend="native")
    x = make((3, 16), torch.float32, "cpu")
    with torch.no_grad():
        plain = mod(x)
        adapter = Doubled(16, 24, bias=False)
        adapter.weight.copy_(mod.up_proj.weight)
        fused_up = mod.up_proj
        mod.up_proj = adapter
        want = mod.down_proj(F.silu(mod.gate_proj(x)) * (2 * fused_up(x)))
        got = mod(x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got, plain, rtol=1e-3, atol=1e-3)
        mod.up_proj = fused_up
        assert_bitwise_equal(mod(x), plain, "the plain children again")
        seen = []
        mod.down_proj.register_forward_hook(lambda m, args, out: seen.append(out.shape))
        assert_bitwise_equal(mod(x), plain, "hooked: the same bits, unfused")
        assert seen == [torch.Size([3, 16])]


# ---------------------------------------------------------------------------------------------
# errors (point 7), torch.library integration
# ---------------------------------------------------------------------------------------------
def test_bad_input_errors():
    x = torch.randn(4, 8)
    gate, up, down = torch.randn(6, 8), torch.randn(6, 8), torch.randn(8, 6)
    with pytest.raises(ValueError, match=r"gate_weight and up_weight must have one shape.*\[6, 8\] and \[5, 8\]"):
        fusedtx.swiglu_ffn(x, gate, torch.randn(5, 8), down)
    with pytest.raises(ValueError, match=r"down_weight must be \(d_out, hidden = 6\), got shape \[8, 5\]"):
        fusedtx.swiglu_ffn(x, gate, up, torch.randn(8, 5))
    with pytest.raises(ValueError, match=r"x's last dim \(7\) must equal weight's in_features"):
        fusedtx.swiglu_ffn(torch.randn(4, 7), gate, up, down)
    with pytest.raises(ValueError, match=r"up_weight must be 2-D, got shape \[6\]"):
        fusedtx.swiglu_ffn(x, gate, torch.randn(6), down)
    with pytest.raises(TypeError, match="down_weight must be a torch.Tensor, got list"):
        fusedtx.swiglu_ffn(x, gate, up, [1.0])
    with pytest.raises(TypeError, match="up_weight must have x's dtype torch.float32, got torch.bfloat16"):
        fusedtx.swiglu_ffn(x, gate, up.bfloat16(), down)
    with pytest.raises(ValueError, match="gate_weight is on meta but x is on cpu"):
        fusedtx.swiglu_ffn(x, gate.to("meta"), up, down)
    with pytest.raises(ValueError, match="gate_bias and up_bias must both be given or both be None"):
        fusedtx.swiglu_ffn(x, gate, up, down, gate_bias=torch.randn(6))
    with pytest.raises(ValueError, match=r"up_bias must have shape \[6\], got \[5\]"):
        fusedtx.swiglu_ffn(x, gate, up, down, gate_bias=torch.randn(6), up_bias=torch.randn(5))
    with pytest.raises(TypeError, match=r"float64 only with backend='reference'"):
        fusedtx.swiglu_ffn(x.double(), gate.double(), up.double(), down.double(), backend="native")
    with pytest.raises(ValueError, match="packed gate/up weight of an even number of rows.*got 5"):
        linear_op.linear(x, torch.randn(5, 8), None, SWIGLU, False, "native")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    require(device, backend)
    x = make((2, 3, 24), torch.float32, device).requires_grad_()
    w = make((20, 24), torch.float32, device, seed=1).requires_grad_()
    b = make((20,), torch.float32, device, seed=2).requires_grad_()
    for bias in (b, None):
        torch.library.opcheck(torch.ops.fusedtx.linear.default, (x, w, bias, SWIGLU, True, backend))
    torch.library.opcheck(torch.ops.fusedtx.linear.default, (x.detach(), w.detach(), None, SWIGLU, False, backend))
    y, h = linear_op.linear.impl(x.detach(), w.detach(), b.detach(), SWIGLU, True, backend)
    torch.library.opcheck(torch.ops.fusedtx.linear_backward.default,
                          (torch.randn_like(y), x.detach(), w.detach(), h, SWIGLU, True, True, True, backend))
    # gate and up as a pair (weight_odd): the op reads them in place and returns both gradients
    gate, up = w[:10].detach().requires_grad_(), w[10:].detach().requires_grad_()
    for bias in (b, None):
        torch.library.opcheck(torch.ops.fusedtx.linear.default, (x, gate, bias, SWIGLU, True, backend, up))
    torch.library.opcheck(torch.ops.fusedtx.linear_backward.default,
                          (torch.randn_like(y), x.detach(), gate.detach(), h, SWIGLU, True, True, True, backend,
                           up.detach()))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    require(device, backend)
    torch.manual_seed(0)
    m = fusedtx.nn.SwiGLUFFN(16, 24, backend=backend).to(device)
    x = make((3, 4, 16), torch.float32, device).requires_grad_()
    assert_compiled_grads_equal(lambda x: m(x * 2.0).square().sum(), x, list(m.parameters()))
    with torch.no_grad():
        assert_bitwise_equal(torch.compile(m, fullgraph=True, backend="aot_eager")(x), m(x), "compiled inference")
