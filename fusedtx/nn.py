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


class Linear(torch.nn.Linear):
    """Drop-in for torch.nn.Linear (same arguments, parameters and state_dict) running
    fusedtx.linear: every output row's bits are independent of the batch; optional fused GELU."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 activation: str | None = None, backend: str | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        F._linear_op.activation_code(activation)  # reject an unknown activation now, not at the first call
        self.activation, self.backend = activation, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias, activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}, backend={self.backend}"


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
