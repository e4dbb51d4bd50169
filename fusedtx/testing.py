"""Assertions for a user's own test suite: is my model batch-invariant, and if not, where not?

    from fusedtx.testing import assert_batch_invariant, assert_decode_consistent, first_divergence
    assert_batch_invariant(model, token_ids)            # each row alone == inside other batches
    assert_decode_consistent(hf_model, prompt_ids, 8)   # HF generate's logits == a full forward's
    first_divergence(model, row_alone, batch, row_b=3)  # the first module whose output differs

Every comparison is bitwise (raw bit patterns: -0.0 differs from +0.0, a NaN equals the same
NaN). A model's output is its `.logits` when it has them, else its first tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .check_properties import compare


def _output(out) -> torch.Tensor:
    """The tensor a model call returned: .logits, a tensor, or the first tensor of a tuple."""
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"fusedtx.testing: the call returned a {type(out).__name__}, with no tensor or .logits to compare")


def _garbage_rows(inputs: torch.Tensor, n: int, gen: torch.Generator, extra: int = 0) -> torch.Tensor:
    """n rows shaped like inputs' rows (dim 1 longer by `extra`): token ids drawn from the ids in
    use for integer inputs, large random values for floating ones."""
    shape = (n, *inputs.shape[1:])
    if extra:
        shape = (n, shape[1] + extra, *shape[2:])
    if inputs.is_floating_point():
        scale = float(inputs.abs().max()) if inputs.numel() else 1.0
        return (torch.randn(shape, generator=gen) * 4 * (scale or 1.0)).to(inputs.device, inputs.dtype)
    high = int(inputs.max()) + 1 if inputs.numel() else 2
    return torch.randint(0, max(high, 2), shape, generator=gen).to(inputs.device, inputs.dtype)


def _differ(a: torch.Tensor, b: torch.Tensor) -> str:
    same, worst = compare([(a, b)])
    if same:
        return ""
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shapes/dtypes {list(a.shape)} {a.dtype} vs {list(b.shape)} {b.dtype}"
    differ = (a != b).nonzero()
    index = tuple(int(i) for i in differ[0]) if len(differ) else "(NaN payloads)"
    return f"max |difference| {worst:.3g}, first at index {index}"


@torch.no_grad()
def assert_batch_invariant(fn: Callable, inputs: torch.Tensor, *, batch_sizes=(2, 5, 16), extra_tokens=(0,),
                           seed: int = 0, garbage: Callable[[int, int], torch.Tensor] | None = None) -> None:
    """Assert that every row of `inputs`, run alone (fn(inputs[r:r+1])), gets bitwise the same
    output as at the first, a middle and the last position of batches of `batch_sizes` rows
    whose other rows are garbage (drawn from `seed`; garbage(n, length) -> n rows of that
    length to use instead).

    extra_tokens: for causal sequence models (an output position depends on the tokens up to
    it), also batches whose rows are this many tokens longer (dim 1), the row's own tokens
    first and garbage after them, comparing the row's leading positions: the batch's length
    changes too, as in a right-padded batch. E.g. (0, 3, 19) for a language model.

    fn: a model or any callable taking a batch (B, ...) and returning a batch-first tensor (or
    a model output with .logits). Raises AssertionError naming the row, the batch and where the
    outputs first differ."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1 or inputs.shape[0] < 1:
        raise ValueError("assert_batch_invariant: inputs must be a tensor with at least one row (rows, ...)")
    for size in batch_sizes:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"assert_batch_invariant: batch_sizes must be positive ints, got {batch_sizes!r}")
    for extra in extra_tokens:
        if not isinstance(extra, int) or extra < 0 or (extra and inputs.dim() < 2):
            raise ValueError(f"assert_batch_invariant: extra_tokens must be ints >= 0 (> 0 only for (rows, tokens, "
                             f"...) inputs), got {extra_tokens!r}")
    gen = torch.Generator().manual_seed(seed)
    length = inputs.shape[1] if inputs.dim() > 1 else None
    for row in range(inputs.shape[0]):
        alone = _output(fn(inputs[row:row + 1]))[0]
        for extra in extra_tokens:
            for size in batch_sizes:
                for pos in sorted({0, size // 2, size - 1}):
                    if garbage is not None:
                        batch = garbage(size, length + extra if length is not None else None).clone()
                    else:
                        batch = _garbage_rows(inputs, size, gen, extra)
                    if length is None:
                        batch[pos] = inputs[row]
                    else:
                        batch[pos, :length] = inputs[row]
                    out = _output(fn(batch))[pos]
                    why = _differ(out[:length] if extra else out, alone)
                    if why:
                        longer = f", {extra} tokens longer" if extra else ""
                        raise AssertionError(f"not batch-invariant: row {row} alone vs at position {pos} of a batch "
                                             f"of {size} rows{longer}: outputs differ ({why})")


@torch.no_grad()
def assert_decode_consistent(model, prompt: torch.Tensor, max_new_tokens: int = 8) -> None:
    """Assert that a Hugging Face model's greedy generate() with its KV cache gives at every step
    bitwise the logits of a full forward over the sequence so far. prompt: (B, T) token ids of
    equal-length sequences (no padding)."""
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.is_floating_point():
        raise ValueError("assert_decode_consistent: prompt must be a (batch, tokens) tensor of token ids")
    out = model.generate(prompt, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    full = _output(model(out.sequences))
    start = prompt.shape[1]
    for step, logits in enumerate(out.logits):
        why = _differ(logits, full[:, start - 1 + step].to(logits.dtype))
        if why:
            raise AssertionError(f"decode step {step} (position {start + step}): generate()'s logits differ from "
                                 f"a full forward over the sequence ({why})")


@dataclass
class Divergence:
    """The first module whose output for the row differs between two runs."""
    path: str              # module path in the model ("" for the model itself)
    module_type: str
    max_abs_diff: float
    index: int             # position of the module in execution (completion) order

    def __str__(self) -> str:
        return (f"{self.path or '(model)'} ({self.module_type}), module #{self.index} to finish: "
                f"max |difference| {self.max_abs_diff:.3g}")


def _trace(model: torch.nn.Module, x: torch.Tensor, row: int) -> list[tuple[str, str, torch.Tensor | None]]:
    """(path, type, row `row` of its output) for every module call, in the order calls finish."""
    records, handles = [], []
    for name, module in model.named_modules():
        def hook(mod, args, out, name=name):
            try:
                t = _output(out)
            except TypeError:
                t = None
            keep = isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == x.shape[0]
            records.append((name, type(mod).__name__, t[row].detach().clone() if keep else None))
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return records


def first_divergence(model: torch.nn.Module, input_a: torch.Tensor, input_b: torch.Tensor, row_a: int = 0,
                     row_b: int | None = None) -> Divergence | None:
    """Run model on input_a and on input_b and compare, module by module in execution order, the
    output of row row_a of the first run with row row_b (default row_a) of the second: the
    first module whose output differs, or None when none does. Typical use: input_a one
    sequence alone, input_b a batch holding it at row_b: the answer is the first layer whose
    bits depend on the batch."""
    row_b = row_a if row_b is None else row_b
    a, b = _trace(model, input_a, row_a), _trace(model, input_b, row_b)
    if [(p, t) for p, t, _ in a] != [(p, t) for p, t, _ in b]:
        raise ValueError("first_divergence: the two runs called different modules (data-dependent control flow?); "
                         "compare inputs that take the same path")
    for index, ((path, kind, x), (_, _, y)) in enumerate(zip(a, b)):
        if x is None or y is None:
            continue
        same, worst = compare([(x, y)])
        if not same:
            return Divergence(path, kind, worst if math.isfinite(worst) else math.inf, index)
    return None
