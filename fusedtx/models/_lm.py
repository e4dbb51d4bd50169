"""What every fusedtx language model shares: the batch-invariant forward with a KV cache, the
training-side log-probabilities, generation and sampling, and reading local HF checkpoints.

A model subclasses CausalLM and says how it embeds tokens at positions, which blocks it runs and
how, its final norm and its head (`lm_head`); everything here then holds for it as for every
other: a sequence's logits never depend on the batch, a KV-cache step gives the bits of a full
forward, and generate()'s log-probabilities equal logprobs() of the finished sequences.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as torch_F

from .. import nn as fnn
from .. import sampling


class Generation(NamedTuple):
    tokens: torch.Tensor            # (B, max_new_tokens) int64
    logprobs: torch.Tensor          # (B, max_new_tokens) float32: log p(token) under the sampled distribution
    logits: torch.Tensor | None     # (B, max_new_tokens, vocab) the logits each token was drawn from, if asked


class CausalLM(torch.nn.Module):
    """A decoder-only language model over fusedtx layers. Subclasses provide `max_positions`,
    `vocab_size`, `lm_head` and the four hooks below."""

    max_positions: int
    vocab_size: int

    # ------------------------------------------------------------------ what a model provides

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The residual stream (B, T, C) entering the first block, tokens idx at `positions` (B or 1, T)."""
        raise NotImplementedError

    def _blocks(self) -> Sequence[torch.nn.Module]:
        raise NotImplementedError

    def _block(self, block: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor,
               kv_cache: fnn.KVCache | None) -> torch.Tensor:
        """One block; with kv_cache it appends this step's keys and values."""
        raise NotImplementedError

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _new_layer_cache(self, block: torch.nn.Module, batch: int, max_len: int) -> fnn.KVCache:
        raise NotImplementedError

    # ------------------------------------------------------------------ forward passes

    def hidden_states(self, idx: torch.Tensor, kv_cache: list[fnn.KVCache] | None = None) -> torch.Tensor:
        """The final norm's output (B, T, C) for tokens idx (B, T). Without a cache the tokens are
        at positions 0 .. T-1; with one (from new_kv_cache), sequence b's tokens follow its own
        cached length, and their keys and values are appended to the cache."""
        name = type(self).__name__
        if idx.dim() != 2 or idx.dtype != torch.int64:
            raise ValueError(f"{name}: idx must be a (batch, time) int64 tensor, got {idx.dtype} of shape {list(idx.shape)}")
        blocks = self._blocks()
        tokens = idx.shape[1]
        if kv_cache is None:
            positions = torch.arange(tokens, device=idx.device)[None, :]
            last = tokens - 1  # from the shape: torch.compile(fullgraph=True) traces it
        else:
            if len(kv_cache) != len(blocks):
                raise ValueError(f"{name}: kv_cache must hold one KVCache per layer ({len(blocks)}), got {len(kv_cache)}")
            positions = (kv_cache[0].lengths[:, None] + torch.arange(tokens)).to(idx.device)
            last = int(positions.max()) if positions.numel() else -1
        if last >= self.max_positions:
            raise ValueError(f"{name}: position {last} is beyond the model's {self.max_positions} positions "
                             f"({self._max_positions_name})")
        x = self._embed(idx, positions)
        if kv_cache is None:
            for block in blocks:
                x = self._block(block, x, positions, None)
            return self._final_norm(x)
        # A call that raises leaves the cache as it was: the layers before the failing one have
        # appended this step's keys, and get their lengths back (what lies beyond is never read).
        before = [cache.lengths for cache in kv_cache]
        try:
            for block, cache in zip(blocks, kv_cache):
                x = self._block(block, x, positions, cache)
        except BaseException:
            for cache, lengths in zip(kv_cache, before):
                cache.lengths = lengths
            raise
        return self._final_norm(x)

    _max_positions_name = "max_positions"

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                kv_cache: list[fnn.KVCache] | None = None):
        """logits (B, T, vocab), or (logits, mean cross-entropy loss) when targets (B, T) are given
        (targets == -1 are ignored)."""
        logits = self.lm_head(self.hidden_states(idx, kv_cache))
        if targets is None:
            return logits
        loss = torch_F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def logprobs(self, idx: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        """log p(idx[:, t] | idx[:, :t]) for t = 1 .. T-1, shape (B, T-1), float32: the
        training-side view of what generate() reports for the tokens it drew."""
        sampling.check_parameters(f"{type(self).__name__}.logprobs", temperature, None, None)
        logits = self(idx)[:, :-1]
        return sampling.token_logprobs(logits, idx[:, 1:], temperature, self._sampling_backend())

    def new_kv_cache(self, batch: int, max_len: int | None = None) -> list[fnn.KVCache]:
        """One empty KVCache per layer for `batch` sequences of up to max_len (default: every position) tokens."""
        max_len = self.max_positions if max_len is None else max_len
        return [self._new_layer_cache(block, batch, max_len) for block in self._blocks()]

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
                 return_logits: bool = False) -> Generation:
        """Continue each prompt by max_new_tokens tokens with a KV cache.

        prompts: a list of token lists / 1-D tensors of any lengths (or a (B, T) tensor). Each
        sequence keeps its own positions: prompts are right-padded for one prefill pass, and the
        cache then forgets the padding. temperature 0 is greedy (argmax, lowest index on ties);
        otherwise tokens are drawn from softmax(logits / temperature), optionally restricted to
        the top_k tokens and to the smallest set whose probability reaches top_p (ties in both
        go to the lowest token id; fusedtx.sampling says exactly how).

        Where the random numbers come from:
        - seed (batch invariant): an int base seed, sequence i then drawing with
          fusedtx.sampling.derive_seeds(seed, len(prompts))[i] (so a sequence's seed depends on
          its index in `prompts`), or a sequence of ints, one per prompt, each in [0, 2**63).
          Sequence i's t-th new token (t = 0 for the first) is fusedtx.sampling.sample() with
          (its seed, t): a function of its own logits, seed and t alone — the same tokens
          whatever else is in the batch, where it sits, the thread count or the run.
        - generator (batch DEPENDENT): one torch.Generator drawn by the whole batch, row by row
          (torch.multinomial): seeded, the same batch gives the same tokens every run, but a
          sequence's tokens change with the rows before it.
        - neither: torch's global generator, as with generator (batch dependent, and seeded only
          by torch.manual_seed).
        seed and generator together are an error.

        The returned log-probabilities are those of softmax(logits / temperature) before the
        top-k / top-p restriction (of the logits for temperature 0) — equal, bit for bit, to
        logprobs(sequence, temperature=...) of a forward pass over the finished sequences in any
        batch."""
        sampling.check_parameters("generate", temperature, top_k, top_p)
        if not fnn._is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if seed is not None and generator is not None:
            raise ValueError("generate: pass seed= (per sequence, batch invariant) or generator= (one stream for "
                             "the batch, batch dependent), not both")
        device = self.lm_head.weight.device
        prompts = self._check_prompts(prompts)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
        if int(lengths.max()) + max_new_tokens > self.max_positions:
            raise ValueError(f"generate: prompt ({int(lengths.max())}) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the model's {self.max_positions} positions ({self._max_positions_name})")
        batch = len(prompts)
        seeds = None if seed is None else sampling.sequence_seeds(seed, batch).to(device)
        padded = torch.zeros(batch, int(lengths.max()), dtype=torch.int64)
        for b, p in enumerate(prompts):
            padded[b, :len(p)] = p
        cache = self.new_kv_cache(batch, int(lengths.max()) + max_new_tokens)
        hidden = self.hidden_states(padded.to(device), cache)
        for layer_cache in cache:
            layer_cache.truncate(lengths)
        hidden = hidden[torch.arange(batch, device=device), (lengths - 1).to(device)][:, None]  # (B, 1, C)
        tokens, logprobs, all_logits = [], [], []
        for step in range(max_new_tokens):
            logits = self.lm_head(hidden)[:, 0]
            if seeds is None:
                token, logprob = sampling.sample_shared(logits, temperature, top_k, top_p, generator,
                                                        backend=self._sampling_backend())
            else:
                steps = torch.full((batch,), step, dtype=torch.int64, device=device)
                token, logprob = sampling.sample(logits, seeds, steps, temperature, top_k, top_p,
                                                 backend=self._sampling_backend())
            tokens.append(token)
            logprobs.append(logprob)
            if return_logits:
                all_logits.append(logits)
            if step + 1 < max_new_tokens:
                hidden = self.hidden_states(token[:, None], cache)
        empty = torch.empty(batch, 0)
        return Generation(torch.stack(tokens, 1) if tokens else empty.long(),
                          torch.stack(logprobs, 1) if logprobs else empty,
                          (torch.stack(all_logits, 1) if all_logits else empty) if return_logits else None)

    def _sampling_backend(self) -> str | None:
        """The fusedtx backend the sampler's softmax runs on: the model's (None: the default)."""
        return getattr(self, "backend", None)

    def _check_prompts(self, prompts) -> list[torch.Tensor]:
        """generate's prompts as 1-D int64 CPU tensors: one per prompt, each at least one token id
        in [0, vocab_size)."""
        if isinstance(prompts, torch.Tensor) and prompts.dim() != 2:
            raise ValueError(f"generate: a tensor of prompts must be (batch, tokens), got shape {list(prompts.shape)} "
                             "(one prompt: prompts[None] or [prompt])")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("generate: need at least one prompt")
        checked = []
        for b, prompt in enumerate(prompts):
            if isinstance(prompt, int) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 0):
                raise ValueError(f"generate: prompts[{b}] is a single token id; pass a list of prompts, each a "
                                 "sequence of token ids ([prompt] for one)")
            t = torch.as_tensor(prompt).cpu()
            if t.dim() != 1 or t.numel() == 0:
                raise ValueError(f"generate: prompts[{b}] must be a 1-D sequence of at least one token id, "
                                 f"got shape {list(t.shape)}")
            if not fnn._is_integer_dtype(t.dtype):
                raise TypeError(f"generate: prompts[{b}] must hold integer token ids, got {t.dtype}")
            t = t.to(torch.int64)
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"generate: prompts[{b}] holds token ids in [{lo}, {hi}], outside "
                                 f"[0, vocab_size = {self.vocab_size})")
            checked.append(t)
        return checked


# ---------------------------------------------------------------------------------------------
# local HF checkpoints
# ---------------------------------------------------------------------------------------------
def read_hf_checkpoint(path: str | os.PathLike, who: str) -> tuple[dict, dict]:
    """(config.json as a dict, the state_dict) of a local HuggingFace-format directory: weights in
    model.safetensors, sharded safetensors (model.safetensors.index.json), pytorch_model.bin or
    its sharded index. Reads files only; never touches the network."""
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{who}: no config.json in {path!r}")
    with open(config_file) as f:
        config = json.load(f)
    candidates = [("model.safetensors", False, True), ("model.safetensors.index.json", True, True),
                  ("pytorch_model.bin", False, False), ("pytorch_model.bin.index.json", True, False)]
    for name, sharded, safe in candidates:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        if sharded:
            with open(file) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(path, shard) for shard in shards]
            for shard in files:
                if not os.path.isfile(shard):
                    raise FileNotFoundError(f"{who}: {name} names the shard {os.path.basename(shard)!r}, "
                                            f"which is not in {path!r}")
        else:
            files = [file]
        state = {}
        for shard in files:
            state.update(_load_weights(shard, safe, who))
        return config, state
    raise FileNotFoundError(f"{who}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
                            f"or pytorch_model.bin.index.json in {path!r}")


def _load_weights(file: str, safe: bool, who: str) -> dict:
    if not safe:
        return torch.load(file, map_location="cpu", weights_only=True)
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ImportError(f"{who}: reading {os.path.basename(file)} needs the `safetensors` package "
                          "(pip install safetensors)") from exc
    return load_file(file)


def hf_state_and_config(model_or_state_dict, config, config_from_hf, who: str) -> tuple:
    """(config, state_dict) of what from_hf was given: a transformers model (its config read with
    config_from_hf unless `config` is given) or a bare state_dict, which needs `config`."""
    if isinstance(model_or_state_dict, torch.nn.Module):
        return config or config_from_hf(model_or_state_dict.config), model_or_state_dict.state_dict()
    if config is None:
        raise ValueError(f"{who}: a bare state_dict needs config= (the heads cannot be read from shapes)")
    return config, dict(model_or_state_dict)


def check_state_dict(state: dict, own_state: dict, who: str) -> None:
    """The checkpoint's names and shapes are the model's, or a ValueError saying which are not."""
    missing, unexpected = sorted(set(own_state) - set(state)), sorted(set(state) - set(own_state))
    if missing or unexpected:
        raise ValueError(f"{who}: state_dict does not fit the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != own_state[name].shape:
            raise ValueError(f"{who}: {name} has shape {list(tensor.shape)}, the config expects "
                             f"{list(own_state[name].shape)}")
