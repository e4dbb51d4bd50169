"""The functional API: fusedtx.softmax(...) and friends, for eager code and torch.compile.

Each function resolves the backend (argument > use_backend / set_backend > FUSEDTX_BACKEND >
per-device default, see fusedtx.backends), fills in defaults and calls the op (fusedtx/ops),
which checks the arguments and, in plain eager code, skips the registered op's dispatcher round
trips (fusedtx/ops/_dispatch.py): same code, same bits.

linear, swiglu_ffn, layer_norm, rms_norm, activation, rope and attention_with_kv_cache first
offer an inference call whose backend is native on CPU
tensors to their op's native lane (`_native_lane`): the whole call, checks included, in one C++
call that returns None wherever anything above would act otherwise, and this path then runs. A
decode step is a few hundred such calls, each with little work, and these Python layers between a
module and its kernel run with caches the weights just swept (docs/design.md, "Layering").
"""
from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as _forward_ad

from . import backends, config, reference
from .ops import activation as _activation
from .ops import causal_attention as _causal_attention
from .ops import layer_norm as _layer_norm
from .ops import linear as _linear
from .ops import log_softmax as _log_softmax
from .ops import rms_norm as _rms_norm
from .ops import rope as _rope
from .ops import softmax as _softmax


def _backend(backend: str | None, x) -> str:
    return backends.resolve(backend, x.device if isinstance(x, torch.Tensor) else torch.device("cpu"))


_compiling = torch.compiler.is_compiling


def _native_lane(backend) -> bool:
    """Whether a call may be offered to its op's native lane (fusedtx._C.<op>_call, which checks
    the tensors, the gradient, dispatch modes and torch.func transforms itself): its backend is
    native on CPU tensors without resolving, nothing traces, no forward-mode AD level is open."""
    return backend in backends.native_on_cpu and not _compiling() and _forward_ad._current_level < 0


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def softmax(x: torch.Tensor, dim: int = -1, *, scale: float | None = None, causal: bool = False,
            backend: str | None = None) -> torch.Tensor:
    """softmax(scale * x) along `dim`, float32 math, output in x's dtype.

    causal=True masks the last two dims as (queries, keys): query i of Tq sees keys
    j <= i + (Tk - Tq), the scaled masked softmax of unfused attention; dim must be -1. Masked
    entries are 0, and so is a query row that sees no key at all.
    Every row's bits depend only on that row (and its position among the queries when causal).
    """
    scale = 1.0 if scale is None else scale
    return _softmax.softmax(x, dim, scale, causal, _backend(backend, x), grad=_needs_grad(x))


def activation(x: torch.Tensor, activation: str, *, backend: str | None = None) -> torch.Tensor:
    """An elementwise activation, float32 math, output in x's dtype: "silu" (F.silu), "gelu"
    (F.gelu, exact) or "gelu_tanh" (F.gelu(approximate="tanh")), forward and backward.

    Each element's bits depend on its value alone. PyTorch's CPU silu / gelu do not promise
    that: their vector body and scalar tail differ in the last bit, and which elements take the
    tail depends on the tensor's size -- on the batch (docs/design.md, "exp, log and erf")."""
    if _native_lane(backend) and type(activation) is str:
        y = _activation.native_call.run(x, reference.ELEMENTWISE.get(activation, -1))
        if y is not None:
            return y
    code = _activation.activation_code(activation)
    return _activation.activation(x, code, _backend(backend, x), grad=_needs_grad(x))


def log_softmax(x: torch.Tensor, dim: int = -1, *, dtype: torch.dtype | None = None,
                backend: str | None = None) -> torch.Tensor:
    """torch.log_softmax along `dim`, float32 math, output in x's dtype (after the cast to
    `dtype`, as torch does: float32, float16 or bfloat16). No scale or mask: apply them to x
    first. Every row's bits depend only on that row; the log is fusedtx's own (reference.log_f32),
    the same bits on every backend.
    """
    if _log_softmax.check_dtype(dtype) is not None and isinstance(x, torch.Tensor):
        x = x.to(dtype)
    return _log_softmax.log_softmax(x, dim, _backend(backend, x), grad=_needs_grad(x))


def layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, *, backend: str | None = None) -> torch.Tensor:
    """torch.nn.functional.layer_norm, fused and batch-invariant: normalise over the trailing
    `normalized_shape` dims with corrected two-pass float32 statistics (float64 for float64 x): a
    constant row gives exactly bias, as in float64 (docs/design.md, "LayerNorm statistics").

    weight and bias may be float32 beside a float16/bfloat16 x (as under autocast); the output
    has x's dtype. Each row's output and input gradient depend on that row alone; the weight and
    bias gradients are summed in a fixed order, so they are the same bits run after run.
    """
    if _native_lane(backend):
        y = _layer_norm.native_call.run(x, normalized_shape, weight, bias, eps)
        if y is not None:
            return y
    grad = _needs_grad(x, weight, bias)
    return _layer_norm.layer_norm(x, normalized_shape, weight, bias, eps, _backend(backend, x), grad=grad)[0]


def rms_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None, eps: float | None = None, *,
             backend: str | None = None) -> torch.Tensor:
    """torch.nn.functional.rms_norm, fused and batch-invariant: x / sqrt(mean(x^2) + eps) * weight
    over the trailing `normalized_shape` dims, float32 statistics (float64 for float64 x) with a
    compensated sum of squares. eps None is torch's default, the machine epsilon of the compute
    dtype (float32's for float16/bfloat16 x, as torch.rms_norm takes it).

    weight may be float32 beside a float16/bfloat16 x; the output has x's dtype, rounded once
    after the weight (HF's LlamaRMSNorm rounds before it: docs/design.md, "RMSNorm"). Each row's
    output and input gradient depend on that row alone; the weight gradient is summed in a
    fixed order, so it is the same bits run after run.
    """
    if _native_lane(backend):
        y = _rms_norm.native_call.run(x, normalized_shape, weight, eps)
        if y is not None:
            return y
    if eps is None and isinstance(x, torch.Tensor) and x.is_floating_point():
        eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    grad = _needs_grad(x, weight)
    return _rms_norm.rms_norm(x, normalized_shape, weight, eps, _backend(backend, x), grad=grad)[0]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           activation: str | None = None, backend: str | None = None) -> torch.Tensor:
    """act(x @ weight.T + bias), weight laid out (out_features, in_features) as in torch.nn.Linear.

    activation: None, "gelu" (exact, erf) or "gelu_tanh" (GPT-2's tanh approximation), fused into
    the matmul's epilogue. x may have any number of leading dims. Each output row's bits depend
    on its own row of x and on the weight alone — not on how many rows there are, where the row
    sits, or the thread count; the weight and bias gradients are summed in a fixed order.
    """
    if _native_lane(backend) and (activation is None or type(activation) is str):
        y = _linear.native_call.run(x, weight, bias, reference.ACTIVATIONS.get(activation, -1))
        if y is not None:
            return y
    name = _backend(backend, x)
    act = _linear.activation_code(activation)
    grad = _needs_grad(x, weight, bias)
    # The pre-activation is saved for the backward only when there is one to differentiate.
    return _linear.linear(x, weight, bias, act, grad and act != 0, name, grad=grad)[0]


def check_activation(activation) -> None:
    """Raise ValueError unless `activation` is one linear() takes (None, "gelu", "gelu_tanh")."""
    _linear.activation_code(activation)


GELU_APPROXIMATIONS = {"none": "gelu", "tanh": "gelu_tanh"}


def gelu_ffn(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None, proj_weight: torch.Tensor,
             proj_bias: torch.Tensor | None, *, approximate: str = "none", backend: str | None = None) -> torch.Tensor:
    """The GPT feed-forward: linear(gelu(linear(x, fc_weight, fc_bias)), proj_weight, proj_bias),
    the GELU fused into the first matmul. approximate: "none" (erf) or "tanh", as in F.gelu."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"gelu_ffn: approximate must be 'none' or 'tanh', got {approximate!r}")
    hidden = linear(x, fc_weight, fc_bias, activation=GELU_APPROXIMATIONS[approximate], backend=backend)
    return linear(hidden, proj_weight, proj_bias, backend=backend)


def swiglu_ffn(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor, *,
               gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
               down_bias: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """The Llama / Qwen / Mistral feed-forward, down(silu(gate(x)) * up(x)), weights laid out as
    torch.nn.Linear's (gate_weight and up_weight (hidden, d_model), down_weight (d_out, hidden)).

    gate and up are one matmul on their row-interleaved packing, x read once, with
    silu(g) * u fused into its epilogue (g and u have exactly the bits separate gate and up
    matmuls give); its backward is fused likewise. The native CPU kernel reads gate and up where
    they are and never makes the packing (Triton and CUDA interleave a copy first). Biases
    are optional (those models have none; gate_bias and up_bias go together). Each row's bits
    depend on that row alone; the weight gradients are summed in a fixed order."""
    if _native_lane(backend):
        y = _linear.native_swiglu_call.run(x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias)
        if y is not None:
            return y
    _linear.check_swiglu_weights(x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias)
    packed_bias = None if gate_bias is None else _linear.pack_gate_up(gate_bias, up_bias)
    name = _backend(backend, x)
    grad = _needs_grad(x, gate_weight, up_weight, packed_bias)
    hidden = _linear.linear(x, gate_weight, packed_bias, _linear.reference.ACT_SWIGLU, grad, name, up_weight,
                            grad=grad)[0]
    return linear(hidden, down_weight, down_bias, backend=backend)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                     split_size: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Causal attention over q, k, v of shape (B, H, T, D) (k, v may have fewer heads: grouped /
    multi-query attention), scale defaulting to 1/sqrt(D). Keys are cut at multiples of the split
    size (fusedtx.set_split_size, default 256) and the chunks merged in order, so each query's
    output is the same bits as in a chunked prefill or a decode step (attention_with_kv_cache).
    Differentiable; the backward sums in fixed orders (deterministic)."""
    grad = _needs_grad(q, k, v)
    return _causal_attention.causal_attention(q, k, v, scale, split_size, _backend(backend, q), grad=grad)[0]


def attention_with_kv_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor, *,
                            scale: float | None = None, split_size: int | None = None,
                            backend: str | None = None) -> torch.Tensor:
    """Attention of new queries against a KV cache that already holds their keys and values.

    q (B, H, Tq, D); k_cache, v_cache (B, Hkv, Tmax, D); seqlens (B,) ints: sequence b has
    seqlens[b] valid keys and its Tq queries are at positions seqlens[b] - Tq ... seqlens[b] - 1,
    causal among themselves. Sequences may have different lengths; nothing beyond seqlens[b] is
    read. Decode is Tq = 1. The same bits as causal_attention over the whole sequence.
    Inference only (no gradient)."""
    if _native_lane(backend):
        split = config.get_split_size() if split_size is None else split_size
        o = _causal_attention.native_kv_cache_call.run(q, k_cache, v_cache, seqlens, scale, split)
        if o is not None:
            return o
    name = _backend(backend, q)
    if _needs_grad(q, k_cache, v_cache):
        raise ValueError("attention_with_kv_cache is inference-only and has no gradient; run it under "
                         "torch.no_grad(), or use causal_attention for training")
    return _causal_attention.attention_with_kv_cache(q, k_cache, v_cache, seqlens, scale, split_size, name)


def _check_table_args(head_dim, max_positions, theta) -> None:
    for arg, value, least in (("head_dim", head_dim, 2), ("max_positions", max_positions, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"rope_table: {arg} must be an int, got {type(value).__name__}")
        if value < least:
            raise ValueError(f"rope_table: {arg} must be >= {least}, got {value}")
    if head_dim % 2:
        raise ValueError(f"rope_table: head_dim must be even (rotate-half pairs i and i + head_dim / 2), got {head_dim}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise TypeError(f"rope_table: theta must be a real number, got {type(theta).__name__}")
    if not (math.isfinite(theta) and theta > 0):
        raise ValueError(f"rope_table: theta must be a finite number > 0, got {theta}")


def rope_table(head_dim: int, max_positions: int, theta: float = 10000.0, rope_scaling: dict | None = None, *,
               device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary embedding table: (cos, sin), each float32 (max_positions, head_dim // 2).

    inv_freq is HF transformers' (rope_scaling None / {"rope_type": "default"}, or "llama3" with
    factor, low_freq_factor, high_freq_factor and original_max_position_embeddings); each angle is
    float32(position) * inv_freq rounded once to float32, its cos and sin taken in float64 and
    rounded to float32 (reference.rope_table). Built on the CPU, then moved to `device`: every
    backend and device reads the same bits."""
    _check_table_args(head_dim, max_positions, theta)
    cos, sin = reference.rope_table(head_dim, max_positions, float(theta), rope_scaling)
    return cos.to(device), sin.to(device)


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
         backend: str | None = None) -> torch.Tensor:
    """Rotary position embedding (rotate-half layout) of q or k, x (B, H, T, D) of any strides:
    y[i] = x[i] cos - x[i + D/2] sin, y[i + D/2] = x[i + D/2] cos + x[i] sin, with the table row of
    each token's absolute position (positions (B, T) int64; a decode step passes its position),
    in float32 without fused multiply-add, output contiguous in x's dtype. A token's bits depend
    on its values and position alone: a full pass, a chunked prefill and a decode step agree.
    Differentiable with respect to x."""
    if _native_lane(backend):
        y = _rope.native_call.run(x, positions, cos, sin)
        if y is not None:
            return y
    return _rope.rope(x, positions, cos, sin, _backend(backend, x), grad=_needs_grad(x))
