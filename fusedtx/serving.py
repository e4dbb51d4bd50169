"""A small continuous-batching server: requests arrive over time, hold one slot each of a shared
KV cache, and are decoded together, greedily (temperature 0).

    requests = [Request(i, prompt, max_new_tokens, arrival=step) for i, (prompt, ...) in ...]
    serve(model, requests, slots=4, garbage=torch.Generator().manual_seed(0))
    requests[0].tokens, requests[0].logits      # its completion, and the logits of each token

At every step the requests that have arrived take free slots and are prefilled together (their
prompts right-padded with garbage tokens), then every running request decodes one token in one
batch, and those that have all their tokens leave, freeing their slot. So each request is
decoded among a set of others that changes from step to step.

What it guarantees: on a batch-invariant model (fusedtx.models.GPT or Llama, any backend) a request's
tokens and logits are those of model.generate([prompt], max_new_tokens) alone, bit for bit,
whatever the other requests, their arrival steps, the number of slots or the garbage padding:
every op gives a row the same bits whatever else is in the batch, padding sits to the right of
a prompt where causal attention never looks, and each slot keeps only its own tokens in the
cache. On a model whose arithmetic depends on the batch (plain PyTorch), the logits can differ
in the last bits from one schedule to another, and the tokens wherever the top two logits are
that close.

`model` is a fusedtx.models.CausalLM (GPT, Llama): serve uses its vocab_size,
new_kv_cache, hidden_states and lm_head.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch


@dataclass
class Request:
    """One request: its prompt and how many tokens it wants, the step at which it arrives, and
    (filled in by serve) the tokens generated and the logits each was chosen from."""
    id: int
    prompt: torch.Tensor           # (T,) int64
    max_new_tokens: int
    arrival: int = 0               # the decode step at which it arrives
    tokens: list = field(default_factory=list)
    logits: list = field(default_factory=list)


def _rows(cache, rows: torch.Tensor):
    """A KVCache holding copies of the given slots' rows of `cache` (one layer)."""
    sub = copy.copy(cache)
    sub.k, sub.v, sub.lengths = cache.k[rows], cache.v[rows], cache.lengths[rows]
    return sub


def _write_back(cache, sub, rows: torch.Tensor) -> None:
    cache.k[rows], cache.v[rows] = sub.k, sub.v
    lengths = cache.lengths.clone()
    lengths[rows] = sub.lengths
    cache.lengths = lengths


@torch.no_grad()
def _step(model, cache, rows: list[int], idx: torch.Tensor, lengths: list[int], fresh: bool = False) -> torch.Tensor:
    """Run tokens idx (len(rows), T) of the requests in these slots through the model against
    their cached keys (none if fresh: new requests); keep each slot's first lengths[i] new tokens
    in the cache (the rest is padding); return the logits after each slot's last kept token
    (len(rows), vocab)."""
    index = torch.tensor(rows)
    view = [_rows(layer, index) for layer in cache]   # only these slots: the batch is theirs alone
    if fresh:
        for sub in view:
            sub.truncate(torch.zeros_like(sub.lengths))
    before = view[0].lengths.clone()
    hidden = model.hidden_states(idx.to(model.lm_head.weight.device), view)
    for layer, sub in zip(cache, view):
        sub.truncate(before + torch.tensor(lengths))
        _write_back(layer, sub, index)
    last = (torch.tensor(lengths) - 1).to(hidden.device)
    return model.lm_head(hidden[torch.arange(len(rows), device=hidden.device), last])


def serve(model, requests: list[Request], slots: int, garbage: torch.Generator) -> list[Request]:
    """Serve `requests` with `slots` slots of KV cache, as the module docstring says: fills in
    each request's tokens and logits (one per generated token) and returns the requests.
    `garbage` draws the tokens that pad prompts prefilled together."""
    vocab, longest = model.vocab_size, max(len(r.prompt) + r.max_new_tokens for r in requests)
    cache = model.new_kv_cache(slots, longest)                  # one KVCache per layer, a row per slot
    waiting = sorted(requests, key=lambda r: r.arrival)         # stable: ties keep the shuffled order
    running: dict[int, Request] = {}                            # slot -> request
    step = 0
    while waiting or running:
        # arrivals take free slots and are prefilled together
        joining = []
        while waiting and waiting[0].arrival <= step and len(running) + len(joining) < slots:
            joining.append(waiting.pop(0))
        if joining:
            rows = [s for s in range(slots) if s not in running][:len(joining)]
            idx = torch.randint(0, vocab, (len(joining), max(len(r.prompt) for r in joining)), generator=garbage)
            for i, r in enumerate(joining):
                idx[i, :len(r.prompt)] = r.prompt
            logits = _step(model, cache, rows, idx, [len(r.prompt) for r in joining], fresh=True)
            for slot, r, row in zip(rows, joining, logits):
                running[slot] = r
                r.tokens.append(int(row.argmax()))
                r.logits.append(row)
        # everyone still short of tokens decodes one, together
        rows = [s for s, r in sorted(running.items()) if len(r.tokens) < r.max_new_tokens]
        if rows:
            idx = torch.tensor([[running[s].tokens[-1]] for s in rows])
            logits = _step(model, cache, rows, idx, [1] * len(rows))
            for slot, row in zip(rows, logits):
                running[slot].tokens.append(int(row.argmax()))
                running[slot].logits.append(row)
        for slot in [s for s, r in running.items() if len(r.tokens) >= r.max_new_tokens]:
            del running[slot]                                   # finished: leaves the batch
        step += 1
    return requests
