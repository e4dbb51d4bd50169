"""The causal attention ops: fixed-split-size causal attention (training, prefill) and the same
kernel against a KV cache (chunked prefill, decode), with backend dispatch, fake and autograd.

    fusedtx::causal_attention(q, k, v, scale, split_size, backend) -> (o, m, l)
    fusedtx::causal_attention_backward(grad_o, q, k, v, m, l, scale, split_size, backend) -> (dq, dk, dv)
    fusedtx::attention_with_kv_cache(q, k_cache, v_cache, seqlens, scale, split_size, backend) -> o

attention_with_kv_cache is causal_attention's decode face, not another algorithm: both run
the causal_attention_forward kernel, one with every sequence's full length, the other with
the cache's lengths, which is why they share this file. Every backend computes
reference.causal_attention_forward: keys cut at multiples of the split size S counted from
position 0, each chunk reduced on its own, chunk partials merged in ascending order — so a
query's output is the same bits in a full pass, a chunked prefill or a decode step, whatever
else is in the batch. m and l (float32 row max and sum) are saved for the backward, which
follows reference.causal_attention_backward's fixed summation orders (no atomics). The backward
does not read the output o: its D_i is the row sum of P * dP, recomputed from q, k, v, grad_o
and m, l (more accurate than FlashAttention's dO_i . o_i, see reference.causal_attention_backward),
so autograd keeps q, k, v, m, l and not o.
"""
from __future__ import annotations

import math

import torch

from ..config import _check_split_size, get_split_size
from ._dispatch import Kernel, NativeFastPath, check_backend, check_real, register

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (q, k, v, seqlens, scale, split_size) -> (o, m, l)
forward_kernel = Kernel("causal_attention_forward", "causal_attention")
# (grad_o, q, k, v, m, l, scale, split_size) -> (dq, dk, dv)
backward_kernel = Kernel("causal_attention_backward", "causal_attention_backward")


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
    if dim < 1:
        raise ValueError(f"{name}: head_dim (q's last dim) must be >= 1, got {dim}")
    if k.shape[1] < 1 or heads % k.shape[1]:
        raise ValueError(f"{name}: q's heads ({heads}) must be a multiple of {k_name}'s heads ({k.shape[1]})")


def resolve_scale_and_split(q, scale, split_size, name: str) -> tuple[float, int]:
    """scale (default 1/sqrt(head dim)) and split size (default fusedtx.get_split_size()), checked."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_real(scale, name, "scale")
    split = get_split_size() if split_size is None else _check_split_size(split_size, name)
    return scale, split


def unit_head_dim(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as every backend's kernels take them: any strides, but consecutive elements
    along the head dim (the kernels load rows as vectors). Another layout (channels_last, a
    transposed view) is copied once; the values, and so the bits of the result, are the same."""
    return tuple(t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous() for t in tensors)


def _lengths(backend: str, seqlens: torch.Tensor) -> torch.Tensor:
    """seqlens as the kernels take them: int64, on the host for the native and reference kernels
    (they read the lengths to plan their work), where they are for Triton (its kernels read them)."""
    seqlens = seqlens if seqlens.dtype == torch.int64 else seqlens.to(torch.int64)
    return seqlens if backend == "triton" else seqlens.cpu()


# ---------------------------------------------------------------------------------------------
# causal attention (training / full prefill)
# ---------------------------------------------------------------------------------------------
def check_args(q, k, v, scale, split_size, backend):
    check_qkv(q, k, v, "causal_attention")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"causal_attention: k must have q's {q.shape[2]} tokens, got {k.shape[2]} "
                         "(for queries against a longer cache use attention_with_kv_cache)")
    scale, split = resolve_scale_and_split(q, scale, split_size, "causal_attention")
    return q, k, v, scale, split, check_backend(backend, "causal_attention")


def _forward(q, k, v, scale, split_size, backend):
    if q.numel() == 0:  # no sequences, heads or tokens: nothing for a kernel to do, on any backend
        return _fake(q, k, v, scale, split_size, backend)
    lengths = torch.full((q.shape[0],), q.shape[2], dtype=torch.int64,
                         device=q.device if backend == "triton" else "cpu")
    q, k, v = unit_head_dim(q, k, v)
    return forward_kernel(backend, q.device)(q, k, v, lengths, scale, split_size)


def _fake(q, k, v, scale, split_size, backend):
    stats = q.new_empty(q.shape[:3], dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def _check_backward(grad_o, q, k, v, m, l, scale, split_size, backend):
    return grad_o, q, k, v, m, l, scale, split_size, check_backend(backend, "causal_attention_backward")


def _backward_body(grad_o, q, k, v, m, l, scale, split_size, backend):
    if q.numel() == 0:  # k and v have q's batch and tokens: empty too
        return tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    q, k, v = unit_head_dim(q, k, v)
    return backward_kernel(backend, q.device)(grad_o.to(q.dtype).contiguous(), q, k, v, m, l, scale, split_size)


def _backward_fake(grad_o, q, k, v, m, l, scale, split_size, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


causal_attention_backward = register(
    "causal_attention_backward",
    "(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor m, Tensor l, float scale, SymInt split_size, "
    "str backend) -> (Tensor, Tensor, Tensor)",
    check=_check_backward, body=_backward_body, fake=_backward_fake)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, split_size, backend = inputs
    _, m, l = output  # o is not needed: the backward's D comes from P and dP
    ctx.save_for_backward(q, k, v, m, l)
    ctx.scale, ctx.split_size, ctx.backend = scale, split_size, backend
    ctx.mark_non_differentiable(m, l)


def _backward(ctx, grad_o, _grad_m, _grad_l):
    q, k, v, m, l = ctx.saved_tensors
    run = causal_attention_backward.in_backward(ctx)
    dq, dk, dv = run(grad_o, q, k, v, m, l, ctx.scale, ctx.split_size, ctx.backend)
    return dq, dk, dv, None, None, None


causal_attention = register(
    "causal_attention",
    "(Tensor q, Tensor k, Tensor v, float scale, SymInt split_size, str backend) -> (Tensor, Tensor, Tensor)",
    check=check_args, body=_forward, fake=_fake, setup_context=_setup_context, backward=_backward)


# ---------------------------------------------------------------------------------------------
# attention against a KV cache (chunked prefill, decode): inference only
# ---------------------------------------------------------------------------------------------
def check_kv_cache_args(q, k_cache, v_cache, seqlens, scale, split_size, backend):
    name = "attention_with_kv_cache"
    check_qkv(q, k_cache, v_cache, name, "k_cache", "v_cache")
    if not isinstance(seqlens, torch.Tensor) or seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: seqlens must be an int32/int64 tensor, got "
                        f"{seqlens.dtype if isinstance(seqlens, torch.Tensor) else type(seqlens).__name__}")
    if tuple(seqlens.shape) != (q.shape[0],):
        raise ValueError(f"{name}: seqlens must have shape [{q.shape[0]}] (one length per sequence), "
                         f"got {list(seqlens.shape)}")
    scale, split = resolve_scale_and_split(q, scale, split_size, name)
    return q, k_cache, v_cache, seqlens, scale, split, check_backend(backend, name)


def check_seqlens(q, k_cache, seqlens, name: str = "attention_with_kv_cache") -> None:
    """Every sequence holds its Tq queries and fits the cache (values: read back from a GPU)."""
    if q.shape[0] == 0:
        return
    # On the CPU (where KVCache keeps them) a list is far cheaper than two reductions; on a GPU
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


# _kv_cache_forward's common case, native: (q, k_cache, v_cache, seqlens, scale, split_size) -> o
native_kv_cache_forward = NativeFastPath("attention_with_kv_cache")
# fusedtx.functional.attention_with_kv_cache's whole call, native on CPU, checks included (None
# where a check would fail: the Python path raises):
# (q, k_cache, v_cache, seqlens, scale or None, split_size) -> o
native_kv_cache_call = NativeFastPath("attention_with_kv_cache_call")


def _kv_cache_forward(q, k_cache, v_cache, seqlens, scale, split_size, backend):
    if backend == "native":
        o = native_kv_cache_forward.run(q, k_cache, v_cache, seqlens, scale, split_size)
        if o is not None:
            return o
    check_seqlens(q, k_cache, seqlens)
    if q.numel() == 0:  # no queries: nothing to attend
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    lengths = _lengths(backend, seqlens)
    q, k_cache, v_cache = unit_head_dim(q, k_cache, v_cache)
    return forward_kernel(backend, q.device)(q, k_cache, v_cache, lengths, scale, split_size)[0]


attention_with_kv_cache = register(
    "attention_with_kv_cache",
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens, float scale, SymInt split_size, str backend) "
    "-> Tensor",
    check=check_kv_cache_args, body=_kv_cache_forward,
    fake=lambda q, k_cache, v_cache, seqlens, scale, split_size, backend:
        torch.empty_like(q, memory_format=torch.contiguous_format))
