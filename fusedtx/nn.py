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
