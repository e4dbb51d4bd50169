"""The attention ops: fixed-split-size causal attention (training/prefill) and attention against a
KV cache (chunked prefill, decode), with backend dispatch, fake and autograd registrations.

    fusedtx::causal_attention(Tensor q, Tensor k, Tensor v, float scale, int split_size, str backend)
        -> (Tensor o, Tensor m, Tensor l)
    fusedtx::causal_attention_backward(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor m, Tensor l,
        float scale, int split_size, str backend) -> (Tensor dq, Tensor dk, Tensor dv)
    fusedtx::attention_with_kv_cache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens,
        float scale, int split_size, str backend) -> Tensor o

Every backend computes reference.causal_attention_forward: keys cut at multiples of the split size S
counted from position 0, each chunk reduced on its own, chunk partials merged in ascending
order — so a query's output is the same bits in a full pass, a chunked prefill or a decode step,
whatever else is in the batch. m and l (float32 row max and sum) are saved for the backward,
which follows reference.causal_attention_backward's fixed summation orders (no atomics). The backward
does not read the output o: its D_i is the row sum of P * dP, recomputed from q, k, v, grad_o
and m, l (more accurate than FlashAttention's dO_i . o_i, see reference.causal_attention_backward), so
autograd keeps q, k, v, m, l and not o.
"""
from __future__ import annotations

import functools
import math
from numbers import Real

import torch

from .. import _extension, reference
from ..backends import BACKENDS, BackendUnavailableError
from ..config import _check_split_size, get_split_size
from ._eager import backward_op, eager_autograd

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_qkv(q, k, v, name: str, k_name: str = "k", v_name: str = "v") -> None:
    """q (B, H, Tq, D), k and v (B, Hkv, Tk, D): types, dtypes, devices and shapes, named."""
    for arg, t in (("q", q), (k_name, k), (v_name, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: {arg} must be 4-D (batch, heads, tokens, head_dim), got shape {list(t.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: q must be float32, bfloat16 or float16, got {q.dtype}")
    for arg, t in ((k_name, k), (v_name, v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: {arg} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but q is on {q.device}; put them on one device")
    if k.shape != v.shape:
        raise ValueError(f"{name}: {k_name} and {v_name} must have one shape, got {list(k.shape)} and {list(v.shape)}")
    batch, heads, _, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"{name}: {k_name} must be (batch={batch}, kv_heads, tokens, head_dim={dim}) like q, "
                         f"got {list(k.shape)}")
    if k.shape[1] < 1 or heads % k.shape[1]:
        raise ValueError(f"{name}: q's heads ({heads}) must be a multiple of {k_name}'s heads ({k.shape[1]})")


def resolve_scale_and_split(q, scale, split_size, name: str) -> tuple[float, int]:
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    # A float needs no isinstance check against the Real ABC (slow: a decode step calls this per layer).
    if (type(scale) is not float and (isinstance(scale, bool) or not isinstance(scale, (int, Real)))) \
            or not math.isfinite(scale):
        raise ValueError(f"{name}: scale must be a finite real number or None, got {scale!r}")
    split = get_split_size() if split_size is None else _check_split_size(split_size, name)
    return float(scale), split


def _check_backend(backend: str, name: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")


_native_ops: dict[tuple[str, str], object] = {}  # (op name, dispatch key) -> the op, once found


def _native(op_name: str, device: torch.device):
    """torch.ops.fusedtx_native.<op_name>, or a clear error where it has no kernel for device.
    Found once per (op, device type): the lookup costs a few microseconds, a decode step's
    kernel little more, and the extension's kernels do not change once it is loaded."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    op = _native_ops.get((op_name, key))
    if op is not None:
        return op
    ops = _extension.ops()
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedtx_native::{op_name}", key):
        raise BackendUnavailableError(f"the native backend has no {key} kernel for {op_name} yet; "
                                      f"use backend='triton' or 'reference' on {device.type}")
    op = _native_ops[(op_name, key)] = getattr(ops, op_name)
    return op


def _forward(backend, q, k, v, seqlens, scale, split_size):
    if backend == "reference":
        return reference.causal_attention_forward(q, k, v, seqlens.cpu(), scale, split_size)
    if backend == "triton":
        from ..kernels import causal_attention as triton_causal_attention

        return triton_causal_attention.causal_attention_forward(q, k, v, seqlens, scale, split_size)
    return _native("causal_attention_forward", q.device)(q, k, v, seqlens.cpu(), scale, split_size)


def _full_lengths(q: torch.Tensor) -> torch.Tensor:
    return torch.full((q.shape[0],), q.shape[2], dtype=torch.int64, device=q.device)


# ---------------------------------------------------------------------------------------------
# causal attention (training / full prefill)
# ---------------------------------------------------------------------------------------------
def causal_attention_impl(q, k, v, scale, split_size, backend, checked: bool = False):
    """The op's body; fusedtx.functional calls it directly in eager inference, with q, k, v
    already checked (checked=True)."""
    if not checked:
        check_qkv(q, k, v, "causal_attention")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"causal_attention: k must have q's {q.shape[2]} tokens, got {k.shape[2]} "
                         "(for queries against a longer cache use attention_with_kv_cache)")
    _check_backend(backend, "causal_attention")
    return _forward(backend, q, k, v, _full_lengths(q), scale, split_size)


@torch.library.custom_op("fusedtx::causal_attention", mutates_args=())
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, split_size: int,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    o, m, l = causal_attention_impl(q, k, v, scale, split_size, backend)
    return o, m, l


@causal_attention.register_fake
def _(q, k, v, scale, split_size, backend):
    check_qkv(q, k, v, "causal_attention")
    stats = q.new_empty(q.shape[:3], dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def causal_attention_backward_impl(grad_o, q, k, v, m, l, scale, split_size, backend):
    """The backward op's body."""
    _check_backend(backend, "causal_attention")
    grad_o = grad_o.to(q.dtype).contiguous()
    if backend == "reference":
        return reference.causal_attention_backward(grad_o, q, k, v, m, l, scale, split_size)
    if backend == "triton":
        from ..kernels import causal_attention_backward as triton_causal_attention_backward

        return triton_causal_attention_backward.causal_attention_backward(grad_o, q, k, v, m, l, scale, split_size)
    return _native("causal_attention_backward", q.device)(grad_o, q, k, v, m, l, scale, split_size)


@torch.library.custom_op("fusedtx::causal_attention_backward", mutates_args=())
def causal_attention_backward(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              m: torch.Tensor, l: torch.Tensor, scale: float, split_size: int,
                              backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return causal_attention_backward_impl(grad_o, q, k, v, m, l, scale, split_size, backend)


@causal_attention_backward.register_fake
def _(grad_o, q, k, v, m, l, scale, split_size, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, split_size, backend = inputs
    _, m, l = output  # o is not needed: the backward's D comes from P and dP
    ctx.save_for_backward(q, k, v, m, l)
    ctx.scale, ctx.split_size, ctx.backend = scale, split_size, backend
    ctx.mark_non_differentiable(m, l)


def _backward(ctx, grad_o, _grad_m, _grad_l):
    q, k, v, m, l = ctx.saved_tensors
    run = backward_op(ctx, causal_attention_backward, causal_attention_backward_impl)
    dq, dk, dv = run(grad_o, q, k, v, m, l, ctx.scale, ctx.split_size, ctx.backend)
    return dq, dk, dv, None, None, None


causal_attention.register_autograd(_backward, setup_context=_setup_context)
# fusedtx.functional has checked q, k and v before it calls this.
causal_attention_eager = eager_autograd("causal_attention", functools.partial(causal_attention_impl, checked=True),
                                        _setup_context, _backward)


# ---------------------------------------------------------------------------------------------
# attention against a KV cache (chunked prefill, decode): inference only
# ---------------------------------------------------------------------------------------------
def check_seqlens(q, k_cache, seqlens, name: str = "attention_with_kv_cache") -> None:
    if not isinstance(seqlens, torch.Tensor) or seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: seqlens must be an int32/int64 tensor, got "
                        f"{seqlens.dtype if isinstance(seqlens, torch.Tensor) else type(seqlens).__name__}")
    if tuple(seqlens.shape) != (q.shape[0],):
        raise ValueError(f"{name}: seqlens must have shape [{q.shape[0]}] (one length per sequence), "
                         f"got {list(seqlens.shape)}")
    if q.shape[0] == 0:
        return
    # On the CPU (where KVCache keeps them) a list is ~10x cheaper than two reductions; on a GPU
    # one reduction, read back once.
    if seqlens.device.type == "cpu":
        lengths = seqlens.tolist()
        lo, hi = min(lengths), max(lengths)
    else:
        lo, hi = (int(x) for x in torch.aminmax(seqlens))
    if lo < q.shape[2]:
        raise ValueError(f"{name}: every seqlens[b] must be >= Tq = {q.shape[2]} (the queries are the last Tq "
                         f"tokens of each sequence), got min {lo}")
    if hi > k_cache.shape[2]:
        raise ValueError(f"{name}: every seqlens[b] must be <= the cache length Tmax = {k_cache.shape[2]}, "
                         f"got max {hi}")


def attention_with_kv_cache_impl(q, k_cache, v_cache, seqlens, scale, split_size, backend):
    check_qkv(q, k_cache, v_cache, "attention_with_kv_cache", "k_cache", "v_cache")
    check_seqlens(q, k_cache, seqlens)
    _check_backend(backend, "attention_with_kv_cache")
    lengths = seqlens if seqlens.dtype == torch.int64 else seqlens.to(torch.int64)
    return _forward(backend, q, k_cache, v_cache, lengths, scale, split_size)[0]


@torch.library.custom_op("fusedtx::attention_with_kv_cache", mutates_args=())
def attention_with_kv_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor,
                            scale: float, split_size: int, backend: str) -> torch.Tensor:
    return attention_with_kv_cache_impl(q, k_cache, v_cache, seqlens, scale, split_size, backend)


@attention_with_kv_cache.register_fake
def _(q, k_cache, v_cache, seqlens, scale, split_size, backend):
    check_qkv(q, k_cache, v_cache, "attention_with_kv_cache", "k_cache", "v_cache")
    return torch.empty_like(q, memory_format=torch.contiguous_format)
