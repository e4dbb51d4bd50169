"""The op pattern, written once: from a public call to the kernel of the chosen backend.

Every op file in fusedtx/ops is the same four pieces (docs/design.md, "Adding an op"):

  * `Kernel`s: one name and ONE signature per kernel entry point on every backend, e.g.
    Kernel("softmax_forward", "softmax") is reference.softmax_forward,
    fusedtx.kernels.softmax.softmax_forward (Triton) and torch.ops.fusedtx_native.softmax_forward
    (C++ / CUDA), all called as (x, scale, causal, n_queries, lanes);
  * a `check` that validates the arguments (TypeError / ValueError naming the argument,
    expected vs actual) and returns them normalised to the schema's types;
  * a `body` that reshapes, asks fusedtx.policy for lanes, groups or tiles, and calls the
    kernels of the backend it is given;
  * one `register(...)` call: the torch.library op (schema, fake, autograd formula) and the
    eager autograd.Function, both made from those pieces.

`register` returns an `Op`. fusedtx.functional resolves the backend and calls the Op, which
checks the arguments once and takes the cheapest path with the registered op's results: the
body (inference) or the eager Function (training) in plain eager code, the registered op
everywhere else (torch.compile, dispatch modes, tensor subclasses, torch.func).
"""
from __future__ import annotations

import functools
import importlib
import math
from numbers import Real
from typing import Callable

import torch
import torch.autograd.forward_ad as _forward_ad

from .. import _extension, reference
from ..backends import BACKENDS, BackendUnavailableError
from ._eager import eager_autograd, is_plain_eager, transform_autograd


def check_backend(backend, op: str) -> str:
    """The backend a registered op is called with (resolved already by fusedtx.functional)."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_real(value, op: str, arg: str, *, least: float | None = None):
    """A finite real number (>= least if given) for a float argument of an op, else TypeError /
    ValueError naming it. Returns it as a float, or as it is when torch.compile traces it
    symbolically (a SymFloat / SymInt under dynamic=True): the comparisons below then become
    guards, where math.isfinite or float() would break the graph."""
    if type(value) is not float:  # the common case skips the (slow) isinstance check against Real
        if isinstance(value, bool) or not isinstance(value, (int, Real, torch.SymFloat, torch.SymInt)):
            raise TypeError(f"{op}: {arg} must be a real number, got {type(value).__name__}")
    # Comparisons, not math.isfinite: they also reject NaN, and they trace.
    if not -math.inf < value < math.inf or (least is not None and value < least):
        bound = "" if least is None else f" >= {least:g}"
        raise ValueError(f"{op}: {arg} must be a finite number{bound}, got {value}")
    return value if isinstance(value, (torch.SymFloat, torch.SymInt)) else float(value)


class Kernel:
    """One kernel entry point, found on each backend under one name:

        reference  fusedtx.reference.<name>
        triton     fusedtx.kernels.<module>.<name>  (imported on first use: it imports triton)
        native     torch.ops.fusedtx_native.<name>  (C++ on CPU, CUDA on GPUs)

    kernel(backend, device) is the callable, found once per (backend, device type): the lookup
    costs a few microseconds, as much as a small kernel, and what is loaded never changes."""

    def __init__(self, name: str, triton_module: str):
        self.name, self.triton_module = name, triton_module
        self._found: dict[tuple[str, str], Callable] = {}

    def __call__(self, backend: str, device: torch.device) -> Callable:
        fn = self._found.get((backend, device.type))
        if fn is None:
            fn = self._found[(backend, device.type)] = self._find(backend, device)
        return fn

    def _find(self, backend: str, device: torch.device) -> Callable:
        if backend == "reference":
            return getattr(reference, self.name)
        if backend == "triton":
            return getattr(importlib.import_module(f"fusedtx.kernels.{self.triton_module}"), self.name)
        status = _extension.status()
        if not status.loaded:
            raise BackendUnavailableError(f"the native backend cannot run {self.name}: the C++ extension "
                                          f"fusedtx._C could not be built or loaded: {status.error}")
        key = "CUDA" if device.type == "cuda" else "CPU"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedtx_native::{self.name}", key):
            raise BackendUnavailableError(f"the native backend has no {key} kernel for {self.name}; "
                                          f"use backend='triton' or 'reference' on {device.type}")
        return getattr(torch.ops.fusedtx_native, self.name)

    def __repr__(self) -> str:
        return f"Kernel({self.name!r})"


class NativeFastPath:
    """An op's common case on the native backend in one C++ call: `run(*args)` is
    fusedtx._C.<name> (csrc/eager.cpp), which returns the outputs, or None where its case does
    not hold (another device, a dtype or shape the body sends elsewhere, a tensor subclass, a
    value out of range): the Python path then goes on. `leading`: constants (policy values) put
    before the caller's arguments. Found on the first call (which may build the extension), then
    called directly: an attribute and a C call per op call. While the extension is not loaded,
    run returns None and the Python path raises its clear error."""

    __slots__ = ("name", "leading", "run")

    def __init__(self, name: str, *leading):
        self.name, self.leading = name, leading
        self.run = self._find

    def _find(self, *args):
        module = _extension.module()
        if module is None:
            self.run = _not_taken
        else:
            fn = getattr(module, self.name)
            self.run = functools.partial(fn, *self.leading) if self.leading else fn
        return self.run(*args)

    def __repr__(self) -> str:
        return f"NativeFastPath({self.name!r})"


def _not_taken(*args) -> None:
    return None


class Op:
    """A registered op ("fusedtx::<name>") and the plain-eager paths made from the same pieces."""

    def __init__(self, name: str, registered, check: Callable, body: Callable, eager: Callable | None):
        self.name, self.registered, self.check, self.body, self.eager = name, registered, check, body, eager
        self.transform: Callable | None = None  # differentiation under torch.func (_eager.transform_autograd)

    def impl(self, *args):
        """What the registered op runs: the arguments checked, then the body."""
        return self.body(*self.check(*args))

    def __call__(self, *args, grad: bool = False):
        """What fusedtx.functional calls, with the backend resolved: the arguments are checked
        once, then the body (grad False) or the eager autograd Function (grad True) runs in plain
        eager code, the registered op everywhere else. Same code, same bits on every path."""
        args = self.check(*args)
        transformed = torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0
        if not transformed and is_plain_eager(args[0]):
            return self.eager(*args) if grad else self.body(*args)
        if transformed and self.transform is not None:
            # Under torch.func, and under forward-mode AD, whose tangents the registered op would
            # drop silently: this Function raises torch's "jvp not implemented" for them instead.
            return self.transform(*args)
        return self.registered(*args)

    def in_backward(self, ctx) -> Callable:
        """What an autograd formula calls for this (backward) op: its body under the eager
        Function, else the registered op, which torch.compile traces. With create_graph=True grad
        mode is on inside the backward and the registered op runs on both paths, so a second
        backward raises the op's clear error ("no autograd formula was registered") rather than
        silently differentiating nothing."""
        if getattr(ctx, "eager", False) and not torch.is_grad_enabled():
            return self.body
        if torch._C._are_functorch_transforms_active():
            return self.transform
        return self.registered

    def __repr__(self) -> str:
        return f"Op(fusedtx::{self.name})"


def register(name: str, schema: str, *, check: Callable, body: Callable, fake: Callable,
             setup_context: Callable | None = None, backward: Callable | None = None) -> Op:
    """Make the op "fusedtx::<name>" with this schema and return its Op.

    check(*args) -> args validates and normalises; body(*args) computes; fake(*args) makes empty
    outputs of the right shapes and dtypes for torch.compile. The registered op checks, then
    runs the body (or fake). setup_context(ctx, inputs, output) and backward(ctx, *grads) are
    the autograd formula, registered with the op and assembled into the eager Function."""
    op = Op(name, None, check, body, None)
    op.registered = torch.library.custom_op(f"fusedtx::{name}", op.impl, mutates_args=(), schema=schema)
    op.registered.register_fake(lambda *args: fake(*check(*args)))
    op.registered.register_vmap(_per_sample_vmap(op.registered))
    if backward is not None:
        op.registered.register_autograd(backward, setup_context=setup_context)
        op.eager = eager_autograd(name, body, setup_context, backward)
        op.transform = transform_autograd(name, op.registered, setup_context, backward)
    else:  # a backward op, called by a formula: differentiating it again is refused, clearly
        op.transform = transform_autograd(name, op.registered, _no_context, _no_derivative(name))
    return op


def _no_context(ctx, inputs, output) -> None:
    pass


def _no_derivative(name: str) -> Callable:
    def backward(ctx, *grads):
        raise RuntimeError(f"fusedtx::{name} has no derivative: fusedtx ops have a first derivative only "
                           "(no double backward, no torch.func.hessian)")
    return backward


def _per_sample_vmap(registered) -> Callable:
    """torch.func.vmap's rule for a registered op: one call per sample, the results stacked. Each
    sample's bits are then those of a call on that sample alone, which batch invariance makes
    the bits of any batch it could sit in."""

    def rule(info, in_dims, *args):
        if info.batch_size == 0:
            raise ValueError(f"{registered._name}: vmap over a dimension of size 0 is not supported")
        samples = [registered(*(a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims)))
                   for i in range(info.batch_size)]
        if isinstance(samples[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*samples)), (0,) * len(samples[0])
        return torch.stack(samples), 0

    return rule
