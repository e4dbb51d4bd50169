"""Library-wide settings that change results: the attention split size.

The split size S is where causal attention cuts the key range (at multiples of S counted from
position 0) before merging chunk partials in ascending order; it is what makes prefill, chunked
prefill and decode give the same bits. Changing S may change bits, never invariance.
"""
from __future__ import annotations

import os

import torch

from .policy import DEFAULT_SPLIT_SIZE

_split_size: int | None = None
# FUSEDTX_SPLIT_SIZE is read once, when fusedtx is imported (checked at first use): a compiled
# function cannot guard on os.environ, so a variable changed later would change eager results
# and not compiled ones. set_split_size changes it at run time.
_env_split_size: str | None = os.environ.get("FUSEDTX_SPLIT_SIZE") or None


def _check_split_size(value, what: str) -> int:
    if isinstance(value, torch.SymInt):  # traced by torch.compile(dynamic=True): specialise it (a
        value = int(value)               # guard); the split size decides the kernels' chunking
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what}: split size must be an int, got {type(value).__name__}")
    if value < 16 or value & (value - 1):
        raise ValueError(f"{what}: split size must be a power of two >= 16, got {value}")
    return value


def set_split_size(value: int | None) -> None:
    """Set the attention split size S for every call without an explicit split_size (None: default)."""
    global _split_size
    _split_size = None if value is None else _check_split_size(value, "set_split_size")


def get_split_size() -> int:
    """set_split_size(...) > FUSEDTX_SPLIT_SIZE (as it was at import) > DEFAULT_SPLIT_SIZE."""
    if _split_size is not None:
        return _split_size
    env = _env_split_size
    if env:
        try:
            return _check_split_size(int(env), "FUSEDTX_SPLIT_SIZE")
        except ValueError as exc:
            raise ValueError(f"FUSEDTX_SPLIT_SIZE={env!r}: {exc}") from None
    return DEFAULT_SPLIT_SIZE
