"""fusedtx.serving.Engine: continuous batching with seeded sampling. A request's tokens and
log-probabilities are the same bits served alone or among others, under any arrival order,
prefill chunk size, batch size, run and thread count, and equal model.logprobs() of the
finished sequence; refused requests never disturb the others; freed slots' leftovers are never
read. Negative controls: a shared-generator sampler and a batch-dependent model fail the same
checks."""
from __future__ import annotations

import random

import pytest
import torch

from fusedtx import sampling
from fusedtx.models import GPT, GPTConfig, Llama, LlamaConfig
from fusedtx.serving import Completion, Engine, SamplingParams
from helpers import require

MAX_LEN = 64
# (prompt length, SamplingParams) of each request: greedy, plain, top-k, top-p, both, a short one
PARAMS = [
    SamplingParams(temperature=0.0, max_new_tokens=9),
    SamplingParams(temperature=0.8, max_new_tokens=12, seed=11),
    SamplingParams(temperature=1.5, top_k=20, max_new_tokens=7, seed=12),
    SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=10, seed=13),
    SamplingParams(temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=8, seed=14),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.5, max_new_tokens=3, seed=15),
    SamplingParams(temperature=1.5, max_new_tokens=11),              # seed from the engine and its id
]
PROMPT_LENGTHS = [5, 17, 1, 30, 9, 12, 40]


def gpt(cls=GPT):
    torch.manual_seed(0)
    return cls(GPTConfig.preset("tiny", block_size=MAX_LEN), backend="native").eval()


def llama():
    torch.manual_seed(0)
    return Llama(LlamaConfig.preset("tiny-qwen3"), backend="native").eval()


MODELS = {"gpt": gpt, "llama": llama}


def prompts(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def alone(model, prompt, params, request_id=0) -> Completion:
    """The request served by itself (with the id it has in the batched runs: a request without a
    seed takes one derived from its id)."""
    engine = Engine(model, max_batch=1, max_len=MAX_LEN)
    for _ in range(request_id):
        engine._next_id += 1
    return engine.generate([prompt], [params])[0]


def scheduled(model, all_prompts, *, max_batch, prefill_chunk, budget, seed, engine_cls=Engine) -> list[Completion]:
    """Every request added in id order but at random steps, served by one engine."""
    rng = random.Random(seed)
    engine = engine_cls(model, max_batch=max_batch, max_len=MAX_LEN, prefill_chunk=prefill_chunk,
                        max_tokens_per_step=budget)
    pending = list(zip(all_prompts, PARAMS))
    out: dict[int, Completion] = {}
    while pending or engine.has_unfinished():
        for _ in range(rng.randint(0, 3) if pending else 0):
            if pending:
                engine.add_request(*pending.pop(0))
        out.update((c.id, c) for c in engine.step())
    return [out[i] for i in range(len(all_prompts))]


def mismatches(got: list[Completion], want: list[Completion]) -> list[int]:
    return [i for i, (g, w) in enumerate(zip(got, want)) if g.tokens != w.tokens or g.logprobs != w.logprobs]


SCHEDULES = [  # (max_batch, prefill_chunk, per-step prompt token budget, arrival seed)
    (2, None, None, 0), (4, 1, None, 1), (4, 7, 12, 2), (16, 64, None, 3), (3, 7, None, 4),
]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_request_gets_its_bits_alone_under_any_schedule(name):
    require("cpu", "native")
    model = MODELS[name]()
    ps = prompts(model)
    want = [alone(model, p, params, i) for i, (p, params) in enumerate(zip(ps, PARAMS))]
    for max_batch, chunk, budget, seed in SCHEDULES:
        got = scheduled(model, ps, max_batch=max_batch, prefill_chunk=chunk, budget=budget, seed=seed)
        assert mismatches(got, want) == [], f"schedule {(max_batch, chunk, budget, seed)}"
        assert [len(c.tokens) for c in got] == [p.max_new_tokens for p in PARAMS]
        assert all(c.finish_reason == "length" for c in got)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logprobs_equal_a_training_forward_of_the_finished_sequences(name):
    """Each completion's log-probabilities == model.logprobs() of prompt + completion, computed
    in one right-padded batch of all of them (garbage after each sequence's end)."""
    require("cpu", "native")
    model = MODELS[name]()
    ps = prompts(model)
    got = scheduled(model, ps, max_batch=3, prefill_chunk=7, budget=None, seed=5)
    seqs = [p + c.tokens for p, c in zip(ps, got)]
    g = torch.Generator().manual_seed(9)
    batch = torch.randint(0, model.vocab_size, (len(seqs), max(map(len, seqs))), generator=g)
    for i, s in enumerate(seqs):
        batch[i, :len(s)] = torch.tensor(s)
    for i, (p, c, params) in enumerate(zip(ps, got, PARAMS)):
        lp = model.logprobs(batch, temperature=params.temperature)[i, len(p) - 1:len(p) - 1 + len(c.tokens)]
        assert torch.equal(lp, torch.tensor(c.logprobs)), f"request {i}"


def test_runs_and_thread_counts_agree():
    require("cpu", "native")
    model = gpt()
    ps = prompts(model)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (2, 2, 1):
            torch.set_num_threads(threads)
            runs.append(scheduled(model, ps, max_batch=4, prefill_chunk=7, budget=None, seed=6))
    finally:
        torch.set_num_threads(before)
    assert mismatches(runs[1], runs[0]) == [] and mismatches(runs[2], runs[0]) == []


class SharedGeneratorEngine(Engine):
    """The sampler generate(generator=...) used to be: one stream for the whole batch, so a row's
    random numbers depend on the rows drawn before it in the step. The negative control."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generator = torch.Generator().manual_seed(0)

    def _sample(self, r):
        p = r.params
        token, logprob = sampling.sample_shared(r.logits[None], p.temperature, p.top_k, p.top_p, self.generator)
        r.tokens.append(int(token[0]))
        r.logprobs.append(float(logprob[0]))
        r.logits = None
        return r.tokens[-1] in p.stop_token_ids or len(r.tokens) >= p.max_new_tokens


def test_negative_control_a_shared_generator_depends_on_the_schedule():
    model = gpt()
    ps = prompts(model)
    one = scheduled(model, ps, max_batch=2, prefill_chunk=None, budget=None, seed=0, engine_cls=SharedGeneratorEngine)
    other = scheduled(model, ps, max_batch=4, prefill_chunk=7, budget=None, seed=1, engine_cls=SharedGeneratorEngine)
    assert mismatches(one, other), "a shared generator gave every request the same tokens under two schedules"


class BatchDependentGPT(GPT):
    """Hidden states that depend on the batch's size, as a kernel that picks its reduction order
    from the batch does (exaggerated, so that it shows at every size)."""

    def hidden_states(self, idx, kv_cache=None):
        return super().hidden_states(idx, kv_cache) * (1 + 1e-6 * idx.shape[0])


def test_negative_control_a_batch_dependent_model_changes_logprobs_with_the_schedule():
    model = gpt(BatchDependentGPT)
    ps = prompts(model)
    one = scheduled(model, ps, max_batch=1, prefill_chunk=None, budget=None, seed=0)
    other = scheduled(model, ps, max_batch=4, prefill_chunk=7, budget=None, seed=1)
    assert mismatches(one, other), "the check missed a batch-dependent model"


def test_negative_control_plain_pytorch_changes_logprobs_with_the_schedule():
    """PlainGPT (torch.nn layers, the same weights): its log-probabilities move with the batch."""
    from fusedtx.models import PlainGPT

    model = gpt(PlainGPT)
    ps = prompts(model)
    runs = [scheduled(model, ps, max_batch=b, prefill_chunk=c, budget=None, seed=s)
            for b, c, s in ((1, None, 0), (4, 7, 1), (16, 1, 2))]
    assert mismatches(runs[1], runs[0]) or mismatches(runs[2], runs[0]), "PlainGPT passed the schedule check"


POISON = 7


class NaNOnPoisonGPT(GPT):
    """Logits of NaN after the token POISON: a request that meets it cannot be sampled."""

    def hidden_states(self, idx, kv_cache=None):
        h = super().hidden_states(idx, kv_cache)
        return torch.where((idx == POISON)[..., None], torch.full_like(h, float("nan")), h)


def test_a_request_that_cannot_be_sampled_ends_alone():
    """NaN logits end that request with finish_reason "error" and a message; the others in its
    batch finish with their own bits."""
    require("cpu", "native")
    model = gpt(NaNOnPoisonGPT)
    ps = [p for p in prompts(model) if POISON not in p][:3]
    want = [alone(model, p, params, i) for i, (p, params) in enumerate(zip(ps, PARAMS[1:4]))]
    engine = Engine(model, max_batch=4, max_len=MAX_LEN, prefill_chunk=7)
    got = engine.generate(ps[:1] + [[3, POISON]] + ps[1:], [PARAMS[1], PARAMS[1], PARAMS[2], PARAMS[3]])
    assert got[1].finish_reason == "error" and "NaN" in got[1].error and got[1].tokens == []
    for mine, theirs in zip(got[:1] + got[2:], want):
        assert mine.tokens == theirs.tokens and mine.logprobs == theirs.logprobs and mine.error is None


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_other_backends_give_each_request_its_bits_alone(backend):
    """The schedule check on the reference and (interpreted) Triton backends: fewer requests."""
    require("cpu", backend)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", block_size=MAX_LEN), backend=backend).eval()
    ps = prompts(model)[:3]
    want = [alone(model, p, params, i) for i, (p, params) in enumerate(zip(ps, PARAMS[1:4]))]
    engine = Engine(model, max_batch=3, max_len=MAX_LEN, prefill_chunk=7)
    got = engine.generate(ps, PARAMS[1:4])
    assert mismatches(got, want) == []


def test_freed_slots_leftovers_are_never_read():
    """Between steps every slot no request holds is filled with NaN (keys and values, all
    positions): the completions do not change."""
    require("cpu", "native")
    model = gpt()
    ps = prompts(model)
    want = scheduled(model, ps, max_batch=3, prefill_chunk=7, budget=None, seed=2)

    class PoisoningEngine(Engine):
        def step(self):
            for s in range(self.max_batch):
                if s not in self.running:
                    for layer in self.cache:
                        layer.k[s] = float("nan")
                        layer.v[s] = float("nan")
            return super().step()

    got = scheduled(model, ps, max_batch=3, prefill_chunk=7, budget=None, seed=2, engine_cls=PoisoningEngine)
    assert mismatches(got, want) == []


def test_a_stop_token_ends_one_request_while_the_others_go_on():
    require("cpu", "native")
    model = gpt()
    ps = prompts(model)
    plain = alone(model, ps[1], PARAMS[1], 1)
    stop = plain.tokens[4]
    first = plain.tokens.index(stop)
    engine = Engine(model, max_batch=4, max_len=MAX_LEN, prefill_chunk=7)
    params = [PARAMS[0], SamplingParams(**{**PARAMS[1].__dict__, "stop_token_ids": (stop,)}), PARAMS[2]]
    got = engine.generate(ps[:3], params)
    assert got[1].finish_reason == "stop" and got[1].tokens == plain.tokens[:first + 1]
    assert got[1].logprobs == plain.logprobs[:first + 1]
    for i in (0, 2):
        want = alone(model, ps[i], PARAMS[i], i)
        assert got[i].tokens == want.tokens and got[i].finish_reason == "length"


def test_refused_requests_say_why_and_disturb_nothing():
    require("cpu", "native")
    model = gpt()
    ps = prompts(model)
    want = [alone(model, p, params, i) for i, (p, params) in enumerate(zip(ps[:2], PARAMS[:2]))]
    engine = Engine(model, max_batch=2, max_len=MAX_LEN, prefill_chunk=7)
    ids = [engine.add_request(ps[0], PARAMS[0])]
    engine.step()
    bad = [
        (ps[0] + [model.vocab_size], SamplingParams(), "prompt token 256 at position 5 is outside the vocabulary"),
        ([], SamplingParams(), "prompt must be a non-empty 1-D sequence"),
        ([[1, 2]], SamplingParams(), "prompt must be a non-empty 1-D sequence"),
        ([1.5, 2.0], SamplingParams(), "prompt must be a non-empty 1-D sequence of int token ids"),
        (ps[3], SamplingParams(max_new_tokens=40), "prompt \\(30 tokens\\) \\+ max_new_tokens \\(40\\) exceeds the "
                                                  "engine's max_len 64"),
        (ps[0], SamplingParams(temperature=-1.0), "temperature must be a finite number >= 0"),
        (ps[0], SamplingParams(top_p=0.0), "top_p must be None or a number in \\(0, 1\\]"),
        (ps[0], SamplingParams(top_k=0), "top_k must be None or an int >= 1"),
        (ps[0], SamplingParams(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
        (ps[0], SamplingParams(stop_token_ids=(999,)), "stop_token_ids must be a tuple of token ids in \\[0, 256\\)"),
        (ps[0], SamplingParams(seed=-3), "seed must be None or an int in \\[0, 2\\*\\*63\\)"),
    ]
    for prompt, params, why in bad:
        with pytest.raises(ValueError, match=f"add_request: {why}"):
            engine.add_request(prompt, params)
    with pytest.raises(TypeError, match="params must be a SamplingParams, got dict"):
        engine.add_request(ps[0], {"temperature": 0.0})
    ids.append(engine.add_request(ps[1], PARAMS[1]))
    out = {}
    while engine.has_unfinished():
        out.update((c.id, c) for c in engine.step())
    assert ids == [0, 1], "a refused request took an id"
    for i in ids:
        assert out[i].tokens == want[i].tokens and out[i].logprobs == want[i].logprobs


def test_engine_arguments_are_checked():
    model = gpt()
    for kwargs, why in [(dict(max_batch=0, max_len=8), "max_batch must be an int >= 1, got 0"),
                        (dict(max_batch=2, max_len=10_000), "max_len \\(10000\\) exceeds the model's 64 positions"),
                        (dict(max_batch=2, max_len=8, prefill_chunk=0), "prefill_chunk must be an int >= 1"),
                        (dict(max_batch=2, max_len=8, seed=-1), "seed must be an int in \\[0, 2\\*\\*63\\)")]:
        with pytest.raises(ValueError, match=f"Engine: {why}"):
            Engine(model, **kwargs)
    with pytest.raises(ValueError, match="generate: 2 prompts but 1 SamplingParams"):
        Engine(model, max_batch=2, max_len=16).generate([[1], [2]], [SamplingParams()])


def test_the_readme_example_runs():
    """README's Engine example, on a tiny model: the code it shows runs and its assertion holds."""
    require("cpu", "native")
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b for b in readme.split("```python\n")[1:] if "engine = Engine(" in b.split("```")[0]]
    assert len(blocks) == 1, "the README's Engine example is gone"
    model = llama()
    prompt_a, prompt_b = prompts(model)[1:3]
    exec(compile(blocks[0].split("```")[0], "README.md", "exec"), dict(model=model, prompt_a=prompt_a, prompt_b=prompt_b))


@pytest.mark.parametrize("widen", ["where it can", "never"])
def test_slots_that_are_not_consecutive_give_each_request_its_bits(monkeypatch, widen):
    """A step over slots that are not consecutive runs with the slots between as fillers
    (serving._widen: token 0, nothing kept) or, where a filler could not take the tokens, on
    copies of its rows. Either way every request gets the bits it gets alone, in every schedule;
    the schedules do take the filler path (counted), and the copies serve when it is refused."""
    from fusedtx import serving

    require("cpu", "native")
    real, widened = serving._widen, []

    def counting(*args):
        out = real(*args) if widen == "where it can" else None
        widened.append(out is not None)
        return out

    monkeypatch.setattr(serving, "_widen", counting)
    model = llama()
    ps = prompts(model)
    want = [alone(model, p, params, i) for i, (p, params) in enumerate(zip(ps, PARAMS))]
    for max_batch, chunk, budget, seed in SCHEDULES:
        got = scheduled(model, ps, max_batch=max_batch, prefill_chunk=chunk, budget=budget, seed=seed)
        assert mismatches(got, want) == [], f"schedule {(max_batch, chunk, budget, seed)}"
    assert widened and any(widened) == (widen == "where it can"), widened


def test_a_filler_slot_that_would_overflow_is_refused():
    """_widen fills the slots between only where each can take the step's tokens."""
    from fusedtx import serving
    from fusedtx.nn import KVCache

    cache = [KVCache(3, 1, 8, 4) for _ in range(2)]
    for layer in cache:
        layer.lengths = torch.tensor([3, 7, 5])
    idx = torch.tensor([[4, 5], [6, 7]])
    assert serving._widen(cache, [0, 2], idx, [2, 2]) is None            # slot 1: 7 + 2 > 8
    rows, wide, lengths, picks = serving._widen(cache, [0, 2], idx[:, :1], [1, 1])  # 7 + 1 fits
    assert rows == [0, 1, 2] and picks == [0, 2] and lengths == [1, 0, 1]
    assert wide.tolist() == [[4], [0], [6]]
