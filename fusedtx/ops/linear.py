"""The `fusedtx::linear` op: y = act(x @ weight.T + bias), batch-invariant, with autograd.

    fusedtx::linear(x, weight, bias, activation, save_preact, backend, weight_odd=None) -> (y, preact)
    fusedtx::linear_backward(grad_y, x, weight, preact, activation, need_dx, need_dweight, need_dbias,
                             backend, weight_odd=None) -> (dx, dweight, dbias, dweight_odd)

x has any number of leading dims and is viewed as (M, K); weight is (N, K) like torch.nn.Linear.
Every backend computes reference.linear_matmul: per block of policy.MATMUL_K_BLOCK k's one
float32 accumulator per output element taking x[i, k] * weight[j, k] with an FMA for k
ascending, the blocks added in order, then + bias, then the activation (GELU erf or tanh) in the
epilogue. No tile shape, split or thread count enters, so a row's bits depend on that row and
on the weight alone.

activation = reference.ACT_SWIGLU (3) is fusedtx.swiglu_ffn's first half: weight is the gate and
up projections packed row-interleaved (2H, K) (reference/linear.py), y = silu(h[:, 0::2]) *
h[:, 1::2] is (..., H), and preact (saved for the backward) is the whole (..., 2H) h. The packing
need not exist: with weight_odd the op's weight is reference.interleave_pair(weight, weight_odd, 0)
(weight = gate, weight_odd = up, both (H, K)), which the kernels read where the two are — the
same bits as on the packed weight, without a (2H, K) copy per training step — and the backward
returns dweight and dweight_odd, the packed gradient's even and odd rows, each its own matmul.

The backward runs three pieces through the same kernels:
    g       = dy * act'(h)              fused elementwise pass, also summing dbias in row groups
    dx      = linear_matmul(g, weight)  the same M-invariant kernel: dx rows are batch-invariant too
    dweight = linear_matmul(g.T, x)     one accumulator per element over the M rows in order
The pre-activation h (M, N) is SAVED by the forward when a gradient is needed and there is an
activation, in x's dtype: as much memory as torch's own F.linear + F.gelu keeps for the GELU
backward, and it saves recomputing a whole matmul. Without an activation nothing extra is kept.
"""
from __future__ import annotations

import math

import torch

from .. import policy, reference
from ._dispatch import Kernel, NativeFastPath, check_backend, register

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (a, b, bias, activation, save_preact, k_block) -> (y, preact)
matmul_kernel = Kernel("linear_matmul", "linear")
# (grad_y, preact, activation, need_bias_grad, groups) -> (grad_preact, grad_bias)
bias_act_backward_kernel = Kernel("linear_bias_act_backward", "linear")
# _forward's common case without save_preact, native: (x, weight, bias, activation, k_block, weight_odd)
native_forward = NativeFastPath("linear")
# fusedtx.functional's whole inference calls, native on CPU, checks included (None where a check
# would fail: the Python path raises): (x, weight, bias, activation code) -> y and
# (x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias) -> y
native_call = NativeFastPath("linear_call", policy.MATMUL_K_BLOCK)
native_swiglu_call = NativeFastPath("swiglu_ffn_call", policy.MATMUL_K_BLOCK)


def activation_code(activation) -> int:
    """None / "none" / "gelu" (exact, erf) / "gelu_tanh" (GPT-2's tanh approximation) -> ACT_*."""
    if isinstance(activation, str) or activation is None:
        code = reference.ACTIVATIONS.get(activation)
        if code is not None:
            return code
    raise ValueError(f"linear: activation must be None, 'gelu' or 'gelu_tanh', got {activation!r}")


def check_args(x, weight, bias, activation, save_preact, backend, weight_odd=None, name: str = "linear"):
    """Raise TypeError / ValueError naming the bad argument, with expected vs actual."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: weight must be a torch.Tensor, got {type(weight).__name__}")
    check_backend(backend, name)
    allowed = SUPPORTED_DTYPES + ((torch.float64,) if backend == "reference" else ())
    if x.dtype not in allowed:
        extra = " (float64 only with backend='reference')" if x.dtype == torch.float64 else ""
        raise TypeError(f"{name}: x must be float32, bfloat16 or float16{extra}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have at least 1 dim (..., in_features), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D (out_features, in_features), got shape {list(weight.shape)}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{name}: x's last dim ({x.shape[-1]}) must equal weight's in_features "
                         f"(weight.shape[1] = {weight.shape[1]}); weight has shape {list(weight.shape)}")
    check_like_x(x, (("weight", weight), ("weight_odd", weight_odd), ("bias", bias)), name)
    if weight_odd is not None and weight_odd.shape != weight.shape:
        raise ValueError(f"{name}: weight_odd must have weight's shape {list(weight.shape)}, got "
                         f"{list(weight_odd.shape)}")
    rows = weight_rows(weight, weight_odd)
    if bias is not None and tuple(bias.shape) != (rows,):
        raise ValueError(f"{name}: bias must have shape [{rows}] (out_features), got {list(bias.shape)}")
    if activation == reference.ACT_SWIGLU and rows % 2:
        raise ValueError(f"{name}: the SwiGLU epilogue takes a packed gate/up weight of an even number of rows "
                         f"(2 x hidden), got {rows}")
    return x, weight, bias, activation, save_preact, backend, weight_odd


def weight_rows(weight, weight_odd) -> int:
    """The op's weight rows: weight's, twice that with weight_odd (the pair interleaved)."""
    return weight.shape[0] * (1 if weight_odd is None else 2)


def out_features(weight_rows, activation):
    """The output width: the weight's rows, half of them for the SwiGLU epilogue (pairs)."""
    return weight_rows // 2 if activation == reference.ACT_SWIGLU else weight_rows


def check_like_x(x, named, name: str) -> None:
    """Each (arg name, tensor or None): a tensor on x's device with x's dtype, else TypeError /
    ValueError naming it."""
    for arg_name, t in named:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg_name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name}: {arg_name} is on {t.device} but x is on {x.device}; put them on one device")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: {arg_name} must have x's dtype {x.dtype}, got {t.dtype}")


def check_swiglu_weights(x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias,
                         name: str = "swiglu_ffn"):
    """The weights of down(silu(gate(x)) * up(x)): TypeError / ValueError naming the bad one. x's
    own checks (dtype, last dim) are the linear op's, which reports them as it runs."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    for arg, t in (("gate_weight", gate_weight), ("up_weight", up_weight), ("down_weight", down_weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: {arg} must be 2-D, got shape {list(t.shape)}")
    check_like_x(x, (("gate_weight", gate_weight), ("up_weight", up_weight), ("down_weight", down_weight),
                     ("gate_bias", gate_bias), ("up_bias", up_bias), ("down_bias", down_bias)), name)
    if gate_weight.shape != up_weight.shape:
        raise ValueError(f"{name}: gate_weight and up_weight must have one shape (hidden, d_model), got "
                         f"{list(gate_weight.shape)} and {list(up_weight.shape)}")
    hidden = gate_weight.shape[0]
    if down_weight.shape[1] != hidden:
        raise ValueError(f"{name}: down_weight must be (d_out, hidden = {hidden}), got shape {list(down_weight.shape)}")
    if (gate_bias is None) != (up_bias is None):
        raise ValueError(f"{name}: gate_bias and up_bias must both be given or both be None")
    for arg, t, n in (("gate_bias", gate_bias, hidden), ("up_bias", up_bias, hidden),
                      ("down_bias", down_bias, down_weight.shape[0])):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name}: {arg} must have shape [{n}], got {list(t.shape)}")


def pack_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU epilogue's packed operand: rows (or elements, for biases) interleaved, packed
    [2j] = gate[j], packed[2j + 1] = up[j]. A copy, differentiable: autograd hands the packed
    gradient's even rows to gate and its odd rows to up."""
    return torch.stack((gate, up), dim=1).reshape(2 * gate.shape[0], *gate.shape[1:])


def _empty(like: torch.Tensor, dtype=None) -> torch.Tensor:
    return like.new_empty(0, dtype=dtype or like.dtype)


def _same_steps(b, b_odd) -> bool:
    """Whether b_odd's strides are b's along every dim longer than 1 (the only ones stepped)."""
    return all(n == 1 or s == t for n, s, t in zip(b.shape, b.stride(), b_odd.stride()))


def _matmul(backend: str, a, b, bias, activation: int, save_preact: bool, b_odd=None, pair_dim: int = 0):
    """(y, preact or None) = act(a @ b + bias) for 2-D a (M, K), b (K, N) of any strides; with
    b_odd, b is reference.interleave_pair(b, b_odd, pair_dim)."""
    if a.shape[0] == 0 or b.shape[1] == 0 or a.shape[1] == 0 or a.dtype == torch.float64:
        backend = "reference"  # an empty sum is +0 whatever the kernel, and no launch; float64: gradcheck
    if b_odd is not None and not _same_steps(b, b_odd):  # the kernels step both halves with b's strides
        b, b_odd = b.contiguous(), b_odd.contiguous()
    y, h = matmul_kernel(backend, a.device)(a, b, bias, activation, save_preact, policy.MATMUL_K_BLOCK, b_odd,
                                            pair_dim)
    return y.contiguous(), (h.contiguous() if save_preact and activation else None)


def _bias_act_backward(backend: str, grad_y, preact, activation: int, need_bias_grad: bool):
    """(grad_preact, grad_bias or None) for contiguous (M, N) grad_y and preact."""
    if grad_y.dtype == torch.float64 or grad_y.numel() == 0:
        backend = "reference"
    g, gb = bias_act_backward_kernel(backend, grad_y.device)(grad_y, preact, activation, need_bias_grad,
                                                             policy.ROW_GROUPS)
    return (g if activation else grad_y), (gb if need_bias_grad else None)


def _forward(x, weight, bias, activation, save_preact, backend, weight_odd=None):
    if backend == "native" and not save_preact:
        out = native_forward.run(x, weight, bias, activation, policy.MATMUL_K_BLOCK, weight_odd)
        if out is not None:
            return out
    lead, k, n = x.shape[:-1], x.shape[-1], weight_rows(weight, weight_odd)
    x2 = x.reshape(math.prod(lead), k)
    if weight_odd is None:
        y, h = _matmul(backend, x2, weight.t(), bias, activation, save_preact)
    else:  # the operand's columns 2j / 2j + 1: weight's and weight_odd's row j
        y, h = _matmul(backend, x2, weight.t(), bias, activation, save_preact, weight_odd.t(), 1)
    preact = h.view(*lead, n) if h is not None else _empty(x)
    return y.view(*lead, out_features(n, activation)), preact


def _fake(x, weight, bias, activation, save_preact, backend, weight_odd=None):
    n = weight_rows(weight, weight_odd)
    shape, y_shape = (*x.shape[:-1], n), (*x.shape[:-1], out_features(n, activation))
    return x.new_empty(y_shape), (x.new_empty(shape) if save_preact and activation else _empty(x))


def _check_backward(grad_y, x, weight, preact, activation, need_dx, need_dweight, need_dbias, backend,
                    weight_odd=None):
    return (grad_y, x, weight, preact, activation, need_dx, need_dweight, need_dbias,
            check_backend(backend, "linear_backward"), weight_odd)


def _backward_body(grad_y, x, weight, preact, activation, need_dx, need_dweight, need_dbias, backend,
                   weight_odd=None):
    k, n, m = weight.shape[1], weight_rows(weight, weight_odd), math.prod(x.shape[:-1])
    dy = grad_y.to(x.dtype).reshape(m, out_features(n, activation)).contiguous()
    h = preact.reshape(m, n).contiguous() if activation else None
    g, gb = _bias_act_backward(backend, dy, h, activation, need_dbias)
    x2 = x.reshape(m, k)
    dx = _matmul(backend, g, weight, None, 0, False, weight_odd, 0)[0].view(x.shape) if need_dx else _empty(x)
    dw, dw_odd = _empty(x), _empty(x)  # two tensors: a custom op's outputs may not alias
    if need_dweight and weight_odd is None:
        dw = _matmul(backend, g.t(), x2, None, 0, False)[0]
    elif need_dweight:  # the packed gradient's even and odd rows, each element's sum as in one matmul
        dw = _matmul(backend, g[:, 0::2].t(), x2, None, 0, False)[0]
        dw_odd = _matmul(backend, g[:, 1::2].t(), x2, None, 0, False)[0]
    db = gb if need_dbias else _empty(x, reference.compute_dtype(x.dtype))
    return dx, dw, db, dw_odd


def _backward_fake(grad_y, x, weight, preact, activation, need_dx, need_dweight, need_dbias, backend,
                   weight_odd=None):
    acc = reference.compute_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else _empty(x),
            x.new_empty(weight.shape) if need_dweight else _empty(x),
            x.new_empty(weight_rows(weight, weight_odd), dtype=acc) if need_dbias else _empty(x, acc),
            x.new_empty(weight.shape) if need_dweight and weight_odd is not None else _empty(x))


linear_backward = register(
    "linear_backward",
    "(Tensor grad_y, Tensor x, Tensor weight, Tensor preact, SymInt activation, bool need_dx, bool need_dweight, "
    "bool need_dbias, str backend, Tensor? weight_odd=None) -> (Tensor, Tensor, Tensor, Tensor)",
    check=_check_backward, body=_backward_body, fake=_backward_fake)


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, _, backend = inputs[:6]
    weight_odd = inputs[6] if len(inputs) > 6 else None  # torch.ops callers may leave the default out
    _, preact = output
    ctx.save_for_backward(x, weight, preact, weight_odd)
    ctx.activation, ctx.backend = activation, backend
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(preact)


def _backward(ctx, grad_y, _grad_preact):
    x, weight, preact, weight_odd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_w_odd = len(ctx.needs_input_grad) > 6 and ctx.needs_input_grad[6]
    if ctx.activation and preact.numel() == 0 and grad_y.numel() != 0:
        raise RuntimeError("linear: the forward did not save the pre-activation (save_preact=False) "
                           "but a gradient is needed; call through fusedtx.linear, which decides it")
    run = linear_backward.in_backward(ctx)
    dx, dw, db, dw_odd = run(grad_y, x, weight, preact, ctx.activation, bool(need_x), bool(need_w or need_w_odd),
                             bool(need_b), ctx.backend, weight_odd)
    grads = (dx if need_x else None, dw if need_w else None, db.to(ctx.bias_dtype) if need_b else None,
             None, None, None, dw_odd if need_w_odd else None)
    return grads[:len(ctx.needs_input_grad)]


linear = register(
    "linear",
    "(Tensor x, Tensor weight, Tensor? bias, SymInt activation, bool save_preact, str backend, "
    "Tensor? weight_odd=None) -> (Tensor, Tensor)",
    check=check_args, body=_forward, fake=_fake, setup_context=_setup_context, backward=_backward)
