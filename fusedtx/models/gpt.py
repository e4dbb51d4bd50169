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

import math
import os
from dataclasses import dataclass, replace

import torch

from .. import nn as fnn
from ..config import _check_split_size
from ._lm import CausalLM, Generation, check_state_dict, hf_state_and_config, read_hf_checkpoint


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


class GPT(CausalLM):
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

    # ------------------------------------------------------------------ CausalLM's hooks

    _max_positions_name = "block_size"

    @property
    def max_positions(self) -> int:
        return self.config.block_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(idx) + self.transformer.wpe(positions)

    def _blocks(self):
        return self.transformer.h

    def _block(self, block, x, positions, kv_cache):
        return block(x, kv_cache)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.ln_f(x)

    def _new_layer_cache(self, block, batch: int, max_len: int) -> fnn.KVCache:
        return block.attn.new_kv_cache(batch, max_len)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_hf(cls, model_or_state_dict, config: GPTConfig | None = None, *, backend: str | None = None) -> "GPT":
        """A GPT holding the weights of a transformers GPT2LMHeadModel (or its state_dict, then
        with `config` or a config inferred from the shapes, which needs n_head from `config`)."""
        config, state = hf_state_and_config(model_or_state_dict, config, GPTConfig.from_hf, "GPT.from_hf")
        model = cls(config, backend=backend)
        model.load_state_dict(_from_hf_state_dict(state, model.state_dict()))
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, backend: str | None = None) -> "GPT":
        """Load a local HuggingFace-format GPT-2 directory: config.json and model.safetensors
        (sharded or not) or pytorch_model.bin. Reads files only; never touches the network."""
        config, state = read_hf_checkpoint(path, "GPT.from_pretrained")
        return cls.from_hf(state, GPTConfig.from_hf(config), backend=backend)


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
    check_state_dict(state, own_state, "GPT.from_hf")
    return state


__all__ = ["GPT", "GPTConfig", "Generation", "PRESETS", "Block"]
