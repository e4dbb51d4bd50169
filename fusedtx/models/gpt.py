"""A GPT-2 style language model built from fusedtx layers, whose logits never depend on the batch.

    from fusedtx.models import GPT, GPTConfig
    model = GPT(GPTConfig.preset("gpt2"))                  # or GPT.from_pretrained("path/to/gpt2")
    logits, loss = model(idx, targets)                     # training
    out = model.generate([prompt_a, prompt_b], 32)         # KV-cache generation, ragged prompts
    out.tokens, out.logprobs                               # == model.logprobs(...) bit for bit

Every layer with a reduction is a fusedtx.nn layer (LayerNorm, Linear, GeluFFN,
CausalSelfAttention); the embeddings are gathers and the log-softmax reduces each row on its
own. So a sequence's logits are the same bits alone or in any batch, at any position in it, with
any right padding, and the same bits whether a token is computed in a full forward, a chunked
prefill or a decode step against the KV cache.

Parameter names follow HuggingFace's GPT2LMHeadModel (transformer.wte, transformer.h.0.attn.c_attn,
..., lm_head), so its state_dict loads after transposing its Conv1D weights (from_hf).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as torch_F

from .. import nn as fnn
from ..config import _check_split_size


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024          # longest sequence (number of learned positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True               # biases in Linear layers (GPT-2: True)
    gelu_approximate: str = "tanh"  # "tanh" (GPT-2's gelu_new) or "none" (erf)
    layer_norm_eps: float = 1e-5
    split_size: int | None = None   # attention split size S; None: fusedtx.get_split_size()

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not fnn._is_int(value) or value < 1:
                raise ValueError(f"GPTConfig: {name} must be an int >= 1, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"GPTConfig: layer_norm_eps must be a finite number >= 0, got {eps!r}")
        if self.split_size is not None:
            _check_split_size(self.split_size, "GPTConfig: split_size")

    @staticmethod
    def preset(name: str, **overrides) -> "GPTConfig":
        """GPT-2's sizes ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") or a small one for
        tests and demos ("tiny", "small"); keyword arguments override fields."""
        if name not in PRESETS:
            raise ValueError(f"GPTConfig.preset: name must be one of {sorted(PRESETS)}, got {name!r}")
        return replace(PRESETS[name], **overrides)

    @staticmethod
    def from_hf(hf_config) -> "GPTConfig":
        """From a transformers GPT2Config or its config.json as a dict."""
        get = hf_config.get if isinstance(hf_config, dict) else (lambda key, default=None: getattr(hf_config, key, default))
        activation = get("activation_function", "gelu_new")
        if activation not in HF_GELUS:
            raise ValueError(f"GPTConfig.from_hf: activation_function must be one of {sorted(HF_GELUS)}, "
                             f"got {activation!r}")
        return GPTConfig(block_size=get("n_positions", 1024), vocab_size=get("vocab_size", 50257),
                         n_layer=get("n_layer", 12), n_head=get("n_head", 12), n_embd=get("n_embd", 768),
                         gelu_approximate=HF_GELUS[activation], layer_norm_eps=get("layer_norm_epsilon", 1e-5))


PRESETS = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),           # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),   # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),    # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),       # 1558M
    "small": GPTConfig(block_size=256, vocab_size=512, n_layer=4, n_head=4, n_embd=128, split_size=32),
    "tiny": GPTConfig(block_size=128, vocab_size=256, n_layer=2, n_head=2, n_embd=32, split_size=16),
}
HF_GELUS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}
# HF GPT-2 Conv1D layers store their weight as (in, out); fusedtx.nn.Linear as (out, in).
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class Generation(NamedTuple):
    tokens: torch.Tensor            # (B, max_new_tokens) int64
    logprobs: torch.Tensor          # (B, max_new_tokens) float32: log p(token) under the sampled distribution
    logits: torch.Tensor | None     # (B, max_new_tokens, vocab) the logits each token was drawn from, if asked


class Block(torch.nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, layers, backend: str | None):
        super().__init__()
        self.ln_1 = layers.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias, backend=backend)
        self.attn = layers.CausalSelfAttention(config.n_embd, config.n_head, config.bias,
                                               split_size=config.split_size, backend=backend)
        self.ln_2 = layers.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias, backend=backend)
        self.mlp = layers.GeluFFN(config.n_embd, bias=config.bias, approximate=config.gelu_approximate,
                                  backend=backend)

    def forward(self, x: torch.Tensor, kv_cache: fnn.KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(torch.nn.Module):
    """GPT-2: token + position embeddings, n_layer Blocks, a final LayerNorm and a language-model
    head tied to the token embedding. backend: the fusedtx backend of every layer (None: the
    library's default for the device)."""

    layers = fnn  # where the blocks' layer classes come from (models.plain swaps in torch.nn ones)

    def __init__(self, config: GPTConfig, *, backend: str | None = None):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"GPT: n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        self.config, self.backend = config, backend
        self.transformer = torch.nn.ModuleDict(dict(
            wte=torch.nn.Embedding(config.vocab_size, config.n_embd),
            wpe=torch.nn.Embedding(config.block_size, config.n_embd),
            h=torch.nn.ModuleList(Block(config, self.layers, backend) for _ in range(config.n_layer)),
            ln_f=self.layers.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias, backend=backend),
        ))
        self.lm_head = self.layers.Linear(config.n_embd, config.vocab_size, bias=False, backend=backend)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: torch.nn.Module) -> None:
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if exclude_embeddings else n

    # ------------------------------------------------------------------ forward passes

    def hidden_states(self, idx: torch.Tensor, kv_cache: list[fnn.KVCache] | None = None) -> torch.Tensor:
        """The final LayerNorm's output (B, T, n_embd) for tokens idx (B, T). Without a cache the
        tokens are at positions 0 .. T-1; with one (from new_kv_cache), sequence b's tokens follow
        its own cached length, and their keys and values are appended to the cache."""
        if idx.dim() != 2 or idx.dtype != torch.int64:
            raise ValueError(f"GPT: idx must be a (batch, time) int64 tensor, got {idx.dtype} of shape {list(idx.shape)}")
        batch, tokens = idx.shape
        if kv_cache is None:
            positions = torch.arange(tokens, device=idx.device)[None, :]
            last = tokens - 1  # from the shape: torch.compile(fullgraph=True) traces it
        else:
            if len(kv_cache) != self.config.n_layer:
                raise ValueError(f"GPT: kv_cache must hold one KVCache per layer ({self.config.n_layer}), "
                                 f"got {len(kv_cache)}")
            positions = (kv_cache[0].lengths[:, None] + torch.arange(tokens)).to(idx.device)
            last = int(positions.max()) if positions.numel() else -1
        if last >= self.config.block_size:
            raise ValueError(f"GPT: position {last} is beyond block_size {self.config.block_size}")
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        if kv_cache is None:
            for block in self.transformer.h:
                x = block(x)
            return self.transformer.ln_f(x)
        # A call that raises leaves the cache as it was: the layers before the failing one have
        # appended this step's keys, and get their lengths back (what lies beyond is never read).
        before = [cache.lengths for cache in kv_cache]
        try:
            for block, cache in zip(self.transformer.h, kv_cache):
                x = block(x, cache)
        except BaseException:
            for cache, lengths in zip(kv_cache, before):
                cache.lengths = lengths
            raise
        return self.transformer.ln_f(x)

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
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"GPT.logprobs: temperature must be a finite number >= 0, got {temperature!r}")
        logits = self(idx)[:, :-1]
        return _token_logprobs(logits, idx[:, 1:], temperature)

    def new_kv_cache(self, batch: int, max_len: int | None = None) -> list[fnn.KVCache]:
        """One empty KVCache per layer for `batch` sequences of up to max_len (default block_size) tokens."""
        max_len = self.config.block_size if max_len is None else max_len
        return [block.attn.new_kv_cache(batch, max_len) for block in self.transformer.h]

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, return_logits: bool = False) -> Generation:
        """Continue each prompt by max_new_tokens tokens with a KV cache.

        prompts: a list of token lists / 1-D tensors of any lengths (or a (B, T) tensor). Each
        sequence keeps its own positions: prompts are right-padded for one prefill pass, and the
        cache then forgets the padding. temperature 0 is greedy (argmax, lowest index on ties);
        otherwise tokens are drawn from softmax(logits / temperature), optionally restricted to
        the top_k tokens and to the smallest set whose probability reaches top_p, with
        `generator` (seeded: the same tokens every run). The returned log-probabilities are those
        of softmax(logits / temperature) before the top-k / top-p restriction (of the logits for
        temperature 0) — equal, bit for bit, to logprobs(sequence, temperature=...) of a forward
        pass over the finished sequences in any batch."""
        if not _is_real(temperature) or not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"generate: temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (not fnn._is_int(top_k) or top_k < 1):
            raise ValueError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and (not _is_real(top_p) or not 0.0 < top_p <= 1.0):
            raise ValueError(f"generate: top_p must be None or a number in (0, 1], got {top_p!r}")
        if not fnn._is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        device = self.transformer.wte.weight.device
        prompts = self._check_prompts(prompts)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
        if int(lengths.max()) + max_new_tokens > self.config.block_size:
            raise ValueError(f"generate: prompt ({int(lengths.max())}) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds block_size {self.config.block_size}")
        batch = len(prompts)
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
            token, logprob = _sample(logits, temperature, top_k, top_p, generator)
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
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"generate: prompts[{b}] holds token ids in [{lo}, {hi}], outside "
                                 f"[0, vocab_size = {self.config.vocab_size})")
            checked.append(t)
        return checked

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_hf(cls, model_or_state_dict, config: GPTConfig | None = None, *, backend: str | None = None) -> "GPT":
        """A GPT holding the weights of a transformers GPT2LMHeadModel (or its state_dict, then
        with `config` or a config inferred from the shapes, which needs n_head from `config`)."""
        if isinstance(model_or_state_dict, torch.nn.Module):
            config = config or GPTConfig.from_hf(model_or_state_dict.config)
            state = model_or_state_dict.state_dict()
        else:
            state = dict(model_or_state_dict)
            if config is None:
                raise ValueError("GPT.from_hf: a bare state_dict needs config= (n_head cannot be read from shapes)")
        model = cls(config, backend=backend)
        model.load_state_dict(_from_hf_state_dict(state, model.state_dict()))
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, backend: str | None = None) -> "GPT":
        """Load a local HuggingFace-format GPT-2 directory: config.json and model.safetensors (or
        pytorch_model.bin). Reads files only; never touches the network."""
        path = os.fspath(path)
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"GPT.from_pretrained: no config.json in {path!r}")
        with open(config_file) as f:
            config = GPTConfig.from_hf(json.load(f))
        safetensors_file, torch_file = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
        if os.path.isfile(safetensors_file):
            try:
                from safetensors.torch import load_file
            except ImportError as exc:
                raise ImportError("GPT.from_pretrained: reading model.safetensors needs the `safetensors` "
                                  "package (pip install safetensors)") from exc
            state = load_file(safetensors_file)
        elif os.path.isfile(torch_file):
            state = torch.load(torch_file, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"GPT.from_pretrained: neither model.safetensors nor pytorch_model.bin in {path!r}")
        return cls.from_hf(state, config, backend=backend)


def _from_hf_state_dict(hf_state: dict, own_state: dict) -> dict:
    """HF GPT-2 names -> ours: add the "transformer." prefix where missing, transpose Conv1D
    weights, drop the causal-mask buffers, tie lm_head to wte."""
    state = {}
    for name, tensor in hf_state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the causal mask older transformers kept as a buffer
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        state[name] = tensor.t() if name.endswith(HF_CONV1D) else tensor
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    missing, unexpected = sorted(set(own_state) - set(state)), sorted(set(state) - set(own_state))
    if missing or unexpected:
        raise ValueError(f"GPT.from_hf: state_dict does not fit the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != own_state[name].shape:
            raise ValueError(f"GPT.from_hf: {name} has shape {list(tensor.shape)}, the config expects "
                             f"{list(own_state[name].shape)}")
    return state


def _is_real(value) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[token] in float32, each row reduced on its own (temperature
    0 means the plain logits, as for greedy decoding)."""
    logits = logits.float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None].to(logits.device))[..., 0]


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of logits (B, vocab) and its log-probability."""
    if temperature == 0.0:
        token = torch.argmax(logits, dim=-1)
    else:
        scaled = logits.float() / temperature
        if top_k is not None and top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the tokens ranked above
            drop = torch.zeros_like(scaled, dtype=torch.bool).scatter(-1, order, before >= top_p)
            scaled = scaled.masked_fill(drop, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        token = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)
    return token, _token_logprobs(logits, token, temperature)


__all__ = ["GPT", "GPTConfig", "Generation", "PRESETS", "Block"]
