"""The functional API: fusedtx.softmax(...) and friends, for eager code and torch.compile.

Each function resolves the backend (argument > use_backend / set_backend > FUSEDTX_BACKEND >
per-device default, see fusedtx.backends), fills in defaults, and calls the registered op — or,
in plain eager code, the same op's pieces without the dispatcher (see below).
"""
from __future__ import annotations

import torch

from . import backends
from .ops import causal_attention as _causal_attention_op
from .ops import layer_norm as _layer_norm_op
from .ops import linear as _linear_op
from .ops import softmax as _softmax_op
from .ops._eager import is_plain_eager


def _device_of(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


# In plain eager code (is_plain_eager: no torch.compile, dispatch mode or torch.func transform)
# every function below skips the registered op's dispatcher round trips: inference calls the op's
# body, training the autograd.Function built from the op's own pieces (ops/_eager.py). Same
# code, same bits; the registered op costs ~10 us more a call without gradients and ~40 us more
# with, forward and backward alike (benchmarks/bench_overhead.py).


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def softmax(x: torch.Tensor, dim: int = -1, *, scale: float | None = None, causal: bool = False,
            backend: str | None = None) -> torch.Tensor:
    """softmax(scale * x) along `dim`, float32 math, output in x's dtype.

    causal=True masks the last two dims as (queries, keys): query i of Tq sees keys
    j <= i + (Tk - Tq), the scaled masked softmax of unfused attention; dim must be -1. Masked
    entries are 0, and so is a query row that sees no key at all.
    Every row's bits depend only on that row (and its position among the queries when causal).
    """
    scale = 1.0 if scale is None else scale
    name = backends.resolve(backend, _device_of(x))
    if is_plain_eager(x):  # the implementation checks the arguments itself
        if _needs_grad(x):
            return _softmax_op.softmax_eager(x, dim, scale, causal, name)
        return _softmax_op.softmax_impl(x, dim, scale, causal, name)
    _softmax_op.check_args(x, dim, scale, causal)  # before the op's schema sees them
    return _softmax_op.softmax(x, dim, float(scale), causal, name)


def layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, *, backend: str | None = None) -> torch.Tensor:
    """torch.nn.functional.layer_norm, fused and batch-invariant: normalise over the trailing
    `normalized_shape` dims with two-pass float32 statistics (float64 for float64 x).

    weight and bias may be float32 beside a float16/bfloat16 x (as under autocast); the output
    has x's dtype. Each row's output and input gradient depend on that row alone; the weight and
    bias gradients are summed in a fixed order, so they are the same bits run after run.
    """
    name = backends.resolve(backend, _device_of(x))
    if is_plain_eager(x):  # the implementation checks the arguments itself
        if _needs_grad(x, weight, bias):
            return _layer_norm_op.layer_norm_eager(x, normalized_shape, weight, bias, eps, name)[0]
        return _layer_norm_op.layer_norm_impl(x, normalized_shape, weight, bias, eps, name)[0]
    _layer_norm_op.check_args(x, normalized_shape, weight, bias, eps)  # before the op's schema sees them
    return _layer_norm_op.layer_norm(x, _layer_norm_op.normalize_shape(normalized_shape), weight, bias,
                                     float(eps), name)[0]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           activation: str | None = None, backend: str | None = None) -> torch.Tensor:
    """act(x @ weight.T + bias), weight laid out (out_features, in_features) as in torch.nn.Linear.

    activation: None, "gelu" (exact, erf) or "gelu_tanh" (GPT-2's tanh approximation), fused into
    the matmul's epilogue. x may have any number of leading dims. Each output row's bits depend
    on its own row of x and on the weight alone — not on how many rows there are, where the row
    sits, or the thread count; the weight and bias gradients are summed in a fixed order.
    """
    name = backends.resolve(backend, _device_of(x))
    act = _linear_op.activation_code(activation)
    need_grad = _needs_grad(x, weight, bias)
    if is_plain_eager(x):  # the implementation checks the arguments itself
        if need_grad:
            return _linear_op.linear_eager(x, weight, bias, act, act != 0, name)[0]
        return _linear_op.linear_impl(x, weight, bias, act, False, name)[0]
    _linear_op.check_args(x, weight, bias, name)  # before the op's schema sees them
    return _linear_op.linear(x, weight, bias, act, need_grad and act != 0, name)[0]


GELU_APPROXIMATIONS = {"none": "gelu", "tanh": "gelu_tanh"}


def gelu_ffn(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None, proj_weight: torch.Tensor,
             proj_bias: torch.Tensor | None, *, approximate: str = "none", backend: str | None = None) -> torch.Tensor:
    """The GPT feed-forward: linear(gelu(linear(x, fc_weight, fc_bias)), proj_weight, proj_bias),
    the GELU fused into the first matmul. approximate: "none" (erf) or "tanh", as in F.gelu."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"gelu_ffn: approximate must be 'none' or 'tanh', got {approximate!r}")
    hidden = linear(x, fc_weight, fc_bias, activation=GELU_APPROXIMATIONS[approximate], backend=backend)
    return linear(hidden, proj_weight, proj_bias, backend=backend)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                     split_size: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Causal attention over q, k, v of shape (B, H, T, D) (k, v may have fewer heads: grouped /
    multi-query attention), scale defaulting to 1/sqrt(D). Keys are cut at multiples of the split
    size (fusedtx.set_split_size, default 256) and the chunks merged in order, so each query's
    output is the same bits as in a chunked prefill or a decode step (attention_with_kv_cache).
    Differentiable; the backward sums in fixed orders (deterministic)."""
    name = backends.resolve(backend, _device_of(q))
    _causal_attention_op.check_qkv(q, k, v, "causal_attention")  # before q's head dim sets the default scale
    scale, split = _causal_attention_op.resolve_scale_and_split(q, scale, split_size, "causal_attention")
    if is_plain_eager(q):
        if _needs_grad(q, k, v):
            return _causal_attention_op.causal_attention_eager(q, k, v, scale, split, name)[0]
        return _causal_attention_op.causal_attention_impl(q, k, v, scale, split, name, checked=True)[0]
    return _causal_attention_op.causal_attention(q, k, v, scale, split, name)[0]


def attention_with_kv_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor, *,
                            scale: float | None = None, split_size: int | None = None,
                            backend: str | None = None) -> torch.Tensor:
    """Attention of new queries against a KV cache that already holds their keys and values.

    q (B, H, Tq, D); k_cache, v_cache (B, Hkv, Tmax, D); seqlens (B,) ints: sequence b has
    seqlens[b] valid keys and its Tq queries are at positions seqlens[b] - Tq ... seqlens[b] - 1,
    causal among themselves. Sequences may have different lengths; nothing beyond seqlens[b] is
    read. Decode is Tq = 1. The same bits as causal_attention over the whole sequence.
    Inference only (no gradient)."""
    name = backends.resolve(backend, _device_of(q))
    if _needs_grad(q, k_cache, v_cache):
        raise ValueError("attention_with_kv_cache is inference-only and has no gradient; run it under "
                         "torch.no_grad(), or use causal_attention for training")
    scale, split = _causal_attention_op.resolve_scale_and_split(q, scale, split_size, "attention_with_kv_cache")
    if is_plain_eager(q):
        return _causal_attention_op.attention_with_kv_cache_impl(q, k_cache, v_cache, seqlens, scale, split, name)
    _causal_attention_op.check_qkv(q, k_cache, v_cache, "attention_with_kv_cache", "k_cache", "v_cache")
    return _causal_attention_op.attention_with_kv_cache(q, k_cache, v_cache, seqlens, scale, split, name)
