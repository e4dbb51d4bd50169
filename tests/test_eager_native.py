"""The native backend's eager fast paths (csrc/eager.cpp) against the Python bodies they stand for.

fusedtx/ops/<op>.py's body, on the native backend, first offers its arguments to fusedtx._C.<op>,
which runs the body's common case in one C++ call or returns None, and the body goes on in
Python. Each case here runs an op both ways — fast path taken (checked: it returned outputs) and
refused (the Python body) — and compares every output's bits, shape, strides, dtype and whether
it is a view. The cases the fast path must refuse (float64 and empty inputs, tensor subclasses,
a __torch_function__ mode, values out of range) are checked to be refused, with the body's
result or error; a kernel's error through it is a Python exception.
"""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fusedtx
from fusedtx import _extension
from fusedtx.ops import causal_attention as attention_op
from fusedtx.ops import linear as linear_op
from fusedtx.ops import rms_norm as rms_norm_op
from fusedtx.ops import rope as rope_op
from helpers import assert_bitwise_equal

PATHS = {"linear": linear_op.native_forward, "rms_norm": rms_norm_op.native_forward,
         "rope": rope_op.native_forward, "attention_with_kv_cache": attention_op.native_kv_cache_forward}


@pytest.fixture(autouse=True)
def _native():
    if _extension.module() is None:
        pytest.skip(f"the C++ extension is not loaded: {_extension.status().error}")


class Taken:
    """Runs the ops with each fast path recording what it returned (`results[name]`), or refused."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.results = monkeypatch, {}

    def record(self):
        module = _extension.module()
        for name, path in PATHS.items():
            self.results[name] = []
            self.monkeypatch.setattr(path, "run", self._recorder(getattr(module, name), self.results[name]))

    def refuse(self):
        for path in PATHS.values():
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
    calls' offers to the fast path must have been taken (or refused)."""
    taken.record()
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


def test_a_llama_decode_step_takes_the_fast_paths(taken):
    """One decode step of a small Llama takes every fast path, and gives the bits of the Python
    bodies."""
    from fusedtx.models import Llama, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Llama(config, backend="native").eval()
    idx = torch.randint(0, 64, (2, 5), generator=_gen(0))

    def step():
        cache = model.new_kv_cache(2, 16)
        model(idx, kv_cache=cache)
        return model(idx[:, :1], kv_cache=cache)[0]

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
