"""The native backend's eager fast paths (csrc/eager.cpp) against the Python bodies they stand for.

fusedtx/ops/<op>.py's body, on the native backend, first offers its arguments to fusedtx._C.<op>,
which runs the body's common case in one C++ call or returns None, and the body goes on in
Python. Each case here runs an op both ways — fast path taken (checked: it returned outputs) and
refused (the Python body) — and compares every output's bits, shape, strides, dtype and whether
it is a view. The cases the fast path must refuse (float64 and empty inputs, tensor subclasses,
a __torch_function__ mode, values out of range) are checked to be refused, with the body's
result or error; a kernel's error through it is a Python exception.

fusedtx.functional's linear, swiglu_ffn, layer_norm, rms_norm, activation, rope and
attention_with_kv_cache first offer a whole inference call to a native lane, fusedtx._C.<op>_call, checks included. The lanes are compared the same way with the
whole Python path (lanes and fast paths refused), and must refuse every call that the Python
checks reject (their errors then surface), that records a gradient, or that runs under a dispatch
mode, a torch.func transform, forward-mode AD or another backend.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fusedtx
from fusedtx import _extension
from fusedtx.ops import activation as activation_op
from fusedtx.ops import causal_attention as attention_op
from fusedtx.ops import layer_norm as layer_norm_op
from fusedtx.ops import linear as linear_op
from fusedtx.ops import rms_norm as rms_norm_op
from fusedtx.ops import rope as rope_op
from helpers import assert_bitwise_equal

PATHS = {"linear": linear_op.native_forward, "rms_norm": rms_norm_op.native_forward,
         "rope": rope_op.native_forward, "attention_with_kv_cache": attention_op.native_kv_cache_forward}
LANES = {"linear_call": linear_op.native_call, "swiglu_ffn_call": linear_op.native_swiglu_call,
         "rms_norm_call": rms_norm_op.native_call, "rope_call": rope_op.native_call,
         "attention_with_kv_cache_call": attention_op.native_kv_cache_call,
         "layer_norm_call": layer_norm_op.native_call, "activation_call": activation_op.native_call}


@pytest.fixture(autouse=True)
def _native():
    if _extension.module() is None:
        pytest.skip(f"the C++ extension is not loaded: {_extension.status().error}")


class Taken:
    """Runs the ops with each fast path recording what it returned (`results[name]`), or refused."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.results = monkeypatch, {}

    def record(self):
        """The ops' fast paths recorded; the lanes refuse every call (the bodies then run)."""
        module = _extension.module()
        for name, path in PATHS.items():
            self.results[name] = []
            self.monkeypatch.setattr(path, "run", self._recorder(getattr(module, name), self.results[name]))
        for path in LANES.values():
            self.monkeypatch.setattr(path, "run", lambda *args: None)

    def record_lanes(self):
        """The lanes recorded (with their leading policy constants), the fast paths as they are."""
        module = _extension.module()
        for name, path in LANES.items():
            self.results[name] = []
            fn = functools.partial(getattr(module, name), *path.leading)
            self.monkeypatch.setattr(path, "run", self._recorder(fn, self.results[name]))

    def refuse(self):
        for path in (*PATHS.values(), *LANES.values()):
            self.monkeypatch.setattr(path, "run", lambda *args: None)

    @staticmethod
    def _recorder(fast, results):
        def run(*args):
            out = fast(*args)
            results.append(out)
            return out
        return run


@pytest.fixture
def taken(monkeypatch):
    return Taken(monkeypatch)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=_gen(seed)).to(dtype)


def _assert_same(fast, slow, what):
    fast = fast if isinstance(fast, tuple) else (fast,)
    slow = slow if isinstance(slow, tuple) else (slow,)
    assert len(fast) == len(slow), what
    for i, (a, b) in enumerate(zip(fast, slow)):
        label = f"{what}, output {i}"
        assert (a.shape, a.stride(), a.dtype, a.device) == (b.shape, b.stride(), b.dtype, b.device), label
        assert a._is_view() == b._is_view(), f"{label}: a view on one path only"
        assert_bitwise_equal(a, b, label)


def _both_ways(taken, name, call, *, expect_taken=True, offer=-1):
    """call() with the fast path offered, then refused; the outputs compared. offer: which of the
    calls' offers to the fast path must have been taken (or refused). A name ending in _call is
    a lane's, compared with the whole Python path."""
    taken.record_lanes() if name in LANES else taken.record()
    with torch.no_grad():
        fast = call()
    offered = taken.results[name]
    assert offered, f"{name}'s body did not offer its arguments to the fast path"
    assert (offered[offer] is not None) == expect_taken, \
        f"{name}: the fast path was {'refused' if expect_taken else 'taken'}"
    taken.refuse()
    with torch.no_grad():
        slow = call()
    _assert_same(fast, slow, name)
    return fast


# ------------------------------------------------------------------------------------------------
# linear (and swiglu_ffn's gate/up half)

LINEAR_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
@pytest.mark.parametrize("x_shape", [(40,), (1, 1, 40), (3, 5, 40), (7, 40)])
def test_linear(taken, dtype, activation, x_shape):
    x, w, b = _randn(x_shape, dtype), _randn((24, 40), dtype, 1), _randn((24,), dtype, 2)
    _both_ways(taken, "linear", lambda: fusedtx.linear(x, w, b, activation=activation))
    _both_ways(taken, "linear", lambda: fusedtx.linear(x, w, activation=activation))


@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
def test_linear_strided_operands_and_parameters(taken, dtype):
    """x a transposed view (reshaped with a copy), weight a transposed view and a Parameter."""
    x = _randn((40, 6), dtype).t()
    w = torch.nn.Parameter(_randn((40, 24), dtype, 1).t(), requires_grad=False)
    _both_ways(taken, "linear", lambda: fusedtx.linear(x, w))
    w_grad = torch.nn.Parameter(_randn((24, 40), dtype, 1))  # requires grad, but no_grad: inference
    _both_ways(taken, "linear", lambda: fusedtx.linear(x, w_grad, activation="gelu"))


@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_ffn(taken, dtype, bias):
    x = _randn((2, 3, 40), dtype)
    gate, up, down = _randn((32, 40), dtype, 1), _randn((32, 40), dtype, 2), _randn((40, 32), dtype, 3)
    biases = dict(gate_bias=_randn((32,), dtype, 4), up_bias=_randn((32,), dtype, 5),
                  down_bias=_randn((40,), dtype, 6)) if bias else {}
    _both_ways(taken, "linear", lambda: fusedtx.swiglu_ffn(x, gate, up, down, **biases))


def test_linear_refusals(taken):
    """Empty inputs take the body's reference path; a gate/up pair stepped unlike each other is
    copied by the body first: each refused, with the body's result. float64 (which the body sends
    to the reference, e.g. the backward's matmuls under gradcheck) is refused."""
    x = _randn((3, 40))
    assert _extension.module().linear(x.double(), _randn((24, 40), torch.float64, 1), None, 0, 128, None) is None
    _both_ways(taken, "linear", lambda: fusedtx.linear(x[:0], _randn((24, 40), seed=1)), expect_taken=False)
    _both_ways(taken, "linear", lambda: fusedtx.linear(x, _randn((0, 40), seed=1)), expect_taken=False)
    gate, up = _randn((32, 40), seed=1), _randn((40, 32), seed=2).t()
    _both_ways(taken, "linear", lambda: fusedtx.swiglu_ffn(x, gate, up, _randn((40, 32), seed=3)),
               expect_taken=False, offer=0)


# ------------------------------------------------------------------------------------------------
# rms_norm

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("x_shape, normalized", [((6, 48), (48,)), ((2, 3, 48), (48,)), ((2, 3, 16), (3, 16)),
                                                 ((48,), (48,))])
def test_rms_norm(taken, dtype, x_shape, normalized):
    x = _randn(x_shape, dtype)
    w = _randn(normalized, dtype, 1)
    _both_ways(taken, "rms_norm", lambda: fusedtx.rms_norm(x, normalized, w, 1e-5))
    _both_ways(taken, "rms_norm", lambda: fusedtx.rms_norm(x, normalized))
    if dtype in (torch.bfloat16, torch.float16):  # a float32 weight beside low-precision x, as HF keeps it
        _both_ways(taken, "rms_norm", lambda: fusedtx.rms_norm(x, normalized, w.float()))


def test_rms_norm_strided_operands(taken):
    x = _randn((48, 5)).t()  # not contiguous: copied into rows
    w = _randn((4, 12), seed=1).t()  # a (12, 4) weight, not contiguous: flattened by a copy
    _both_ways(taken, "rms_norm", lambda: fusedtx.rms_norm(x, 48))
    _both_ways(taken, "rms_norm", lambda: fusedtx.rms_norm(_randn((2, 12, 4)), (12, 4), w))
    norm = fusedtx.nn.RMSNorm(48)  # a Parameter weight
    _both_ways(taken, "rms_norm", lambda: norm(x))


def test_rms_norm_refuses_empty_input(taken):
    _both_ways(taken, "rms_norm", lambda: fusedtx.rms_norm(_randn((0, 48)), 48), expect_taken=False)


# ------------------------------------------------------------------------------------------------
# rope

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_rope(taken, dtype):
    cos, sin = fusedtx.rope_table(16, 64)
    x = _randn((2, 3, 5, 16), dtype)
    positions = torch.randint(0, 64, (2, 5), generator=_gen(1))
    _both_ways(taken, "rope", lambda: fusedtx.rope(x, positions, cos, sin))


def test_rope_strided_operands(taken):
    """What the Llama decode step rotates: q and k heads out of one projection, a transposed view
    with a unit-stride head dim; one with a strided head dim (copied); expanded positions."""
    cos, sin = fusedtx.rope_table(8, 32)
    h = _randn((2, 4, 6, 8))  # (B, T, heads, D)
    positions = torch.arange(3, 7).expand(2, 4)
    _both_ways(taken, "rope", lambda: fusedtx.rope(h[:, :, :5].transpose(1, 2), positions, cos, sin))
    strided = _randn((2, 5, 4, 16))[..., ::2]
    _both_ways(taken, "rope", lambda: fusedtx.rope(strided, positions, cos, sin))


def test_rope_refuses_positions_outside_the_table(taken):
    """The fast path checks the positions too, and leaves the error to the body."""
    cos, sin = fusedtx.rope_table(8, 32)
    x = _randn((1, 2, 2, 8))
    for bad in ([[0, 32]], [[-1, 3]]):
        taken.record()
        with pytest.raises(ValueError, match="positions must lie in"):
            fusedtx.rope(x, torch.tensor(bad), cos, sin)
        assert taken.results["rope"] == [None]
    _both_ways(taken, "rope", lambda: fusedtx.rope(x, torch.tensor([[0, 31]]), cos, sin))  # the bounds: taken


# ------------------------------------------------------------------------------------------------
# attention against a KV cache

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize("lengths_dtype", [torch.int64, torch.int32])
def test_attention_with_kv_cache(taken, dtype, queries, lengths_dtype):
    q = _randn((2, 4, queries, 16), dtype)
    k, v = _randn((2, 2, 40, 16), dtype, 1), _randn((2, 2, 40, 16), dtype, 2)
    seqlens = torch.tensor([queries + 3, 37], dtype=lengths_dtype)
    _both_ways(taken, "attention_with_kv_cache",
               lambda: fusedtx.attention_with_kv_cache(q, k, v, seqlens, split_size=16))


def test_attention_with_kv_cache_strided_query(taken):
    """The decode step's query: a transposed view of the projection (unit-stride head dim)."""
    q = _randn((2, 1, 4, 16)).transpose(1, 2)
    k, v = _randn((2, 4, 24, 16), seed=1), _randn((2, 4, 24, 16), seed=2)
    _both_ways(taken, "attention_with_kv_cache",
               lambda: fusedtx.attention_with_kv_cache(q, k, v, torch.tensor([5, 24]), split_size=16))


@pytest.mark.parametrize("lengths, error", [([0, 9], "must be >= Tq"), ([9, 25], "must be <= the cache length")])
def test_attention_with_kv_cache_refuses_bad_lengths(taken, lengths, error):
    q = _randn((2, 4, 1, 16))
    k, v = _randn((2, 4, 24, 16), seed=1), _randn((2, 4, 24, 16), seed=2)
    taken.record()
    with torch.no_grad(), pytest.raises(ValueError, match=error):
        fusedtx.attention_with_kv_cache(q, k, v, torch.tensor(lengths), split_size=16)
    assert taken.results["attention_with_kv_cache"] == [None]


# ------------------------------------------------------------------------------------------------
# What every fast path refuses, and how its errors surface

class Traced(torch.Tensor):
    """A subclass whose __torch_function__ sees every call made on it from Python."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_subclass_argument_sees_the_bodys_calls(taken):
    """A weight that overrides __torch_function__ is refused by the fast path, so it sees the
    Python body's calls on it (weight.t()). Negative control: a plain weight is taken."""
    x, w = _randn((3, 40)), _randn((24, 40), seed=1)
    Traced.calls = []
    taken.record()
    with torch.no_grad():
        out = fusedtx.linear(x, w.as_subclass(Traced))
    assert taken.results["linear"] == [None] and "t" in Traced.calls, Traced.calls
    taken.record()
    with torch.no_grad():
        plain = fusedtx.linear(x, w)
    assert taken.results["linear"][0] is not None
    assert_bitwise_equal(out.as_subclass(torch.Tensor), plain, "subclass weight vs plain")


def test_a_torch_function_mode_sees_the_bodys_calls(taken):
    """Under a TorchFunctionMode the fast path steps aside: the mode sees the body's calls.
    Negative control: without the mode it is taken."""
    seen = []

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    x = _randn((2, 3, 48))
    taken.record()
    with torch.no_grad(), Mode():
        fusedtx.rms_norm(x, 48)
    assert taken.results["rms_norm"] == [None] and seen, seen
    taken.record()
    with torch.no_grad():
        fusedtx.rms_norm(x, 48)
    assert taken.results["rms_norm"][0] is not None


def test_a_kernel_error_is_a_python_exception():
    """Arguments the ops' checks would refuse, passed straight to the fast path: the kernel's own
    check raises through it as RuntimeError, the process goes on."""
    fast = _extension.module()
    with pytest.raises(RuntimeError, match="linear_matmul"):
        fast.linear(_randn((3, 40)), _randn((24, 39)), None, 0, 128, None)
    with pytest.raises(TypeError, match="cannot be interpreted as an integer"):
        fast.linear(_randn((3, 40)), _randn((24, 40)), None, "gelu", 128, None)
    with pytest.raises(TypeError, match="takes 6 arguments, got 2"):
        fast.linear(_randn((3, 40)), _randn((24, 40)))
    assert fast.linear(_randn((3, 40)), _randn((24, 40)), None, 0, 128, None) is not None


def test_the_profiler_still_sees_the_kernel(taken):
    """The fast path calls the kernel through the dispatcher: profiles name it as the body's
    torch.ops call does."""
    x, w = _randn((2, 40)), _randn((24, 40), seed=1)
    taken.record()
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fusedtx.linear(x, w)
    assert taken.results["linear"][0] is not None
    assert "fusedtx_native::linear_matmul" in {e.name for e in prof.events()}


def _llama_decode_step(backend):
    """A small Llama's prefill of two 5-token prompts and one decode step: its logits."""
    from fusedtx.models import Llama, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Llama(config, backend=backend).eval()
    idx = torch.randint(0, 64, (2, 5), generator=_gen(0))

    def step():
        cache = model.new_kv_cache(2, 16)
        model(idx, kv_cache=cache)
        return model(idx[:, :1], kv_cache=cache)[0]

    return step


def test_a_llama_decode_step_takes_the_fast_paths(taken):
    """One decode step of a small Llama takes every fast path, and gives the bits of the Python
    bodies."""
    step = _llama_decode_step("native")
    _both_ways(taken, "linear", step)
    taken.record()
    with torch.no_grad():
        step()
    for name, results in taken.results.items():
        assert results and all(r is not None for r in results), f"{name}: {len(results)} calls, some refused"


@pytest.mark.parametrize("defect", ["one bit", "strides"])
def test_the_comparison_catches_a_defective_fast_path(taken, monkeypatch, defect):
    """Negative control: a fast path whose output differs from the body's in one bit, or in its
    strides alone, fails the comparison every case above makes."""
    real = _extension.module()

    def linear(*args):
        y, preact = real.linear(*args)
        if defect == "one bit":
            y.view(-1)[0] = torch.nextafter(y.view(-1)[0], torch.tensor(float("inf")))
        else:
            y = y.t().contiguous().t()
        return y, preact

    fake = type("FastPaths", (), {name: staticmethod(getattr(real, name)) for name in PATHS})
    fake.linear = staticmethod(linear)
    monkeypatch.setattr(_extension, "module", lambda: fake)
    x, w = _randn((3, 40)), _randn((24, 40), seed=1)
    with pytest.raises(AssertionError, match="not bitwise equal" if defect == "one bit" else "output 0"):
        _both_ways(taken, "linear", lambda: fusedtx.linear(x, w))


# ------------------------------------------------------------------------------------------------
# fusedtx.functional's native lanes: the whole inference call in one C++ call

@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("activation", [None, "none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("x_shape", [(40,), (1, 1, 40), (3, 5, 40), (40, 6)])
def test_linear_lane(taken, dtype, activation, x_shape):
    x = _randn(x_shape, dtype) if x_shape[-1] == 40 else _randn(x_shape, dtype).t()  # also a strided x
    w, b = _randn((24, 40), dtype, 1), _randn((24,), dtype, 2)
    _both_ways(taken, "linear_call", lambda: fusedtx.linear(x, w, b, activation=activation))
    _both_ways(taken, "linear_call", lambda: fusedtx.linear(x, w.t().contiguous().t(), activation=activation))
    layer = fusedtx.nn.Linear(40, 24, dtype=dtype)  # Parameters that require grad, under no_grad
    _both_ways(taken, "linear_call", lambda: layer(x))


@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("down_bias", [False, True])
def test_swiglu_ffn_lane(taken, dtype, down_bias):
    x = _randn((2, 3, 40), dtype)
    gate, up, down = _randn((32, 40), dtype, 1), _randn((32, 40), dtype, 2), _randn((40, 32), dtype, 3)
    bias = _randn((40,), dtype, 6) if down_bias else None
    _both_ways(taken, "swiglu_ffn_call", lambda: fusedtx.swiglu_ffn(x, gate, up, down, down_bias=bias))
    ffn = fusedtx.nn.SwiGLUFFN(40, 32, dtype=dtype)
    _both_ways(taken, "swiglu_ffn_call", lambda: ffn(x[0, :1]))
    # gate and up biases are packed by the Python body: refused, with its result
    _both_ways(taken, "swiglu_ffn_call", lambda: fusedtx.swiglu_ffn(
        x, gate, up, down, gate_bias=_randn((32,), dtype, 4), up_bias=_randn((32,), dtype, 5)), expect_taken=False)
    # a gate/up pair stepped unlike each other is copied by the body first: refused
    _both_ways(taken, "swiglu_ffn_call", lambda: fusedtx.swiglu_ffn(x, gate, up.t().contiguous().t(), down),
               expect_taken=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("x_shape, normalized", [((6, 48), 48), ((2, 3, 48), (48,)), ((2, 3, 16), [3, 16]),
                                                 ((48,), torch.Size([48])), ((2, 3, 16), (2, 3, 16))])
def test_rms_norm_lane(taken, dtype, x_shape, normalized):
    x = _randn(x_shape, dtype)
    shape = (normalized,) if isinstance(normalized, int) else tuple(normalized)
    w = _randn(shape, dtype, 1)
    _both_ways(taken, "rms_norm_call", lambda: fusedtx.rms_norm(x, normalized, w, 1e-5))
    _both_ways(taken, "rms_norm_call", lambda: fusedtx.rms_norm(x, normalized))
    _both_ways(taken, "rms_norm_call", lambda: fusedtx.rms_norm(x, normalized, w, 0.0))
    if dtype in (torch.bfloat16, torch.float16):  # a float32 weight beside low-precision x, as HF keeps it
        _both_ways(taken, "rms_norm_call", lambda: fusedtx.rms_norm(x, normalized, w.float()))
    norm = fusedtx.nn.RMSNorm(shape, eps=1e-6, dtype=dtype)
    _both_ways(taken, "rms_norm_call", lambda: norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("x_shape, normalized", [((6, 48), 48), ((2, 3, 48), (48,)), ((2, 3, 16), [3, 16]),
                                                 ((48,), torch.Size([48]))])
def test_layer_norm_lane(taken, dtype, x_shape, normalized):
    x = _randn(x_shape, dtype)
    shape = (normalized,) if isinstance(normalized, int) else tuple(normalized)
    w, b = _randn(shape, dtype, 1), _randn(shape, dtype, 2)
    _both_ways(taken, "layer_norm_call", lambda: fusedtx.layer_norm(x, normalized, w, b))
    _both_ways(taken, "layer_norm_call", lambda: fusedtx.layer_norm(x, normalized, w, None, 1e-3))
    _both_ways(taken, "layer_norm_call", lambda: fusedtx.layer_norm(x, normalized))
    _both_ways(taken, "layer_norm_call", lambda: fusedtx.layer_norm(x.t() if x.dim() == 2 else x, x.shape[-1:]
                                                                    if x.dim() != 2 else x.shape[0]))
    if dtype in (torch.bfloat16, torch.float16):  # float32 parameters beside low-precision x
        _both_ways(taken, "layer_norm_call", lambda: fusedtx.layer_norm(x, normalized, w.float(), b.float()))
    norm = fusedtx.nn.LayerNorm(shape, dtype=dtype)
    _both_ways(taken, "layer_norm_call", lambda: norm(x))


@pytest.mark.parametrize("dtype", LINEAR_DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
def test_activation_lane(taken, dtype, activation):
    x = _randn((3, 5, 40), dtype)
    _both_ways(taken, "activation_call", lambda: fusedtx.activation(x, activation))
    _both_ways(taken, "activation_call", lambda: fusedtx.activation(x.transpose(0, 2), activation))  # strided
    _both_ways(taken, "activation_call", lambda: fusedtx.activation(x[0, 0, 0], activation))  # 0-d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_rope_lane(taken, dtype):
    cos, sin = fusedtx.rope_table(16, 64)
    x = _randn((2, 3, 5, 16), dtype)
    positions = torch.randint(0, 64, (2, 5), generator=_gen(1))
    _both_ways(taken, "rope_call", lambda: fusedtx.rope(x, positions, cos, sin))
    h = _randn((2, 4, 6, 16), dtype)  # (B, T, heads, D): q heads of one projection, transposed
    _both_ways(taken, "rope_call", lambda: fusedtx.rope(h[:, :, :5].transpose(1, 2), positions[:, :4], cos, sin))
    _both_ways(taken, "rope_call", lambda: fusedtx.rope(x[..., ::2], positions, *fusedtx.rope_table(8, 64)))
    _both_ways(taken, "rope_call", lambda: fusedtx.rope(x, torch.arange(59, 64).expand(2, 5), cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize("lengths_dtype", [torch.int64, torch.int32])
def test_attention_with_kv_cache_lane(taken, dtype, queries, lengths_dtype):
    q = _randn((2, 4, queries, 16), dtype)
    k, v = _randn((2, 2, 40, 16), dtype, 1), _randn((2, 2, 40, 16), dtype, 2)
    seqlens = torch.tensor([queries + 3, 40], dtype=lengths_dtype)
    name = "attention_with_kv_cache_call"
    _both_ways(taken, name, lambda: fusedtx.attention_with_kv_cache(q, k, v, seqlens))
    _both_ways(taken, name, lambda: fusedtx.attention_with_kv_cache(q, k, v, seqlens, scale=0.3, split_size=16))
    qt = _randn((2, queries, 4, 16), dtype).transpose(1, 2)  # the decode step's query: a transposed view
    _both_ways(taken, name, lambda: fusedtx.attention_with_kv_cache(qt, k, v, seqlens, split_size=32))
    fusedtx.set_split_size(16)  # the library-wide split size reaches the lane
    try:
        _both_ways(taken, name, lambda: fusedtx.attention_with_kv_cache(q, k, v, seqlens))
    finally:
        fusedtx.set_split_size(None)


def _lane_refuses(taken, name, call, error=None):
    """call() offers its lane a call that the lane refuses; the Python path then raises `error`
    (an exception type) or returns its result."""
    taken.record_lanes()
    if error is None:
        call()
    else:
        with pytest.raises(error):
            call()
    assert taken.results[name] == [None], f"{name} took {taken.results[name]}"


def test_lanes_refuse_what_the_checks_reject(taken):
    """Every bad argument the Python checks name is refused by the lane, so their errors surface."""
    x, w, b = _randn((3, 40)), _randn((24, 40), seed=1), _randn((24,), seed=2)
    gate, up, down = _randn((32, 40), seed=1), _randn((32, 40), seed=2), _randn((40, 32), seed=3)
    with torch.no_grad():
        for call, error in [
            (lambda: fusedtx.linear(x.long(), w.long()), TypeError),              # dtype
            (lambda: fusedtx.linear(x, w.half()), TypeError),                     # weight's dtype
            (lambda: fusedtx.linear(x, w[None]), ValueError),                     # weight 3-D
            (lambda: fusedtx.linear(x, w[:, :39]), ValueError),                   # in_features
            (lambda: fusedtx.linear(x, w, b[:23]), ValueError),                   # bias shape
            (lambda: fusedtx.linear(x, w, b.double()), TypeError),                # bias dtype
            (lambda: fusedtx.linear(x, w, b[None]), ValueError),                  # bias 2-D
            (lambda: fusedtx.linear(x, w, activation="relu"), ValueError),        # activation
            (lambda: fusedtx.linear(x[0, 0], w), ValueError),                     # 0-d x
            (lambda: fusedtx.linear(x, w, "bias"), TypeError),                    # not a tensor
        ]:
            _lane_refuses(taken, "linear_call", call, error)
        for call, error in [
            (lambda: fusedtx.swiglu_ffn(x, gate, up[:31], down), ValueError),     # gate / up shapes
            (lambda: fusedtx.swiglu_ffn(x, gate, up, down[:, :31]), ValueError),  # down's hidden
            (lambda: fusedtx.swiglu_ffn(x, gate, up, down, down_bias=b), ValueError),
            (lambda: fusedtx.swiglu_ffn(x, gate[:, :39], up[:, :39], down), ValueError),  # d_model
            (lambda: fusedtx.swiglu_ffn(x, gate, up.half(), down), TypeError),
            (lambda: fusedtx.swiglu_ffn(x.half(), gate.half(), up.half(), down), TypeError),
        ]:
            _lane_refuses(taken, "swiglu_ffn_call", call, error)
        n = _randn((2, 3, 48))
        for call, error in [
            (lambda: fusedtx.rms_norm(n, 47), ValueError),                        # trailing dims
            (lambda: fusedtx.rms_norm(n, (2, 3, 48, 1)), ValueError),             # longer than x
            (lambda: fusedtx.rms_norm(n, ()), ValueError),                        # empty
            (lambda: fusedtx.rms_norm(n, 48.0), TypeError),                       # not ints
            (lambda: fusedtx.rms_norm(n, (True,)), TypeError),
            (lambda: fusedtx.rms_norm(n, 48, _randn((47,))), ValueError),         # weight shape
            (lambda: fusedtx.rms_norm(n, 48, _randn((48,)).double()), TypeError),  # weight dtype
            (lambda: fusedtx.rms_norm(n.half(), 48, _randn((48,)).double()), TypeError),
            (lambda: fusedtx.rms_norm(n, 48, None, -1e-5), ValueError),           # eps
            (lambda: fusedtx.rms_norm(n, 48, None, float("nan")), ValueError),
            (lambda: fusedtx.rms_norm(n, 48, None, "1e-5"), TypeError),
            (lambda: fusedtx.rms_norm(n.long(), 48), TypeError),
        ]:
            _lane_refuses(taken, "rms_norm_call", call, error)
        cos, sin = fusedtx.rope_table(8, 32)
        r, positions = _randn((1, 2, 3, 8)), torch.tensor([[0, 1, 2]])
        for call, error in [
            (lambda: fusedtx.rope(r[0], positions, cos, sin), ValueError),          # x 3-D
            (lambda: fusedtx.rope(r[..., :7], positions, cos, sin), ValueError),    # odd head_dim
            (lambda: fusedtx.rope(r.long(), positions, cos, sin), TypeError),
            (lambda: fusedtx.rope(r, positions.int(), cos, sin), TypeError),        # positions' dtype
            (lambda: fusedtx.rope(r, positions[:, :2], cos, sin), ValueError),     # positions' shape
            (lambda: fusedtx.rope(r, positions, cos.double(), sin), TypeError),     # table dtype
            (lambda: fusedtx.rope(r, positions, cos[:, :3], sin[:, :3]), ValueError),
            (lambda: fusedtx.rope(r, positions, cos, sin[:16]), ValueError),        # cos / sin shapes
            (lambda: fusedtx.rope(r, positions, cos.requires_grad_(), sin), ValueError),
            (lambda: fusedtx.rope(r, positions + 30, cos.detach(), sin), ValueError),  # outside the table
            (lambda: fusedtx.rope(r, positions - 1, cos.detach(), sin), ValueError),
        ]:
            _lane_refuses(taken, "rope_call", call, error)
        q, kv = _randn((2, 4, 1, 16)), _randn((2, 2, 24, 16), seed=1)
        lengths = torch.tensor([5, 24])
        name = "attention_with_kv_cache_call"
        for call, error in [
            (lambda: fusedtx.attention_with_kv_cache(q, kv.half(), kv, lengths), TypeError),
            (lambda: fusedtx.attention_with_kv_cache(q, kv[0], kv, lengths), ValueError),      # k 3-D
            (lambda: fusedtx.attention_with_kv_cache(q, kv, kv[:, :, :20], lengths), ValueError),
            (lambda: fusedtx.attention_with_kv_cache(q, kv[:, :1].expand(2, 3, 24, 16), kv[:, :1].expand(2, 3, 24, 16),
                                                     lengths), ValueError),                  # heads
            (lambda: fusedtx.attention_with_kv_cache(q, kv[..., :8], kv[..., :8], lengths), ValueError),
            (lambda: fusedtx.attention_with_kv_cache(q, kv, kv, lengths.float()), TypeError),
            (lambda: fusedtx.attention_with_kv_cache(q, kv, kv, lengths[:1]), ValueError),
            (lambda: fusedtx.attention_with_kv_cache(q, kv, kv, torch.tensor([0, 5])), ValueError),
            (lambda: fusedtx.attention_with_kv_cache(q, kv, kv, torch.tensor([5, 25])), ValueError),
            (lambda: fusedtx.attention_with_kv_cache(q, kv, kv, lengths, split_size=24), ValueError),
            (lambda: fusedtx.attention_with_kv_cache(q, kv, kv, lengths, split_size=True), TypeError),
            (lambda: fusedtx.attention_with_kv_cache(q, kv, kv, lengths, scale=float("nan")), ValueError),
            (lambda: fusedtx.attention_with_kv_cache(q.long(), kv.long(), kv.long(), lengths), TypeError),
        ]:
            _lane_refuses(taken, name, call, error)
        for call, error in [
            (lambda: fusedtx.layer_norm(n, 47), ValueError),
            (lambda: fusedtx.layer_norm(n, 48, _randn((48,)), _randn((47,))), ValueError),        # bias shape
            (lambda: fusedtx.layer_norm(n.half(), 48, _randn((48,)), _randn((48,)).half()), TypeError),  # mixed
            (lambda: fusedtx.layer_norm(n, 48, None, _randn((48,)).double()), TypeError),
            (lambda: fusedtx.layer_norm(n, 48, None, None, -1.0), ValueError),
            (lambda: fusedtx.layer_norm(n, (48.0,)), TypeError),
            (lambda: fusedtx.layer_norm(n.int(), 48), TypeError),
        ]:
            _lane_refuses(taken, "layer_norm_call", call, error)
        for call, error in [
            (lambda: fusedtx.activation(n, "relu"), ValueError),
            (lambda: fusedtx.activation(n.double(), "silu"), TypeError),
            (lambda: fusedtx.activation(n.long(), "gelu"), TypeError),
        ]:
            _lane_refuses(taken, "activation_call", call, error)
        # accepted by the checks, refused by the lane: the Python path's result
        _lane_refuses(taken, "rms_norm_call", lambda: fusedtx.rms_norm(n, 48, None, 1))  # an int eps
        _lane_refuses(taken, "linear_call", lambda: fusedtx.linear(x[:0], w))            # empty: the reference
        _lane_refuses(taken, "rms_norm_call", lambda: fusedtx.rms_norm(n[:0], 48))


def test_lanes_refuse_what_must_see_the_registered_op(taken):
    """A gradient to record, a dispatch mode, a torch.func transform: refused by the lane (and
    the Python path takes the eager Function or the registered op). Forward-mode AD and another
    backend: not offered at all. Negative control: the same call plain is taken."""
    x, w = _randn((3, 40)), _randn((24, 40), seed=1)
    n = _randn((2, 48))
    taken.record_lanes()
    with torch.no_grad():
        fusedtx.linear(x, w), fusedtx.rms_norm(n, 48)
    assert taken.results["linear_call"][0] is not None and taken.results["rms_norm_call"][0] is not None

    _lane_refuses(taken, "linear_call", lambda: fusedtx.linear(x.requires_grad_(), w).sum().backward())
    assert x.grad is not None
    x = x.detach()
    _lane_refuses(taken, "rms_norm_call", lambda: fusedtx.rms_norm(n, 48, torch.ones(48, requires_grad=True)))
    _lane_refuses(taken, "layer_norm_call", lambda: fusedtx.layer_norm(n, 48, torch.ones(48, requires_grad=True)))
    _lane_refuses(taken, "activation_call", lambda: fusedtx.activation(n.clone().requires_grad_(), "silu"))
    cos, sin = fusedtx.rope_table(8, 16)
    _lane_refuses(taken, "rope_call", lambda: fusedtx.rope(_randn((1, 2, 3, 8)).requires_grad_(),
                                                           torch.tensor([[0, 1, 2]]), cos, sin))
    kv = _randn((1, 2, 8, 16))
    _lane_refuses(taken, "attention_with_kv_cache_call", lambda: fusedtx.attention_with_kv_cache(
        _randn((1, 2, 1, 16)).requires_grad_(), kv, kv, torch.tensor([8])), ValueError)  # inference only

    seen = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        with Mode():
            _lane_refuses(taken, "linear_call", lambda: fusedtx.linear(x, w))
        assert "fusedtx.linear.default" in seen, seen
        _lane_refuses(taken, "linear_call", lambda: torch.func.vmap(lambda r: fusedtx.linear(r, w))(x))
        _lane_refuses(taken, "rms_norm_call", lambda: torch.func.grad(lambda r: fusedtx.rms_norm(r, 48).sum())(n))

        taken.record_lanes()
        with fwAD.dual_level():
            fusedtx.linear(x, w)
        with fusedtx.use_backend("reference"):
            fusedtx.linear(x, w), fusedtx.rms_norm(n, 48)
        fusedtx.linear(x, w, backend="reference")
        assert taken.results["linear_call"] == [] and taken.results["rms_norm_call"] == []
        fusedtx.linear(x, w, backend="native")  # named: offered, taken
        assert taken.results["linear_call"][0] is not None


def test_decode_steps_take_the_lanes(taken):
    """A small Llama's and a small GPT's decode steps send every linear, SwiGLU, norm, rotation
    and attention through the lanes, with the bits of the whole Python path; GELU as a module of
    its own (a converted HF GPT-2) too."""
    from fusedtx.models import GPT, GPTConfig

    _both_ways(taken, "linear_call", _llama_decode_step(None))
    llama = ("linear_call", "swiglu_ffn_call", "rms_norm_call", "rope_call", "attention_with_kv_cache_call")
    for name in llama:
        results = taken.results[name]
        assert results and all(r is not None for r in results), f"{name}: {len(results)} calls, some refused"

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 64, (2, 5), generator=_gen(0))

    def step():
        cache = gpt.new_kv_cache(2, 16)
        gpt(idx, kv_cache=cache)
        return gpt(idx[:, :1], kv_cache=cache)[0]

    _both_ways(taken, "layer_norm_call", step)
    for name in ("linear_call", "layer_norm_call", "attention_with_kv_cache_call"):
        results = taken.results[name]
        assert results and all(r is not None for r in results), f"{name}: {len(results)} calls, some refused"
    gelu = fusedtx.nn.GELU(approximate="tanh")
    _both_ways(taken, "activation_call", lambda: gelu(_randn((2, 1, 128))))


def test_the_comparison_catches_a_defective_lane(taken, monkeypatch):
    """Negative control: a lane whose output is one bit off fails the comparison."""
    real = _extension.module()

    def linear_call(*args):
        y = real.linear_call(*args)
        y.view(-1)[0] = torch.nextafter(y.view(-1)[0], torch.tensor(float("inf")))
        return y

    fake = type("FastPaths", (), {name: staticmethod(getattr(real, name)) for name in (*PATHS, *LANES)})
    fake.linear_call = staticmethod(linear_call)
    monkeypatch.setattr(_extension, "module", lambda: fake)
    x, w = _randn((3, 40)), _randn((24, 40), seed=1)
    with pytest.raises(AssertionError, match="not bitwise equal"):
        _both_ways(taken, "linear_call", lambda: fusedtx.linear(x, w))
