"""The Llama family (Llama 3, Qwen 2 / 2.5 / 3, Mistral, SmolLM2) built from fusedtx layers, whose
logits never depend on the batch.

    from fusedtx.models import Llama
    model = Llama.from_pretrained("path/to/Qwen2.5-0.5B", dtype=torch.bfloat16)   # local files only
    out = model.generate([prompt_a, prompt_b], 32)      # KV-cache generation, ragged prompts
    out.logprobs                                        # == model.logprobs(...) bit for bit

Every layer with a reduction is a fusedtx layer (RMSNorm, Linear, SwiGLUFFN, causal attention
with grouped-query heads); rotary embeddings read one table of cos/sin indexed by each token's
position (fusedtx.rope_table), so a token gets the same bits in a full forward, a chunked
prefill and a decode step. Parameter names are HuggingFace's (model.embed_tokens,
model.layers.0.self_attn.q_proj, ..., lm_head): an HF state_dict loads as it is (from_hf).

What the family varies, from the HF config: grouped-query heads (num_key_value_heads), a head_dim
other than hidden_size / heads (Qwen3), biases on q/k/v (Qwen2) or on every projection
(attention_bias), RMSNorm over each head of q and k before RoPE (Qwen3), RoPE scaling "default"
or "llama3", tied or untied embeddings. A sliding window (Mistral's sliding_window, Qwen's
use_sliding_window) is honoured by refusing positions at or past the window: before it, sliding
and full causal attention are the same computation.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

from .. import functional as F
from .. import nn as fnn
from ..config import _check_split_size
from ._lm import CausalLM, check_state_dict, hf_state_and_config, read_hf_checkpoint

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class LlamaConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None    # None: num_attention_heads (no grouping)
    head_dim: int | None = None               # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()                  # ((key, value), ...) of HF's rope_scaling without rope_theta; () = default
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False              # biases on q, k, v and o (Llama, Qwen3)
    qkv_bias: bool = False                    # biases on q, k, v only (Qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False                     # RMSNorm over each head of q and k before RoPE (Qwen3)
    sliding_window: int | None = None         # positions at or past it are refused
    split_size: int | None = None             # attention split size S; None: fusedtx.get_split_size()

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig: model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            _check_positive_int(name, getattr(self, name))
        for name in ("num_key_value_heads", "head_dim", "sliding_window"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"LlamaConfig: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"LlamaConfig: hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads}) unless head_dim is given")
        if self.head_size % 2:
            raise ValueError(f"LlamaConfig: the head dimension must be even for rotary embeddings, got {self.head_size}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (name == "rope_theta" and value == 0):
                raise ValueError(f"LlamaConfig: {name} must be a finite number {'> 0' if name == 'rope_theta' else '>= 0'}, "
                                 f"got {value!r}")
        rope_type = self.rope.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"LlamaConfig: rope_scaling type {rope_type!r} is not supported (supported: {ROPE_TYPES})")
        if self.split_size is not None:
            _check_split_size(self.split_size, "LlamaConfig: split_size")

    @property
    def kv_heads(self) -> int:
        return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads if self.head_dim is None else self.head_dim

    @property
    def rope(self) -> dict:
        """rope_scaling as a dict ({} for the default)."""
        return dict(self.rope_scaling)

    @staticmethod
    def preset(name: str, **overrides) -> "LlamaConfig":
        """The sizes of SmolLM2-135M, Qwen2.5-0.5B, Llama-3.2-1B or Qwen3-0.6B (random weights), or a
        small one for tests and `fusedtx check` ("tiny", "small": Llama; "tiny-qwen2", "tiny-qwen3");
        keyword arguments override fields."""
        if name not in PRESETS:
            raise ValueError(f"LlamaConfig.preset: name must be one of {sorted(PRESETS)}, got {name!r}")
        return replace(PRESETS[name], **overrides)

    @staticmethod
    def from_hf(hf_config) -> "LlamaConfig":
        """From a transformers LlamaConfig / Qwen2Config / Qwen3Config / MistralConfig, or its
        config.json as a dict."""
        d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        model_type = d.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig.from_hf: model_type must be one of {MODEL_TYPES}, got {model_type!r}")
        # transformers >= 5 keeps rope_theta and the scaling in rope_parameters; older configs in
        # rope_theta and rope_scaling ("type" before "rope_type").
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        if rope.get("rope_type", "default") == "default":
            rope = {}
        sliding = d.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
            sliding = None
        return LlamaConfig(
            model_type=model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"], num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"), rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling=tuple(sorted(rope.items())), max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)) and model_type != "qwen2",
            qkv_bias=model_type == "qwen2", mlp_bias=bool(d.get("mlp_bias", False)), qk_norm=model_type == "qwen3",
            sliding_window=sliding)


def _check_positive_int(name: str, value) -> None:
    if not fnn._is_int(value) or value < 1:
        raise ValueError(f"LlamaConfig: {name} must be an int >= 1, got {value!r}")


_LLAMA3_1B_ROPE = (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                   ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))
PRESETS = {
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                                max_position_embeddings=8192, tie_word_embeddings=True),
    "qwen2.5-0.5b": LlamaConfig(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
                                rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
                                qkv_bias=True),
    "llama-3.2-1b": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                                rope_scaling=_LLAMA3_1B_ROPE, max_position_embeddings=131072, tie_word_embeddings=True),
    "qwen3-0.6b": LlamaConfig(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                              num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                              rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                              tie_word_embeddings=True, qk_norm=True),
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128,
                        split_size=16),
    "small": LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
                         split_size=32),
    "tiny-qwen2": LlamaConfig(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=128, tie_word_embeddings=True, qkv_bias=True, split_size=16),
    "tiny-qwen3": LlamaConfig(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                              max_position_embeddings=128, qk_norm=True, split_size=16),
}


class LlamaAttention(torch.nn.Module):
    """Grouped-query causal self-attention with rotary embeddings: q/k/v projections (optional
    biases), per-head q/k RMSNorm (Qwen3), RoPE at each token's position, fusedtx attention (the
    full causal pass, or against a KV cache), o_proj."""

    def __init__(self, config: LlamaConfig, layers, backend: str | None):
        super().__init__()
        heads, kv_heads, hd, hidden = config.num_attention_heads, config.kv_heads, config.head_size, config.hidden_size
        qkv_bias = config.attention_bias or config.qkv_bias
        self.n_head, self.n_kv_head, self.head_dim = heads, kv_heads, hd
        self.q_proj = layers.Linear(hidden, heads * hd, bias=qkv_bias, backend=backend)
        self.k_proj = layers.Linear(hidden, kv_heads * hd, bias=qkv_bias, backend=backend)
        self.v_proj = layers.Linear(hidden, kv_heads * hd, bias=qkv_bias, backend=backend)
        self.o_proj = layers.Linear(heads * hd, hidden, bias=config.attention_bias, backend=backend)
        if config.qk_norm:
            self.q_norm = layers.RMSNorm(hd, eps=config.rms_norm_eps, backend=backend)
            self.k_norm = layers.RMSNorm(hd, eps=config.rms_norm_eps, backend=backend)
        else:
            self.q_norm = self.k_norm = None
        self.split_size, self.backend = config.split_size, backend
        self._stacked = fnn.PackingCache()  # [q; k; v] weights (and biases) for inference

    def new_kv_cache(self, batch: int, max_len: int) -> fnn.KVCache:
        w = self.k_proj.weight
        return fnn.KVCache(batch, self.n_kv_head, max_len, self.head_dim, dtype=w.dtype, device=w.device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: "fnn.RotaryEmbedding",
                kv_cache: fnn.KVCache | None = None) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.project(x, positions.expand(batch, tokens), rotary)  # (B, heads, T, hd)
        if kv_cache is None:
            y = self.attend(q, k, v)
        else:
            before = kv_cache.lengths  # append replaces the tensor, never writes into it
            seqlens = kv_cache.append(k, v)
            try:
                y = self.attend_cached(q, kv_cache, seqlens)
            except BaseException:
                kv_cache.lengths = before  # what was appended lies beyond the lengths: never read
                raise
        return self.o_proj(y.transpose(1, 2).reshape(batch, tokens, self.n_head * self.head_dim))

    def project(self, x: torch.Tensor, positions: torch.Tensor, rotary) -> tuple[torch.Tensor, ...]:
        """q and k rotated, and v, each (B, heads, T, hd). When autograd records nothing (no
        gradient to x or the weights) and outside torch.compile (inference, decode), q, k and v
        come from one matmul on the stacked weights (cached, fnn.PackingCache) and q and k are
        rotated in one call: an output column's bits depend on x's row and that column's weights
        alone, and rope is elementwise, so these are the bits of the separate calls, in two kernel
        calls instead of five."""
        params = self._stackable_params()
        if params is not None and fnn.PackingCache.usable((x, *params)):
            batch, tokens, _ = x.shape
            qk_heads = self.n_head + self.n_kv_head
            weight, bias = self._stacked.get(params, _stack_qkv)
            h = F.linear(x, weight, bias, backend=self.backend).view(batch, tokens, qk_heads + self.n_kv_head,
                                                                     self.head_dim)
            qk = rotary.rotate(h[:, :, :qk_heads].transpose(1, 2), positions)
            return qk[:, :self.n_head], qk[:, self.n_head:], h[:, :, qk_heads:].transpose(1, 2)
        return self.project_separately(x, positions, rotary)

    def project_separately(self, x: torch.Tensor, positions: torch.Tensor, rotary) -> tuple[torch.Tensor, ...]:
        """project() through each projection module and rotary's forward (autograd, hooks, other
        layers)."""
        batch, tokens, _ = x.shape
        q = self.q_proj(x).view(batch, tokens, self.n_head, self.head_dim)
        k = self.k_proj(x).view(batch, tokens, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(batch, tokens, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q.transpose(1, 2), k.transpose(1, 2), positions)
        return q, k, v

    def _stackable_params(self) -> tuple | None:
        """(q, k, v weights, q, k, v biases) when one matmul on the stacked weights is what the
        three projections would compute, else None: no q/k norm between projection and rope, each
        projection a plain fusedtx Linear without hooks (a hook, or a module swapped in, e.g. an
        adapter, must see its own call), and the biases all there or all absent."""
        proj = (self.q_proj, self.k_proj, self.v_proj)
        if self.q_norm is not None or not all(map(fnn.is_plain_linear, proj)):
            return None
        biases = tuple(p.bias for p in proj)
        if len({b is None for b in biases}) != 1:
            return None
        return tuple(p.weight for p in proj) + biases

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The full causal pass over (B, heads, T, hd) tensors."""
        return F.causal_attention(q, k, v, split_size=self.split_size, backend=self.backend)

    def attend_cached(self, q: torch.Tensor, kv_cache: fnn.KVCache, seqlens: torch.Tensor) -> torch.Tensor:
        """The queries q (the last q.shape[2] tokens of each sequence) against the cache."""
        return F.attention_with_kv_cache(q, kv_cache.k, kv_cache.v, seqlens, split_size=self.split_size,
                                         backend=self.backend)


def _stack_qkv(q_weight, k_weight, v_weight, q_bias, k_bias, v_bias):
    bias = None if q_bias is None else torch.cat((q_bias, k_bias, v_bias))
    return torch.cat((q_weight, k_weight, v_weight)), bias


# The layers a Llama is built from.
LAYERS = SimpleNamespace(RMSNorm=fnn.RMSNorm, Linear=fnn.Linear, SwiGLUFFN=fnn.SwiGLUFFN,
                         RotaryEmbedding=fnn.RotaryEmbedding, LlamaAttention=LlamaAttention)


class LlamaDecoderLayer(torch.nn.Module):
    """Pre-RMSNorm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, layers, backend: str | None):
        super().__init__()
        self.input_layernorm = layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, backend=backend)
        self.self_attn = layers.LlamaAttention(config, layers, backend)
        self.post_attention_layernorm = layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, backend=backend)
        self.mlp = layers.SwiGLUFFN(config.hidden_size, config.intermediate_size, bias=config.mlp_bias, backend=backend)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary, kv_cache: fnn.KVCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(CausalLM):
    """A Llama-family decoder: token embedding, num_hidden_layers decoder layers, a final RMSNorm
    and a language-model head (tied to the embedding when the config says so). backend: the
    fusedtx backend of every layer (None: the library's default for the device)."""

    layers = LAYERS  # where the layers come from (models.plain swaps in torch.nn ones)

    def __init__(self, config: LlamaConfig, *, backend: str | None = None):
        super().__init__()
        layers = self.layers
        self.config, self.backend = config, backend
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = torch.nn.ModuleList(LlamaDecoderLayer(config, layers, backend)
                                                for _ in range(config.num_hidden_layers))
        self.model.norm = layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, backend=backend)
        self.model.rotary_emb = layers.RotaryEmbedding(config.head_size, config.max_position_embeddings,
                                                       theta=config.rope_theta, rope_scaling=config.rope or None,
                                                       backend=backend)
        self.lm_head = layers.Linear(config.hidden_size, config.vocab_size, bias=False, backend=backend)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: torch.nn.Module) -> None:
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ CausalLM's hooks

    @property
    def max_positions(self) -> int:
        window = self.config.sliding_window
        return self.config.max_position_embeddings if window is None else min(window, self.config.max_position_embeddings)

    @property
    def _max_positions_name(self) -> str:
        if self.max_positions == self.config.max_position_embeddings:
            return "max_position_embeddings"
        return "sliding_window: fusedtx attends to every earlier key, which equals a sliding window only before it"

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(idx)

    def _blocks(self):
        return self.model.layers

    def _block(self, block, x, positions, kv_cache):
        return block(x, positions, self.model.rotary_emb, kv_cache)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def _new_layer_cache(self, block, batch: int, max_len: int) -> fnn.KVCache:
        return block.self_attn.new_kv_cache(batch, max_len)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_hf(cls, model_or_state_dict, config: LlamaConfig | None = None, *, backend: str | None = None,
                dtype: torch.dtype | None = None) -> "Llama":
        """A Llama holding the weights of a transformers LlamaForCausalLM / Qwen2ForCausalLM /
        Qwen3ForCausalLM / MistralForCausalLM (or its state_dict, then with `config`). dtype:
        torch.float32 or torch.bfloat16 weights (default: the checkpoint's, float32 for float16)."""
        config, state = hf_state_and_config(model_or_state_dict, config, LlamaConfig.from_hf, "Llama.from_hf")
        if dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"Llama.from_hf: dtype must be None, torch.float32 or torch.bfloat16, got {dtype!r}")
        state = {name: t for name, t in state.items() if not name.endswith("rotary_emb.inv_freq")}
        if config.tie_word_embeddings:
            state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
        model = cls(config, backend=backend)
        check_state_dict(state, model.state_dict(), "Llama.from_hf")
        if dtype is None:
            dtype = next(iter(state.values())).dtype
            dtype = torch.float32 if dtype == torch.float16 else dtype
        model.to(dtype)
        model.load_state_dict(state)
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, backend: str | None = None,
                        dtype: torch.dtype | None = None) -> "Llama":
        """Load a local HuggingFace-format Llama / Qwen2 / Qwen3 / Mistral directory: config.json
        and model.safetensors, sharded or not (model.safetensors.index.json), or pytorch_model.bin.
        Reads files only; never touches the network."""
        config, state = read_hf_checkpoint(path, "Llama.from_pretrained")
        return cls.from_hf(state, LlamaConfig.from_hf(config), backend=backend, dtype=dtype)


__all__ = ["Llama", "LlamaConfig", "PRESETS", "LlamaDecoderLayer", "LlamaAttention"]
