"""The `fusedtx::layer_norm` op: argument checks, backend dispatch, fake and autograd.

    fusedtx::layer_norm(x, normalized_shape, weight, bias, eps, backend) -> (y, mean, rstd)
    fusedtx::layer_norm_backward(grad_y, x, mean, rstd, weight, need_param_grads, backend) -> (dx, dw, db)

The semantics of torch.nn.functional.layer_norm: normalise over the trailing dims given by
normalized_shape. Every backend works on x viewed as (rows, N); mean and rstd (float32, or
float64 for float64 x) are saved for the backward, which computes dx per row and the weight and
bias gradients through the fixed row groups of reference.row_group_sum (policy.ROW_GROUPS): no
atomics, the same bits for any thread count or GPU. Row sums use policy.row_lanes lanes.
"""
from __future__ import annotations

import math

from .. import policy
from ._dispatch import Kernel, NativeFastPath, register
from ._row_norm import as_rows as _as_rows, check_backward, check_norm_args, fake_backward, fake_forward
from ._row_norm import flat as _flat, stats_shape as _stats_shape

# (x, weight, bias, eps, lanes) -> (y, mean, rstd)
forward_kernel = Kernel("layer_norm_forward", "layer_norm")
# (grad_y, x, mean, rstd, weight, need_param_grads, lanes, groups) -> (dx, dweight, dbias)
backward_kernel = Kernel("layer_norm_backward", "layer_norm")
# fusedtx.functional.layer_norm's whole inference call, native on CPU, checks included (None
# where a check would fail: the Python path raises): (x, normalized_shape, weight, bias, eps) -> y
native_call = NativeFastPath("layer_norm_call", policy.CPU_LANES)


def check_args(x, normalized_shape, weight, bias, eps, backend):
    """Raise TypeError / ValueError naming the bad argument, with expected vs actual."""
    x, shape, (weight, bias), eps, backend = check_norm_args("layer_norm", x, normalized_shape,
                                                             {"weight": weight, "bias": bias}, eps, backend)
    return x, shape, weight, bias, eps, backend


def _forward(x, shape, weight, bias, eps, backend):
    n = math.prod(shape)
    lanes = policy.row_lanes(backend, n, x.device)
    y, mean, rstd = forward_kernel(backend, x.device)(_as_rows(x, n), _flat(weight), _flat(bias), eps, lanes)
    if y.shape == x.shape:  # x was (rows, N) already: no views
        return y, mean, rstd
    stats = _stats_shape(x, shape)
    return y.view(x.shape), mean.view(stats), rstd.view(stats)


def _fake(x, shape, weight, bias, eps, backend):
    return fake_forward(x, shape, n_stats=2)


def _backward_body(grad_y, x, mean, rstd, weight, need_param_grads, backend):
    n = math.prod(x.shape[mean.dim():])
    lanes = policy.row_lanes(backend, n, x.device)
    dx, dw, db = backward_kernel(backend, x.device)(_as_rows(grad_y.to(x.dtype), n), _as_rows(x, n), _flat(mean),
                                                    _flat(rstd), _flat(weight), need_param_grads, lanes,
                                                    policy.ROW_GROUPS)
    if not need_param_grads:  # two distinct empty tensors: op outputs may not alias each other
        dw, db = x.new_empty(0, dtype=mean.dtype), x.new_empty(0, dtype=mean.dtype)
    return (dx if dx.shape == x.shape else dx.view(x.shape)), dw, db


def _backward_fake(grad_y, x, mean, rstd, weight, need_param_grads, backend):
    return fake_backward(x, mean, need_param_grads, n_params=2)


layer_norm_backward = register(
    "layer_norm_backward",
    "(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, bool need_param_grads, str backend) "
    "-> (Tensor, Tensor, Tensor)",
    check=check_backward("layer_norm_backward"), body=_backward_body, fake=_backward_fake)


def _setup_context(ctx, inputs, output):
    x, _, weight, bias, _, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias, ctx.backend = bias is not None, backend
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    _, _, need_w, need_b, _, _ = ctx.needs_input_grad
    run = layer_norm_backward.in_backward(ctx)
    dx, dw, db = run(grad_y, x, mean, rstd, weight, bool(need_w or need_b), ctx.backend)
    dweight = dw.to(weight.dtype).view(weight.shape) if need_w else None
    dbias = db.to(ctx.bias_dtype).view(x.shape[mean.dim():]) if need_b else None
    return dx, None, dweight, dbias, None, None


layer_norm = register(
    "layer_norm",
    "(Tensor x, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, float eps, str backend) "
    "-> (Tensor, Tensor, Tensor)",
    check=check_args, body=_forward, fake=_fake, setup_context=_setup_context, backward=_backward)
