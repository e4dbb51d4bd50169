"""Sampling that never depends on the batch: a counter-based random source and a per-row sampler.

    from fusedtx.sampling import sample
    tokens, logprobs = sample(logits, seeds, steps, temperature=0.8, top_k=50, top_p=0.95)

Row b's token is a function of (logits[b], seeds[b], steps[b], temperature, top_k, top_p) alone:
the same bits alone or in any batch, at any position, beside any neighbours, for any thread
count and run (docs/design.md, "Sampling"). A shared torch.Generator cannot give that: the
random numbers a row consumes depend on how many rows drew before it.

The random source is Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
3", SC 2011; the generator of Random123, cuRAND and PyTorch's CUDA RNG): a bijection of a
128-bit counter under a 64-bit key, with no state. It is written here in int64 tensor
arithmetic whose every intermediate stays below 2**63, so it is exact — the same integers on
CPU and CUDA, vectorised or not.

Philox4x32-10, on 32-bit words (all arithmetic mod 2**32):

    M0, M1 = 0xD2511F53, 0xCD9E8D57            multipliers
    W0, W1 = 0x9E3779B9, 0xBB67AE85            key increments
    counter (c0, c1, c2, c3), key (k0, k1); 10 times:
        (hi0, lo0) = M0 * c0 as 64 bits        high and low 32-bit halves of the product
        (hi1, lo1) = M1 * c2 as 64 bits
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
        (k0, k1) = (k0 + W0, k1 + W1)
    output: the four words (c0, c1, c2, c3)

How fusedtx uses it: a seed s (int64, taken as its 64 bits) is the key, k0 = s mod 2**32, k1 =
(s >> 32) mod 2**32. The counter is (t mod 2**32, t >> 32, j, domain): t the step (a
sequence's t-th generated token), j the block index, domain 0 for draws and 1 for deriving
per-sequence seeds (derive_seeds). `uniform` turns the words into numbers in [0, 1):

    float32: element j is word j % 4 of block j // 4:   (word >> 8) * 2**-24
    float64: element j is words 2(j % 2), 2(j % 2) + 1 of block j // 2:
             ((first << 21) | (second >> 11)) * 2**-53

The sampler (`sample`): temperature 0 is the argmax, the lowest index on ties. Otherwise, with
scaled = float32(logits) / temperature:

1. top_k: keep the k largest scaled logits; ties at the k-th value go to the lowest index (a
   stable descending sort), so exactly k tokens stay.
2. p = fusedtx.softmax of the scaled logits, the others at -inf (batch invariant, exp 0 there);
   integer weights w_i = floor(p_i * 2**48): exactly p_i * 2**48 wherever p_i >= 2**-25, and 0
   where p_i < 2**-48 (such a token is never drawn).
3. top_p: rank the tokens by p descending, ties by the lowest index (a stable sort); keep a
   token while the weights ranked above it sum to less than top_p * W (W = sum of w, float64
   product): the smallest such set whose probability reaches top_p.
4. Draw: u = uniform(seed, t, 1, float64), r = min(floor(u * W), W - 1), and the token is the
   first index i (vocabulary order) whose inclusive prefix sum of w exceeds r: token i has
   probability w_i / W.

Every sum in steps 3 and 4 is a sum of integers below 2**63, exact in any order — so neither
the batch nor the device's reduction order can change a bit of it, and no cumulative sum of
floats is needed. The returned log-probabilities are log_softmax(float32(logits) / temperature)
of the chosen token (the plain logits at temperature 0), before top-k / top-p: token_logprobs,
the same function that models' logprobs() uses, so a sampler's and a trainer's numbers are the
same bits.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import functional

MASK32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10
DRAW, DERIVE = 0, 1          # the counter's fourth word: what the random words are for
WEIGHT_BITS = 48             # integer weights w = floor(p * 2**WEIGHT_BITS): sums stay below 2**53
SEED_LIMIT = 2 ** 63         # generate's seeds: ints in [0, SEED_LIMIT)


# ---------------------------------------------------------------------------------------------
# the random source
# ---------------------------------------------------------------------------------------------
def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of m * x for 32-bit m and x in int64 tensors, exactly: x is split
    into 16-bit halves so that no product reaches 2**49 (torch has no uint64, and a 64-bit
    product would overflow int64)."""
    low = m * (x & 0xFFFF)                      # < 2**48
    mid = m * (x >> 16) + (low >> 16)           # m * x == mid * 2**16 + (low & 0xFFFF), mid < 2**49
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 (the module docstring) of counters (c0, c1, c2, c3) under keys (k0, k1):
    int64 tensors (or ints) holding 32-bit words, broadcast together; returns the four words."""
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(*(torch.as_tensor(w, dtype=torch.int64)
                                                       for w in (c0, c1, c2, c3, k0, k1)))
    for round_ in range(PHILOX_ROUNDS):
        if round_:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def random_words(seeds: torch.Tensor, steps: torch.Tensor, blocks: int, domain: int = DRAW) -> torch.Tensor:
    """(B, 4 * blocks) int64 words in [0, 2**32): row b is Philox of counters (steps[b] mod 2**32,
    steps[b] >> 32, j, domain) for j = 0 .. blocks-1 under key seeds[b], the words of each block
    in order. seeds and steps: (B,) int64 (a seed is taken as its 64 bits)."""
    seeds, steps = seeds[:, None], steps[:, None]
    block = torch.arange(blocks, dtype=torch.int64, device=seeds.device)[None, :]
    words = philox4x32_10(steps & MASK32, (steps >> 32) & MASK32, block, domain,
                          seeds & MASK32, (seeds >> 32) & MASK32)
    return torch.stack(words, -1).flatten(-2)


def uniform(seeds: torch.Tensor, steps: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, n) numbers in [0, 1), row b a function of (seeds[b], steps[b]) alone: 24 random bits
    each in float32, 53 in float64 (the module docstring says which words)."""
    if dtype == torch.float32:
        words = random_words(seeds, steps, -(-n // 4))[:, :n]
        return (words >> 8).to(torch.float32) * 2.0 ** -24
    if dtype == torch.float64:
        words = random_words(seeds, steps, -(-n // 2))[:, :2 * n]
        bits = (words[:, 0::2] << 21) | (words[:, 1::2] >> 11)        # < 2**53: exact in float64
        return bits.to(torch.float64) * 2.0 ** -53
    raise ValueError(f"uniform: dtype must be torch.float32 or torch.float64, got {dtype}")


def derive_seeds(base: int, count: int) -> list[int]:
    """The seeds generate(seed=base) gives its `count` sequences: sequence i's seed is
    (w0 | (w1 & 0x7FFFFFFF) << 32) for the first two words (w0, w1) of Philox of the counter
    (i mod 2**32, i >> 32, 0, 1) under key base — an int in [0, 2**63) that depends on (base, i)."""
    index = torch.arange(count, dtype=torch.int64)
    w0, w1, _, _ = philox4x32_10(index & MASK32, index >> 32, 0, DERIVE, base & MASK32, (base >> 32) & MASK32)
    return (w0 | ((w1 & 0x7FFFFFFF) << 32)).tolist()


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_parameters(who: str, temperature, top_k, top_p) -> None:
    """ValueError naming the argument unless temperature is a finite number >= 0, top_k None or
    an int >= 1, top_p None or a number in (0, 1]."""
    if not is_real(temperature) or not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{who}: temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"{who}: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not is_real(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"{who}: top_p must be None or a number in (0, 1], got {top_p!r}")


def sequence_seeds(seed, count: int, who: str = "generate") -> torch.Tensor:
    """(count,) int64 seeds from generate's `seed`: an int base seed (derive_seeds) or one int per
    sequence, each in [0, 2**63); otherwise a ValueError naming `seed`."""
    if isinstance(seed, torch.Tensor):
        if seed.dim() == 0 or seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise ValueError(f"{who}: a tensor of seeds must be 1-D and of an integer dtype, got {seed.dtype} "
                             f"of shape {list(seed.shape)}")
        seed = seed.tolist()
    if _is_int(seed):
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"{who}: seed must be in [0, 2**63), got {seed}")
        return torch.tensor(derive_seeds(seed, count), dtype=torch.int64)
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
        raise ValueError(f"{who}: seed must be None, an int or a sequence of one int per prompt, "
                         f"got {type(seed).__name__}")
    if len(seed) != count:
        raise ValueError(f"{who}: seed must hold one int per prompt ({count}), got {len(seed)}")
    for i, s in enumerate(seed):
        if not _is_int(s) or not 0 <= s < SEED_LIMIT:
            raise ValueError(f"{who}: seed[{i}] must be an int in [0, 2**63), got {s!r}")
    return torch.tensor(list(seed), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                   backend: str | None = None) -> torch.Tensor:
    """log softmax(logits / temperature)[token] in float32 (temperature 0 means the plain logits,
    as for greedy decoding), with fusedtx.log_softmax: each row reduced on its own in a fixed
    order, the same bits on every backend and device, and differentiable (a trainer's loss)."""
    logits = logits.float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    logp = functional.log_softmax(logits, -1, backend=backend)
    return logp.gather(-1, tokens[..., None].to(logits.device))[..., 0]


def candidate_weights(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                      backend: str | None = None, who: str = "sample") -> torch.Tensor:
    """(B, V) int64 weights of the tokens a row may draw (steps 1-3 of the module docstring):
    0 outside the top-k / top-p sets. temperature > 0."""
    scaled = logits.float() / temperature
    bad = torch.isnan(scaled).any(-1) | (scaled == math.inf).any(-1) | (scaled == -math.inf).all(-1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{who}: logits row {row} cannot be sampled from: it holds NaN or +inf after dividing "
                         f"by temperature {temperature}, or no finite value")
    vocab = scaled.shape[-1]
    if top_k is not None and top_k < vocab:
        order = torch.sort(scaled, dim=-1, descending=True, stable=True).indices
        outside = torch.ones_like(scaled, dtype=torch.bool).scatter(-1, order[:, :top_k], False)
        scaled = scaled.masked_fill(outside, -math.inf)
    probs = functional.softmax(scaled, dim=-1, backend=backend)
    weights = torch.floor(probs.double() * 2.0 ** WEIGHT_BITS).to(torch.int64)
    if top_p is not None and top_p < 1.0:
        order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
        ranked = weights.gather(-1, order)
        above = ranked.cumsum(-1) - ranked                       # integers: exact in any order
        total = weights.sum(-1, keepdim=True)
        outside = above.double() >= top_p * total.double()
        weights = weights.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), 0)
    return weights


def draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B,) the first index whose inclusive prefix sum of weights (B, V) exceeds floor(u * W),
    W the row's sum and u (B,) float64 in [0, 1) (step 4): index i with probability w_i / W."""
    total = weights.sum(-1)
    r = torch.minimum(torch.floor(u * total.double()).to(torch.int64), total - 1)
    return (weights.cumsum(-1) <= r[:, None]).sum(-1)


def _check_rows(who: str, logits, **rows) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"{who}: logits must be a floating-point (batch, vocab) tensor, got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)} "
                         f"of shape {list(getattr(logits, 'shape', []))}")
    for name, t in rows.items():
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != logits.shape[:1]:
            raise ValueError(f"{who}: {name} must be an int64 tensor of shape [{logits.shape[0]}] (one per row), "
                             f"got {getattr(t, 'dtype', type(t).__name__)} of shape {list(getattr(t, 'shape', []))}")


def sample(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, *,
           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B,) int64, logprobs (B,) float32): one token per row of logits (B, V), row b
    drawn with the random numbers of (seeds[b], steps[b]) — int64 tensors of shape (B,), a seed
    taken as its 64 bits, a step >= 0 — as the module docstring says. temperature 0 is greedy;
    top_k / top_p restrict the draw; `backend` is fusedtx.softmax's. Row b's token and
    log-probability depend on row b's logits, seed and step and the parameters alone."""
    check_parameters("sample", temperature, top_k, top_p)
    _check_rows("sample", logits, seeds=seeds, steps=steps)
    if bool((steps < 0).any()):
        raise ValueError(f"sample: steps must be >= 0, got {int(steps.min())}")
    if temperature == 0.0:
        token = torch.argmax(logits, dim=-1)
    else:
        weights = candidate_weights(logits, temperature, top_k, top_p, backend)
        u = uniform(seeds.to(logits.device), steps.to(logits.device), 1, torch.float64)[:, 0]
        token = draw(weights, u)
    return token, token_logprobs(logits, token, temperature, backend)


def sample_shared(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None, *,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sample()'s tokens drawn instead from one stream for the whole batch: torch.multinomial over
    the same candidate weights with `generator` (None: torch's global generator). Batch
    DEPENDENT: row b consumes the random numbers left by rows 0 .. b-1, so its token changes
    with what else is in the batch. Seeded, it repeats for the same batch."""
    if temperature == 0.0:
        token = torch.argmax(logits, dim=-1)
    else:
        weights = candidate_weights(logits, temperature, top_k, top_p, backend, who="generate")
        token = torch.multinomial(weights.cpu().double(), 1, generator=generator)[:, 0].to(logits.device)
    return token, token_logprobs(logits, token, temperature, backend)
