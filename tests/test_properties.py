"""Property-based tests: the contract (docs/design.md, "The contract") checked on random cases
of every op, backend, dtype, layout and edge value, as a user's code would call the public API.

Each test runs one property through tests/properties_gen.run_property: a fixed number of
seeded cases by default (fast, for CI), or FUSEDTX_FUZZ_SECONDS seconds of fresh cases per
property (long, `-m fuzz`); a failure prints the seed, the case index and the case's parameters.
Properties still open on main are marked xfail(strict=True) with the issue item and the branch
that fixes them: drop the marker when that branch lands.
"""
from __future__ import annotations

import copy as copy_module
import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as torch_F

import fusedtx
from fusedtx import backends, reference
from fusedtx.models import GPT, GPTConfig, Llama, LlamaConfig
from properties_gen import (LAYOUTS, SPECIALS, STYLES, assert_same_bits, broadcastable, garbage, rel_error,
                            relayout, run_property, same_bits, size, torch_gen, values, with_threads)

pytestmark = pytest.mark.fuzz

LOW = (torch.float16, torch.bfloat16)
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def require(backend: str) -> None:
    if not backends.is_available(backend, "cpu"):
        try:
            backends.resolve(backend, torch.device("cpu"))
        except backends.BackendUnavailableError as exc:
            pytest.skip(str(exc))


def cases(native: int, reference: int | None = None, triton: int | None = None, *, backend: str = "native") -> int:
    """The fast mode's case count for a backend (Triton runs under the interpreter: few, small)."""
    return {"native": native, "reference": reference if reference is not None else max(1, native // 2),
            "triton": triton if triton is not None else max(1, native // 10)}[backend]


def _dtype(rng: random.Random, backend: str, float64: bool = False) -> torch.dtype:
    choices = list(FLOATS) + ([torch.float64] if float64 and backend != "triton" else [])
    return rng.choice(choices)


def _style(rng: random.Random, p: dict, edge: bool = True) -> None:
    p["style"] = rng.choice(STYLES) if edge else "normal"
    p["specials"] = rng.choice((0, 0, 1, 3)) if edge else 0


# ---------------------------------------------------------------------------------------------
# The ops as a property sees them: parameters, tensors, a call
# ---------------------------------------------------------------------------------------------
@dataclass
class Spec:
    name: str
    gen: Callable        # (rng, backend, edge) -> params, with "batch" and "grad"
    tensors: Callable    # params -> {name: tensor}, drawn from params["seed"]
    call: Callable       # (params, tensors, backend) -> output
    grad_names: tuple = ()
    batched: tuple = ()  # inputs whose dim 0 is the batch (the rest are shared: weights)
    int_inputs: tuple = field(default=())
    n_tensors: int = 4   # how many tensors `tensors` returns (None ones included): one layout each


def _row_shape(rng, ndim: int, most_numel: int, most: int = 257) -> list[int]:
    shape = []
    for _ in range(ndim):
        shape.append(size(rng, max(1, min(most, most_numel // max(1, math.prod(shape))))))
    return shape


# softmax -------------------------------------------------------------------------------------
def softmax_gen(rng, backend, edge=True):
    small = backend == "triton"
    p = {"dtype": _dtype(rng, backend), "batch": rng.randint(1, 2 if small else 4), "grad": rng.random() < 0.6}
    p["causal"] = rng.random() < 0.3  # masks the last two dims as (queries, keys): a row is 2-D
    ndim = rng.randint(2 if p["causal"] else 1, 2 if small else 3)
    if small:  # the interpreter runs one program per row: a few rows (other dims: native, reference)
        p["shape"] = [size(rng, 4) for _ in range(ndim - 1)] + [size(rng, 64)]
    else:
        p["shape"] = _row_shape(rng, ndim, 4096)
    p["dim"] = -1 if p["causal"] or small else rng.randint(-len(p["shape"]), -1)
    p["scale"] = rng.choice((None, None, rng.uniform(0.01, 4.0), -rng.uniform(0.1, 2.0), 0.0, 1e-3, 100.0))
    _style(rng, p, edge)
    return p


def softmax_tensors(p):
    rng, gen = random.Random(p["seed"]), torch_gen(p["seed"])
    return {"x": values(rng, gen, [p["batch"], *p["shape"]], p["dtype"], p["style"], p["specials"])}


def softmax_call(p, t, backend):
    return fusedtx.softmax(t["x"], p["dim"], scale=p["scale"], causal=p["causal"], backend=backend)


# layer_norm ----------------------------------------------------------------------------------
def layer_norm_gen(rng, backend, edge=True):
    small = backend == "triton"
    p = {"dtype": _dtype(rng, backend, float64=True), "batch": rng.randint(1, 4), "grad": rng.random() < 0.6}
    p["norm_shape"] = _row_shape(rng, rng.choice((1, 1, 1, 2)), 256 if small else 2048, 300)
    p["lead"] = _row_shape(rng, rng.choice((0, 0, 1)), 4)
    p["weight"], p["bias"] = rng.random() < 0.8, rng.random() < 0.7
    p["param_f32"] = p["dtype"] in LOW and rng.random() < 0.5
    p["eps"] = rng.choice((1e-5, 1e-5, 1e-6, 0.1, 1e-12))
    _style(rng, p, edge)
    return p


def layer_norm_tensors(p):
    rng, gen = random.Random(p["seed"]), torch_gen(p["seed"])
    pdt = torch.float32 if p["param_f32"] else p["dtype"]
    n = p["norm_shape"]
    t = {"x": values(rng, gen, [p["batch"], *p["lead"], *n], p["dtype"], p["style"], p["specials"])}
    t["weight"] = (1 + values(rng, gen, n, torch.float64) * 0.5).to(pdt) if p["weight"] else None
    t["bias"] = values(rng, gen, n, pdt) if p["bias"] else None
    return t


def layer_norm_call(p, t, backend):
    return fusedtx.layer_norm(t["x"], p["norm_shape"], t["weight"], t["bias"], p["eps"], backend=backend)


# rms_norm ------------------------------------------------------------------------------------
def rms_norm_gen(rng, backend, edge=True):
    """layer_norm's rows and parameters without the bias; eps None is the compute dtype's."""
    p = layer_norm_gen(rng, backend, edge)
    p["bias"] = False
    p["eps"] = rng.choice((None, 1e-5, 1e-6, 0.1, 1e-12))
    return p


def rms_norm_call(p, t, backend):
    return fusedtx.rms_norm(t["x"], p["norm_shape"], t["weight"], p["eps"], backend=backend)


# rope ----------------------------------------------------------------------------------------
ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def rope_gen(rng, backend, edge=True):
    """q or k (B, H, T, D) rotated by the table rows of random positions (repeated, out of order,
    up to the table's last row), the table default or llama3-scaled."""
    small = backend == "triton"  # the interpreter runs one program per token
    p = {"dtype": _dtype(rng, backend, float64=True), "batch": rng.randint(1, 2 if small else 4),
         "grad": rng.random() < 0.6}
    p["heads"] = rng.choice((1, 1, 2, 3, 4))
    p["t"] = size(rng, 6 if small else 40)
    p["d"] = 2 * size(rng, 32 if small else 64)
    p["max_positions"] = rng.choice((1, p["t"], p["t"] + rng.randint(1, 50), rng.randint(1, 5000)))
    p["positions"] = rng.choice(("random", "consecutive", "last"))
    p["theta"] = rng.choice((10000.0, 500000.0, 10.0, 10 ** rng.uniform(0, 7)))
    p["scaling"] = rng.random() < 0.4
    p["original_max"] = rng.choice((4, 16, 64, 8192))
    _style(rng, p, edge)
    return p


def rope_positions(rng, gen, p, batch):
    """(batch, T) int64 positions in the table: random, consecutive from a random start (a
    prefill or decode chunk), or all the table's last row."""
    t, most = p["t"], p["max_positions"]
    if p["positions"] == "random" or most < t:
        return torch.randint(0, most, (batch, t), generator=gen)
    if p["positions"] == "last":
        return torch.full((batch, t), most - 1, dtype=torch.int64)
    starts = torch.randint(0, most - t + 1, (batch, 1), generator=gen)
    return starts + torch.arange(t)


def rope_tensors(p):
    rng, gen = random.Random(p["seed"]), torch_gen(p["seed"])
    t = {"x": values(rng, gen, [p["batch"], p["heads"], p["t"], p["d"]], p["dtype"], p["style"], p["specials"])}
    t["positions"] = rope_positions(rng, gen, p, p["batch"])
    scaling = dict(ROPE_LLAMA3, original_max_position_embeddings=p["original_max"]) if p["scaling"] else None
    t["cos"], t["sin"] = fusedtx.rope_table(p["d"], p["max_positions"], p["theta"], scaling)
    return t


def rope_call(p, t, backend):
    return fusedtx.rope(t["x"], t["positions"], t["cos"], t["sin"], backend=backend)


# swiglu_ffn ----------------------------------------------------------------------------------
SWIGLU_NAMES = ("x", "gate_weight", "up_weight", "down_weight", "gate_bias", "up_bias", "down_bias")


def swiglu_gen(rng, backend, edge=True):
    """linear's rows through gate, up (d_model -> hidden) and down (hidden -> d_out) projections,
    biases optional (gate and up together)."""
    small, mid = backend == "triton", backend == "reference"  # the reference emulates each FMA in float64
    p = {"dtype": _dtype(rng, backend), "batch": rng.randint(1, 4), "grad": rng.random() < 0.6}
    p["k"] = size(rng, 48 if small else 160)  # past the 128-wide K block of the matmuls
    p["hidden"], p["n"] = size(rng, 24 if small else 48 if mid else 96), size(rng, 16 if small else 32 if mid else 64)
    p["lead"] = _row_shape(rng, rng.choice((0, 0, 1, 2)), 3 if small else 8, 8)
    p["gate_up_bias"], p["down_bias"] = rng.random() < 0.3, rng.random() < 0.3
    _style(rng, p, edge)
    if p["style"] == "tiny" and p["k"] > 1:
        p["style"] = "scaled"  # as linear's: tiny x times a N(0, 1) weight underflows to all zeros
    return p


def swiglu_tensors(p):
    rng, gen = random.Random(p["seed"]), torch_gen(p["seed"])
    k, hidden, n, dtype = p["k"], p["hidden"], p["n"], p["dtype"]
    t = {"x": values(rng, gen, [p["batch"], *p["lead"], k], dtype, p["style"], p["specials"])}
    t["gate_weight"] = (values(rng, gen, [hidden, k], torch.float64) / math.sqrt(k)).to(dtype)
    t["up_weight"] = (values(rng, gen, [hidden, k], torch.float64) / math.sqrt(k)).to(dtype)
    t["down_weight"] = (values(rng, gen, [n, hidden], torch.float64) / math.sqrt(hidden)).to(dtype)
    for name, width, given in (("gate_bias", hidden, p["gate_up_bias"]), ("up_bias", hidden, p["gate_up_bias"]),
                               ("down_bias", n, p["down_bias"])):
        t[name] = values(rng, gen, [width], dtype) if given else None
    return t


def swiglu_call(p, t, backend):
    return fusedtx.swiglu_ffn(t["x"], t["gate_weight"], t["up_weight"], t["down_weight"], gate_bias=t["gate_bias"],
                              up_bias=t["up_bias"], down_bias=t["down_bias"], backend=backend)


# linear --------------------------------------------------------------------------------------
def linear_gen(rng, backend, edge=True):
    small = backend == "triton"
    p = {"dtype": _dtype(rng, backend), "batch": rng.randint(1, 4), "grad": rng.random() < 0.6}
    p["k"], p["n"] = size(rng, 64 if small else 300), size(rng, 32 if small else 200)
    p["lead"] = _row_shape(rng, rng.choice((0, 0, 1, 2)), 3 if small else 8, 8)
    p["bias"] = rng.random() < 0.7
    p["activation"] = rng.choice((None, "gelu", "gelu_tanh"))
    _style(rng, p, edge)
    if p["style"] == "tiny" and p["k"] > 1:
        p["style"] = "scaled"  # tiny x times a N(0, 1) weight: products below float32's range, all zeros
    return p


def linear_tensors(p):
    rng, gen = random.Random(p["seed"]), torch_gen(p["seed"])
    k, n = p["k"], p["n"]
    t = {"x": values(rng, gen, [p["batch"], *p["lead"], k], p["dtype"], p["style"], p["specials"])}
    t["weight"] = (values(rng, gen, [n, k], torch.float64) / math.sqrt(k)).to(p["dtype"])
    t["bias"] = values(rng, gen, [n], p["dtype"]) if p["bias"] else None
    return t


def linear_call(p, t, backend):
    return fusedtx.linear(t["x"], t["weight"], t["bias"], activation=p["activation"], backend=backend)


# causal_attention ----------------------------------------------------------------------------
def _heads(rng):
    h = rng.choice((1, 1, 2, 4))
    return h, rng.choice([d for d in (1, 2, 4) if h % d == 0])


def _head_dim(rng, backend):
    return rng.choice((16, 32)) if backend == "triton" else rng.choice((1, 2, 3, 8, 16, 24, 32, 64))


def attention_gen(rng, backend, edge=True):
    p = {"dtype": _dtype(rng, backend), "batch": rng.randint(1, 3), "grad": rng.random() < 0.5}
    p["heads"], p["kv_heads"] = _heads(rng)
    p["d"] = _head_dim(rng, backend)
    p["t"] = size(rng, {"triton": 24, "reference": 40}.get(backend, 80))
    p["split"] = rng.choice((None, 16, 16, 32, 64))
    p["scale"] = rng.choice((None, None, rng.uniform(0.05, 1.0)))
    p["style"] = rng.choice(("normal", "normal", "scaled", "constant")) if edge else "normal"
    if p["style"] == "scaled":
        p["style"] = "normal"  # scores are sums of d products: keep them finite
    p["specials"] = rng.choice((0, 0, 1)) if edge else 0
    return p


# Special values placed in q, k, v (and the output gradient) by the attention properties: all of
# them, NaN and infinities included (a masked pair is no term of any sum, forward or backward).
ATTENTION_SPECIALS = SPECIALS


def attention_tensors(p):
    rng, gen = random.Random(p["seed"]), torch_gen(p["seed"])
    b, t, d = p["batch"], p["t"], p["d"]
    return {name: values(rng, gen, [b, p["heads" if name == "q" else "kv_heads"], t, d], p["dtype"], p["style"],
                         p["specials"], ATTENTION_SPECIALS) for name in ("q", "k", "v")}


def attention_call(p, t, backend):
    return fusedtx.causal_attention(t["q"], t["k"], t["v"], scale=p["scale"], split_size=p["split"], backend=backend)


# attention_with_kv_cache ---------------------------------------------------------------------
def kv_gen(rng, backend, edge=True):
    p = attention_gen(rng, backend, edge)
    p["grad"] = False
    p["tmax"] = p.pop("t")
    p["tq"] = rng.choice((1, 1, rng.randint(1, p["tmax"])))
    return p


def kv_tensors(p):
    rng, gen = random.Random(p["seed"]), torch_gen(p["seed"])
    b, tmax, d = p["batch"], p["tmax"], p["d"]
    t = {"q": values(rng, gen, [b, p["heads"], p["tq"], d], p["dtype"], p["style"], p["specials"], ATTENTION_SPECIALS)}
    seqlens = torch.tensor([rng.randint(p["tq"], tmax) for _ in range(b)], dtype=torch.int64)
    for name in ("k_cache", "v_cache"):
        c = values(rng, gen, [b, p["kv_heads"], tmax, d], p["dtype"], p["style"], p["specials"], ATTENTION_SPECIALS)
        for i, n in enumerate(seqlens.tolist()):  # beyond seqlens: never read
            c[i, :, n:] = garbage(gen, c[i, :, n:].shape, p["dtype"])
        t[name] = c
    t["seqlens"] = seqlens.to(rng.choice((torch.int64, torch.int32)))
    return t


def kv_call(p, t, backend):
    with torch.no_grad():
        return fusedtx.attention_with_kv_cache(t["q"], t["k_cache"], t["v_cache"], t["seqlens"], scale=p["scale"],
                                               split_size=p["split"], backend=backend)


SPECS = {
    "softmax": Spec("softmax", softmax_gen, softmax_tensors, softmax_call, ("x",), ("x",)),
    "layer_norm": Spec("layer_norm", layer_norm_gen, layer_norm_tensors, layer_norm_call,
                       ("x", "weight", "bias"), ("x",)),
    "rms_norm": Spec("rms_norm", rms_norm_gen, layer_norm_tensors, rms_norm_call, ("x", "weight"), ("x",)),
    "rope": Spec("rope", rope_gen, rope_tensors, rope_call, ("x",), ("x", "positions"), ("positions",)),
    "linear": Spec("linear", linear_gen, linear_tensors, linear_call, ("x", "weight", "bias"), ("x",)),
    "swiglu_ffn": Spec("swiglu_ffn", swiglu_gen, swiglu_tensors, swiglu_call, SWIGLU_NAMES, ("x",),
                       n_tensors=len(SWIGLU_NAMES)),
    "causal_attention": Spec("causal_attention", attention_gen, attention_tensors, attention_call,
                             ("q", "k", "v"), ("q", "k", "v")),
    "attention_with_kv_cache": Spec("attention_with_kv_cache", kv_gen, kv_tensors, kv_call, (),
                                    ("q", "k_cache", "v_cache", "seqlens"), ("seqlens",)),
}


def grad_out(p, shape, dtype) -> torch.Tensor:
    """The output gradient a backward starts from (special values too, finite ones for attention)."""
    rng, gen = random.Random(p["seed"] + 1), torch_gen(p["seed"] + 1)
    pool = ATTENTION_SPECIALS if "heads" in p else SPECIALS
    return values(rng, gen, shape, dtype, "normal", rng.choice((0, 0, 0, 1)), pool)


def evaluate(spec: Spec, p: dict, t: dict, backend: str, gout=None) -> dict:
    """{"out": output, "grad_<name>": gradient of each differentiable input} (gradients when
    p["grad"]), the backward seeded with gout (default: grad_out(p, ...))."""
    if not (p["grad"] and spec.grad_names):
        with torch.no_grad():
            return {"out": spec.call(p, t, backend)}
    leaves = dict(t)
    for name in spec.grad_names:
        if t.get(name) is not None:
            leaves[name] = t[name].detach().requires_grad_()
    out = spec.call(p, leaves, backend)
    wrt = [name for name in spec.grad_names if leaves.get(name) is not None]
    if gout is None:
        gout = grad_out(p, out.shape, out.dtype)
    grads = torch.autograd.grad(out, [leaves[name] for name in wrt], gout)
    return {"out": out.detach(), **{f"grad_{name}": g for name, g in zip(wrt, grads)}}


def assert_results_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: {sorted(a)} vs {sorted(b)}"
    for key in a:
        assert_same_bits(a[key], b[key], f"{what} {key}")


OPS = list(SPECS)
ALL_BACKENDS = ("reference", "native", "triton")


# ---------------------------------------------------------------------------------------------
# 1. native == reference, bit for bit, forward and backward (NaN-aware)
# ---------------------------------------------------------------------------------------------
PARITY_CASES = {"softmax": 40, "layer_norm": 40, "rms_norm": 40,
                "rope": 16, "linear": 30, "swiglu_ffn": 10, "causal_attention": 12, "attention_with_kv_cache": 15}


@pytest.mark.parametrize("op", OPS)
def test_native_equals_reference(op):
    require("native")
    spec = SPECS[op]

    def check(p):
        t = spec.tensors(p)
        assert_results_equal(evaluate(spec, p, t, "native"), evaluate(spec, p, t, "reference"), "native vs reference")

    run_property(f"parity-{op}", lambda rng: spec.gen(rng, "native"), check, cases=PARITY_CASES[op],
                 test=f"test_native_equals_reference[{op}]")


# ---------------------------------------------------------------------------------------------
# 2. batch invariance: a row alone == that row inside a batch with garbage neighbours
# ---------------------------------------------------------------------------------------------
def _neighbours(gen, rng, spec: Spec, name: str, one: torch.Tensor, batch: int, pos: int, p: dict) -> torch.Tensor:
    """A batch of `batch` rows holding `one` (a batch of 1) at `pos` and garbage or other rows elsewhere."""
    if name in spec.int_inputs:  # other sequences' own valid lengths (seqlens) or positions in the table
        if name == "positions":
            rows = rope_positions(rng, gen, dict(p, positions="random"), batch)
        else:
            lo = p.get("tq", 1)
            rows = torch.tensor([rng.randint(lo, p["tmax"]) for _ in range(batch)], dtype=one.dtype)
    elif rng.random() < 0.5:
        rows = garbage(gen, (batch, *one.shape[1:]), one.dtype)
    else:
        rows = values(rng, gen, (batch, *one.shape[1:]), one.dtype, rng.choice(STYLES), 2)
    rows[pos] = one[0]
    return rows


BATCH_CASES = {"softmax": 30, "layer_norm": 30, "rms_norm": 30,
               "rope": 12, "linear": 25, "swiglu_ffn": 8, "causal_attention": 10, "attention_with_kv_cache": 12}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_batch_invariance(op, backend):
    require(backend)
    spec = SPECS[op]

    def generate(rng):
        p = spec.gen(rng, backend)
        p["batch"], p["big"] = 1, rng.randint(2, 9 if backend != "triton" else 3)
        p["pos"] = rng.randrange(p["big"])
        return p

    def check(p):
        rng, gen = random.Random(p["seed"] + 2), torch_gen(p["seed"] + 2)
        one = spec.tensors(p)
        alone = evaluate(spec, p, one, backend)
        many = {n: (_neighbours(gen, rng, spec, n, v, p["big"], p["pos"], p) if n in spec.batched else v)
                for n, v in one.items()}
        gout = None
        if "grad_" + spec.batched[0] in alone:
            out = alone["out"]
            gout = garbage(gen, (p["big"], *out.shape[1:]), out.dtype)
            gout[p["pos"]] = grad_out(p, out.shape, out.dtype)[0]
        batched = evaluate(spec, p, many, backend, gout)
        assert_same_bits(alone["out"][0], batched["out"][p["pos"]], "output row")
        for name in spec.batched:
            if f"grad_{name}" in alone:
                assert_same_bits(alone[f"grad_{name}"][0], batched[f"grad_{name}"][p["pos"]], f"grad of {name}")

    run_property(f"batch-{op}-{backend}", generate, check, cases=cases(BATCH_CASES[op], backend=backend),
                 test=f"test_batch_invariance[{op}-{backend}]")


def test_batch_invariance_negative_control():
    """The batch check catches a row that reads its neighbours: softmax over the batch dim."""
    spec = Spec("leaky", softmax_gen, softmax_tensors, lambda p, t, b: torch.softmax(t["x"].float(), 0),
                ("x",), ("x",))
    p = {"dtype": torch.float32, "batch": 1, "grad": False, "shape": [5], "causal": False, "dim": -1,
         "scale": None, "style": "normal", "specials": 0, "seed": 1}
    one = spec.tensors(p)
    many = {"x": torch.cat([one["x"], one["x"] + 1])}
    assert not same_bits(evaluate(spec, p, one, "native")["out"][0], evaluate(spec, p, many, "native")["out"][0])


# ---------------------------------------------------------------------------------------------
# 3. layout invariance: the same values in any layout give the same bits
# ---------------------------------------------------------------------------------------------
LAYOUT_CASES = {"softmax": 30, "layer_norm": 30, "rms_norm": 30,
                "rope": 12, "linear": 25, "swiglu_ffn": 8, "causal_attention": 8, "attention_with_kv_cache": 12}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_layout_invariance(op, backend):
    require(backend)
    spec = SPECS[op]

    def generate(rng):
        p = spec.gen(rng, backend)
        p["layouts"] = [rng.choice(LAYOUTS) for _ in range(5)]
        p["grad_layout"] = rng.choice(LAYOUTS)
        p["layouts"] += [rng.choice(LAYOUTS) for _ in range(spec.n_tensors - 5)]
        return p

    def check(p):
        rng, gen = random.Random(p["seed"] + 3), torch_gen(p["seed"] + 3)
        base, laid = {}, {}
        tensors = spec.tensors(p)
        assert len(tensors) <= len(p["layouts"]), f"{spec.name}: {len(tensors)} tensors, n_tensors too small"
        for (name, v), kind in zip(tensors.items(), p["layouts"]):
            if v is not None and kind == "expanded":
                v = broadcastable(v, rng)
            base[name] = None if v is None else v.contiguous()
            laid[name] = None if v is None else relayout(v, kind, rng, gen)
        g = g_laid = None
        if p["grad"]:
            out = evaluate(spec, dict(p, grad=False), base, backend)["out"]
            g = grad_out(p, out.shape, out.dtype)
            if p["grad_layout"] == "expanded":
                g = broadcastable(g, rng)
            g_laid, g = relayout(g, p["grad_layout"], rng, gen), g.contiguous()
        assert_results_equal(evaluate(spec, p, base, backend, g), evaluate(spec, p, laid, backend, g_laid),
                             f"contiguous vs {p['layouts']}, grad {p['grad_layout']}")

    run_property(f"layout-{op}-{backend}", generate, check, cases=cases(LAYOUT_CASES[op], backend=backend),
                 test=f"test_layout_invariance[{op}-{backend}]")


def test_layout_negative_control():
    """The layout check sees a kernel that reads the storage behind a view: a strided view's
    NaN-filled gaps change the result when read as if contiguous."""
    rng, gen = random.Random(0), torch_gen(0)
    x = values(rng, gen, [3, 8], torch.float32)
    strided = relayout(x, "strided", random.Random(1), gen)
    while strided.is_contiguous():
        strided = relayout(x, "strided", rng, gen)
    raw = torch.as_strided(strided, x.shape, (x.shape[1], 1))  # ignores the view's strides
    assert not same_bits(fusedtx.softmax(x, backend="native"), fusedtx.softmax(raw, backend="native"))


# ---------------------------------------------------------------------------------------------
# 4. attention: full pass == chunked prefill == decode steps, bitwise; split size respected
# ---------------------------------------------------------------------------------------------
def consistency_gen(backend):
    def generate(rng):
        p = attention_gen(rng, backend)
        p["batch"] = rng.randint(1, 3)
        most = {"triton": 12, "reference": 40}.get(backend, 64)
        p["lengths"] = [rng.randint(1, most) for _ in range(p["batch"])]
        p["t"] = max(p["lengths"])
        p["schedule"] = rng.choice(("prefill", "decode", "windows"))
        p["global_split"] = p["split"] is not None and rng.random() < 0.5
        return p
    return generate


def _windows(rng, p) -> list[tuple[int, list[int]]]:
    """(Tq, ends per sequence) steps: consecutive random chunks, one-token decode, or random windows."""
    lengths = p["lengths"]
    if p["schedule"] == "windows":
        steps = []
        for _ in range(4):
            tq = rng.randint(1, min(lengths))
            steps.append((tq, [rng.randint(tq, n) for n in lengths]))
        return steps
    # chunks of one common size per step (1: decode) until every sequence is complete; a complete
    # sequence replays its last queries
    steps, done = [], [0] * len(lengths)
    while any(d < n for d, n in zip(done, lengths)):
        room = min(n - d for d, n in zip(done, lengths) if d < n)
        tq = min(1 if p["schedule"] == "decode" else rng.randint(1, room), min(lengths))
        ends = [d + tq if d < n else n for d, n in zip(done, lengths)]
        steps.append((tq, ends))
        done = [e if d < n else d for d, n, e in zip(done, lengths, ends)]
    return steps


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_attention_full_chunked_decode(backend):
    require(backend)

    def check(p):
        rng, gen = random.Random(p["seed"] + 4), torch_gen(p["seed"] + 4)
        split_arg = None if p["global_split"] else p["split"]
        before = fusedtx.get_split_size()
        fusedtx.set_split_size(p["split"] if p["global_split"] else None)
        try:
            t = attention_tensors(p)
            full = [fusedtx.causal_attention(t["q"][b:b + 1, :, :n], t["k"][b:b + 1, :, :n], t["v"][b:b + 1, :, :n],
                                             scale=p["scale"], split_size=split_arg, backend=backend)
                    for b, n in enumerate(p["lengths"])]
            if backend == "native":  # the split size reaches the kernel: the spec with S explicitly
                for b, n in enumerate(p["lengths"]):
                    spec = fusedtx.causal_attention(t["q"][b:b + 1, :, :n], t["k"][b:b + 1, :, :n],
                                                    t["v"][b:b + 1, :, :n], scale=p["scale"],
                                                    split_size=p["split"] or before, backend="reference")
                    assert_same_bits(full[b], spec, f"sequence {b}: native vs reference with split {p['split']}")
            for tq, ends in _windows(rng, p):
                k_cache = garbage(gen, t["k"].shape, p["dtype"])
                v_cache = garbage(gen, t["v"].shape, p["dtype"])
                q = torch.empty(p["batch"], p["heads"], tq, p["d"], dtype=p["dtype"])
                for b, e in enumerate(ends):  # the cache holds keys up to the end, garbage beyond
                    k_cache[b, :, :e] = t["k"][b, :, :e]
                    v_cache[b, :, :e] = t["v"][b, :, :e]
                    q[b] = t["q"][b, :, e - tq:e]
                seqlens = torch.tensor(ends)
                with torch.no_grad():
                    out = fusedtx.attention_with_kv_cache(q, k_cache, v_cache, seqlens, scale=p["scale"],
                                                          split_size=split_arg, backend=backend)
                for b, e in enumerate(ends):
                    assert_same_bits(out[b], full[b][0, :, e - tq:e], f"sequence {b}, queries {e - tq}..{e - 1}")
        finally:
            fusedtx.set_split_size(None if before == fusedtx.policy.DEFAULT_SPLIT_SIZE else before)

    run_property(f"attention-consistency-{backend}", consistency_gen(backend), check,
                 cases=cases(12, 8, 2, backend=backend), test=f"test_attention_full_chunked_decode[{backend}]")


def test_split_size_negative_control():
    """Two split sizes give different bits on a long enough sequence: the split is really used."""
    rng, gen = random.Random(0), torch_gen(0)
    q, k, v = (values(rng, gen, [1, 1, 100, 16], torch.float32, "normal") for _ in range(3))
    a = fusedtx.causal_attention(q, k, v, split_size=16, backend="native")
    b = fusedtx.causal_attention(q, k, v, split_size=64, backend="native")
    assert not same_bits(a, b)


def masked_gen(backend):
    def generate(rng):
        p = attention_gen(rng, backend)
        p["t"] = max(p["t"], 2)
        p["cut"] = rng.randint(1, p["t"] - 1)  # keys >= cut are poisoned; queries < cut cannot see them
        p["poison"] = rng.choice(("nan", "inf", "-inf", "max"))
        return p
    return generate


def _poison(t: torch.Tensor, cut: int, kind: str) -> torch.Tensor:
    value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "max": torch.finfo(t.dtype).max}[kind]
    t = t.clone()
    t[:, :, cut:] = value
    return t


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_attention_future_keys_never_read(backend):
    """A key a query cannot see (a future position) never influences it, whatever its value."""
    require(backend)

    def check(p):
        t = attention_tensors(p)
        poisoned = {"q": t["q"], "k": _poison(t["k"], p["cut"], p["poison"]), "v": _poison(t["v"], p["cut"], p["poison"])}
        spec, cut = SPECS["causal_attention"], p["cut"]
        # the output gradient of the later queries is poisoned too: it must not reach earlier keys
        gout = grad_out(p, t["q"].shape, p["dtype"])
        clean = evaluate(spec, p, t, backend, gout)
        dirty = evaluate(spec, p, poisoned, backend, _poison(gout, cut, p["poison"]) if p["grad"] else None)
        assert_same_bits(clean["out"][:, :, :cut], dirty["out"][:, :, :cut], f"queries before {cut}")
        if p["grad"]:
            assert_same_bits(clean["grad_q"][:, :, :cut], dirty["grad_q"][:, :, :cut], f"dq before {cut}")

    run_property(f"attention-masked-{backend}", masked_gen(backend), check, cases=cases(10, 5, 2, backend=backend),
                 test=f"test_attention_future_keys_never_read[{backend}]")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_softmax_causal_masked_never_read(backend):
    """softmax(causal=True): an entry a query cannot see never influences its row or its gradient."""
    require(backend)

    def generate(rng):
        p = softmax_gen(rng, backend)
        p["causal"], p["dim"], p["grad"] = True, -1, True
        p["shape"] = [*p["shape"][:-2], max(2, size(rng, 16)), size(rng, 32)]
        p["poison"] = rng.choice(("nan", "inf", "-inf", "max"))
        return p

    def check(p):
        t = softmax_tensors(p)
        tq, tk = p["shape"][-2:]
        visible = torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + (tk - tq)
        value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "max": torch.finfo(p["dtype"]).max}[p["poison"]]
        poisoned = {"x": t["x"].masked_fill(~visible, value)}
        spec = SPECS["softmax"]
        assert_results_equal(evaluate(spec, p, t, backend), evaluate(spec, p, poisoned, backend), "clean vs poisoned")

    run_property(f"softmax-masked-{backend}", generate, check, cases=cases(20, 10, 2, backend=backend),
                 test=f"test_softmax_causal_masked_never_read[{backend}]")


# ---------------------------------------------------------------------------------------------
# 5. thread-count invariance (native)
# ---------------------------------------------------------------------------------------------
THREAD_CASES = {"softmax": 12, "layer_norm": 12, "rms_norm": 12,
                "rope": 4, "linear": 10, "swiglu_ffn": 4, "causal_attention": 6, "attention_with_kv_cache": 6}


@pytest.mark.parametrize("op", OPS)
def test_thread_count_invariance(op):
    require("native")
    spec = SPECS[op]

    def generate(rng):
        p = spec.gen(rng, "native")
        p["batch"] = rng.choice((1, 3, 8, 16, 33))
        p["threads"] = rng.choice(((1, 2), (1, 3), (2, 4)))
        return p

    def check(p):
        t = spec.tensors(p)
        one, two = (with_threads(n, lambda: evaluate(spec, p, t, "native")) for n in p["threads"])
        assert_results_equal(one, two, f"threads {p['threads']}")

    run_property(f"threads-{op}", generate, check, cases=THREAD_CASES[op], test=f"test_thread_count_invariance[{op}]")


# ---------------------------------------------------------------------------------------------
# 6. training drop-in: in-place edits of outputs, then backward, as with torch.nn
# ---------------------------------------------------------------------------------------------
def _dropin_modules(p, backend):
    """(fusedtx module, the torch.nn computation with the same parameters, its parameters, input shape)."""
    kind, d, n = p["module"], p["d"], p["n"]
    if kind == "linear":
        ours = fusedtx.nn.Linear(d, n, bias=p["bias"], activation=p["activation"], backend=backend)
        act = {None: torch.nn.Identity(), "gelu": torch.nn.GELU(), "gelu_tanh": torch.nn.GELU("tanh")}
        theirs = torch.nn.Sequential(torch.nn.Linear(d, n, bias=p["bias"]), act[p["activation"]])
        theirs[0].load_state_dict(ours.state_dict())
        return ours, theirs, list(theirs.parameters()), [p["rows"], d]
    if kind == "layer_norm":
        ours = fusedtx.nn.LayerNorm(d, bias=p["bias"], backend=backend)
        theirs = torch.nn.LayerNorm(d, bias=p["bias"])
        with torch.no_grad():
            ours.weight.normal_(1, 0.3, generator=torch_gen(p["seed"]))
        theirs.load_state_dict(ours.state_dict())
        return ours, theirs, list(theirs.parameters()), [p["rows"], d]
    if kind == "softmax":
        return fusedtx.nn.Softmax(-1, backend=backend), torch.nn.Softmax(-1), [], [p["rows"], d]
    if kind == "attention":
        ours = fusedtx.nn.CausalSelfAttention(p["heads"] * 16, p["heads"], backend=backend)
        return ours, lambda x: _torch_attention(ours, x), list(ours.parameters()), [2, p["rows"], p["heads"] * 16]
    raise ValueError(kind)


def _dropin_ulps(p, ours, x, gout) -> list[float]:
    """Per result of the drop-in run (output, gradients of x and the parameters): 2 sqrt(K) float32
    ulps of the magnitude of the K terms it sums (section 7's allowance), as an absolute error.
    Where the terms cancel, both PyTorch's and fusedtx's errors are rounding noise of that size
    (LayerNorm's dx over 2 columns is rstd * (g - mean(g)) * eps / (var + eps)): a ratio of two
    noises says nothing. Attention has no such model here: 0."""
    kind = p["module"]
    if kind == "attention":
        return [0.0] * (2 + len(list(ours.parameters())))
    op = {"linear": "linear", "layer_norm": "layer_norm", "softmax": "softmax"}[kind]
    named = dict(ours.named_parameters())
    t = {"x": x, "weight": named.get("weight"), "bias": named.get("bias")}
    q = {"norm_shape": (p["d"],), "eps": ours.eps if kind == "layer_norm" else None,
         "activation": p["activation"], "dim": -1, "scale": None}
    ref = {"out": torch.softmax(x.double(), -1)} if kind == "softmax" else {}
    mags = _magnitudes(op, q, t, gout, ref)
    keys = ["out", "grad_x"] + [f"grad_{n}" for n, _ in ours.named_parameters()]
    return [2 * math.sqrt(max(k, 1)) * torch.finfo(torch.float32).eps * m
            for m, k in (mags.get(key, (0.0, 1)) for key in keys)]


def _double(p, ours, theirs):
    """The torch side of _dropin_modules in float64: (forward, parameters, module)."""
    if p["module"] == "attention":
        copy = copy_module.deepcopy(ours).double()
        return (lambda x: _torch_attention(copy, x)), list(copy.parameters()), copy
    copy = copy_module.deepcopy(theirs).double()
    return copy, list(copy.parameters()), copy


def _torch_attention(module, x):
    """fusedtx.nn.CausalSelfAttention's computation in plain torch (for the drop-in comparison)."""
    b, t, c = x.shape
    h = module.n_head
    q, k, v = torch_F.linear(x, module.c_attn.weight, module.c_attn.bias).split(c, dim=2)
    q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))
    y = torch_F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return torch_F.linear(y.transpose(1, 2).reshape(b, t, c), module.c_proj.weight, module.c_proj.bias)


def _zero_first_column(h):
    h[..., :1] = 0
    return h


EDITS = {
    "relu_": lambda h: torch.nn.ReLU(inplace=True)(h),
    "add_": lambda h: h.add_(1),
    "iadd": lambda h: h.__iadd__(1),
    "mul_": lambda h: h.mul_(2),
    "slice": _zero_first_column,
    "clamp_": lambda h: h.clamp_(-0.5, 0.5),
}


def _dropin_run(forward, params, x, edit, in_place: bool, grad_out: bool = False):
    """(edited output, gradients of x and params) of a loss on forward(x) after `edit`, and with
    grad_out the gradient arriving at forward's output (not in place only)."""
    xi = x.detach().clone().requires_grad_()
    out = forward(xi)
    h = EDITS[edit](out if in_place else out.clone())
    loss = (h * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view(h.shape)).sum()
    grads = torch.autograd.grad(loss, [xi, *params] + ([out] if grad_out else []))
    return [h.detach(), *grads]


def _dropin_check(p, backend, lossy=None):
    """fusedtx's module (or `lossy`, a forward on its parameters, for the negative control) after
    p's in-place edit: output and gradients within 2x torch.nn's error against float64."""
    torch.manual_seed(p["seed"])
    ours, theirs, their_params, shape = _dropin_modules(p, backend)
    x = values(random.Random(p["seed"]), torch_gen(p["seed"]), shape, torch.float32)
    # What the edit should give: torch's computation with the edit applied to a copy of its
    # output, in float32 and (the yardstick) float64. torch's own Softmax refuses an in-place
    # edit of its output (its backward reads it): there fusedtx may refuse too, with autograd's
    # error, or give the right gradients.
    want = _dropin_run(theirs, their_params, x, p["edit"], in_place=False)
    theirs64, params64, _ = _double(p, ours, theirs)
    *exact, gout = _dropin_run(theirs64, params64, x.double(), p["edit"], in_place=False, grad_out=True)
    ulps = _dropin_ulps(p, ours, x, gout)
    try:
        _dropin_run(theirs, their_params, x, p["edit"], in_place=True)
        torch_refuses = False
    except RuntimeError:
        torch_refuses = True
    try:
        forward = ours if lossy is None else (lambda z: lossy(ours, z))
        got = _dropin_run(forward, list(ours.parameters()), x, p["edit"], in_place=True)
    except RuntimeError as exc:
        if torch_refuses and "inplace" in str(exc):
            return
        raise
    for i, (a, b, ref) in enumerate(zip(got, want, exact)):
        ours_err = (a.double() - ref).abs().max().item()
        torch_err = (b.double() - ref).abs().max().item()
        # a gradient summed over rows of the loss's +-weights can cancel to ~0: allow a few
        # float32 ulps per row summed, and where terms cancel a few ulps of their magnitude
        bound = 2 * torch_err + 1e-5 * ref.abs().max().item() + 1e-6 * math.prod(shape[:-1]) + ulps[i]
        assert ours_err <= bound, f"{'output' if i == 0 else f'gradient {i}'}: max |error| {ours_err:.3e} " \
                                  f"vs torch's {torch_err:.3e} (float64 yardstick)"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_training_drop_in(backend):
    require(backend)

    def generate(rng):
        small = backend == "triton"
        p = {"module": rng.choice(("linear", "linear", "layer_norm", "softmax", "attention")),
             "d": size(rng, 32 if small else 96), "n": size(rng, 16 if small else 64), "rows": rng.randint(1, 5 if small else 12),
             "bias": rng.random() < 0.7, "activation": rng.choice((None, "gelu", "gelu_tanh")),
             "heads": rng.choice((1, 2)), "edit": rng.choice(list(EDITS))}
        return p

    run_property(f"drop-in-{backend}", generate, lambda p: _dropin_check(p, backend),
                 cases=cases(16, 8, 3, backend=backend), test=f"test_training_drop_in[{backend}]")


def test_training_drop_in_negative_control():
    """The drop-in bound, terms' allowance included, still catches a LayerNorm gradient that loses
    precision: dx rounded to bfloat16 on its way out (the forward is fusedtx's own). Not on two
    columns: there the exact dx, rstd * (g - mean(g)) * eps / (var + eps), lies below the rounding
    noise of its terms in any float32 order, and the bound allows that noise."""
    require("native")

    def lossy(module, x):
        class Lossy(torch.autograd.Function):
            @staticmethod
            def forward(ctx, z):
                return z.clone()

            @staticmethod
            def backward(ctx, g):
                return g.bfloat16().float()
        return module(Lossy.apply(x))

    p = {"module": "layer_norm", "d": 24, "n": 8, "rows": 3, "bias": True, "activation": None, "heads": 1,
         "edit": "add_", "seed": 513329691}
    _dropin_check(p, "native")
    with pytest.raises(AssertionError, match="gradient 1"):
        _dropin_check(p, "native", lossy)


# ---------------------------------------------------------------------------------------------
# 7. accuracy against float64: at most 2x PyTorch's own error in the same dtype, plus a few ulps
# ---------------------------------------------------------------------------------------------
def _magnitudes(op: str, p: dict, t: dict, gout: torch.Tensor | None, ref: dict) -> dict:
    """{key: (M, K)}: the float64 norm M of the magnitudes of the terms each result element sums
    (the sum of |terms|), and the number K of terms. A rounding error of a few ulps of M per
    sqrt(K) is unavoidable in any summation order; it matters where the terms cancel (a result
    far below M) or underflow, where a relative error against the result alone says nothing."""
    t = {n: (None if v is None else v.detach().double() if v.is_floating_point() else v) for n, v in t.items()}
    g = None if gout is None else gout.double().abs()
    if op == "rope":
        return _rope_magnitudes(t, g)
    if op == "swiglu_ffn":
        return _swiglu_magnitudes(t, g)
    if op == "softmax":
        y, k = ref["out"].double(), t["x"].shape[p["dim"]]
        scale = abs(1.0 if p["scale"] is None else p["scale"])
        out = {"out": (y.norm().item(), k)}
        if g is not None:
            out["grad_x"] = ((scale * y * (g + (y * g).sum(p["dim"], keepdim=True))).norm().item(), k)
        return out
    if op == "layer_norm":
        dims = tuple(range(-len(p["norm_shape"]), 0))
        k = math.prod(p["norm_shape"])
        x = t["x"]
        mean = x.mean(dims, keepdim=True)
        rstd = ((x - mean).pow(2).mean(dims, keepdim=True) + p["eps"]).rsqrt()
        xhat = (x - mean) * rstd
        w = t["weight"].abs() if t["weight"] is not None else torch.ones(p["norm_shape"], dtype=torch.float64)
        b = t["bias"].abs() if t["bias"] is not None else 0
        out = {"out": ((xhat.abs() * w + b).norm().item(), k)}
        if g is not None:
            gw = g * w
            rows = x.numel() // k
            # The backward recomputes xhat = (x - mean) * rstd: its rounding error is relative to
            # |x| + |mean|, not to |x - mean| (rows nearly constant next to their mean cancel).
            # The forward's bound keeps |xhat|: its statistics must not lose the spread.
            terms = (x.abs() + mean.abs()) * rstd
            out["grad_x"] = ((rstd * (gw + gw.mean(dims, keepdim=True)
                                      + terms * (gw * terms).mean(dims, keepdim=True))).norm().item(), k)
            lead = tuple(range(x.dim() - len(dims)))
            # each term g * xhat carries xhat's own rounding error (its statistics sum k terms)
            spread = 1 + math.sqrt(k / max(rows, 1))
            out["grad_weight"] = ((g * terms).sum(lead).norm().item() * spread, rows)
            out["grad_bias"] = (g.sum(lead).norm().item(), rows)
        return out
    x, w = t["x"].abs(), t["weight"].abs()
    b = t["bias"].abs() if t["bias"] is not None else None
    out = {"out": (torch_F.linear(x, w, b).norm().item(), x.shape[-1])}
    if g is not None:
        rows = x.numel() // x.shape[-1]
        if p["activation"]:
            # GELU'(h) carries h's rounding error (a K-term sum of magnitude |x| @ |w|.T) times
            # |GELU''| <= 0.8, in ulps of h's terms: add it to the gradient's own terms.
            h_terms = torch_F.linear(x, w, b) * math.sqrt(x.shape[-1])
            g = g * (1.2 + 0.8 * h_terms / math.sqrt(max(rows, w.shape[0])))
        out["grad_x"] = ((g @ w).norm().item(), w.shape[0])
        out["grad_weight"] = ((g.reshape(-1, w.shape[0]).t() @ x.reshape(-1, w.shape[1])).norm().item(), rows)
        out["grad_bias"] = (g.reshape(-1, w.shape[0]).sum(0).norm().item(), rows)
    return out


def _rope_magnitudes(t: dict, g: torch.Tensor | None) -> dict:
    """Each rotated element sums two products, x[i] cos and x[i + D/2] sin (or the transposed
    pair for the gradient): their magnitudes, K = 2."""
    def terms(z):
        c, s = (t[n][t["positions"]][:, None].abs() for n in ("cos", "sin"))
        half = z.shape[-1] // 2
        a, b = z[..., :half].abs(), z[..., half:].abs()
        return torch.cat([a * c + b * s, b * c + a * s], -1)

    out = {"out": (terms(t["x"]).norm().item(), 2)}
    if g is not None:
        out["grad_x"] = (terms(g).norm().item(), 2)
    return out


def _swiglu_magnitudes(t: dict, g: torch.Tensor | None) -> dict:
    """down(silu(gate(x)) * up(x)): each result's terms, the rounding errors of the sums feeding
    it carried through (h = silu(g) u holds g's and u's K-term sums: |silu'(g)| |u| G + |silu(g)| U,
    G and U their terms' magnitudes; |silu''| <= 0.5). K: the longest sum on the way."""
    x, gw, uw, dw = (t[n] for n in ("x", "gate_weight", "up_weight", "down_weight"))
    gate, up = torch_F.linear(x, gw, t["gate_bias"]), torch_F.linear(x, uw, t["up_bias"])
    sig = torch.sigmoid(gate)
    silu, dsilu = (gate * sig).abs(), (sig * (1 + gate * (1 - sig))).abs()
    G, U = (torch_F.linear(x.abs(), w.abs(), None if b is None else b.abs())
            for w, b in ((gw, t["gate_bias"]), (uw, t["up_bias"])))
    H = silu * up.abs() + dsilu * up.abs() * G + silu * U
    k, hidden, n = x.shape[-1], gw.shape[0], dw.shape[0]
    rows = x.numel() // k
    db = None if t["down_bias"] is None else t["down_bias"].abs()
    out = {"out": (torch_F.linear(H, dw.abs(), db).norm().item(), max(k, hidden))}
    if g is not None:
        DH = g @ dw.abs()  # dh = g @ down: n terms
        DG = DH * (dsilu * (up.abs() + U) + 0.5 * up.abs() * G)  # dh u silu'(g)
        DU = DH * (silu + dsilu * G)                             # dh silu(g)
        flat = (lambda z: z.reshape(-1, z.shape[-1]))
        out["grad_x"] = ((DG @ gw.abs() + DU @ uw.abs()).norm().item(), max(2 * hidden, n, k))
        out["grad_gate_weight"] = ((flat(DG).t() @ flat(x.abs())).norm().item(), max(rows, n, k))
        out["grad_up_weight"] = ((flat(DU).t() @ flat(x.abs())).norm().item(), max(rows, n, k))
        out["grad_down_weight"] = ((flat(g).t() @ flat(H)).norm().item(), max(rows, hidden, k))
        out["grad_gate_bias"] = (flat(DG).sum(0).norm().item(), max(rows, n, k))
        out["grad_up_bias"] = (flat(DU).sum(0).norm().item(), max(rows, n, k))
        out["grad_down_bias"] = (flat(g).sum(0).norm().item(), rows)
    return out


def _accuracy_bound(torch_err: float, dtype: torch.dtype, magnitude: float, terms: int, ref_norm: float) -> float:
    """2x PyTorch's relative error, plus 2 sqrt(K) ulps of the terms' magnitude (relative to the result)."""
    ulps = 2 * math.sqrt(max(terms, 1)) * torch.finfo(dtype).eps * magnitude
    return 2.0 * torch_err + ulps / (ref_norm if ref_norm > 0 else 1.0)


def _torch_result(op: str, p: dict, t: dict, dtype=None) -> dict:
    """PyTorch's eager op (in t's dtype, or the inputs cast to `dtype`): output and input gradients."""
    cast = {n: (v if v is None or not v.is_floating_point()  # positions: as they are
                else (v.to(dtype) if dtype else v).detach().requires_grad_()) for n, v in t.items()}
    if op == "rope":  # Hugging Face's apply_rotary_pos_emb: the table's rows in x's dtype
        x, half = cast["x"], cast["x"].shape[-1] // 2
        cos, sin = (torch.cat([cast[n], cast[n]], -1)[cast["positions"]][:, None].to(x.dtype) for n in ("cos", "sin"))
        out = x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin
    elif op == "swiglu_ffn":  # Hugging Face's LlamaMLP
        x = cast["x"]
        hidden = torch_F.silu(torch_F.linear(x, cast["gate_weight"], cast["gate_bias"])) \
            * torch_F.linear(x, cast["up_weight"], cast["up_bias"])
        out = torch_F.linear(hidden, cast["down_weight"], cast["down_bias"])
    elif op == "softmax":
        x = cast["x"]
        scale = 1.0 if p["scale"] is None else p["scale"]
        out = torch.softmax(x * scale, p["dim"])
    elif op == "layer_norm":
        out = torch_F.layer_norm(cast["x"], p["norm_shape"], cast["weight"], cast["bias"], p["eps"])
    else:
        out = torch_F.linear(cast["x"], cast["weight"], cast["bias"])
        out = {None: out, "gelu": torch_F.gelu(out), "gelu_tanh": torch_F.gelu(out, approximate="tanh")}[p["activation"]]
    wrt = [n for n in SPECS[op].grad_names if cast.get(n) is not None]
    gout = grad_out(dict(p, seed=p["seed"] + 5), out.shape, torch.float64).to(p["dtype"]).to(out.dtype)
    grads = torch.autograd.grad(out, [cast[n] for n in wrt], gout) if p["grad"] else []
    return {"out": out.detach(), **{f"grad_{n}": g for n, g in zip(wrt, grads)}}


def accuracy_gen(op, backend, styles, dtype=None):
    """Finite values of moderate magnitude (PyTorch's own op must stay finite in the dtype) in the
    given styles."""
    spec = SPECS[op]

    def generate(rng):
        p = spec.gen(rng, backend, edge=False)
        if p["dtype"] == torch.float64 or dtype is not None:
            p["dtype"], p["param_f32"] = dtype or torch.float32, False
        if op == "softmax":
            p["causal"] = False
            p["scale"] = rng.choice((None, rng.uniform(0.1, 2.0)))
        if op == "layer_norm":
            p["eps"] = rng.choice((1e-5, 1e-6))
        p["style"] = rng.choice(styles)
        return p
    return generate


def accuracy_check(op, backend, spec: Spec | None = None):
    """The accuracy property of SPECS[op] (or `spec`, another call of the same op: negative controls)."""
    spec = spec or SPECS[op]

    def check(p):
        t = spec.tensors(p)
        if op == "layer_norm" and p["param_f32"]:
            t = {n: (v.to(p["dtype"]) if v is not None else None) for n, v in t.items()}
        ref = _torch_result(op, p, t, torch.float64)
        theirs = _torch_result(op, p, t)
        gout = grad_out(dict(p, seed=p["seed"] + 5), ref["out"].shape, torch.float64).to(p["dtype"]) \
            if p["grad"] else None
        ours = evaluate(spec, p, t, backend, gout)
        magnitudes = _magnitudes(op, p, t, gout, ref)
        for key in ours:
            if key not in theirs:
                continue
            mine, torch_err = rel_error(ours[key], ref[key]), rel_error(theirs[key], ref[key])
            bound = _accuracy_bound(torch_err, p["dtype"], *magnitudes[key], ref[key].double().norm().item())
            assert mine <= bound or math.isnan(torch_err), \
                f"{key}: relative error {mine:.3e} > {bound:.3e} (2 x torch's {torch_err:.3e} + 2 sqrt(K) ulps " \
                f"of the terms, K = {magnitudes[key][1]})"

    return check


def test_accuracy_negative_control():
    """The accuracy bound catches a linear that loses precision (its inputs rounded to bfloat16)."""
    p = {"dtype": torch.float32, "batch": 4, "grad": False, "k": 100, "n": 20, "lead": [], "bias": True,
         "activation": None, "style": "normal", "specials": 0, "seed": 3}
    t = linear_tensors(p)
    ref = _torch_result("linear", p, t, torch.float64)
    lossy = fusedtx.linear(*(v.bfloat16().float() for v in (t["x"], t["weight"], t["bias"])), backend="native")
    torch_err = rel_error(_torch_result("linear", p, t)["out"], ref["out"])
    bound = _accuracy_bound(torch_err, torch.float32, *_magnitudes("linear", p, t, None, ref)["out"],
                            ref["out"].norm().item())
    assert rel_error(lossy, ref["out"]) > bound > rel_error(linear_call(p, t, "native"), ref["out"])


def _bfloat16_gradient(x: torch.Tensor) -> torch.Tensor:
    """x, whose gradient is rounded to bfloat16 on its way back (a lossy backward)."""
    class Lossy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            return z.clone()

        @staticmethod
        def backward(ctx, g):
            return g.bfloat16().to(g.dtype)
    return Lossy.apply(x)


# (parameters, a lossy call, the result it spoils): a float32 case each, with a gradient
LOSSY = {
    "rope": ({"dtype": torch.float32, "batch": 2, "grad": True, "heads": 2, "t": 9, "d": 64, "max_positions": 500,
              "positions": "random", "theta": 10000.0, "scaling": False, "original_max": 16, "style": "normal",
              "specials": 0, "seed": 5},
             # the table read in bfloat16
             lambda p, t, b: rope_call(p, dict(t, cos=t["cos"].bfloat16().float(), sin=t["sin"].bfloat16().float()), b),
             "out"),
    "swiglu_ffn": ({"dtype": torch.float32, "batch": 3, "grad": True, "k": 130, "hidden": 64, "n": 33, "lead": [2],
                    "gate_up_bias": True, "down_bias": False, "style": "normal", "specials": 0, "seed": 5},
                   # x's gradient, the loosest bound (its terms carry three sums' errors), rounded to bfloat16
                   lambda p, t, b: swiglu_call(p, dict(t, x=_bfloat16_gradient(t["x"])), b),
                   "grad_x"),
}


@pytest.mark.parametrize("op", list(LOSSY))
def test_accuracy_negative_control_rope_swiglu(op):
    """The accuracy bounds of rope and swiglu_ffn pass the op and catch a lossy one."""
    require("native")
    p, lossy, spoiled = LOSSY[op]
    accuracy_check(op, "native")(p)
    with pytest.raises(AssertionError, match=f"^{spoiled}: relative error"):
        accuracy_check(op, "native", dataclasses.replace(SPECS[op], call=lossy))(p)


ACCURACY_STYLES = {"softmax": ("normal", "normal", "flat", "offset"), "linear": ("normal", "normal", "flat", "offset"),
                   "layer_norm": ("normal",), "rope": ("normal", "normal", "scaled", "flat", "offset"),
                   "swiglu_ffn": ("normal", "normal", "flat", "offset")}
ACCURACY_CASES = {"softmax": (20, 10, 3), "layer_norm": (20, 10, 3), "linear": (20, 10, 3), "rope": (10, 4, 2),
                  "swiglu_ffn": (8, 3, 2)}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("op", list(ACCURACY_CASES))
def test_accuracy(op, backend):
    require(backend)
    run_property(f"accuracy-{op}-{backend}", accuracy_gen(op, backend, ACCURACY_STYLES[op]),
                 accuracy_check(op, backend), cases=cases(*ACCURACY_CASES[op], backend=backend),
                 test=f"test_accuracy[{op}-{backend}]")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_accuracy_layer_norm_offset_rows(backend):
    """float32 rows that are constant or nearly so next to their magnitude (a large offset): the
    statistics must not lose the spread (issue 16 item 7)."""
    require(backend)
    # float32 rows (low-precision x is normalised in float32: exact enough) of 3 or more elements
    generate = accuracy_gen("layer_norm", backend, ("offset", "flat"), torch.float32)

    def generate_long_rows(rng):
        p = generate(rng)
        p["norm_shape"] = [max(3, n) for n in p["norm_shape"]]
        return p

    run_property(f"accuracy-layer_norm-offset-{backend}", generate_long_rows,
                 accuracy_check("layer_norm", backend), cases=cases(20, 10, 3, backend=backend),
                 test=f"test_accuracy_layer_norm_offset_rows[{backend}]")


def _torch_gelu(h: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's GELU and its derivative at h, in h's dtype."""
    h = h.detach().clone().requires_grad_()
    y = torch_F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")
    (dy,) = torch.autograd.grad(y.sum(), h)
    return y.detach(), dy


def _close(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Elementwise: both NaN, equal (infinities too), or within 1% (of a rounded value)."""
    got, want = got.double(), want.double()
    near = (got - want).abs() <= 1e-2 * want.abs() + 1e-30
    return (torch.isnan(got) & torch.isnan(want)) | (got == want) | near


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gelu_extremes_as_pytorch(backend):
    """linear(..., activation=gelu / gelu_tanh) at extreme pre-activations (+-inf, +-huge, the
    tanh form's cut near -9.96): each value and derivative is PyTorch's, in float64 or in the
    same dtype (they differ where the dtype overflows: PyTorch float32's exact GELU gives NaN
    at +inf, its tanh derivative NaN where h * h overflows)."""
    require(backend)

    def generate(rng):
        return {"dtype": rng.choice(FLOATS), "activation": rng.choice(("gelu", "gelu_tanh")), "rows": rng.randint(1, 9)}

    def check(p):
        rng = random.Random(p["seed"])
        finfo = torch.finfo(p["dtype"])
        pool = [math.inf, -math.inf, finfo.max, -finfo.max, 1e20, -1e20, 1e4, -1e4, 30.0, -30.0, -9.96, -9.95,
                3.0, -3.0, 0.0, -0.0]
        h = torch.tensor([rng.choice(pool) for _ in range(p["rows"])], dtype=torch.float64)
        x = h.to(p["dtype"])[:, None].requires_grad_()
        y = fusedtx.linear(x, torch.ones(1, 1, dtype=p["dtype"]), activation=p["activation"], backend=backend)
        (dy,) = torch.autograd.grad(y.sum(), x)
        same = _torch_gelu(x[:, 0], p["activation"])
        wide = _torch_gelu(x[:, 0].double(), p["activation"])
        for what, got, want_same, want_wide in (("gelu", y[:, 0].detach(), same[0], wide[0]),
                                                ("gelu'", dy[:, 0], same[1], wide[1])):
            ok = _close(got, want_same) | _close(got, want_wide.to(p["dtype"]))
            assert bool(ok.all()), f"{what}({x[:, 0].tolist()}) = {got.tolist()}, PyTorch: {want_same.tolist()} " \
                                   f"({p['dtype']}), {want_wide.tolist()} (float64)"

    run_property(f"gelu-extremes-{backend}", generate, check, cases=cases(10, 5, 2, backend=backend),
                 test=f"test_gelu_extremes_as_pytorch[{backend}]")


# ---------------------------------------------------------------------------------------------
# 8. bad inputs raise TypeError / ValueError / RuntimeError naming the argument
# ---------------------------------------------------------------------------------------------
def _bad_calls(rng: random.Random, backend: str):
    """(description, call, words one of which the message must contain)."""
    n = size(rng, 9)
    x = torch.randn(2, n)
    q = torch.randn(1, 2, 3, 16)
    bad_dtype = rng.choice((torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8))
    bad_number = rng.choice((math.nan, math.inf, -math.inf, "1.0", [1.0]))
    neg = -rng.randint(1, 5)
    calls = [
        ("softmax x dtype", lambda: fusedtx.softmax(torch.zeros(2, n, dtype=bad_dtype), backend=backend), ["x"]),
        ("softmax x not tensor", lambda: fusedtx.softmax([[1.0] * n], backend=backend), ["x"]),
        ("softmax dim", lambda: fusedtx.softmax(x, rng.choice((2, -3, 1.0, "1")), backend=backend), ["dim"]),
        ("softmax scale", lambda: fusedtx.softmax(x, scale=bad_number, backend=backend), ["scale"]),
        ("softmax causal", lambda: fusedtx.softmax(x, causal=rng.choice((1, "yes", None)), backend=backend),
         ["causal"]),
        ("softmax causal dim", lambda: fusedtx.softmax(x, 0, causal=True, backend=backend), ["dim"]),
        ("softmax backend", lambda: fusedtx.softmax(x, backend=rng.choice(("cuda", "Native", "", 3))), ["backend"]),
        ("layer_norm x dtype", lambda: fusedtx.layer_norm(torch.zeros(2, n, dtype=bad_dtype), (n,), backend=backend),
         ["x"]),
        ("layer_norm shape", lambda: fusedtx.layer_norm(x, rng.choice(((n + 1,), (neg,), (), n + 2)), backend=backend),
         ["normalized_shape"]),
        ("layer_norm shape type", lambda: fusedtx.layer_norm(x, rng.choice((float(n), (float(n),), "n")),
                                                             backend=backend), ["normalized_shape"]),
        ("layer_norm weight shape", lambda: fusedtx.layer_norm(x, (n,), torch.ones(n + 1), backend=backend),
         ["weight"]),
        ("layer_norm weight dtype", lambda: fusedtx.layer_norm(x, (n,), torch.ones(n, dtype=torch.float64),
                                                               backend=backend), ["weight"]),
        ("layer_norm bias", lambda: fusedtx.layer_norm(x, (n,), None, rng.choice(([0.0] * n, torch.ones(n + 1))),
                                                       backend=backend), ["bias"]),
        ("layer_norm eps", lambda: fusedtx.layer_norm(x, (n,), eps=rng.choice((-1e-5, math.nan, math.inf, "1e-5")),
                                                      backend=backend), ["eps"]),
        ("linear x dtype", lambda: fusedtx.linear(torch.zeros(2, n, dtype=bad_dtype), torch.ones(3, n),
                                                  backend=backend), ["x"]),
        ("linear weight shape", lambda: fusedtx.linear(x, torch.ones(3, n + 1), backend=backend), ["weight", "in_features"]),
        ("linear weight dim", lambda: fusedtx.linear(x, torch.ones(n), backend=backend), ["weight"]),
        ("linear weight dtype", lambda: fusedtx.linear(x, torch.ones(3, n, dtype=torch.float16), backend=backend),
         ["weight"]),
        ("linear bias shape", lambda: fusedtx.linear(x, torch.ones(3, n), torch.ones(4), backend=backend), ["bias"]),
        ("linear activation", lambda: fusedtx.linear(x, torch.ones(3, n), activation=rng.choice(("relu", "GELU", 1)),
                                                     backend=backend), ["activation"]),
        ("linear 0-d", lambda: fusedtx.linear(torch.tensor(1.0), torch.ones(1, 1), backend=backend), ["x"]),
        ("attention q dim", lambda: fusedtx.causal_attention(q[0], q[0], q[0], backend=backend), ["q"]),
        ("attention k tokens", lambda: fusedtx.causal_attention(q, q[:, :, :2], q[:, :, :2], backend=backend), ["k"]),
        ("attention heads", lambda: fusedtx.causal_attention(q, torch.randn(1, 3, 3, 16), torch.randn(1, 3, 3, 16),
                                                             backend=backend), ["heads"]),
        ("attention dtype", lambda: fusedtx.causal_attention(q, q.double(), q, backend=backend), ["k", "dtype"]),
        ("attention split", lambda: fusedtx.causal_attention(q, q, q, split_size=rng.choice((0, neg, 24, 8, 16.0, "16")),
                                                             backend=backend), ["split"]),
        ("attention scale", lambda: fusedtx.causal_attention(q, q, q, scale=bad_number, backend=backend), ["scale"]),
        ("kv seqlens dtype", lambda: fusedtx.attention_with_kv_cache(q[:, :, :1], q, q, torch.tensor([2.0]),
                                                                    backend=backend), ["seqlens"]),
        ("kv seqlens range", lambda: fusedtx.attention_with_kv_cache(q[:, :, :1], q, q,
                                                                    torch.tensor([rng.choice((0, 4, neg))]),
                                                                    backend=backend), ["seqlens"]),
        ("kv seqlens shape", lambda: fusedtx.attention_with_kv_cache(q[:, :, :1], q, q, torch.tensor([2, 2]),
                                                                    backend=backend), ["seqlens"]),
        ("kv seqlens list", lambda: fusedtx.attention_with_kv_cache(q[:, :, :1], q, q, [2], backend=backend),
         ["seqlens"]),
        ("set_split_size", lambda: fusedtx.set_split_size(rng.choice((0, neg, 100, 8, 32.0, "32"))), ["split"]),
        ("use_backend", lambda: fusedtx.use_backend(rng.choice(("gpu", 1))).__enter__(), ["backend"]),
        ("nn.Linear activation", lambda: fusedtx.nn.Linear(n, 3, activation="swish"), ["activation"]),
        ("KVCache size", lambda: fusedtx.nn.KVCache(rng.choice((neg, 1.5, "2")), 1, 4, 16), ["batch"]),
        ("KVCache append", lambda: fusedtx.nn.KVCache(1, 1, 4, 16).append(q[:, :1, :, :8], q[:, :1, :, :8]), ["k"]),
        ("KVCache overflow", lambda: fusedtx.nn.KVCache(1, 1, 2, 16).append(q[:, :1], q[:, :1]), ["overflow"]),
        ("KVCache truncate", lambda: fusedtx.nn.KVCache(1, 1, 4, 16).truncate(rng.choice(([1.5], [5], [neg], [1, 1]))),
         ["lengths"]),
        ("CausalSelfAttention", lambda: fusedtx.nn.CausalSelfAttention(rng.choice((30, neg, 2.5)), 4), ["d_model"]),
        ("GeluFFN approximate", lambda: fusedtx.nn.GeluFFN(8, approximate="erf"), ["approximate"]),
        ("GPTConfig preset", lambda: GPTConfig.preset("gpt5"), ["name"]),
        ("GPTConfig sizes", lambda: GPTConfig.preset("tiny", **{rng.choice(("n_head", "n_embd", "n_layer", "vocab_size",
                                                                            "block_size")): rng.choice((0, neg, 2.5))}),
         ["n_head", "n_embd", "n_layer", "vocab_size", "block_size"]),
        ("GPT generate sampling", lambda: _tiny_gpt().generate([[1]], 2, **rng.choice((
            {"temperature": rng.choice((math.nan, math.inf, "1", -0.5))}, {"temperature": 1.0, "top_k": rng.choice((0, 1.5))},
            {"temperature": 1.0, "top_p": rng.choice((0.0, 1.5, "0.5", math.nan))}))), ["temperature", "top_k", "top_p"]),
        ("GPT generate tokens", lambda: _tiny_gpt().generate([[1, 2]], rng.choice((neg, 1.5, "3"))),
         ["max_new_tokens"]),
        ("GPT generate temperature", lambda: _tiny_gpt().generate([[1, 2]], 2, temperature=-1.0), ["temperature"]),
        ("GPT generate seed", lambda: _tiny_gpt().generate([[1, 2]], 2, temperature=1.0, seed=rng.choice(
            (neg, 2 ** 63, 1.5, "3", [1, 2], [neg], [True]))), ["seed"]),
        ("GPT generate prompt", lambda: _tiny_gpt().generate(rng.choice(([[]], [], [[1, 10 ** 6]], [[-1]], [[1.5]])),
                                                             2), ["prompt"]),
        ("GPT idx dtype", lambda: _tiny_gpt()(torch.zeros(1, 3)), ["idx"]),
        ("GPT too long", lambda: _tiny_gpt()(torch.zeros(1, 200, dtype=torch.int64)), ["block_size"]),
        ("GPT logprobs temperature", lambda: _tiny_gpt().logprobs(torch.zeros(1, 3, dtype=torch.int64),
                                                                  temperature=rng.choice((-1.0, math.nan, "1"))),
         ["temperature"]),
    ]
    return calls


_TINY = {}


def _tiny_gpt():
    if "model" not in _TINY:
        torch.manual_seed(0)
        _TINY["model"] = GPT(GPTConfig.preset("tiny"), backend="native")
    return _TINY["model"]


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_bad_inputs_raise_clear_errors(backend):
    require(backend)
    n_calls = len(_bad_calls(random.Random(0), backend))

    def generate(rng):
        return {"call": rng.randrange(n_calls)}

    def check(p):
        rng = random.Random(p["seed"])
        what, call, words = _bad_calls(rng, backend)[p["call"]]
        before = fusedtx.get_split_size()
        try:
            call()
        except (TypeError, ValueError, RuntimeError) as exc:
            message = str(exc)
            assert any(w.lower() in message.lower() for w in words), \
                f"{what}: {type(exc).__name__} does not name {words}: {message!r}"
        else:
            raise AssertionError(f"{what}: no error raised")
        finally:
            fusedtx.set_split_size(None if before == fusedtx.policy.DEFAULT_SPLIT_SIZE else before)
            fusedtx.set_backend(None)

    run_property(f"bad-inputs-{backend}", generate, check, cases=60 if backend == "native" else 20,
                 test=f"test_bad_inputs_raise_clear_errors[{backend}]")


# ---------------------------------------------------------------------------------------------
# The model: a sequence's logits alone == in a padded batch; generate == logprobs; cache == full
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_gpt_batch_and_cache_invariance(backend):
    require(backend)

    def generate(rng):
        small = backend == "triton"
        return {"n_layer": rng.randint(1, 1 if small else 2), "n_head": rng.choice((1, 2)),
                "head_dim": 16 if small else rng.choice((16, 8, 3)), "vocab": rng.choice((17, 64)),
                "split": rng.choice((16, 32)), "gelu": rng.choice(("tanh", "none")),
                "lengths": [rng.randint(1, 8 if small else 30) for _ in range(rng.randint(1, 2 if small else 4))],
                "new": rng.randint(1, 2 if small else 6), "temperature": rng.choice((0.0, 0.7, 1.0))}

    def check(p):
        torch.manual_seed(p["seed"])
        config = GPTConfig(block_size=64, vocab_size=p["vocab"], n_layer=p["n_layer"], n_head=p["n_head"],
                           n_embd=p["n_head"] * p["head_dim"], split_size=p["split"], gelu_approximate=p["gelu"])
        _model_invariance_check(GPT(config, backend=backend).eval(), p)

    run_property(f"gpt-{backend}", generate, check, cases=cases(4, 3, 1, backend=backend),
                 test=f"test_gpt_batch_and_cache_invariance[{backend}]")


def _model_invariance_check(model, p) -> None:
    """generate()'s log-probabilities == logprobs() of each finished sequence; a sequence's logits
    alone == right-padded in a batch at another position."""
    gen = torch_gen(p["seed"])
    prompts = [torch.randint(0, p["vocab"], (n,), generator=gen) for n in p["lengths"]]
    with torch.no_grad():
        out = model.generate(prompts, p["new"], temperature=p["temperature"], generator=torch_gen(p["seed"] + 1))
        for b, prompt in enumerate(prompts):
            seq = torch.cat([prompt, out.tokens[b]])[None]
            lp = model.logprobs(seq, temperature=p["temperature"])
            assert_same_bits(out.logprobs[b], lp[0, len(prompt) - 1:], f"sequence {b}: generate vs logprobs")
        seq = prompts[0]
        alone = model(seq[None])
        pad = torch.randint(0, p["vocab"], (3, len(seq) + 5), generator=gen)
        pad[1, :len(seq)] = seq
        assert_same_bits(alone[0], model(pad)[1, :len(seq)], "logits alone vs padded batch")


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_llama_batch_and_cache_invariance(backend):
    """The same on random Llama-family shapes: model type (Qwen2 q/k/v biases, Qwen3 q/k norm and
    a head_dim of its own), grouped-query heads, RoPE default or llama3, tied or untied head."""
    require(backend)

    def generate(rng):
        small = backend == "triton"
        heads = rng.choice((1, 2, 4))
        rope = rng.choice(((), (("factor", 4.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                 ("original_max_position_embeddings", 16), ("rope_type", "llama3"))))
        return {"model_type": rng.choice(("llama", "qwen2", "qwen3", "mistral")), "n_layer": rng.randint(1, 1 if small else 2),
                "heads": heads, "kv_heads": rng.choice([d for d in (1, 2, 4) if heads % d == 0]),
                "head_dim": 16 if small else rng.choice((16, 8, 2)), "vocab": rng.choice((17, 64)),
                "split": rng.choice((16, 32)), "rope": rope, "tie": rng.random() < 0.5,
                "lengths": [rng.randint(1, 8 if small else 30) for _ in range(rng.randint(1, 2 if small else 4))],
                "new": rng.randint(1, 2 if small else 6), "temperature": rng.choice((0.0, 0.7, 1.0))}

    def check(p):
        torch.manual_seed(p["seed"])
        hidden = p["heads"] * (p["head_dim"] + (2 if p["model_type"] == "qwen3" else 0))  # Qwen3: head_dim != hidden / heads
        config = LlamaConfig(model_type=p["model_type"], vocab_size=p["vocab"], hidden_size=hidden,
                             intermediate_size=2 * hidden + 3, num_hidden_layers=p["n_layer"],
                             num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"], head_dim=p["head_dim"],
                             rope_scaling=p["rope"], max_position_embeddings=64, tie_word_embeddings=p["tie"],
                             qkv_bias=p["model_type"] == "qwen2", qk_norm=p["model_type"] == "qwen3",
                             split_size=p["split"])
        _model_invariance_check(Llama(config, backend=backend).eval(), p)

    run_property(f"llama-{backend}", generate, check, cases=cases(4, 3, 1, backend=backend),
                 test=f"test_llama_batch_and_cache_invariance[{backend}]")


# ---------------------------------------------------------------------------------------------
# rope_table: HF's inv_freq, each row rounded once (so a row depends on its position alone)
# ---------------------------------------------------------------------------------------------
def _hf_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    # transformers 5 reads theta from the rope parameters dict
    parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
    config = HFLlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                           max_position_embeddings=1 << 14, rope_parameters=parameters)
    return LlamaRotaryEmbedding(config).inv_freq


def rope_table_gen(rng):
    p = {"d": 2 * size(rng, 64), "max_positions": rng.choice((size(rng, 257), rng.randint(1, 2000))),
         "theta": rng.choice((10000.0, 500000.0, 10 ** rng.uniform(0, 7)))}
    low = rng.uniform(0.5, 2.0)
    p["scaling"] = None if rng.random() < 0.5 else {
        "rope_type": "llama3", "factor": rng.uniform(1.0, 32.0), "low_freq_factor": low,
        "high_freq_factor": low + rng.uniform(0.5, 8.0), "original_max_position_embeddings": rng.choice((4, 64, 8192))}
    return p


def rope_table_check(table=fusedtx.rope_table):
    def check(p):
        d, n = p["d"], p["max_positions"]
        cos, sin = table(d, n, p["theta"], p["scaling"])
        assert cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (n, d // 2)
        # row i: cos / sin of the float32 angle float32(i) * inv_freq, correctly rounded to float32
        # (within half an ulp of the float64 value, whose own error is far below that): a row's
        # bits depend on its position and the parameters, not on the table's length
        angle = (torch.arange(n).float()[:, None] * _hf_inv_freq(d, p["theta"], p["scaling"])).double()
        for what, got, exact in (("cos", cos, angle.cos()), ("sin", sin, angle.sin())):
            half_ulp = (torch.nextafter(got.abs(), torch.tensor(math.inf)) - got.abs()).double() / 2
            err = (got.double() - exact).abs()
            assert bool((err <= half_ulp * (1 + 1e-6)).all()), \
                f"{what}: {int((err > half_ulp).sum())} elements not correctly rounded, max error {err.max().item():.3e}"
    return check


def test_rope_table_rows():
    pytest.importorskip("transformers")
    run_property("rope-table", rope_table_gen, rope_table_check(), cases=8, test="test_rope_table_rows")


def test_rope_table_negative_control():
    """The table check catches angles not rounded to float32 first (taken in float64)."""
    pytest.importorskip("transformers")

    def float64_angles(d, n, theta, scaling):
        angle = torch.arange(n).double()[:, None] * reference.rope_inv_freq(d, theta, scaling).double()
        return angle.cos().float(), angle.sin().float()

    p = {"d": 64, "max_positions": 1000, "theta": 10000.0, "scaling": None}
    rope_table_check()(p)
    with pytest.raises(AssertionError, match="not correctly rounded"):
        rope_table_check(float64_angles)(p)


# ---------------------------------------------------------------------------------------------
# torch.compile(dynamic=True) gives eager's bits
# ---------------------------------------------------------------------------------------------
# Fast mode's cases per op (default 2): one for the ops whose eager tests compile too (test_rope,
# test_swiglu_ffn); swiglu_ffn's graph has Inductor code of its own to build (the gate/up packing)
COMPILE_CASES = {"rope": 1, "swiglu_ffn": 1}


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_compile_dynamic_equals_eager(op):
    require("native")
    spec = SPECS[op]
    torch._dynamo.reset()

    def generate(rng):
        p = spec.gen(rng, "native", edge=False)
        p["grad"] = False
        return p

    compiled = torch.compile(lambda p, t: spec.call(p, t, "native"), dynamic=True, fullgraph=True)
    calls = [0]

    def check(p):
        calls[0] += 1
        if calls[0] % 4 == 0:  # start afresh before dynamo's recompile limit makes it fall back to eager
            torch._dynamo.reset()
        t = spec.tensors(p)
        eager = spec.call(p, t, "native")
        with torch.no_grad():
            got = compiled(p, t)
        assert_same_bits(eager, got, "compiled vs eager")

    run_property(f"compile-{op}", generate, check, cases=COMPILE_CASES.get(op, 2),
                 test=f"test_compile_dynamic_equals_eager[{op}]")
