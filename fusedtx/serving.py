"""Continuous batching over any fusedtx model, with every request's bits its own.

    engine = Engine(model, max_batch=8, max_len=512, prefill_chunk=64)
    rid = engine.add_request(prompt, SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=64, seed=7))
    while engine.has_unfinished():
        for done in engine.step():           # Completion(id, tokens, logprobs, finish_reason)
            ...
    engine.generate(prompts, params)          # the simple case: every completion, in order

Requests join and leave at any step. Each holds one slot of a shared KV cache; a new request's
slot is emptied first (its length set to 0: what the previous holder left is never read, the
attention reads nothing beyond a slot's length). A step prefills the waiting prompts in chunks
of at most `prefill_chunk` tokens under a budget of `max_tokens_per_step` prompt tokens, and
decodes one token for every request whose prompt is in. Tokens are drawn by
fusedtx.sampling.sample from (the request's logits, its seed, the index of the token), and
log-probabilities are fusedtx.log_softmax's: on a batch-invariant model a request's tokens and
log-probabilities are the same bits whatever else is served with it, however its prompt was
chunked and whenever it arrived — and equal to model.logprobs() of the finished sequence.
A request that cannot be served is refused by add_request with a ValueError, before anything
is touched; one that is accepted always finishes.

Why: on a batch-invariant model (fusedtx.models.GPT or Llama, any backend) every op gives a row
the same bits whatever else is in the batch, and each slot keeps only its own tokens in the
cache. On a
model whose arithmetic depends on the batch (plain PyTorch) the log-probabilities can differ in
the last bits from one schedule to another, and the tokens wherever the top two are that close.

`model` is a fusedtx.models.CausalLM (GPT, Llama): the engine uses its vocab_size,
new_kv_cache, hidden_states and lm_head.
"""
from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass, field

import torch

from . import sampling


def _slots(rows: list[int]):
    """How to index the cache for these slots: a slice when they are consecutive (a view then
    serves them, and appends land in the cache itself), else an index tensor (copies)."""
    first = rows[0]
    return slice(first, first + len(rows)) if rows == list(range(first, first + len(rows))) else torch.tensor(rows)


def _rows(cache, index):
    """A KVCache of the slots `index` (from _slots) of `cache` (one layer)."""
    sub = copy.copy(cache)
    sub.k, sub.v, sub.lengths = cache.k[index], cache.v[index], cache.lengths[index].clone()
    return sub


def _write_back(cache, sub, index) -> None:
    if not isinstance(index, slice):  # copies: put them back (a view wrote in place)
        cache.k[index], cache.v[index] = sub.k, sub.v
    lengths = cache.lengths.clone()
    lengths[index] = sub.lengths
    cache.lengths = lengths


@torch.no_grad()
def _step(model, cache, rows: list[int], idx: torch.Tensor, lengths: list[int], fresh: bool = False) -> torch.Tensor:
    """Run tokens idx (len(rows), T) of the requests in these slots through the model against
    their cached keys (none if fresh: new requests); keep each slot's first lengths[i] new tokens
    in the cache (the rest is padding); return the logits after each slot's last kept token
    (len(rows), vocab). Slots that are not consecutive run with the slots between as fillers
    (_widen) where they can, on views of the cache; else on copies of their rows."""
    index, picks = _slots(rows), None
    if not fresh and not isinstance(index, slice):
        widened = _widen(cache, rows, idx, lengths)
        if widened is not None:
            rows, idx, lengths, picks = widened
            index = _slots(rows)
    view = [_rows(layer, index) for layer in cache]   # these slots (and fillers) alone make the batch
    if fresh:
        for sub in view:
            sub.truncate(torch.zeros_like(sub.lengths))
    before = view[0].lengths.clone()
    hidden = model.hidden_states(idx.to(model.lm_head.weight.device), view)
    for layer, sub in zip(cache, view):
        sub.truncate(before + torch.tensor(lengths))
        _write_back(layer, sub, index)
    chosen = torch.tensor(list(range(len(rows))) if picks is None else picks)  # the requests' rows, not fillers
    last = torch.tensor(lengths)[chosen] - 1
    return model.lm_head(hidden[chosen.to(hidden.device), last.to(hidden.device)])


def _widen(cache, rows: list[int], idx: torch.Tensor, lengths: list[int]):
    """rows (ascending, not consecutive) widened to every slot from the first to the last, so that
    the step runs on a view of the cache rather than on copies of its rows. The slots between run
    as fillers: token 0, nothing kept (length 0 new tokens, so the cache's lengths come back to
    theirs); what they append lies beyond their lengths, where nothing is read and the next append
    writes. On a batch-invariant model the fillers change no other row's bits. None when a filler
    could not take the step's tokens (its length near max_len): the copies then serve.
    Returns (rows, idx, lengths, picks): picks[i] is the position of the i-th original row."""
    first, last = rows[0], rows[-1]
    tokens = idx.shape[1]
    if int(cache[0].lengths[first:last + 1].max()) + tokens > cache[0].max_len:
        return None
    picks = [r - first for r in rows]
    wide_idx = torch.zeros(last - first + 1, tokens, dtype=idx.dtype)
    wide_idx[picks] = idx
    wide_lengths = [0] * (last - first + 1)
    for pick, n in zip(picks, lengths):
        wide_lengths[pick] = n
    return list(range(first, last + 1)), wide_idx, wide_lengths, picks


# ---------------------------------------------------------------------------------------------
# Engine: continuous batching with seeded, batch-invariant sampling
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    """How one request is completed. temperature 0 is greedy (the lowest index on ties); top_k /
    top_p restrict the draw (fusedtx.sampling); generation stops after max_new_tokens tokens or
    at the first token in stop_token_ids (which is kept). seed: the request's random numbers
    (None: derived from the engine's seed and the request's id, which is then what they depend on)."""
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None


@dataclass
class Completion:
    """A finished request: its id, the generated tokens, the log-probability of each (log_softmax
    of logits / temperature, the plain logits at temperature 0, before top-k / top-p) and why it
    stopped: "stop" (a stop token), "length" (max_new_tokens) or "error" (its logits could not
    be sampled, e.g. NaN: `error` says why; the other requests go on)."""
    id: int
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    error: str | None = None


@dataclass
class _Active:
    id: int
    prompt: torch.Tensor
    params: SamplingParams
    seed: int
    slot: int = -1
    prefilled: int = 0                         # prompt tokens in the cache
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    logits: torch.Tensor | None = None         # the logits the next token is drawn from


class Engine:
    """See the module docstring. model: a fusedtx.models.CausalLM (GPT, Llama, or their Plain
    twins); max_batch: KV-cache slots (requests served at once); max_len: the longest prompt +
    completion a slot holds; prefill_chunk: the most prompt tokens of one request per step (None:
    whole prompts); max_tokens_per_step: the prompt tokens all requests may prefill in one step
    (None: no limit); seed: the base of the seeds of requests that bring none."""

    def __init__(self, model, *, max_batch: int, max_len: int, prefill_chunk: int | None = None,
                 max_tokens_per_step: int | None = None, seed: int = 0):
        for name, value, least in (("max_batch", max_batch, 1), ("max_len", max_len, 2),
                                   ("prefill_chunk", prefill_chunk, 1), ("max_tokens_per_step", max_tokens_per_step, 1)):
            if value is None and name in ("prefill_chunk", "max_tokens_per_step"):
                continue
            if not sampling._is_int(value) or value < least:
                raise ValueError(f"Engine: {name} must be an int >= {least}, got {value!r}")
        if max_len > model.max_positions:
            raise ValueError(f"Engine: max_len ({max_len}) exceeds the model's {model.max_positions} positions")
        if not sampling._is_int(seed) or not 0 <= seed < sampling.SEED_LIMIT:
            raise ValueError(f"Engine: seed must be an int in [0, 2**63), got {seed!r}")
        self.model, self.max_batch, self.max_len = model, max_batch, max_len
        self.prefill_chunk, self.max_tokens_per_step, self.seed = prefill_chunk, max_tokens_per_step, seed
        self.cache = model.new_kv_cache(max_batch, max_len)
        self.waiting: deque[_Active] = deque()
        self.running: dict[int, _Active] = {}      # slot -> request
        self._next_id = 0

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None) -> int:
        """Queue a request; its id. ValueError naming what is wrong (nothing queued) when it
        cannot be served: an empty prompt, token ids outside the vocabulary, prompt +
        max_new_tokens beyond max_len, bad sampling parameters."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"add_request: params must be a SamplingParams, got {type(params).__name__}")
        prompt = self._check_prompt(prompt)
        self._check_params(params, len(prompt))
        rid = self._next_id
        seed = params.seed if params.seed is not None else sampling.derive_seeds(self.seed, rid + 1)[rid]
        self.waiting.append(_Active(rid, prompt, params, seed))
        self._next_id += 1
        return rid

    def _check_prompt(self, prompt) -> torch.Tensor:
        vocab = self.model.vocab_size
        try:
            t = torch.as_tensor(prompt)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"add_request: prompt must be a sequence of token ids, got {type(prompt).__name__}") from exc
        if t.dim() != 1 or t.numel() == 0 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"add_request: prompt must be a non-empty 1-D sequence of int token ids, got {t.dtype} "
                             f"of shape {list(t.shape)}")
        bad = (t < 0) | (t >= vocab)
        if bool(bad.any()):
            raise ValueError(f"add_request: prompt token {int(t[bad][0])} at position {int(bad.nonzero()[0])} is "
                             f"outside the vocabulary [0, {vocab})")
        return t.to(torch.int64).cpu()

    def _check_params(self, params: SamplingParams, prompt_len: int) -> None:
        sampling.check_parameters("add_request", params.temperature, params.top_k, params.top_p)
        n = params.max_new_tokens
        if not sampling._is_int(n) or n < 1:
            raise ValueError(f"add_request: max_new_tokens must be an int >= 1, got {n!r}")
        if prompt_len + n > self.max_len:
            raise ValueError(f"add_request: prompt ({prompt_len} tokens) + max_new_tokens ({n}) exceeds the engine's "
                             f"max_len {self.max_len}")
        stops = params.stop_token_ids
        if not isinstance(stops, (tuple, list)) or not all(sampling._is_int(s) and 0 <= s < self.model.vocab_size
                                                           for s in stops):
            raise ValueError(f"add_request: stop_token_ids must be a tuple of token ids in [0, "
                             f"{self.model.vocab_size}), got {stops!r}")
        if params.seed is not None and (not sampling._is_int(params.seed) or not 0 <= params.seed < sampling.SEED_LIMIT):
            raise ValueError(f"add_request: seed must be None or an int in [0, 2**63), got {params.seed!r}")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Completion]:
        """One step: waiting requests take free slots; every request with logits pending draws its
        next token (those that finish leave, freeing their slot); the others decode one token
        together, and prompts not yet in are prefilled by a chunk each. Returns the requests
        that finished in this step."""
        free = [s for s in range(self.max_batch) if s not in self.running]
        while self.waiting and free:
            r = self.waiting.popleft()
            r.slot = free.pop(0)
            for layer in self.cache:                      # the previous holder's keys are never read
                lengths = layer.lengths.clone()
                lengths[r.slot] = 0
                layer.lengths = lengths
            self.running[r.slot] = r
        done, decoding = [], []
        for r in self._by_slot():
            if r.logits is None:
                continue
            try:
                finished = self._sample(r)
            except ValueError as exc:  # this request's logits have no distribution: it alone ends
                del self.running[r.slot]
                done.append(Completion(r.id, r.tokens, r.logprobs, "error", str(exc)))
                continue
            if finished:
                del self.running[r.slot]
                reason = "stop" if r.tokens[-1] in r.params.stop_token_ids else "length"
                done.append(Completion(r.id, r.tokens, r.logprobs, reason))
            else:
                decoding.append(r)
        if decoding:
            idx = torch.tensor([[r.tokens[-1]] for r in decoding])
            logits = _step(self.model, self.cache, [r.slot for r in decoding], idx, [1] * len(decoding))
            for r, row in zip(decoding, logits):
                r.logits = row
        self._prefill([r for r in self._by_slot() if r.prefilled < len(r.prompt)])
        return done

    def _by_slot(self) -> list[_Active]:
        return [self.running[s] for s in sorted(self.running)]

    def _prefill(self, prefilling: list[_Active]) -> None:
        """The next chunk of each prompt not yet in, within the step's token budget; requests whose
        chunks have one length run together. A prompt's last chunk leaves the logits of its
        first generated token."""
        budget = math.inf if self.max_tokens_per_step is None else self.max_tokens_per_step
        chunks: dict[int, list[_Active]] = {}
        for r in prefilling:
            n = min(len(r.prompt) - r.prefilled, self.prefill_chunk or math.inf, budget)
            if n <= 0:
                break
            chunks.setdefault(int(n), []).append(r)
            budget -= n
        for n, group in sorted(chunks.items()):
            idx = torch.stack([r.prompt[r.prefilled:r.prefilled + n] for r in group])
            logits = _step(self.model, self.cache, [r.slot for r in group], idx, [n] * len(group))
            for r, row in zip(group, logits):
                r.prefilled += n
                if r.prefilled == len(r.prompt):
                    r.logits = row

    def _sample(self, r: _Active) -> bool:
        """Draw r's next token from its logits; True when r is finished."""
        p = r.params
        step = torch.tensor([len(r.tokens)])
        token, logprob = sampling.sample(r.logits[None], torch.tensor([r.seed]), step, p.temperature, p.top_k, p.top_p,
                                         backend=self.model._sampling_backend())
        r.tokens.append(int(token[0]))
        r.logprobs.append(float(logprob[0]))
        r.logits = None
        return r.tokens[-1] in p.stop_token_ids or len(r.tokens) >= p.max_new_tokens

    # -- the simple case --------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Serve these prompts (one SamplingParams for all, or one each) to completion, in order.
        Every request is checked before any is queued."""
        prompts = list(prompts)
        each = params if isinstance(params, list) else [params] * len(prompts)
        if len(each) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(each)} SamplingParams")
        for prompt, p in zip(prompts, each):
            p = SamplingParams() if p is None else p
            self._check_params(p, len(self._check_prompt(prompt)))
        ids = [self.add_request(prompt, p) for prompt, p in zip(prompts, each)]
        out: dict[int, Completion] = {}
        while self.has_unfinished():
            out.update((c.id, c) for c in self.step())
        return [out[i] for i in ids]
