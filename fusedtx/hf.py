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

Padded batches (transformers pads a batch of unequal prompts on the left and passes a mask):
each row's keys are shifted so that its first real token comes first before the kernels run,
and the outputs shifted back, so a row's chunks are counted from its first real token, as if
it ran alone. transformers' generate() numbers positions from the first real token too, so a
left-padded row gets the bits of the same prompt alone, at every step. A query the mask does
not let see its own position is padding: its output is finite and unspecified (HF's SDPA gives
NaN there), and nothing real attends to it. Right padding needs no shift: causal attention
never looks right.

What it refuses, with a ValueError saying so, rather than silently losing invariance:
  * a mask that is not "causal, from each row's first real token": packed sequences, custom
    masks, a static cache's mask (keys beyond the current position), a prefill chunk whose
    queries are still padding;
  * attention dropout (training mode with attention_dropout > 0), logit soft-capping,
    attention sinks, a sliding window shorter than the sequence, non-causal attention.
The mask transformers builds for "fusedtx" is its SDPA mask, which is None whenever the
plain causal mask is meant (no padding, and Tq = Tk or Tq = 1).
"""
from __future__ import annotations

import weakref

import torch

from . import functional as F

NAME = "fusedtx"


def _refuse(what: str) -> None:
    raise ValueError(f"fusedtx attention: {what}")


_MASK_NOT_CAUSAL = ("the attention mask is not causal from each row's first real token: packed sequences, "
                    "custom masks and a static cache's mask are not supported (fusedtx would count a "
                    "row's key chunks from the wrong place and its bits would depend on the batch). "
                    "Left- or right-padded batches and DynamicCache are supported")

# The last mask read and its padding: transformers passes one mask object to every layer of a
# forward, so it is read once. Keyed by the object, its version counter and the call's lengths.
_last_mask: tuple = (None, None, None)


def _left_padding(mask: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor | None:
    """Padding keys before each row's first real token, (B,) int64 on the CPU; None without any.

    A query is real when the mask lets it see its own position (key q + k_len - q_len); a real
    query of row b must see exactly the keys p_b <= j <= its position, with one p_b per row.
    Anything else is refused. A row without a real query gets p_b = k_len (all padding)."""
    global _last_mask
    try:
        key = (mask._version, q_len, k_len)
    except RuntimeError:  # an inference-mode tensor has no version counter: not cached
        key = None
    ref, cached_key, pads = _last_mask
    if key is not None and ref is not None and ref() is mask and cached_key == key:
        return pads
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if allowed.dim() != 4 or allowed.shape[-2:] != (q_len, k_len) or allowed.shape[0] < 1:
        _refuse(f"expected a (batch, 1, {q_len}, {k_len}) attention mask, got shape {list(mask.shape)}")
    if allowed.shape[1] != 1 and not bool((allowed == allowed[:, :1]).all()):
        _refuse("an attention mask that differs between heads is not supported")
    allowed = allowed[:, 0].cpu()
    offset = k_len - q_len
    position = torch.arange(q_len)[:, None] + offset                      # (Tq, 1) each query's own key
    j = torch.arange(k_len)[None, :]
    real = allowed.gather(2, position.expand(allowed.shape[0], q_len, 1))[..., 0]   # (B, Tq)
    first_seen = torch.where(allowed.any(-1), allowed.to(torch.uint8).argmax(-1), k_len)   # (B, Tq)
    last_real = torch.where(real, torch.arange(q_len), -1).amax(-1)                   # (B,)
    pads = torch.where(last_real >= 0, first_seen.gather(1, last_real.clamp(min=0)[:, None])[:, 0],
                       k_len).to(torch.int64)
    expected = (j >= pads[:, None, None]) & (j <= position)                # (B, Tq, Tk)
    if not bool(((allowed == expected) | ~real[..., None]).all()):
        _refuse(_MASK_NOT_CAUSAL)
    pads = pads if bool(pads.any()) else None
    if key is not None:
        _last_mask = (weakref.ref(mask), key, pads)
    return pads


def _shift(t: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
    """t (B, H, T, D) with row b's position i moved to i - by[b] (mod T): by = the padding
    left-aligns every row, by = -padding puts it back. A gather, so gradients flow through."""
    n = t.shape[2]
    index = (torch.arange(n)[None, :] + by[:, None]) % n                   # (B, T)
    index = index.to(t.device)[:, None, :, None].expand(t.shape)
    return t.gather(2, index)


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
    pads = None
    if attention_mask is not None:
        pads = _left_padding(attention_mask, q_len, k_len)
    elif q_len != k_len and q_len != 1:
        _refuse(f"{q_len} queries against {k_len} keys without a mask: expected the causal mask")
    if q_len == k_len:
        if pads is None:
            out = F.causal_attention(query, key, value, scale=scaling)
        else:  # left-align, attend, shift back; a row that is all padding is shifted by k_len: not at all
            out = F.causal_attention(_shift(query, pads), _shift(key, pads), _shift(value, pads), scale=scaling)
            out = _shift(out, -pads)
    else:
        if pads is None:
            key_lens = torch.full((query.shape[0],), k_len, dtype=torch.int64)
        else:
            key_lens = k_len - pads
            if bool((key_lens < q_len).any()):
                _refuse(f"{q_len} queries against {k_len} keys of which only {int(key_lens.min())} are real in "
                        "some row: a chunk whose queries are still padding is not supported; prefill the "
                        "padding in the first chunk, or without chunks")
            key, value = _shift(key, pads), _shift(value, pads)
        out = F.attention_with_kv_cache(query, key, value, key_lens, scale=scaling)
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
