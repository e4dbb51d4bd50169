"""The `fusedtx::rms_norm` op: argument checks, backend dispatch, fake and autograd.

    fusedtx::rms_norm(x, normalized_shape, weight, eps, backend) -> (y, rstd)
    fusedtx::rms_norm_backward(grad_y, x, rstd, weight, need_param_grads, backend) -> (dx, dw)

The semantics of torch.nn.functional.rms_norm: normalise over the trailing dims given by
normalized_shape by the root mean square (fusedtx.functional fills in eps = None). Every
backend works on x viewed as (rows, N); rstd (float32, or float64 for float64 x) is saved for
the backward, which computes dx per row and the weight gradient through the fixed row groups of
reference.row_group_sum (policy.ROW_GROUPS): no atomics, the same bits for any thread count or
GPU. Row sums use policy.row_lanes lanes, as layer_norm's.
"""
from __future__ import annotations

import math

from .. import policy
from ._dispatch import Kernel, NativeFastPath, register
from ._row_norm import as_rows, check_backward, check_norm_args, fake_backward, fake_forward, flat, stats_shape

# (x, weight, eps, lanes) -> (y, rstd)
forward_kernel = Kernel("rms_norm_forward", "rms_norm")
# (grad_y, x, rstd, weight, need_param_grads, lanes, groups) -> (dx, dweight)
backward_kernel = Kernel("rms_norm_backward", "rms_norm")
# _forward's common case, native: (x, n, len(shape), weight, eps, lanes) -> (y, rstd)
native_forward = NativeFastPath("rms_norm")
# fusedtx.functional.rms_norm's whole inference call, native on CPU, checks included (None where
# a check would fail: the Python path raises): (x, normalized_shape, weight, eps or None) -> y
native_call = NativeFastPath("rms_norm_call", policy.CPU_LANES)


def check_args(x, normalized_shape, weight, eps, backend):
    """Raise TypeError / ValueError naming the bad argument, with expected vs actual."""
    x, shape, (weight,), eps, backend = check_norm_args("rms_norm", x, normalized_shape, {"weight": weight}, eps,
                                                        backend)
    return x, shape, weight, eps, backend


def _forward(x, shape, weight, eps, backend):
    n = math.prod(shape)
    lanes = policy.row_lanes(backend, n, x.device)
    if backend == "native":
        out = native_forward.run(x, n, len(shape), weight, eps, lanes)
        if out is not None:
            return out
    y, rstd = forward_kernel(backend, x.device)(as_rows(x, n), flat(weight), eps, lanes)
    if y.shape == x.shape:  # x was (rows, N) already: no views
        return y, rstd
    return y.view(x.shape), rstd.view(stats_shape(x, shape))


def _fake(x, shape, weight, eps, backend):
    return fake_forward(x, shape, n_stats=1)


def _backward_body(grad_y, x, rstd, weight, need_param_grads, backend):
    n = math.prod(x.shape[rstd.dim():])
    lanes = policy.row_lanes(backend, n, x.device)
    dx, dw = backward_kernel(backend, x.device)(as_rows(grad_y.to(x.dtype), n), as_rows(x, n), flat(rstd),
                                                flat(weight), need_param_grads, lanes, policy.ROW_GROUPS)
    if not need_param_grads:
        dw = x.new_empty(0, dtype=rstd.dtype)
    return (dx if dx.shape == x.shape else dx.view(x.shape)), dw


def _backward_fake(grad_y, x, rstd, weight, need_param_grads, backend):
    return fake_backward(x, rstd, need_param_grads, n_params=1)


rms_norm_backward = register(
    "rms_norm_backward",
    "(Tensor grad_y, Tensor x, Tensor rstd, Tensor? weight, bool need_param_grads, str backend) -> (Tensor, Tensor)",
    check=check_backward("rms_norm_backward"), body=_backward_body, fake=_backward_fake)


def _setup_context(ctx, inputs, output):
    x, _, weight, _, backend = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.backend = backend
    ctx.mark_non_differentiable(rstd)


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    need_w = ctx.needs_input_grad[2]
    run = rms_norm_backward.in_backward(ctx)
    dx, dw = run(grad_y, x, rstd, weight, bool(need_w), ctx.backend)
    return dx, None, (dw.to(weight.dtype).view(weight.shape) if need_w else None), None, None


rms_norm = register(
    "rms_norm",
    "(Tensor x, SymInt[] normalized_shape, Tensor? weight, float eps, str backend) -> (Tensor, Tensor)",
    check=check_args, body=_forward, fake=_fake, setup_context=_setup_context, backward=_backward)
