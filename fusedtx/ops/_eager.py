"""Eager autograd for the fusedtx ops, without the dispatcher's round trips through Python.

Each op is registered with torch.library (custom_op + register_fake + register_autograd): that
is what torch.compile, opcheck, dispatch modes, tensor subclasses and torch.func transforms see.
In plain eager training, though, a Python custom op pays for its generality on every call:
dispatcher to Python to dispatcher to Python, inspect-based argument binding, and the same again
for the backward op inside the backward — as long as the kernel itself on small inputs, and
far longer than a GPU kernel (benchmarks/bench_overhead.py measures both paths).

`eager_autograd` assembles a torch.autograd.Function from the op's own pieces — its body, its
setup_context and its backward formula — so that the two paths share every line that computes
anything: the same bits (tests/test_eager.py compares them). fusedtx.ops._dispatch.Op takes it
only for plain tensors outside torch.compile, dispatch modes and torch.func transforms
(`is_plain_eager`); everything else goes through the registered op.

torch.func's grad, vjp and jacrev cannot differentiate the registered op itself: torch.library
builds its autograd from a ctx-first Function, which functorch refuses. `transform_autograd`
is the same formula as a Function in functorch's style (a separate setup_context) around the
registered op, which the Op takes for differentiation under a torch.func transform; vmap of the
ops (and so jacrev, which vmaps the backward) is the per-sample rule that `_dispatch` registers.
Forward-mode AD (jvp, jacfwd) has no formula: it raises NotImplementedError, where the registered
op would drop the tangents silently, so the Op takes this Function under forward AD too.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def is_plain_eager(x) -> bool:
    """True when calling an op's pieces directly is indistinguishable from calling the registered
    op: x is a plain tensor, nothing traces (torch.compile) and no dispatch mode is active. (Op
    asks first whether a torch.func transform or forward-mode AD wraps the call.)"""
    return (type(x) is torch.Tensor
            and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None)


def eager_autograd(name: str, body: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """`apply(*inputs)` of an autograd.Function equivalent to the registered op with these pieces.

    body(*inputs) -> outputs is the op's implementation; setup_context(ctx, inputs, outputs) and
    backward(ctx, *grads) are what the op registers with register_autograd. The forward is
    written in the ctx-first style rather than with a separate setup_context because
    Function.apply binds the arguments of the latter through inspect.signature, as slow as a small kernel;
    torch.func transforms, which need the separate style, take the registered op instead."""

    def forward(ctx, *inputs):
        # An output that is a view of a tensor made here (the body's reshape back from rows)
        # would be a "view created inside a custom Function", which autograd forbids modifying
        # in place; the registered op's outputs and torch's accept it. detach() gives the same
        # storage as a tensor that is not a view (no copy), before setup_context sees the
        # outputs, so that what it saves or marks is what the Function returns (modifying a
        # saved output in place then raises autograd's version error, as for torch's ops).
        outputs = body(*inputs)
        if isinstance(outputs, tuple):
            outputs = tuple(o.detach() if o._is_view() else o for o in outputs)
        elif outputs._is_view():
            outputs = outputs.detach()
        setup_context(ctx, inputs, outputs)
        ctx.eager = True
        # The registered op's backward gets zero-filled gradients for the outputs that have none
        # (the statistics, the pre-activation: a whole (M, N) tensor for linear); no formula reads
        # them, so none are made here, but for the first output, which every formula reads:
        # its metadata (not the tensor, which would make a reference cycle) for a zero gradient.
        ctx.set_materialize_grads(False)
        first = outputs[0] if isinstance(outputs, tuple) else outputs
        ctx.first_output = (first.shape, first.dtype, first.device)
        return outputs

    def backward_materialized(ctx, *grads):
        if grads[0] is None:  # only other outputs have gradients (gradcheck asks for them)
            shape, dtype, device = ctx.first_output
            grads = (torch.zeros(shape, dtype=dtype, device=device), *grads[1:])
        return backward(ctx, *grads)

    function = type(f"{name}_eager", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_materialized)})
    return function.apply



def transform_autograd(name: str, registered: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """`apply(*inputs)` of an autograd.Function that runs the registered op with its registered
    formula, written as torch.func transforms need: forward without ctx, setup_context apart,
    and vmap through the ops it calls (generate_vmap_rule: each registered op has a vmap rule)."""

    def forward(*inputs):
        return registered(*inputs)

    def jvp(ctx, *tangents):
        raise NotImplementedError(f"fusedtx::{name}: forward-mode AD (torch.func.jvp, jacfwd, hessian, "
                                  "torch.autograd.forward_ad) is not supported, only reverse mode "
                                  "(backward, torch.func.grad, vjp, jacrev)")

    function = type(f"{name}_transform", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
                     "backward": staticmethod(backward), "jvp": staticmethod(jvp), "generate_vmap_rule": True})
    return function.apply
