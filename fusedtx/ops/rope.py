"""The `fusedtx::rope` op: rotary position embeddings (rotate-half layout), with backend
dispatch, fake and autograd.

    fusedtx::rope(x, positions, cos, sin, backend) -> y
    fusedtx::rope_backward(grad_y, positions, cos, sin, backend) -> dx

x (B, H, T, D) of any strides, positions (B, T) int64 (each token's absolute position), cos and
sin the (P, D/2) float32 table of fusedtx.rope_table on x's device. Every backend computes
reference.rope_forward / rope_backward: elementwise, no reduction, so nothing depends on the
batch, the chunking or the thread count; a token's bits depend on its own values and position
alone. The gradient is with respect to x only: the table is a constant (a buffer).
"""
from __future__ import annotations

import torch

from .causal_attention import unit_head_dim
from ._dispatch import Kernel, NativeFastPath, check_backend, register

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

forward_kernel = Kernel("rope_forward", "rope")    # (x, positions, cos, sin) -> y
backward_kernel = Kernel("rope_backward", "rope")  # (grad_y, positions, cos, sin) -> dx
native_forward = NativeFastPath("rope")  # _forward's common case, native: (x, positions, cos, sin) -> y
# fusedtx.functional.rope's whole inference call, native on CPU, checks included (None where a
# check would fail: the Python path raises): (x, positions, cos, sin) -> y
native_call = NativeFastPath("rope_call")


def check_args(x, positions, cos, sin, backend, name: str = "rope"):
    """Raise TypeError / ValueError naming the bad argument, with expected vs actual. Shapes,
    dtypes and devices only: the positions' values are checked by the body (check_positions)."""
    for arg, t in (("x", x), ("positions", positions), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: x must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if backend == "triton" and x.dtype == torch.float64:
        raise TypeError(f"{name}: the triton backend computes in float32 and does not take float64 x; "
                        "use backend='native' or 'reference' for float64")
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be 4-D (batch, heads, tokens, head_dim), got shape {list(x.shape)}")
    batch, _, tokens, dim = x.shape
    if dim < 2 or dim % 2:
        raise ValueError(f"{name}: x's head_dim must be even and >= 2 (rotate-half pairs i and i + D/2), got {dim}")
    if positions.dtype != torch.int64:
        raise TypeError(f"{name}: positions must be an int64 tensor, got {positions.dtype}")
    if tuple(positions.shape) != (batch, tokens):
        raise ValueError(f"{name}: positions must have shape [batch={batch}, tokens={tokens}] (x's), "
                         f"got {list(positions.shape)}")
    if positions.device != x.device and positions.device.type != "cpu":
        raise ValueError(f"{name}: positions is on {positions.device} but x is on {x.device}; put them on x's "
                         "device or the CPU")
    for arg, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: {arg} must be float32 (fusedtx.rope_table), got {t.dtype}")
        if t.dim() != 2 or t.shape[1] != dim // 2 or t.shape[0] < 1:
            raise ValueError(f"{name}: {arg} must have shape [max_positions, head_dim / 2 = {dim // 2}], "
                             f"got {list(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but x is on {x.device}; put the table on x's device")
        if t.requires_grad:
            raise ValueError(f"{name}: {arg} requires grad, but rope differentiates with respect to x only "
                             "(the table is a constant); pass it detached")
    if cos.shape != sin.shape:
        raise ValueError(f"{name}: cos and sin must have one shape, got {list(cos.shape)} and {list(sin.shape)}")
    return x, positions, cos, sin, check_backend(backend, name)


def check_positions(positions: torch.Tensor, max_positions: int, name: str = "rope") -> None:
    """Every position lies in the table (values: one reduction read back from a GPU). The kernels
    never read outside it either way: an out-of-range position gives a NaN row."""
    if positions.numel() == 0:
        return
    # A decode step's few positions: a list is cheaper than a reduction; else one reduction for
    # both bounds (read back once from a GPU).
    if positions.device.type == "cpu" and positions.numel() <= 64:
        values = positions.reshape(-1).tolist()
        lo, hi = min(values), max(values)
    else:
        lo, hi = (int(v) for v in torch.aminmax(positions))
    if lo < 0 or hi >= max_positions:
        raise ValueError(f"{name}: positions must lie in [0, {max_positions - 1}] (the table's max_positions is "
                         f"{max_positions}), got values from {lo} to {hi}")


def _operands(x, positions, cos, sin, backend):
    """What every backend's kernel takes: x with a unit-stride head dim, positions contiguous on
    the device whose kernel reads them (the CPU for native CPU and the reference), the table
    contiguous."""
    check_positions(positions, cos.shape[0])
    positions = positions.to(x.device).contiguous()
    (x,) = unit_head_dim(x)
    return x, positions, cos.contiguous(), sin.contiguous()


def _fake(x, positions, cos, sin, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _forward(x, positions, cos, sin, backend):
    if backend == "native":
        y = native_forward.run(x, positions, cos, sin)
        if y is not None:
            return y
    if x.numel() == 0:  # nothing for a kernel to do, on any backend
        return _fake(x, positions, cos, sin, backend)
    return forward_kernel(backend, x.device)(*_operands(x, positions, cos, sin, backend))


def _check_backward(grad_y, positions, cos, sin, backend):
    return grad_y, positions, cos, sin, check_backend(backend, "rope_backward")


def _backward_body(grad_y, positions, cos, sin, backend):
    if grad_y.numel() == 0:
        return _fake(grad_y, positions, cos, sin, backend)
    return backward_kernel(backend, grad_y.device)(*_operands(grad_y, positions, cos, sin, backend))


rope_backward = register(
    "rope_backward", "(Tensor grad_y, Tensor positions, Tensor cos, Tensor sin, str backend) -> Tensor",
    check=_check_backward, body=_backward_body, fake=_fake)


def _setup_context(ctx, inputs, output):
    x, positions, cos, sin, backend = inputs
    ctx.save_for_backward(positions, cos, sin)
    ctx.dtype, ctx.backend = x.dtype, backend


def _backward(ctx, grad_y):
    positions, cos, sin = ctx.saved_tensors
    dx = rope_backward.in_backward(ctx)(grad_y.to(ctx.dtype), positions, cos, sin, ctx.backend)
    return dx, None, None, None, None


rope = register("rope", "(Tensor x, Tensor positions, Tensor cos, Tensor sin, str backend) -> Tensor",
                check=check_args, body=_forward, fake=_fake, setup_context=_setup_context, backward=_backward)
