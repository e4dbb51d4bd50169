"""PlainGPT and PlainLlama: the same models with plain PyTorch layers — the comparison column and
negative control.

torch.nn.Linear, torch.nn.LayerNorm / RMSNorm, F.gelu / F.silu, HF-style rotary embeddings
(cos and sin of each float32 angle computed per call) and F.scaled_dot_product_attention (with
a mask over the KV cache when decoding) in place of the fusedtx layers; parameter names,
state_dict, generate() and logprobs() are the fusedtx models'. Numerically it is what a user would write without
fusedtx: correct, but its bits may change with the batch, the padding and prefill vs decode.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .. import nn as fnn
from ..reference import rope_inv_freq
from .gpt import GPT
from .llama import Llama, LlamaAttention


class _LayerNorm(torch.nn.LayerNorm):
    def __init__(self, n: int, eps: float = 1e-5, bias: bool = True, *, backend=None):
        super().__init__(n, eps=eps, bias=bias)


class _Linear(torch.nn.Linear):
    def __init__(self, n_in: int, n_out: int, bias: bool = True, *, backend=None):
        super().__init__(n_in, n_out, bias=bias)


class _GeluFFN(torch.nn.Module):
    def __init__(self, d_model: int, bias: bool = True, approximate: str = "none", *, backend=None):
        super().__init__()
        self.c_fc, self.c_proj = torch.nn.Linear(d_model, 4 * d_model, bias), torch.nn.Linear(4 * d_model, d_model, bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class _CausalSelfAttention(torch.nn.Module):
    def __init__(self, d_model: int, n_head: int, bias: bool = True, *, split_size=None, backend=None):
        super().__init__()
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.c_attn, self.c_proj = torch.nn.Linear(d_model, 3 * d_model, bias), torch.nn.Linear(d_model, d_model, bias)

    def new_kv_cache(self, batch: int, max_len: int) -> fnn.KVCache:
        return fnn.KVCache(batch, self.n_head, max_len, self.head_dim, dtype=self.c_attn.weight.dtype,
                           device=self.c_attn.weight.device)

    def forward(self, x: torch.Tensor, kv_cache: fnn.KVCache | None = None) -> torch.Tensor:
        batch, tokens, d_model = x.shape
        q, k, v = (t.view(batch, tokens, self.n_head, self.head_dim).transpose(1, 2)
                   for t in self.c_attn(x).split(d_model, dim=2))
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            seqlens = kv_cache.append(k, v)
            keys = torch.arange(kv_cache.max_len)
            query_positions = seqlens[:, None] - tokens + torch.arange(tokens)               # (B, Tq)
            mask = (keys[None, None, :] <= query_positions[:, :, None]) & (keys < seqlens[:, None, None])
            y = F.scaled_dot_product_attention(q, kv_cache.k, kv_cache.v, attn_mask=mask[:, None].to(x.device))
        return self.c_proj(y.transpose(1, 2).reshape(batch, tokens, d_model))


class PlainGPT(GPT):
    """GPT on plain PyTorch layers (see the module docstring); same constructor and state_dict."""

    layers = SimpleNamespace(LayerNorm=_LayerNorm, Linear=_Linear, GeluFFN=_GeluFFN,
                             CausalSelfAttention=_CausalSelfAttention)


class _RMSNorm(torch.nn.RMSNorm):
    def __init__(self, n: int, eps: float | None = None, *, backend=None):
        super().__init__(n, eps=eps)


class _SwiGLUFFN(torch.nn.Module):
    def __init__(self, d_model: int, d_hidden: int, bias: bool = False, *, backend=None):
        super().__init__()
        self.gate_proj = torch.nn.Linear(d_model, d_hidden, bias)
        self.up_proj = torch.nn.Linear(d_model, d_hidden, bias)
        self.down_proj = torch.nn.Linear(d_hidden, d_model, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _RotaryEmbedding(torch.nn.Module):
    """HF transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb: the angles of each call's
    positions in float32, their cos and sin in float32, applied in x's dtype."""

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0, rope_scaling=None, *, backend=None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, rope_scaling), persistent=False)

    def _apply(self, fn, recurse=True):
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)  # float32 whatever the model's dtype
        return self

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        freqs = positions.to(q.device).float()[..., None] * self.inv_freq       # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                        # (B, 1, T, D)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)

        def rotate(x):
            x1, x2 = x.chunk(2, dim=-1)
            return x * cos + torch.cat((-x2, x1), dim=-1) * sin
        return rotate(q), rotate(k)


class _LlamaAttention(LlamaAttention):
    def project(self, x, positions, rotary):
        return self.project_separately(x, positions, rotary)

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)

    def attend_cached(self, q, kv_cache, seqlens):
        tokens = q.shape[2]
        keys = torch.arange(kv_cache.max_len)
        query_positions = seqlens[:, None] - tokens + torch.arange(tokens)               # (B, Tq)
        mask = (keys[None, None, :] <= query_positions[:, :, None]) & (keys < seqlens[:, None, None])
        return F.scaled_dot_product_attention(q, kv_cache.k, kv_cache.v, attn_mask=mask[:, None].to(q.device),
                                              enable_gqa=self.n_kv_head != self.n_head)


class PlainLlama(Llama):
    """Llama on plain PyTorch layers (see the module docstring); same constructor and state_dict."""

    layers = SimpleNamespace(RMSNorm=_RMSNorm, Linear=_Linear, SwiGLUFFN=_SwiGLUFFN,
                             RotaryEmbedding=_RotaryEmbedding, LlamaAttention=_LlamaAttention)
