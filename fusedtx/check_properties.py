"""The properties `python -m fusedtx check` verifies, one function each, on any fusedtx language model (GPT, Llama).

Each check_<property>(make, work, seed, ...) builds its model with make() (a factory giving a
model with the same weights at every call), runs `work`'s sizes of the property with inputs
drawn from `seed`, and returns a Cell: "pass" when every compared tensor is bitwise identical
(accuracy: within 2x PyTorch float32's error), else "fail" with the largest absolute
difference. The properties are listed in fusedtx/check.py, which runs them as a table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .serving import Engine, SamplingParams


@dataclass(frozen=True)
class Workload:
    """How much of each property to run (the sizes; the model is the check's --preset)."""
    max_len: int = 48                 # longest sequence in the batch-invariance batches
    compositions: int = 4             # random batches the target sequence is placed in
    max_others: int = 16              # other sequences in the largest of them
    prompts: int = 4                  # prompts for generate() (properties 3 and 4)
    new_tokens: int = 24              # tokens generated per prompt (3 and 4)
    prefill_len: int = 40             # longest prompt (3, 4, 6); the chunked prefills' length (3)
    train_steps: int = 3              # AdamW steps per training run (5)
    train_batch: tuple = (4, 32)      # (sequences, tokens) per training step (5)
    requests: int = 16                # requests per serve (6)
    serves: int = 4                   # serves with different schedules (6); the first one alone
    max_slots: int = 8                # most requests decoded together (6)
    serve_new_tokens: tuple = (8, 32)   # each request wants between these many tokens (6)
    sample_temperature: float = 0.8   # the sampled serves' temperature (6, sampled)


@dataclass
class Cell:
    """The outcome of one property on one model: a cell of the table."""
    status: str                       # "pass", "fail", "skipped" or "error"
    max_abs_diff: float | None = None
    detail: str = ""                  # what the table shows beside ✓ / ✗
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Comparing results
# ---------------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns, so that -0.0 != +0.0 and NaN == NaN of the same payload."""
    int_type = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(int_type)


def compare(pairs) -> tuple[bool, float]:
    """(all pairs bitwise identical, largest |a - b| over them) for pairs of tensors."""
    same, worst = True, 0.0
    for a, b in pairs:
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, math.inf
        if not torch.equal(_bits(a), _bits(b)):
            same = False
            diff = (a.detach().double() - b.detach().double()).abs()
            worst = max(worst, float(torch.nan_to_num(diff, nan=math.inf).max()))
    return same, worst


def _cell(same: bool, worst: float, detail: str = "", **extra) -> Cell:
    return Cell("pass" if same else "fail", worst, detail, extra=extra)


def _tokens(rng: torch.Generator, vocab: int, *shape) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=rng)


def _device(model: torch.nn.Module) -> torch.device:
    return model.lm_head.weight.device


# ---------------------------------------------------------------------------------------------
# The properties. Each takes a model factory (same weights every call), a workload and a seed.
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def check_accuracy(make, work: Workload, seed: int, reference_error: Callable) -> Cell:
    """Relative error of the logits against float64 PyTorch, within 2x PyTorch float32's own
    (contract point 1; the ops meet it one by one, and the model composes them)."""
    model = make()
    rng = torch.Generator().manual_seed(seed)
    idx = _tokens(rng, model.vocab_size, 4, work.max_len).to(_device(model))
    error, torch_error = reference_error(model(idx), idx)
    return Cell("pass" if error <= 2 * torch_error + 1e-9 else "fail", None, f"{error:.1e}",
                extra=dict(relative_error=error, torch_float32_relative_error=torch_error))


@torch.no_grad()
def check_batch_invariance(make, work: Workload, seed: int) -> Cell:
    """A sequence's logits alone == its logits inside batches of other sequences of other lengths,
    at a random index, every row right-padded with random garbage tokens."""
    model = make()
    rng, vocab, device = torch.Generator().manual_seed(seed), model.vocab_size, _device(model)
    pairs, shapes = [], []
    for trial in range(work.compositions):
        length = int(torch.randint(1, work.max_len + 1, (), generator=rng))
        sequence = _tokens(rng, vocab, length)
        alone = model(sequence[None].to(device))[0]
        # the last trial has the most others; the rest a random number of them
        others = work.max_others if trial == work.compositions - 1 else int(torch.randint(1, work.max_others + 1, (), generator=rng))
        index = int(torch.randint(0, others + 1, (), generator=rng))
        width = int(torch.randint(length, work.max_len + 1, (), generator=rng))
        batch = _tokens(rng, vocab, others + 1, width)                 # garbage everywhere ...
        batch[index, :length] = sequence                               # ... but the target's tokens
        pairs.append((model(batch.to(device))[index, :length], alone))
        shapes.append((others + 1, width, index, length))
    same, worst = compare(pairs)
    return _cell(same, worst, batches=shapes)


@torch.no_grad()
def check_generate_vs_forward(make, work: Workload, seed: int) -> Cell:
    """At every step of generate(return_logits=True), the logits == a full forward over the
    sequence so far (each sequence alone, no cache)."""
    model = make()
    rng, vocab, device = torch.Generator().manual_seed(seed), model.vocab_size, _device(model)
    prompts = [_tokens(rng, vocab, int(torch.randint(1, work.prefill_len + 1, (), generator=rng)))
               for _ in range(work.prompts)]
    out = model.generate(prompts, work.new_tokens, return_logits=True)
    pairs = []
    for b, prompt in enumerate(prompts):
        sequence = torch.cat([prompt, out.tokens[b].cpu()])
        full = model(sequence[None].to(device))[0]
        # the logits at position t predict token t + 1: the first new token comes from the prompt's last
        pairs.append((out.logits[b], full[len(prompt) - 1: len(prompt) - 1 + work.new_tokens]))
    same, worst = compare(pairs)
    return _cell(same, worst, prompt_lengths=[len(p) for p in prompts])


@torch.no_grad()
def check_chunked_prefill(make, work: Workload, seed: int) -> Cell:
    """Feeding a prompt through the KV cache in chunks (all of 1 token, all of 7, random sizes)
    gives the same logits as one full forward."""
    model = make()
    rng, vocab, device = torch.Generator().manual_seed(seed), model.vocab_size, _device(model)
    prompt = _tokens(rng, vocab, 1, work.prefill_len).to(device)
    full = model(prompt)
    schedules = {"1": [1] * work.prefill_len, "7": [7] * math.ceil(work.prefill_len / 7), "random": []}
    while sum(schedules["random"]) < work.prefill_len:
        schedules["random"].append(int(torch.randint(1, 13, (), generator=rng)))
    pairs = []
    for sizes in schedules.values():
        cache, start, chunks = model.new_kv_cache(1, work.prefill_len), 0, []
        for size in sizes:
            chunk = prompt[:, start: start + size]
            if chunk.shape[1]:
                chunks.append(model.lm_head(model.hidden_states(chunk, cache)))
            start += size
        pairs.append((torch.cat(chunks, 1), full))
    same, worst = compare(pairs)
    return _cell(same, worst, chunk_schedules=list(schedules.values()))


@torch.no_grad()
def check_on_policy(make, work: Workload, seed: int) -> Cell:
    """Sample at temperature 1 (as an RL sampler does); then a training-style forward over the
    finished sequences — shuffled, among extra sequences, right-padded with garbage — must give
    the sampler's log-probabilities bit for bit: KL(sampler || trainer) exactly 0."""
    model = make()
    rng, vocab, device = torch.Generator().manual_seed(seed), model.vocab_size, _device(model)
    prompts = [_tokens(rng, vocab, int(torch.randint(1, work.prefill_len + 1, (), generator=rng)))
               for _ in range(work.prompts)]
    out = model.generate(prompts, work.new_tokens, temperature=1.0, return_logits=True,
                         generator=torch.Generator().manual_seed(seed + 1))
    sequences = [torch.cat([p, t]) for p, t in zip(prompts, out.tokens.cpu())]
    extra = [_tokens(rng, vocab, int(torch.randint(2, work.max_len + 1, (), generator=rng))) for _ in range(3)]
    rows = torch.randperm(len(sequences) + len(extra), generator=rng).tolist()  # where sequence i goes
    width = max(len(s) for s in sequences + extra)
    batch = _tokens(rng, vocab, len(rows), width)
    for row, s in zip(rows, sequences + extra):
        batch[row, :len(s)] = s
    batch = batch.to(device)
    trainer_logprobs, trainer_logits = model.logprobs(batch), model(batch)
    pairs, kl = [], 0.0
    for i, prompt in enumerate(prompts):
        steps = slice(len(prompt) - 1, len(prompt) - 1 + work.new_tokens)
        pairs.append((out.logprobs[i], trainer_logprobs[rows[i], steps]))
        sampler, trainer = out.logits[i].double().log_softmax(-1), trainer_logits[rows[i], steps].double().log_softmax(-1)
        kl = max(kl, float((sampler.exp() * (sampler - trainer)).sum(-1).mean()))
    same, worst = compare(pairs)
    return _cell(same, worst, f"KL {kl:.0e}" if kl else "KL 0", kl=kl)


def _train(make, work: Workload, seed: int, threads: int | None = None):
    """A few AdamW steps on random tokens: (losses, gradients of every step, final parameters)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model = make().train()
        rng, vocab, device = torch.Generator().manual_seed(seed), model.vocab_size, _device(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        losses, grads = [], []
        for _ in range(work.train_steps):
            data = _tokens(rng, vocab, work.train_batch[0], work.train_batch[1] + 1).to(device)
            _, loss = model(data[:, :-1], data[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            losses.append(loss.detach())
            grads += [p.grad.clone() for p in model.parameters()]
            optimizer.step()
        return losses, grads, [p.detach().clone() for p in model.parameters()]
    finally:
        torch.set_num_threads(previous)


def _compare_runs(a, b) -> tuple[bool, float]:
    return compare([pair for part_a, part_b in zip(a, b) for pair in zip(part_a, part_b)])


def check_training(make, work: Workload, seed: int, device: torch.device) -> dict[str, Cell]:
    """Training determinism: two runs from the same init at the current thread count, and (on
    CPU) a third at another thread count. Gives the cells of both training rows."""
    now = torch.get_num_threads()
    first, second = _train(make, work, seed), _train(make, work, seed)
    same, worst = _compare_runs(first, second)
    cells = {"training_repeat": _cell(same, worst, steps=work.train_steps)}
    if device.type != "cpu":
        cells["training_threads"] = Cell("skipped", detail="CPU only")
    else:
        other = 1 if now > 1 else 2
        same, worst = _compare_runs(first, _train(make, work, seed, threads=other))
        cells["training_threads"] = _cell(same, worst, f"{min(now, other)} vs {max(now, other)} threads",
                                          threads=[now, other])
    return cells


def _engine_serves(model, specs: list, work: Workload, rng: torch.Generator) -> list[list]:
    """Serve the requests `specs` ((prompt, SamplingParams) pairs) `work.serves` times with
    fusedtx.serving.Engine: first each alone (max_batch 1), then with random batch sizes, prefill
    chunks (1, 7, 64 or whole prompts), arrival orders and steps (0-3 new requests a step). Each
    serve's Completions in the order of `specs`."""
    max_len = max(len(p) + params.max_new_tokens for p, params in specs)
    runs = []
    for serve_no in range(work.serves):
        if serve_no == 0:
            runs.append([Engine(model, max_batch=1, max_len=max_len).generate([p], [params])[0] for p, params in specs])
            continue
        engine = Engine(model, max_batch=int(torch.randint(2, work.max_slots + 1, (), generator=rng)), max_len=max_len,
                        prefill_chunk=[1, 7, 64, None][serve_no % 4])
        order = torch.randperm(len(specs), generator=rng).tolist()
        ids, done = {}, {}
        while order or engine.has_unfinished():
            for _ in range(int(torch.randint(0, 4, (), generator=rng))):
                if order:
                    i = order.pop(0)
                    ids[engine.add_request(*specs[i])] = i
            done.update((ids[c.id], c) for c in engine.step())
        runs.append([done[i] for i in range(len(specs))])
    return runs


def _serving_cell(runs: list[list], pairs: list) -> Cell:
    """The unique completions per prompt over the serves, and the log-probabilities of each serve
    against the first (alone) one where their tokens agree, plus `pairs` (more (ours, expected)
    log-probability pairs): pass when every prompt has one completion and every pair is equal."""
    unique = [len({tuple(run[i].tokens) for run in runs}) for i in range(len(runs[0]))]
    pairs = pairs + [(torch.tensor(a.logprobs), torch.tensor(b.logprobs)) for run in runs[1:]
                     for a, b in zip(runs[0], run) if a.tokens == b.tokens]
    same, worst = compare(pairs)
    diverged = sum(u > 1 for u in unique)
    detail = "1 per prompt" if not diverged else f"up to {max(unique)} per prompt ({diverged}/{len(unique)})"
    return Cell("pass" if same and not diverged else "fail", worst, detail,
                extra=dict(unique_completions=unique, prompts_with_several=diverged))


def _prompts(rng: torch.Generator, vocab: int, work: Workload) -> list[tuple[list, int]]:
    """work.requests (prompt, tokens wanted) pairs: prompts of 2 ... prefill_len tokens."""
    low, high = work.serve_new_tokens
    return [(_tokens(rng, vocab, int(torch.randint(2, work.prefill_len + 1, (), generator=rng))).tolist(),
             int(torch.randint(low, high + 1, (), generator=rng))) for _ in range(work.requests)]


def check_serving(make, work: Workload, seed: int) -> Cell:
    """Serve the same requests greedily (temperature 0) `serves` times with fusedtx.serving.Engine
    — first each alone, then under random schedules — and count the unique completions per
    prompt; every serve's log-probabilities must be the alone serve's bits."""
    model = make()
    rng = torch.Generator().manual_seed(seed)
    specs = [(prompt, SamplingParams(0.0, max_new_tokens=n)) for prompt, n in _prompts(rng, model.vocab_size, work)]
    return _serving_cell(_engine_serves(model, specs, work, rng), [])


def check_serving_sampled(make, work: Workload, seed: int) -> Cell:
    """Serve the same requests `serves` times with fusedtx.serving.Engine at temperature 0.8, each
    with its own seed (some with top-k / top-p) — first each alone, then with random arrival
    steps, batch sizes and prefill chunks (1, 7, 64 or whole prompts) — and count the unique
    completions per prompt; the log-probabilities must be the same bits in every serve and equal
    to a training forward's (model.logprobs) over the finished sequences: KL exactly 0."""
    model = make()
    rng = torch.Generator().manual_seed(seed)
    specs = []
    for i, (prompt, n) in enumerate(_prompts(rng, model.vocab_size, work)):
        top_k, top_p = [(None, None), (40, None), (None, 0.9), (40, 0.95)][i % 4]
        specs.append((prompt, SamplingParams(work.sample_temperature, top_k, top_p, n, seed=seed * 1000 + i)))
    runs = _engine_serves(model, specs, work, rng)
    trained = []
    for (prompt, params), c in zip(specs, runs[0]):  # the trainer's view of what the sampler drew
        seq = torch.tensor([prompt + c.tokens], device=_device(model))
        lp = model.logprobs(seq, temperature=params.temperature)[0, len(prompt) - 1:].cpu()
        trained.append((torch.tensor(c.logprobs), lp))
    return _serving_cell(runs, trained)
