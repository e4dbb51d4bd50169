"""fusedtx.batch_invariant_mode: run a plain-PyTorch model's reductions on fusedtx kernels, without
changing its code.

    with fusedtx.batch_invariant_mode():
        logits = model(idx)                  # F.linear, x @ W, layer_norm, softmax, ... on fusedtx
    with fusedtx.batch_invariant_mode(strict=True):
        model(idx)                           # also raises on a call it cannot make invariant

A torch.overrides.TorchFunctionMode: every torch function called inside the block is offered to
it first, and these are answered by fusedtx ops (forward and backward, on CPU and CUDA):

    F.linear(x, w, b)                                      fusedtx.linear
    x @ w, torch.matmul / mm / addmm with a 2-D w          fusedtx.linear(x, w.t()) (+ addmm's bias)
    F.layer_norm, F.rms_norm                               fusedtx.layer_norm / rms_norm
    softmax, log_softmax (torch., F., Tensor.)             fusedtx.softmax / log_softmax
    F.silu, F.gelu (exact or tanh)                         fusedtx.activation
    F.scaled_dot_product_attention, is_causal=True,        fusedtx.causal_attention
      no mask, no dropout, as many queries as keys

A function mode rather than ATen-level overrides (torch.library): it sees the Python call with
its meaning intact (a weight operand, is_causal) before it is decomposed, runs in eager code and
under autograd alike, and leaves everything else to PyTorch untouched. Calls it cannot serve —
an unsupported dtype (float64) or device, SDPA with a mask, dropout or top-left causal alignment,
a matmul of two batched activations (bmm, einsum), and on CPU the elementwise
sigmoid, softplus, mish, elu, selu and exp2 (PyTorch's CPU kernels for those compute an element
differently in their vector body and scalar tail, so its bits depend on where it sits in the
tensor) — run as PyTorch runs them;
with strict=True they raise a RuntimeError naming the call and why, so that a user learns
which call keeps the model from being invariant. Modules built from fusedtx layers, and
fusedtx's own calls, pass through the mode unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as torch_F
from torch.overrides import TorchFunctionMode

from . import functional as F

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)

_LINEAR = {torch_F.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}
_ADDMM = {torch.addmm, torch.Tensor.addmm}
_LAYER_NORM = {torch_F.layer_norm}
_RMS_NORM = {torch_F.rms_norm}
_SOFTMAX = {torch.softmax, torch_F.softmax, torch.Tensor.softmax}
_LOG_SOFTMAX = {torch.log_softmax, torch_F.log_softmax, torch.Tensor.log_softmax}
_SDPA = {torch_F.scaled_dot_product_attention}
_SILU = {torch_F.silu}
_GELU = {torch_F.gelu}
# Elementwise functions whose PyTorch CPU kernels are not batch invariant (vector body and scalar
# tail differ in the last bit) and that fusedtx has no kernel for: strict mode names them on CPU.
_POSITION_DEPENDENT = {torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid", torch_F.softplus: "softplus",
                       torch_F.mish: "mish", torch_F.elu: "elu", torch_F.selu: "selu", torch.exp2: "exp2",
                       torch.Tensor.exp2: "exp2"}
# Reductions across rows or within a row that fusedtx cannot answer yet: strict mode names them.
_UNSERVED = {torch.bmm: "bmm", torch.Tensor.bmm: "bmm", torch.baddbmm: "baddbmm", torch.Tensor.baddbmm: "baddbmm",
             torch.einsum: "einsum"}


class _Unserved(Exception):
    """This call stays with PyTorch; the message says why (strict mode raises it)."""


def _check_tensor(t, what: str) -> None:
    if t.dtype not in _FLOATS:
        raise _Unserved(f"{what} is {t.dtype}; fusedtx kernels take float32, bfloat16 and float16")
    if t.device.type not in ("cpu", "cuda"):
        raise _Unserved(f"{what} is on {t.device}; fusedtx runs on cpu and cuda")


def _linear(args, kwargs):
    x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    _check_tensor(x, "the input")
    return F.linear(x, weight, bias)


def _matmul(args, kwargs, name: str):
    a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
    if not isinstance(b, torch.Tensor) or a.dim() < 1 or b.dim() != 2 or kwargs.get("out") is not None:
        shape = list(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        raise _Unserved(f"{name} of a {a.dim()}-D by a {shape} operand: only x @ W with a 2-D W (a weight) is "
                        "served; a product of two batched activations is not")
    _check_tensor(a, "the first operand")
    return F.linear(a, b.t())


def _addmm(args, kwargs):
    bias, a, b = args[0], args[1], args[2]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if beta != 1 or alpha != 1 or kwargs.get("out") is not None:
        raise _Unserved(f"addmm with beta={beta}, alpha={alpha}: only beta = alpha = 1 is served")
    _check_tensor(a, "mat1")
    if bias.dim() == 1 and bias.shape[0] == b.shape[1] and bias.dtype == a.dtype:
        return F.linear(a, b.t(), bias)
    return bias + F.linear(a, b.t())


def _layer_norm(args, kwargs):
    x, shape = args[0], args[1] if len(args) > 1 else kwargs["normalized_shape"]
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    bias = args[3] if len(args) > 3 else kwargs.get("bias")
    eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
    _check_tensor(x, "the input")
    return F.layer_norm(x, shape, weight, bias, eps)


def _rms_norm(args, kwargs):
    x, shape = args[0], args[1] if len(args) > 1 else kwargs["normalized_shape"]
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    eps = args[3] if len(args) > 3 else kwargs.get("eps")
    _check_tensor(x, "the input")
    return F.rms_norm(x, shape, weight, eps)


def _softmax(args, kwargs, op, name: str):
    """softmax / log_softmax(x, dim, dtype) (F.'s third positional argument is _stacklevel)."""
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    dtype = args[2] if len(args) > 2 and not isinstance(args[2], int) else kwargs.get("dtype")
    if dim is None:
        raise _Unserved(f"{name} without dim")
    if dtype is not None:
        x = x.to(dtype)
    _check_tensor(x, "the input")
    return op(x, dim)


def _silu(args, kwargs):
    x = args[0]
    if (args[1] if len(args) > 1 else kwargs.get("inplace", False)):
        raise _Unserved("silu with inplace=True: fusedtx writes a new tensor")
    _check_tensor(x, "the input")
    return F.activation(x, "silu")


def _gelu(args, kwargs):
    x = args[0]
    approximate = args[1] if len(args) > 1 else kwargs.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise _Unserved(f"gelu with approximate={approximate!r}")
    _check_tensor(x, "the input")
    return F.activation(x, "gelu" if approximate == "none" else "gelu_tanh")


def _sdpa(args, kwargs):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    q, k, v = bound["query"], bound["key"], bound["value"]
    if bound.get("attn_mask") is not None:
        raise _Unserved("scaled_dot_product_attention with an attn_mask: only is_causal=True without a mask is served")
    if bound.get("dropout_p", 0.0):
        raise _Unserved(f"scaled_dot_product_attention with dropout_p={bound['dropout_p']}")
    if not bound.get("is_causal", False):
        raise _Unserved("scaled_dot_product_attention with is_causal=False: only causal attention is served")
    if q.dim() != 4 or q.shape[-2] != k.shape[-2]:
        raise _Unserved("scaled_dot_product_attention with a query length other than the key length (SDPA's "
                        "is_causal aligns them top-left) or not (batch, heads, tokens, dim)")
    if q.shape[1] != k.shape[1] and not bound.get("enable_gqa", False):
        raise _Unserved("scaled_dot_product_attention with fewer key heads than query heads and enable_gqa=False")
    _check_tensor(q, "the query")
    return F.causal_attention(q, k, v, scale=bound.get("scale"))


class BatchInvariantMode(TorchFunctionMode):
    """See the module docstring. strict: raise on a call that stays with PyTorch."""

    def __init__(self, strict: bool = False):
        super().__init__()
        if not isinstance(strict, bool):
            raise TypeError(f"batch_invariant_mode: strict must be a bool, got {type(strict).__name__}")
        self.strict = strict

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            if func in _LINEAR:
                return _linear(args, kwargs)
            if func in _MATMUL:
                return _matmul(args, kwargs, getattr(func, "__name__", "matmul"))
            if func in _ADDMM:
                return _addmm(args, kwargs)
            if func in _LAYER_NORM:
                return _layer_norm(args, kwargs)
            if func in _RMS_NORM:
                return _rms_norm(args, kwargs)
            if func in _SOFTMAX:
                return _softmax(args, kwargs, F.softmax, "softmax")
            if func in _LOG_SOFTMAX:
                return _softmax(args, kwargs, F.log_softmax, "log_softmax")
            if func in _SDPA:
                return _sdpa(args, kwargs)
            if func in _SILU:
                return _silu(args, kwargs)
            if func in _GELU:
                return _gelu(args, kwargs)
            if func in _UNSERVED:
                raise _Unserved(f"{_UNSERVED[func]} has no fusedtx kernel yet")
            if func in _POSITION_DEPENDENT and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu":
                raise _Unserved(f"{_POSITION_DEPENDENT[func]} on CPU: PyTorch's kernel gives an element other bits in "
                                "its vector body than in its scalar tail, so they depend on the tensor's size; "
                                "fusedtx has no kernel for it")
        except _Unserved as why:
            if self.strict:
                raise RuntimeError(f"batch_invariant_mode(strict=True): {why}") from None
        return func(*args, **kwargs)


def batch_invariant_mode(strict: bool = False) -> BatchInvariantMode:
    """The context manager (see the module docstring)."""
    return BatchInvariantMode(strict)
