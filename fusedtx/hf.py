"""fusedtx attention inside Hugging Face transformers models, as the attention implementation
"fusedtx".

    import fusedtx.hf
    fusedtx.hf.register()                           # once per process (fusedtx.convert calls it)
    model.set_attn_implementation("fusedtx")        # or from_pretrained(..., attn_implementation="fusedtx")

transformers hands an attention implementation the queries of this call (B, H, Tq, D) and every
key and value of the sequence so far (B, Hkv, Tk, D): the cache already updated. With Tq = Tk
(a full forward, a prefill) fusedtx.causal_attention runs; with Tq < Tk (a decode step, a chunk
of a chunked prefill) fusedtx.attention_with_kv_cache runs with every sequence Tk keys long.
Both cut the keys at the same multiples of the split size and merge the chunks in the same
order, so HF's own generate() gives every token the bits of a full forward over the sequence.

What it refuses, with a ValueError saying so, rather than silently losing invariance:
  * an attention mask other than the plain causal one: left padding (HF pads batches of
    unequal prompts on the left), packed sequences, custom masks. A padded row's chunks would
    be counted from the padding, not from its first real token, so its bits would depend on
    the batch; run unequal sequences in separate calls or equal-length batches;
  * attention dropout (training mode with attention_dropout > 0), logit soft-capping,
    attention sinks, a sliding window shorter than the sequence, non-causal attention.
The mask transformers builds for "fusedtx" is its SDPA mask, which is None whenever the
plain causal mask is meant (no padding, and Tq = Tk or Tq = 1).
"""
from __future__ import annotations

import torch

from . import functional as F

NAME = "fusedtx"


def _refuse(what: str) -> None:
    raise ValueError(f"fusedtx attention: {what}")


def _check_causal_mask(mask: torch.Tensor, q_len: int, k_len: int) -> None:
    """The mask must allow exactly query i -> keys j <= i + (k_len - q_len), for every row."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if allowed.dim() != 4 or allowed.shape[-2:] != (q_len, k_len):
        _refuse(f"expected a (batch, 1, {q_len}, {k_len}) attention mask, got shape {list(mask.shape)}")
    q = torch.arange(q_len, device=mask.device)[:, None] + (k_len - q_len)
    causal = torch.arange(k_len, device=mask.device)[None, :] <= q
    if not bool((allowed == causal).all()):
        _refuse("the attention mask is not the plain causal mask: padded batches (transformers pads on "
                "the left), packed sequences and custom masks are not supported, because a padded "
                "row's key chunks would be counted from the padding and its bits would depend on the "
                "batch. Run sequences of unequal length in separate calls, or as equal-length batches")


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-implementation signature: (attn_output (B, Tq, H, D), None)."""
    if dropout:
        _refuse(f"attention dropout ({dropout}) is not supported; use model.eval() or set the attention "
                "dropout to 0 for training")
    if kwargs.get("softcap") is not None:
        _refuse("logit soft-capping (softcap) is not supported")
    if kwargs.get("s_aux") is not None:
        _refuse("attention sinks (s_aux) are not supported")
    if is_causal is False or getattr(module, "is_causal", True) is False:
        _refuse("only causal (decoder) self-attention is supported")
    q_len, k_len = query.shape[2], key.shape[2]
    window = kwargs.get("sliding_window")
    if window is not None and k_len > window:
        _refuse(f"a sliding window of {window} keys is shorter than the sequence ({k_len} keys); fusedtx "
                "attends to every earlier key, which equals a sliding window only before it")
    if attention_mask is not None:
        _check_causal_mask(attention_mask, q_len, k_len)
    elif q_len != k_len and q_len != 1:
        _refuse(f"{q_len} queries against {k_len} keys without a mask: expected the causal mask")
    if q_len == k_len:
        out = F.causal_attention(query, key, value, scale=scaling)
    else:
        seqlens = torch.full((query.shape[0],), k_len, dtype=torch.int64)
        out = F.attention_with_kv_cache(query, key, value, seqlens, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register "fusedtx" with transformers' AttentionInterface (and its SDPA mask function with
    AttentionMaskInterface). Idempotent; ImportError when transformers is not installed."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:
        raise ImportError(f"fusedtx.hf needs Hugging Face transformers with AttentionInterface "
                          f"(pip install 'transformers>=4.56'): {exc}") from exc
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def is_hf_model(model: torch.nn.Module) -> bool:
    """A transformers PreTrainedModel (it can switch its attention implementation)."""
    return callable(getattr(model, "set_attn_implementation", None)) and hasattr(model, "config")


def use_fusedtx_attention(model: torch.nn.Module) -> None:
    """Register "fusedtx" and switch the HF model (and its sub-models) to it."""
    register()
    model.set_attn_implementation(NAME)
