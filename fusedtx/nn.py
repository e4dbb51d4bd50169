"""Drop-in nn.Module layers built on fusedtx.functional."""
from __future__ import annotations

import torch

from . import functional as F


class Softmax(torch.nn.Module):
    """torch.nn.Softmax with fusedtx's fused, batch-invariant kernel (and optional scale/causal)."""

    def __init__(self, dim: int = -1, *, scale: float | None = None, causal: bool = False,
                 backend: str | None = None):
        super().__init__()
        self.dim, self.scale, self.causal, self.backend = dim, scale, causal, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(x, self.dim, scale=self.scale, causal=self.causal, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}, causal={self.causal}, backend={self.backend}"


class SiLU(torch.nn.Module):
    """Drop-in for torch.nn.SiLU running fusedtx.activation(x, "silu"): each element's bits
    depend on its value alone, forward and backward."""

    def __init__(self, inplace: bool = False, *, backend: str | None = None):
        super().__init__()
        self.backend = backend  # `inplace` is accepted for torch.nn.SiLU's signature; the output is new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.activation(x, "silu", backend=self.backend)


class GELU(torch.nn.Module):
    """Drop-in for torch.nn.GELU(approximate="none" | "tanh") running fusedtx.activation(x,
    "gelu" | "gelu_tanh"): each element's bits depend on its value alone, forward and backward."""

    def __init__(self, approximate: str = "none", *, backend: str | None = None):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate, self.backend = approximate, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.activation(x, "gelu" if self.approximate == "none" else "gelu_tanh", backend=self.backend)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class LogSoftmax(torch.nn.Module):
    """Drop-in for torch.nn.LogSoftmax(dim) with fusedtx's fused, batch-invariant kernel."""

    def __init__(self, dim: int | None = None, *, backend: str | None = None):
        super().__init__()
        self.dim, self.backend = dim, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim is None:
            raise ValueError("LogSoftmax: dim must be given (torch.nn.LogSoftmax's implicit dim is deprecated), got None")
        return F.log_softmax(x, self.dim, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, backend={self.backend}"


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for torch.nn.LayerNorm (same arguments, parameters and state_dict) running
    fusedtx.layer_norm: batch-invariant output and input gradient, deterministic weight and
    bias gradients."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str | None = None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for torch.nn.RMSNorm (same arguments, parameters and state_dict) running
    fusedtx.rms_norm: batch-invariant output and input gradient, a deterministic weight gradient."""

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, backend: str | None = None):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps, backend=self.backend)


class Linear(torch.nn.Linear):
    """Drop-in for torch.nn.Linear (same arguments, parameters and state_dict) running
    fusedtx.linear: every output row's bits are independent of the batch; optional fused GELU."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 activation: str | None = None, backend: str | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        F.check_activation(activation)  # reject an unknown activation now, not at the first call
        self.activation, self.backend = activation, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias, activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}, backend={self.backend}"


class Conv1D(torch.nn.Module):
    """Hugging Face GPT-2's Conv1D, y = x @ weight + bias with weight laid out (in_features,
    out_features), on fusedtx.linear (same parameters and state_dict): what fusedtx.convert puts
    in its place. The kernels read the weight through its transpose's strides, no copy; an output
    element's bits are those of a Linear holding weight.t()."""

    def __init__(self, out_features: int, in_features: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str | None = None):
        super().__init__()
        self.nf, self.nx = out_features, in_features
        self.weight = torch.nn.Parameter(torch.empty(in_features, out_features, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.t(), self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.nx}, out_features={self.nf}, bias={self.bias is not None}, backend={self.backend}"


class GeluFFN(torch.nn.Module):
    """The GPT-2 feed-forward block, c_proj(gelu(c_fc(x))), with the GELU fused into c_fc's matmul.

    Children `c_fc` (d_model -> d_hidden, default 4 d_model) and `c_proj` (d_hidden -> d_model) are
    fusedtx.nn.Linear, named as in GPT-2, so a state_dict of the same layout loads unchanged.
    approximate: "none" (exact erf GELU) or "tanh" (GPT-2's)."""

    def __init__(self, d_model: int, d_hidden: int | None = None, bias: bool = True, approximate: str = "none",
                 device=None, dtype=None, *, backend: str | None = None):
        super().__init__()
        if approximate not in F.GELU_APPROXIMATIONS:
            raise ValueError(f"GeluFFN: approximate must be 'none' or 'tanh', got {approximate!r}")
        d_hidden = 4 * d_model if d_hidden is None else d_hidden
        self.c_fc = Linear(d_model, d_hidden, bias, device, dtype, backend=backend)
        self.c_proj = Linear(d_hidden, d_model, bias, device, dtype, backend=backend)
        self.approximate, self.backend = approximate, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu_ffn(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                          approximate=self.approximate, backend=self.backend)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}, backend={self.backend}"


class RotaryEmbedding(torch.nn.Module):
    """Llama's rotary position embeddings for q and k: the fusedtx.rope_table (cos, sin) as
    non-persistent buffers (rebuilt, never loaded from a state_dict), and
    forward(q, k, positions) -> (q_rot, k_rot) with fusedtx.rope. positions (B, T) int64 are the
    tokens' absolute positions: the same bits in a full pass, a chunked prefill and a decode step."""

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0, rope_scaling: dict | None = None,
                 device=None, *, backend: str | None = None):
        super().__init__()
        cos, sin = F.rope_table(head_dim, max_positions, theta, rope_scaling, device=device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.head_dim, self.max_positions, self.theta, self.rope_scaling = head_dim, max_positions, theta, rope_scaling
        self.backend = backend

    def _apply(self, fn, recurse=True):
        # module.to(dtype) / .half() / .bfloat16() cast floating buffers: the table stays float32,
        # rebuilt (the same bits) on the device it was moved to.
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            self.cos, self.sin = F.rope_table(self.head_dim, self.max_positions, self.theta, self.rope_scaling,
                                              device=self.cos.device)
        return self

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotate(q, positions), self.rotate(k, positions)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One tensor (B, H, T, D) rotated, e.g. q and k heads side by side: rope is elementwise
        per token and head, so rotating them together gives each the bits of rotating it alone."""
        return F.rope(x, positions, self.cos, self.sin, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, max_positions={self.max_positions}, theta={self.theta}, "
                f"rope_scaling={self.rope_scaling}, backend={self.backend}")


class PackingCache:
    """A tensor made from some parameters (q, k and v stacked) for the
    inference path, made once and reused as long as the parameters are the same tensors,
    unmodified: the key is each one's identity, storage, `_version`, dtype, device and shape, so
    an in-place update (an optimizer step, load_state_dict) or a new tensor packs again. Usable
    when autograd records nothing from these tensors and outside torch.compile (usable()): a
    packing of tensors that require grad belongs to that step's graph, and a compiled graph
    packs for itself."""

    def __init__(self):
        self.key = self.value = None

    @staticmethod
    def usable(tensors=()) -> bool:
        """No autograd graph through `tensors` (grad mode off, or none requires grad), no tracing."""
        return ((not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors))
                and not torch.compiler.is_compiling())

    def get(self, tensors, pack):
        """pack(*tensors), from the cache when the tensors are the ones it was made from."""
        key = tuple(None if t is None else (id(t), t._version, t.data_ptr(), t.dtype, t.device, t.shape)
                    for t in tensors)
        if self.value is None or self.key != key:
            self.key, self.value = key, pack(*tensors)
        return self.value

    def clear(self) -> None:
        self.key = self.value = None


def is_plain_linear(module: torch.nn.Module) -> bool:
    """A fusedtx Linear without activation or forward hooks: a caller may read its weight and bias
    into a fused kernel instead of calling it (a subclass, an adapter swapped in, or a hook must
    see its own call)."""
    return (type(module) is Linear and module.activation is None and not module._forward_hooks
            and not module._forward_pre_hooks)


class SwiGLUFFN(torch.nn.Module):
    """The Llama / Qwen / Mistral feed-forward block, down_proj(silu(gate_proj(x)) * up_proj(x)),
    on fusedtx.swiglu_ffn: gate and up as one packed matmul with silu(g) * u in its epilogue.

    Children `gate_proj`, `up_proj` (d_model -> d_hidden) and `down_proj` (d_hidden -> d_model)
    are fusedtx.nn.Linear, named as in Hugging Face's LlamaMLP, so its state_dict loads
    unchanged. A child replaced by another module, or given a forward hook, is called as a
    module (down(silu(gate(x)) * up(x)) unfused) so that it sees its own call. The matmul reads
    gate and up where they are (no packed copy: no memory beyond the parameters, nothing to go
    stale when they change)."""

    def __init__(self, d_model: int, d_hidden: int, bias: bool = False, device=None, dtype=None, *,
                 backend: str | None = None):
        super().__init__()
        self.gate_proj = Linear(d_model, d_hidden, bias, device, dtype, backend=backend)
        self.up_proj = Linear(d_model, d_hidden, bias, device, dtype, backend=backend)
        self.down_proj = Linear(d_hidden, d_model, bias, device, dtype, backend=backend)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        if not all(map(is_plain_linear, (gate, up, down))):
            # A child swapped (an adapter) or hooked must see its own call: the three projections
            # as modules, silu(g) * u between them (elementwise: the same bits in any batch).
            return down(F.activation(gate(x), "silu", backend=self.backend) * up(x))
        return F.swiglu_ffn(x, gate.weight, up.weight, down.weight, gate_bias=gate.bias, up_bias=up.bias,
                            down_bias=down.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend}"


def _is_int(value) -> bool:
    """A Python int that is not a bool (True would pass isinstance(value, int))."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _shape_of(t) -> object:
    return list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


class KVCache:
    """Preallocated keys and values of one attention layer for a batch of sequences, each with its
    own length: (batch, kv_heads, max_len, head_dim) buffers and `lengths` (batch,) int64.

    append(k, v) writes the new (batch, kv_heads, T, head_dim) keys and values of every sequence
    right after its own length and returns the lengths after them — what attention_with_kv_cache
    takes as seqlens; the attention then reads nothing beyond them."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, *, dtype=torch.float32,
                 device=None):
        for name, value, least in (("batch", batch, 0), ("kv_heads", kv_heads, 1), ("max_len", max_len, 0),
                                   ("head_dim", head_dim, 1)):
            if not _is_int(value) or value < least:
                raise ValueError(f"KVCache: {name} must be an int >= {least}, got {value!r}")
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(batch, dtype=torch.int64)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if (not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.dim() != 4
                or k.shape != v.shape or k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3]):
            raise ValueError(f"KVCache.append: k and v must be (batch, kv_heads, T, head_dim) = "
                             f"({self.k.shape[0]}, {self.k.shape[1]}, T, {self.k.shape[3]}), "
                             f"got {_shape_of(k)} and {_shape_of(v)}")
        tokens, lengths = k.shape[2], self.lengths.tolist()
        if lengths and max(lengths) + tokens > self.max_len:
            raise ValueError(f"KVCache.append: {tokens} more tokens overflow the cache "
                             f"(lengths up to {max(lengths)}, max_len {self.max_len})")
        if len(set(lengths)) == 1:  # a single sequence or a uniform batch: one slice write
            start = lengths[0]
            self.k[:, :, start:start + tokens] = k
            self.v[:, :, start:start + tokens] = v
        elif lengths:  # ragged: each sequence's tokens at its own positions, one scatter per buffer
            positions = (self.lengths[:, None] + torch.arange(tokens)).to(self.k.device)   # (B, T)
            rows = torch.arange(len(lengths), device=self.k.device)[:, None]               # (B, 1)
            # k[rows, :, positions] indexes (B, T, kv_heads, head_dim): the new tokens' layout.
            self.k[rows, :, positions] = k.transpose(1, 2).to(self.k.dtype)
            self.v[rows, :, positions] = v.transpose(1, 2).to(self.v.dtype)
        self.lengths = self.lengths + tokens
        return self.lengths

    def truncate(self, lengths) -> None:
        """Forget every sequence's keys beyond lengths[b] (e.g. after a right-padded prefill):
        they stay in the buffers but are never read again, and the next append overwrites them."""
        lengths = torch.as_tensor(lengths).cpu()
        if not _is_integer_dtype(lengths.dtype):
            raise TypeError(f"KVCache.truncate: lengths must be integers, got {lengths.dtype}")
        lengths = lengths.to(torch.int64)
        if lengths.shape != self.lengths.shape:
            raise ValueError(f"KVCache.truncate: lengths must have shape {list(self.lengths.shape)}, "
                             f"got {list(lengths.shape)}")
        if bool((lengths < 0).any()) or bool((lengths > self.lengths).any()):
            raise ValueError(f"KVCache.truncate: lengths must lie in [0, current lengths "
                             f"{self.lengths.tolist()}], got {lengths.tolist()}")
        self.lengths = lengths.clone()

    def reset(self) -> None:
        self.lengths.zero_()


class CausalSelfAttention(torch.nn.Module):
    """GPT-2 causal self-attention on fusedtx kernels: c_attn (fused QKV projection), the
    fixed-split-size attention, c_proj. n_kv_head < n_head gives grouped-query attention.

    forward(x) runs the full causal pass (training, prefill); forward(x, kv_cache) appends this
    step's keys and values to the cache and attends to everything cached — chunked prefill or
    decode — with the same bits for every token as the full pass."""

    def __init__(self, d_model: int, n_head: int, bias: bool = True, n_kv_head: int | None = None,
                 split_size: int | None = None, device=None, dtype=None, *, backend: str | None = None):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        for name, value in (("d_model", d_model), ("n_head", n_head), ("n_kv_head", n_kv_head)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"CausalSelfAttention: {name} must be a positive int, got {value!r}")
        if d_model % n_head or n_head % n_kv_head:
            raise ValueError(f"CausalSelfAttention: d_model ({d_model}) must be a multiple of n_head ({n_head}) "
                             f"and n_head a multiple of n_kv_head ({n_kv_head})")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        self.c_attn = Linear(d_model, (n_head + 2 * n_kv_head) * self.head_dim, bias, device, dtype, backend=backend)
        self.c_proj = Linear(d_model, d_model, bias, device, dtype, backend=backend)
        self.split_size, self.backend = split_size, backend

    def new_kv_cache(self, batch: int, max_len: int, *, dtype=None, device=None) -> KVCache:
        return KVCache(batch, self.n_kv_head, max_len, self.head_dim, dtype=dtype or self.c_attn.weight.dtype,
                       device=device or self.c_attn.weight.device)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        batch, tokens, d_model = x.shape
        q, k, v = self.c_attn(x).split([self.n_head * self.head_dim] + 2 * [self.n_kv_head * self.head_dim], dim=2)
        q = q.view(batch, tokens, self.n_head, self.head_dim).transpose(1, 2)       # (B, nh, T, hs)
        k = k.view(batch, tokens, self.n_kv_head, self.head_dim).transpose(1, 2)    # (B, nkv, T, hs)
        v = v.view(batch, tokens, self.n_kv_head, self.head_dim).transpose(1, 2)
        if kv_cache is None:
            y = F.causal_attention(q, k, v, split_size=self.split_size, backend=self.backend)
        else:
            before = kv_cache.lengths  # append replaces the tensor, never writes into it
            seqlens = kv_cache.append(k, v)
            try:
                y = F.attention_with_kv_cache(q, kv_cache.k, kv_cache.v, seqlens, split_size=self.split_size,
                                              backend=self.backend)
            except BaseException:
                kv_cache.lengths = before  # what was appended lies beyond the lengths: never read
                raise
        return self.c_proj(y.transpose(1, 2).reshape(batch, tokens, d_model))
