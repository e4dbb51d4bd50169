"""fusedtx.sampling: per-request seeded sampling that never depends on the batch.

1. the random source: Philox4x32-10 in int64 tensors == a plain-Python Philox (Random123's
   known answers), and so are uniform() and derive_seeds();
2. the sampler == a plain-Python reference of its steps (the integer weights, top-p, the draw);
3. batch invariance, bitwise: a row's token and log-probability alone == in batches of 2..16 at
   any position beside garbage rows, at temperatures 0, 0.8 and 1.5 with top-k / top-p; the same
   across runs and thread counts. Negative control: the shared-generator sampler fails it;
4. statistics: a chi-square test of the drawn tokens against softmax(logits / T), restricted to
   the top-k / top-p set, whose tokens are the only ones drawn; the tie rules;
5. generate(seed=...) on a tiny GPT and Llama: a prompt's tokens and log-probabilities alone ==
   inside batches of other ragged prompts == logprobs() of the finished sequence;
6. bad arguments raise ValueError naming them.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import fusedtx
from fusedtx import sampling
from fusedtx.models import GPT, GPTConfig, Llama, LlamaConfig
from helpers import assert_bitwise_equal, bitwise_equal, require, under_each_thread_count

M32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# 1. the random source against plain Python
# ---------------------------------------------------------------------------------------------
def philox_python(counter, key):
    """Philox4x32-10 on Python ints, as Random123 writes it."""
    c, k = list(counter), list(key)
    for round_ in range(10):
        if round_:
            k = [(k[0] + 0x9E3779B9) & M32, (k[1] + 0xBB67AE85) & M32]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & M32, (p0 >> 32) ^ c[3] ^ k[1], p0 & M32]
    return c


def words_python(seed, step, block, domain=0):
    return philox_python((step & M32, (step >> 32) & M32, block, domain), (seed & M32, (seed >> 32) & M32))


def uniform_python(seed, step, n, bits):
    """n numbers in [0, 1) as fusedtx.sampling's docstring specifies them."""
    if bits == 24:
        return [(words_python(seed, step, j // 4)[j % 4] >> 8) * 2.0 ** -24 for j in range(n)]
    out = []
    for j in range(n):
        w = words_python(seed, step, j // 2)
        out.append((((w[2 * (j % 2)] << 21) | (w[2 * (j % 2) + 1] >> 11))) * 2.0 ** -53)
    return out


KNOWN_ANSWERS = [  # Random123's kat_vectors for philox4x32, 10 rounds: counter, key, output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32,) * 4, (M32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    assert tuple(philox_python(counter, key)) == expected
    assert tuple(int(w) for w in sampling.philox4x32_10(*counter, *key)) == expected


def test_philox_tensors_equal_python_on_random_and_extreme_words():
    rng = random.Random(0)
    edges = [0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, M32]
    rows = [[rng.choice(edges) if rng.random() < 0.3 else rng.getrandbits(32) for _ in range(6)] for _ in range(500)]
    columns = torch.tensor(rows, dtype=torch.int64).T
    got = torch.stack(sampling.philox4x32_10(*columns), 1).tolist()
    assert got == [philox_python(r[:4], r[4:]) for r in rows]


SEEDS = [0, 1, 12345, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1, -1, -(2 ** 63)]   # sample() takes any int64
STEPS = [0, 1, 7, 2 ** 32 - 1, 2 ** 32 + 5, 2 ** 62]


@pytest.mark.parametrize("dtype, bits", [(torch.float32, 24), (torch.float64, 53)])
def test_uniform_equals_python(dtype, bits):
    seeds = torch.tensor([s for s in SEEDS for _ in STEPS])
    steps = torch.tensor([t for _ in SEEDS for t in STEPS])
    got = sampling.uniform(seeds, steps, 9, dtype)
    assert got.dtype == dtype and got.shape == (len(seeds), 9)
    assert bool(((got >= 0) & (got < 1)).all())
    for b in range(len(seeds)):
        assert got[b].tolist() == uniform_python(int(seeds[b]), int(steps[b]), 9, bits), (int(seeds[b]), int(steps[b]))


def test_derive_seeds_equals_python():
    for base in (0, 5, 2 ** 40 + 3, 2 ** 63 - 1):
        expected = []
        for i in range(6):
            w = philox_python((i, 0, 0, 1), (base & M32, base >> 32))
            expected.append(w[0] | ((w[1] & 0x7FFFFFFF) << 32))
        assert sampling.derive_seeds(base, 6) == expected
        assert all(0 <= s < 2 ** 63 for s in expected) and len(set(expected)) == 6


# ---------------------------------------------------------------------------------------------
# 2. the sampler against a plain-Python reference of its steps
# ---------------------------------------------------------------------------------------------
def sample_python(logits_row, seed, step, temperature, top_k, top_p):
    """sample()'s token for one row, the docstring's steps on Python ints and floats (the
    probabilities from fusedtx.softmax, as the sampler takes them)."""
    scaled = logits_row.float() / temperature
    values = scaled.tolist()
    if top_k is not None and top_k < len(values):
        keep = sorted(range(len(values)), key=lambda i: (-values[i], i))[:top_k]
        scaled = torch.full_like(scaled, -math.inf).index_put_((torch.tensor(keep),), scaled[keep])
    probs = fusedtx.softmax(scaled[None], dim=-1)[0].tolist()
    weights = [math.floor(p * 2.0 ** 48) for p in probs]
    if top_p is not None and top_p < 1.0:
        total, above = sum(weights), 0
        for i in sorted(range(len(probs)), key=lambda i: (-probs[i], i)):
            if float(above) >= top_p * float(total):
                weights[i], above = 0, above + weights[i]
            else:
                above += weights[i]
    total = sum(weights)
    r = min(math.floor(uniform_python(seed, step, 1, 53)[0] * float(total)), total - 1)
    running = 0
    for i, w in enumerate(weights):
        running += w
        if running > r:
            return i
    raise AssertionError("no token drawn")


PARAMS = [(0.8, None, None), (0.8, 50, None), (0.8, None, 0.9), (1.5, 20, 0.7), (1.5, None, None), (1.5, 3, 0.99)]


@pytest.mark.parametrize("temperature, top_k, top_p", PARAMS)
def test_sample_equals_python_reference(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(24, 300, generator=g) * 3
    logits[5, ::3] = -math.inf                                   # masked entries
    logits[6, 10:20] = logits[6, 10]                             # ties
    seeds, steps = torch.arange(24) * 7919 + 3, torch.arange(24) % 5
    tokens, logprobs = sampling.sample(logits, seeds, steps, temperature, top_k, top_p)
    for b in range(24):
        assert int(tokens[b]) == sample_python(logits[b], int(seeds[b]), int(steps[b]), temperature, top_k, top_p), b
    assert_bitwise_equal(logprobs, fusedtx.log_softmax(logits / temperature, -1).gather(-1, tokens[:, None])[:, 0])


def test_sample_on_the_reference_backend_equals_native():
    require("cpu", "native")
    g = torch.Generator().manual_seed(2)
    logits, seeds, steps = torch.randn(8, 500, generator=g) * 4, torch.arange(8), torch.zeros(8, dtype=torch.int64)
    native = sampling.sample(logits, seeds, steps, 0.8, 40, 0.9, backend="native")
    reference = sampling.sample(logits, seeds, steps, 0.8, 40, 0.9, backend="reference")
    assert torch.equal(native[0], reference[0]) and bitwise_equal(native[1], reference[1])


def test_the_same_tokens_every_run():
    """Pinned: a change to the random source or the sampler that moves a token shows here."""
    logits = torch.sin(torch.arange(8 * 64, dtype=torch.float32).view(8, 64) * 0.37) * 4
    tokens, _ = sampling.sample(logits, torch.arange(8) * 1000003, torch.arange(8), 0.8, None, 0.95)
    assert tokens.tolist() == PINNED_TOKENS


PINNED_TOKENS = [21, 7, 10, 34, 54, 6, 10, 50]


# ---------------------------------------------------------------------------------------------
# 3. batch invariance, runs and thread counts
# ---------------------------------------------------------------------------------------------
VOCAB = 1000


def garbage_rows(n: int, generator: torch.Generator, temperature: float) -> torch.Tensor:
    """Rows a careless neighbour could make: huge, constant, mostly -inf, spread far apart.
    Every row still has a finite maximum after scaling (sample() refuses rows with none)."""
    rows = torch.randn(n, VOCAB, generator=generator) * 1e4
    huge = 3e38 if temperature >= 1.0 else 1e30                 # finite after / temperature
    for i in range(n):
        kind = i % 4
        if kind == 1:
            rows[i] = rows[i].sign() * huge
        elif kind == 2:
            rows[i] = 7.0
        elif kind == 3:
            rows[i, torch.randperm(VOCAB, generator=generator)[:-3]] = -math.inf
    return rows


def invariance_failures(sampler, temperature, top_k, top_p, compositions=40):
    """(#compositions, #where a row's token or log-probability differs from its value alone):
    the probe row (own seed and step) among 1..15 garbage rows with their own seeds and steps."""
    g = torch.Generator().manual_seed(11)
    probe = torch.randn(1, VOCAB, generator=g) * 2
    seed, step = torch.tensor([987654321]), torch.tensor([3])
    alone = sampler(probe, seed, step, temperature, top_k, top_p)
    failures = 0
    for case in range(compositions):
        batch = 2 + case % 15
        index = [0, batch - 1, int(torch.randint(0, batch, (), generator=g))][case % 3]
        logits = garbage_rows(batch, g, temperature)
        seeds = torch.randint(0, 2 ** 62, (batch,), generator=g)
        steps = torch.randint(0, 100, (batch,), generator=g)
        logits[index], seeds[index], steps[index] = probe[0], seed[0], step[0]
        tokens, logprobs = sampler(logits, seeds, steps, temperature, top_k, top_p)
        failures += not (tokens[index] == alone[0][0] and bitwise_equal(logprobs[index:index + 1], alone[1]))
    return compositions, failures


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, None, None)] + PARAMS)
def test_a_row_draws_the_same_alone_and_in_any_batch(temperature, top_k, top_p):
    total, failures = invariance_failures(sampling.sample, temperature, top_k, top_p)
    assert failures == 0, f"{failures} of {total} batches changed the probe row's token or log-probability"


def test_negative_control_a_shared_generator_depends_on_the_batch():
    """The same check on the shared-stream sampler (one torch.Generator, torch.multinomial, as
    generate(generator=...) does): rows before the probe consume its random numbers."""
    def shared(logits, seeds, steps, temperature, top_k, top_p):
        return sampling.sample_shared(logits, temperature, top_k, top_p, torch.Generator().manual_seed(0))

    total, failures = invariance_failures(shared, 0.8, None, None)
    assert failures > 0, "the shared generator passed: the batch-invariance check cannot fail"


def test_the_same_bits_across_runs_and_thread_counts():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 4096, generator=g) * 3                 # big enough to be split over threads
    seeds, steps = torch.randint(0, 2 ** 62, (64,), generator=g), torch.randint(0, 50, (64,), generator=g)
    runs = under_each_thread_count(lambda: sampling.sample(logits, seeds, steps, 0.8, 100, 0.9), counts=(1, 2, 1, 2))
    for tokens, logprobs in runs[1:]:
        assert torch.equal(tokens, runs[0][0]) and bitwise_equal(logprobs, runs[0][1])


# ---------------------------------------------------------------------------------------------
# 4. statistics and tie rules
# ---------------------------------------------------------------------------------------------
# The 0.999 quantiles of the chi-square distribution: a correct sampler fails one test in 1000
# seeds; the seeds here are fixed, so the outcome is too.
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124,
            9: 27.877, 10: 29.588, 11: 31.264}
DRAWS = 40000
STAT_LOGITS = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.7, 0.5, 0.3, 0.0, -0.2, -0.5, -0.8, -1.0])


def draws(temperature, top_k=None, top_p=None, vary="seed"):
    """Token counts (V,) of DRAWS draws from STAT_LOGITS: one seed per draw at step 0, or one seed
    over DRAWS steps."""
    index = torch.arange(DRAWS, dtype=torch.int64)
    if vary == "seed":
        seeds, steps = index * 2654435761 + 17, torch.zeros_like(index)
    else:
        seeds, steps = torch.full_like(index, 99), index
    tokens, _ = sampling.sample(STAT_LOGITS.expand(DRAWS, -1), seeds, steps, temperature, top_k, top_p)
    return torch.bincount(tokens, minlength=len(STAT_LOGITS)).double()


def chi_square(counts, probs):
    """Pearson's statistic of counts against probabilities over the tokens with probs > 0
    (expected counts >= 5 each)."""
    keep = probs > 0
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    assert bool((expected >= 5).all())
    return float(((counts[keep] - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("vary", ["seed", "step"])
@pytest.mark.parametrize("temperature", [0.8, 1.5])
def test_draws_follow_softmax_of_logits_over_temperature(temperature, vary):
    counts = draws(temperature, vary=vary)
    probs = torch.softmax(STAT_LOGITS.double() / temperature, -1)
    stat = chi_square(counts, probs)
    assert stat < CHI2_999[11], f"chi-square {stat:.2f} over 11 degrees of freedom"
    # negative control: the same counts against the distribution at another temperature
    assert chi_square(counts, torch.softmax(STAT_LOGITS.double() / (temperature * 1.25), -1)) > CHI2_999[11]


@pytest.mark.parametrize("top_k, top_p, allowed", [(6, None, 6), (None, 0.8, None), (8, 0.9, None)])
def test_top_k_and_top_p_draw_from_their_sets_in_proportion(top_k, top_p, allowed):
    temperature = 1.5
    probs = torch.softmax(STAT_LOGITS.double() / temperature, -1)
    if top_k is not None:
        probs[top_k:] = 0                                            # STAT_LOGITS is sorted
    if top_p is not None:
        before = torch.cumsum(probs / probs.sum(), 0) - probs / probs.sum()
        probs[before >= top_p] = 0
    counts = draws(temperature, top_k, top_p)
    assert counts[probs == 0].sum() == 0, "a token outside the set was drawn"
    kept = int((probs > 0).sum())
    if allowed is not None:
        assert kept == allowed
    stat = chi_square(counts, probs)
    assert stat < CHI2_999[kept - 1], f"chi-square {stat:.2f} over {kept - 1} degrees of freedom"


def test_top_k_and_top_p_never_draw_outside_their_sets_on_random_rows():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2000, 200, generator=g) * 2
    seeds, steps = torch.arange(2000), torch.arange(2000) % 9
    for top_k, top_p in [(10, None), (None, 0.5), (30, 0.8)]:
        tokens, _ = sampling.sample(logits, seeds, steps, 1.2, top_k, top_p)
        ranks = (logits > logits.gather(-1, tokens[:, None])).sum(-1)          # tokens scoring higher
        if top_k is not None:
            assert int(ranks.max()) < top_k
        if top_p is not None:
            probs = torch.softmax(logits.double() / 1.2, -1)
            if top_k is not None:
                probs = probs.masked_fill(probs < probs.topk(top_k, -1).values[:, -1:], 0)
                probs = probs / probs.sum(-1, keepdim=True)
            above = (probs * (probs > probs.gather(-1, tokens[:, None]))).sum(-1)
            assert bool((above < top_p + 1e-6).all())     # the sampler's probabilities are float32


def test_tie_rules():
    seeds, steps = torch.arange(500), torch.zeros(500, dtype=torch.int64)
    # greedy: the lowest index among equal maxima
    row = torch.tensor([[3.0, 7.0, 7.0, 1.0]])
    assert int(sampling.sample(row, seeds[:1], steps[:1], 0.0)[0]) == 1
    # top-k: exactly k tokens, ties at the k-th value to the lowest indices
    row = torch.tensor([1.0, 5.0, 5.0, 5.0, 5.0, 0.0]).expand(500, -1)
    tokens, _ = sampling.sample(row, seeds, steps, 1.0, top_k=2)
    assert set(tokens.tolist()) == {1, 2}
    # top-p: equal probabilities ranked by index; 4 equal tokens reach 0.5 with the first two
    row = torch.zeros(500, 4)
    tokens, _ = sampling.sample(row, seeds, steps, 1.0, top_p=0.5)
    assert set(tokens.tolist()) == {0, 1}
    # top_k = 1 and a tiny top_p are greedy
    logits = torch.randn(500, 50, generator=torch.Generator().manual_seed(6))
    for kwargs in (dict(top_k=1), dict(top_p=1e-9)):
        assert torch.equal(sampling.sample(logits, seeds, steps, 1.3, **kwargs)[0], logits.argmax(-1))


# ---------------------------------------------------------------------------------------------
# 5. generate(seed=...)
# ---------------------------------------------------------------------------------------------
def tiny(family):
    torch.manual_seed(0)
    if family == "gpt":
        return GPT(GPTConfig.preset("tiny"), backend="native").eval()
    return Llama(LlamaConfig.preset("tiny"), backend="native").eval()


def prompts_of(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.8, 50, 0.9), (1.5, None, None)])
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_generate_with_seed_gives_a_prompt_the_same_tokens_in_any_batch(family, temperature, top_k, top_p):
    require("cpu", "native")
    model, steps = tiny(family), 10
    probe, probe_seed = prompts_of([6], 1)[0], 424242
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    alone = model.generate([probe], steps, seed=[probe_seed], **kwargs)
    batches = [([3, 17], 0), ([1, 9, 4, 12], 2), ([20, 2, 5, 7, 1, 11, 8], 7)]  # others' lengths, probe index
    for case, (lengths, index) in enumerate(batches):
        prompts = prompts_of(lengths, 10 + case)
        prompts.insert(index, probe)
        seeds = [1000 * case + i for i in range(len(prompts))]
        seeds[index] = probe_seed
        out = model.generate(prompts, steps, seed=seeds, **kwargs)
        assert torch.equal(out.tokens[index], alone.tokens[0]), f"batch {case}: tokens changed with the batch"
        assert_bitwise_equal(out.logprobs[index], alone.logprobs[0], f"batch {case}: log-probabilities")
    # the trainer's view: logprobs() of the finished sequence, in a batch of others, garbage-padded
    sequence = probe + alone.tokens[0].tolist()
    batch = torch.randint(0, 256, (3, len(sequence) + 4), generator=torch.Generator().manual_seed(8))
    batch[1, :len(sequence)] = torch.tensor(sequence)
    trainer = model.logprobs(batch, temperature=temperature)[1, len(probe) - 1:len(sequence) - 1]
    assert_bitwise_equal(alone.logprobs[0], trainer, "sampler vs trainer log-probabilities")


def test_generate_base_seed_is_derive_seeds_and_seeds_matter():
    require("cpu", "native")
    model, prompts = tiny("gpt"), prompts_of([4, 9, 2], 3)
    base = model.generate(prompts, 8, temperature=1.0, seed=77)
    explicit = model.generate(prompts, 8, temperature=1.0, seed=sampling.derive_seeds(77, 3))
    assert torch.equal(base.tokens, explicit.tokens) and bitwise_equal(base.logprobs, explicit.logprobs)
    as_tensor = torch.tensor(sampling.derive_seeds(77, 3))
    assert torch.equal(model.generate(prompts, 8, temperature=1.0, seed=as_tensor).tokens, base.tokens)
    assert not torch.equal(model.generate(prompts, 8, temperature=1.0, seed=78).tokens, base.tokens)
    greedy = model.generate(prompts, 8)
    assert torch.equal(model.generate(prompts, 8, seed=5).tokens, greedy.tokens)       # temperature 0: no draw


# ---------------------------------------------------------------------------------------------
# 6. bad arguments
# ---------------------------------------------------------------------------------------------
def test_generate_refuses_bad_seeds():
    require("cpu", "native")
    model = tiny("gpt")
    cases = [
        (dict(seed=1, generator=torch.Generator()), r"pass seed= .* or generator= .*, not both"),
        (dict(seed=[1, 2, 3]), r"seed must hold one int per prompt \(2\), got 3"),
        (dict(seed=[1]), r"seed must hold one int per prompt \(2\), got 1"),
        (dict(seed=[1, 2.5]), r"seed\[1\] must be an int in \[0, 2\*\*63\), got 2.5"),
        (dict(seed=[True, 2]), r"seed\[0\] must be an int in \[0, 2\*\*63\), got True"),
        (dict(seed=[1, -2]), r"seed\[1\] must be an int in \[0, 2\*\*63\), got -2"),
        (dict(seed=-1), r"seed must be in \[0, 2\*\*63\), got -1"),
        (dict(seed=2 ** 63), r"seed must be in \[0, 2\*\*63\), got 9223372036854775808"),
        (dict(seed=1.0), "seed must be None, an int or a sequence of one int per prompt, got float"),
        (dict(seed="12"), "seed must be None, an int or a sequence of one int per prompt, got str"),
        (dict(seed=torch.tensor([1.0, 2.0])), "a tensor of seeds must be 1-D and of an integer dtype"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=f"generate: {message}"):
            model.generate([[1, 2], [3]], 2, temperature=1.0, **kwargs)


def test_sample_refuses_bad_arguments():
    logits, seeds, steps = torch.randn(2, 5), torch.tensor([1, 2]), torch.tensor([0, 0])
    cases = [
        ((logits[0], seeds, steps), {}, r"logits must be a floating-point \(batch, vocab\) tensor"),
        ((logits.long(), seeds, steps), {}, "logits must be a floating-point"),
        ((logits, seeds[:1], steps), {},
         r"seeds must be an int64 tensor of shape \[2\] \(one per row\), got torch.int64 of shape \[1\]"),
        ((logits, seeds.int(), steps), {}, "seeds must be an int64 tensor of shape"),
        ((logits, seeds, [0, 0]), {}, "steps must be an int64 tensor of shape .* got list"),
        ((logits, seeds, torch.tensor([0, -3])), {}, "steps must be >= 0, got -3"),
        ((logits, seeds, steps), dict(temperature=-0.5), "temperature must be a finite number >= 0, got -0.5"),
        ((logits, seeds, steps), dict(top_k=0), "top_k must be None or an int >= 1, got 0"),
        ((logits, seeds, steps), dict(top_p=1.5), r"top_p must be None or a number in \(0, 1\], got 1.5"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=f"sample: {message}"):
            sampling.sample(*args, **kwargs)
    for bad_row in (torch.tensor([0.0, math.nan, 1.0]), torch.full((3,), -math.inf), torch.tensor([1.0, math.inf, 0.0])):
        rows = torch.stack([torch.zeros(3), bad_row])
        with pytest.raises(ValueError, match="sample: logits row 1 cannot be sampled from"):
            sampling.sample(rows, seeds, steps, 0.8)
    with pytest.raises(ValueError, match="uniform: dtype must be torch.float32 or torch.float64"):
        sampling.uniform(seeds, steps, 2, torch.float16)


def test_the_readme_example_runs():
    """README's seed= example, on a tiny model: the code it shows runs and its assertion holds."""
    require("cpu", "native")
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b for b in readme.split("```python\n")[1:] if "seed=[11, 12]" in b.split("```")[0]]
    assert len(blocks) == 1, "the README's seed= example is gone"
    prompt_a, prompt_b = prompts_of([5, 9], 2)
    exec(compile(blocks[0].split("```")[0], "README.md", "exec"),
         dict(torch=torch, model=tiny("llama"), prompt_a=prompt_a, prompt_b=prompt_b))
