"""What the row normalisation tests share: RowNorm, one description of fusedtx.rms_norm and
fusedtx.layer_norm as the tests call them (functions, modules, ops, reference, the names of
their parameters and statistics, and the deliberately wrong versions the negative controls
run), their parameters, and the table of shapes (CASES, norm_cases).

Every backend takes a norm's pieces in one order (fusedtx/ops/_row_norm.py):

    op.impl(x, normalized_shape, *params, eps, backend) -> (y, *stats)
    backward(grad_y, x, *stats, weight, need_param_grads, backend) -> (dx, *param_grads)
    ref_forward(x, *params, eps, lanes) -> (y, *stats)
    ref_backward(grad_y, x, *stats, weight, need_param_grads, lanes, groups) -> (dx, *param_grads)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import fusedtx
from fusedtx import reference
from fusedtx.ops import layer_norm as layer_norm_op
from fusedtx.ops import rms_norm as rms_norm_op
from helpers import make


@dataclass(frozen=True)
class RowNorm:
    """One row normalisation, as the tests that run for both call it."""

    name: str
    params: tuple[str, ...]  # the parameters, in call order
    stats: tuple[str, ...]  # the per-row statistics saved for the backward, in output order
    fn: Callable  # fn(x, normalized_shape, *params, eps=, backend=): the functional API
    torch_fn: Callable  # torch_fn(x, normalized_shape, *params, eps=): PyTorch's, output in x's dtype
    float32_eps: float  # the eps fn and torch_fn take for float32 x when none is given
    module: Callable  # fusedtx.nn's drop-in
    torch_module: Callable  # what it replaces
    op: object  # the fusedtx.ops Op: op.impl(...)
    backward: Callable  # torch.ops.fusedtx.<name>_backward
    ref_forward: Callable
    ref_backward: Callable
    batch_variant: Callable  # (x, *params) -> y: a row's bits depend on the batch size
    thread_variant: Callable  # (x, *params) -> y: dweight's bits depend on the thread count
    xhat: Callable  # x normalised, as the row terms of dweight: the run-to-run negative control's
    dweight_slack: Callable | None = None  # (x, dy, exact, eps) -> relative allowance (helpers.assert_accuracy)

    @property
    def grad_names(self) -> tuple[str, ...]:
        return ("dx", *("d" + p for p in self.params))


def make_params(norm: RowNorm, normalized_shape, affine: str, dtype, device, seed=10) -> tuple:
    """norm's parameters for affine "both", "weight" (no bias) or "none": weight from seed, bias
    from seed + 1, None where absent (RMSNorm has a weight only, so "both" is "weight")."""
    made = {"weight": make(normalized_shape, dtype, device, seed, 0.5, 1.0) if affine in ("both", "weight") else None}
    if "bias" in norm.params:
        made["bias"] = make(normalized_shape, dtype, device, seed + 1, 0.5, 0.0) if affine == "both" else None
    return tuple(made[p] for p in norm.params)


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------
def matmul_rms_norm(x, weight):
    """An RMSNorm whose mean square is a matvec (`x^2 @ ones / N`): PyTorch's CPU matmul blocks by
    the batch size, so this is NOT batch-invariant. The negative control. (Non-finite garbage
    is zeroed first: with it the matvec happened to take a batch-invariant path; the probe row
    is finite and unchanged by that.)"""
    n = x.shape[-1]
    ones = torch.linspace(1.0, 1.0 + 1e-3, n, dtype=torch.float32, device=x.device)[:, None]
    xf = torch.nan_to_num(x.float(), posinf=0.0, neginf=0.0)
    return (xf * torch.rsqrt((xf * xf) @ ones / n) * weight).to(x.dtype)


class _PerThreadPartialsRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, w):
        ctx.save_for_backward(a, w)
        return F.rms_norm(a, (a.shape[-1],), w)

    @staticmethod
    def backward(ctx, dy):  # dweight only (dx: a stand-in, the check compares dweight)
        a, w = ctx.saved_tensors
        xhat = a * torch.rsqrt(a.square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
        return dy.clone(), sum(chunk.sum(0) for chunk in (dy * xhat).chunk(torch.get_num_threads()))


def per_thread_partials_rms_norm(x, weight):
    """An RMSNorm whose weight gradient adds one partial per thread (rows cut into
    torch.get_num_threads() chunks), as a kernel that splits rows by thread count would: the
    negative control. (torch's own RMSNorm reduces dweight column by column, thread-invariant.)"""
    return _PerThreadPartialsRMSNorm.apply(x, weight)


def rms_norm_dweight_slack(x, dy, exact, eps):
    """The allowance of docs/design.md's accuracy rule where terms cancel: 2 sqrt(K) float32 ulps
    of the magnitude of the K row terms dy * xhat that each dweight element sums, relative to the
    result (dweight of random-sign dy sums terms that cancel; torch's pairwise sum is more
    accurate than the fixed row-group order there)."""
    x64 = x.double().reshape(-1, exact[2].numel())
    terms = dy.double().reshape(x64.shape) * x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps)
    ulps = 2 * x64.shape[0] ** 0.5 * torch.finfo(torch.float32).eps * terms.abs().sum(0).norm().item()
    return ulps / exact[2].norm().item()


RMS_NORM = RowNorm(
    name="rms_norm", params=("weight",), stats=("rstd",),
    fn=fusedtx.rms_norm,
    # F.rms_norm promotes its output to float32 beside a float32 weight, which would hold
    # fusedtx's bfloat16 / float16 output to a float32 error.
    torch_fn=lambda x, shape, w, eps=None: F.rms_norm(x, shape, w, eps).to(x.dtype),
    float32_eps=torch.finfo(torch.float32).eps,  # torch's default
    module=fusedtx.nn.RMSNorm, torch_module=torch.nn.RMSNorm,
    op=rms_norm_op.rms_norm, backward=torch.ops.fusedtx.rms_norm_backward,
    ref_forward=reference.rms_norm_forward, ref_backward=reference.rms_norm_backward,
    batch_variant=matmul_rms_norm, thread_variant=per_thread_partials_rms_norm,
    xhat=lambda x: x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5),
    dweight_slack=rms_norm_dweight_slack,
)


# ---------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------
def matmul_layer_norm(x, weight, bias):
    """A LayerNorm whose statistics are matvecs (`x @ ones / N`): PyTorch's CPU matmul blocks by
    the batch size, so this is NOT batch-invariant. The negative control."""
    n = x.shape[-1]
    ones = torch.linspace(1.0, 1.0 + 1e-3, n, dtype=torch.float32, device=x.device)[:, None]
    xf = x.float()
    d = xf - (xf @ ones) / n
    return (d / torch.sqrt((d * d) @ ones / n + 1e-5) * weight + bias).to(x.dtype)


LAYER_NORM = RowNorm(
    name="layer_norm", params=("weight", "bias"), stats=("mean", "rstd"),
    fn=fusedtx.layer_norm,
    torch_fn=lambda x, shape, w, b, eps=1e-5: F.layer_norm(x, shape, w, b, eps),
    float32_eps=1e-5,
    module=fusedtx.nn.LayerNorm, torch_module=torch.nn.LayerNorm,
    op=layer_norm_op.layer_norm, backward=torch.ops.fusedtx.layer_norm_backward,
    ref_forward=reference.layer_norm_forward, ref_backward=reference.layer_norm_backward,
    batch_variant=matmul_layer_norm,
    # PyTorch's own LayerNorm: its weight gradient follows the thread count
    thread_variant=lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b),
    xhat=lambda x: (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5),
)

NORMS = [pytest.param(RMS_NORM, id="rms_norm"), pytest.param(LAYER_NORM, id="layer_norm")]


def per_norm(rms_norm_value, layer_norm_value) -> list:
    """(norm, value) parameters, for a test with one value that differs between the two norms."""
    return [pytest.param(RMS_NORM, rms_norm_value, id="rms_norm"), pytest.param(LAYER_NORM, layer_norm_value,
                                                                                 id="layer_norm")]


# (id, x shape, normalized_shape, affine): odd widths, multi-dim normalized shapes, no affine
CASES = [
    ("N1", (4, 1), (1,), "both"),
    ("N7", (3, 7), (7,), "both"),
    ("N768", (2, 5, 768), (768,), "both"),
    ("N1000-noBias", (3, 1000), (1000,), "weight"),
    ("2d-shape", (2, 3, 4, 10), (4, 10), "both"),
    ("no-affine", (5, 130), (130,), "none"),
    ("0rows", (0, 64), (64,), "both"),
    ("131rows", (131, 64), (64,), "both"),  # row groups of 2: 66 hold rows (the last one row), the last 62 are empty
]


def norm_cases(skip=()) -> list:
    """(norm, shape, normalized_shape, affine) parameters: CASES for each norm, id
    "<norm>-<case>", but the ids in skip and the cases that would repeat another for the norm
    (no bias where it has none)."""
    return [pytest.param(norm, shape, normalized_shape, affine, id=f"{norm.name}-{case}")
            for norm in (RMS_NORM, LAYER_NORM) for case, shape, normalized_shape, affine in CASES
            if (affine != "weight" or "bias" in norm.params) and f"{norm.name}-{case}" not in skip]
