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
