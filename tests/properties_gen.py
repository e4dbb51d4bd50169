"""The engine of the property-based suite (tests/test_properties.py): seeded case generation, a
per-property case budget (fast, the default) or time budget (long), reproducers, and the value,
layout and comparison helpers the properties share.

Case i of property P under run seed S draws everything from random.Random(f"{S}:{P}:{i}") (its
tensors from a torch.Generator seeded from that), so a failure is reproduced by S and i alone:

    FUSEDTX_FUZZ_SEED=S FUSEDTX_FUZZ_CASE=i python -m pytest -n0 "tests/test_properties.py::test_..."

Modes, from the environment:
    (none)                   fast: each property runs its fixed number of cases under seed 0
    FUSEDTX_FUZZ_SECONDS=N   long: each property runs new cases for N seconds under a fresh seed
                             (printed at the end with the case counts) and stops at the first failure
    FUSEDTX_FUZZ_SEED=S      the run seed (either mode); FUSEDTX_FUZZ_CASE=i: run case i only
"""
from __future__ import annotations

import math
import os
import random
import secrets
import time
from typing import Callable

import torch

FAST_SEED = 0
# name -> [seed, cases, seconds]: the per-property counts, reported by tests/conftest.py.
FUZZ_LOG: dict = {}


def long_seconds() -> float | None:
    value = os.environ.get("FUSEDTX_FUZZ_SECONDS")
    return float(value) if value else None


def run_seed() -> int:
    value = os.environ.get("FUSEDTX_FUZZ_SEED")
    if value:
        return int(value)
    return FAST_SEED if long_seconds() is None else secrets.randbits(31)


def run_property(name: str, generate: Callable[[random.Random], dict], check: Callable[[dict], None], *,
                 cases: int, test: str = "") -> None:
    """Generate and check cases of one property: `cases` of them (fast mode), or as many as
    FUSEDTX_FUZZ_SECONDS allows (long mode). generate(rng) returns the case's parameters, a dict
    of plain values (with an int "seed" for its tensors); check(params) raises on a violation.
    The first failure raises AssertionError with a one-line reproducer."""
    seed, budget = run_seed(), long_seconds()
    only = os.environ.get("FUSEDTX_FUZZ_CASE")
    indices = [int(only)] if only else None
    start, done = time.monotonic(), 0
    i = 0
    while True:
        if indices is not None:
            if not indices:
                break
            i = indices.pop()
        elif budget is None and i >= cases or budget is not None and time.monotonic() - start >= budget:
            break
        rng = random.Random(f"{seed}:{name}:{i}")
        params = generate(rng)
        params.setdefault("seed", rng.getrandbits(31))
        try:
            check(params)
        except Exception as exc:
            FUZZ_LOG[name] = [seed, done, time.monotonic() - start, f"FAILED at case {i}"]
            where = f"tests/test_properties.py::{test}" if test else "tests/test_properties.py"
            raise AssertionError(
                f"property {name!r} failed at case {i} (seed {seed}): {type(exc).__name__}: {exc}\n"
                f"reproduce: FUSEDTX_FUZZ_SEED={seed} FUSEDTX_FUZZ_CASE={i} python -m pytest -n0 \"{where}\"  "
                f"# {params}") from exc
        done += 1
        i += 1
    FUZZ_LOG[name] = [seed, done, time.monotonic() - start, "ok"]


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float64": torch.float64}
SIZES = (1, 1, 2, 3, 4, 5, 7, 8, 13, 16, 17, 31, 33, 63, 64, 65, 100, 127, 128, 129, 257)
STYLES = ("normal", "normal", "scaled", "offset", "constant", "tiny")
SPECIALS = ("nan", "inf", "-inf", "max", "-max", "denormal", "-0", "0")


def size(rng: random.Random, most: int) -> int:
    """A size in [1, most], often 1, an odd one or one next to a power of two."""
    choices = [s for s in SIZES if s <= most]
    return rng.choice(choices) if rng.random() < 0.7 else rng.randint(1, most)


def exponent_range(dtype: torch.dtype) -> tuple[int, int]:
    """Decimal exponents of scales that keep a row's values finite (with room for sums)."""
    return {torch.float16: (-3, 2), torch.bfloat16: (-30, 30)}.get(dtype, (-30, 30))


def values(rng: random.Random, gen: torch.Generator, shape, dtype: torch.dtype, style: str = "normal",
           specials: int = 0, pool=SPECIALS) -> torch.Tensor:
    """Random values of `shape` in `dtype`: style "normal" (N(0, ~1)), "scaled" (a random power of
    ten), "offset" (a large offset plus small noise), "constant" (rows constant along the last
    dim, of any magnitude), "flat" (constant rows near 1), "tiny" (subnormal magnitudes); then `specials` random positions set to one of `pool`."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    lo, hi = exponent_range(dtype)
    if style == "normal":
        x = x * 10 ** rng.uniform(-0.5, 0.5)
    elif style == "scaled":
        x = x * 10 ** rng.uniform(lo, hi)
    elif style == "offset":
        offset = rng.choice((-1, 1)) * 10 ** rng.uniform(1, 4 if dtype != torch.float16 else 3)
        x = offset + x * abs(offset) * 10 ** rng.uniform(-4, -1)
    elif style in ("constant", "flat"):
        if x.dim():
            x = x[..., :1].expand(x.shape).clone()
        x = x * 10 ** (rng.uniform(lo, hi) if style == "constant" else rng.uniform(-1, 1))
    elif style == "tiny":
        x = x * torch.finfo(dtype).tiny * 10 ** rng.uniform(-2, 0)
    else:
        raise ValueError(style)
    x = x.to(dtype)
    if specials and x.numel():
        flat = x.view(-1)
        finfo = torch.finfo(dtype)
        table = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "max": finfo.max * 0.9,
                 "-max": -finfo.max * 0.9, "denormal": finfo.tiny / 8, "-0": -0.0, "0": 0.0}
        for _ in range(specials):
            flat[rng.randrange(flat.numel())] = table[rng.choice(pool)]
    return x


def garbage(gen: torch.Generator, shape, dtype: torch.dtype) -> torch.Tensor:
    """Values that would poison anything that read them: huge, NaN and +-inf among large ones."""
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * 1e4
    flat = g.view(-1)
    flat[::5] = math.nan
    flat[2::7] = math.inf
    flat[3::11] = -math.inf
    flat[4::13] = torch.finfo(dtype).max
    return g.to(dtype)


def torch_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Layouts: the same values with other strides
# ---------------------------------------------------------------------------------------------
LAYOUTS = ("contiguous", "permuted", "strided", "offset", "channels_last", "expanded")


def _hole(t: torch.Tensor):
    """What fills the storage around a view: NaN, which poisons any kernel that reads it."""
    return math.nan if t.is_floating_point() else -1


def relayout(t: torch.Tensor, kind: str, rng: random.Random, gen: torch.Generator) -> torch.Tensor:
    """A tensor equal to t element for element (bit for bit) laid out as `kind`: "permuted"
    (stored in another dim order, e.g. transposed), "strided" (every other element of a larger
    buffer full of NaN), "offset" (at a storage offset), "channels_last" (4-D), "expanded" (t
    must already be constant along a size-1-able dim: see broadcastable)."""
    if t.dim() == 0 or kind == "contiguous":
        return t.contiguous()
    if kind == "permuted":
        order = list(range(t.dim()))
        rng.shuffle(order)
        inverse = [order.index(d) for d in range(t.dim())]
        return t.permute(order).contiguous().permute(inverse)
    if kind == "strided":
        steps = [rng.choice((1, 2, 3)) for _ in range(t.dim())]
        big = torch.full([s * st + rng.randint(0, 2) for s, st in zip(t.shape, steps)], _hole(t), dtype=t.dtype)
        view = big[tuple(slice(0, s * st, st) for s, st in zip(t.shape, steps))]
        view.copy_(t)
        return view
    if kind == "offset":
        off = rng.randint(1, 7)
        buf = torch.full((t.numel() + off + rng.randint(0, 3),), _hole(t), dtype=t.dtype)
        view = buf[off:off + t.numel()].view(t.shape)
        view.copy_(t)
        return view
    if kind == "channels_last":
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t.contiguous()
    if kind == "expanded":
        dims = [d for d in range(t.dim()) if t.shape[d] > 1 and t.stride(d) == 0]
        return t if dims else t.contiguous()
    raise ValueError(kind)


def broadcastable(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """t made constant along one random dim of size > 1, as a stride-0 expanded view."""
    dims = [d for d in range(t.dim()) if t.shape[d] > 1]
    if not dims:
        return t
    d = rng.choice(dims)
    return t.narrow(d, 0, 1).expand(t.shape)


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    int_type = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(int_type)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal (so -0.0 != +0.0), NaN-aware: NaN positions must match; a NaN's sign and
    payload are not part of the contract."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return False
    return torch.equal(_bits(a)[~na], _bits(b)[~nb])


def assert_same_bits(a, b, what: str) -> None:
    """Raise AssertionError naming the first differing element, for tensors or None."""
    if a is None or b is None:
        if a is not b:
            raise AssertionError(f"{what}: one side is None")
        return
    if same_bits(a, b):
        return
    if a.shape != b.shape or a.dtype != b.dtype:
        raise AssertionError(f"{what}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
    na, nb = torch.isnan(a), torch.isnan(b)
    differ = (na != nb) | (~na & ~nb & (_bits(a) != _bits(b)).view(a.shape))
    idx = tuple(int(i) for i in differ.nonzero()[0])
    raise AssertionError(f"{what}: {int(differ.sum())} of {a.numel()} elements differ, first at {list(idx)}: "
                         f"{a[idx].item()!r} vs {b[idx].item()!r}")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (the absolute error when ref is all zeros)."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    err = (out - ref).norm().item()
    return err / denom if denom > 0 else err


def with_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)
