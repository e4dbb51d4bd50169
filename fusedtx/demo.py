"""`python -m fusedtx demo`: train a tiny character-level GPT for a minute, then show that a
prompt's greedy completion does not depend on what else is in the batch.

The corpus is one every Python installation has: a few modules of the standard library's own
source. The model is a 3-layer GPT on fusedtx's default backend (native C++ on CPU, Triton on a
GPU), trained with AdamW for --seconds (so how far it gets depends on the machine). The checkpoint (--out) holds the state_dict, the config
and the vocabulary. Then the prompt is completed at temperature 0 alone, and placed among 3 and
15 other prompts of different lengths: fusedtx gives the same characters and the same
log-probabilities every time. The same weights in plain PyTorch (models.PlainGPT) are shown
beside it: on a CPU its greedy text rarely changes with the batch (a minute-old model is often
sure enough of its next character that the choice survives), but its log-probabilities do, and
the demo prints by how much — what an RL trainer that re-scores a sampler's tokens in its own
batch sees as a KL that is not 0.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict

import torch

from .check import _marks
from .models import GPT, GPTConfig, PlainGPT

# Modules present in every CPython's Lib/ (fine if a few are missing: we take what is there).
CORPUS_FILES = ("textwrap.py", "string.py", "random.py", "functools.py", "heapq.py", "bisect.py",
                "fnmatch.py", "shlex.py", "dataclasses.py", "contextlib.py", "os.py", "argparse.py")
DEFAULT_PROMPT = "    def __init__(self"
CONFIG = dict(block_size=128, n_layer=3, n_head=4, n_embd=128, split_size=32)


def load_corpus() -> str:
    """A few standard-library modules' source, concatenated (this package's own source if the
    standard library ships without .py files, as some embedded Pythons do)."""
    stdlib = os.path.dirname(os.__file__)
    paths = [os.path.join(stdlib, name) for name in CORPUS_FILES]
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        here = os.path.dirname(__file__)
        paths = sorted(os.path.join(here, n) for n in os.listdir(here) if n.endswith(".py"))
    texts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return "\n\n".join(texts)


class Vocab:
    """Characters <-> token ids (the corpus's characters, sorted)."""

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            raise ValueError(f"demo: the prompt has characters the corpus never had: {unknown}")
        return [self.index[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def train(model: GPT, data: torch.Tensor, seconds: float, batch: int, lr: float, seed: int, progress: bool):
    """AdamW on random windows of `data` until `seconds` have passed; the learning rate warms up
    over 20 steps and decays along a cosine of the elapsed time. Returns (steps, last loss)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.1)
    block = model.config.block_size
    bar = _bar(seconds) if progress else None
    start, step, smooth = time.perf_counter(), 0, None
    model.train()
    while (elapsed := time.perf_counter() - start) < seconds:
        window = _windows(data, block, batch, generator).to(model.lm_head.weight.device)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * elapsed / seconds)))
        _, loss = model(window[:, :-1], window[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
        if bar is not None:
            bar(min(time.perf_counter() - start, seconds), f"step {step}  loss {smooth:.3f}")
    if bar is not None:
        bar(None, f"step {step}  loss {smooth:.3f}")
    return step, smooth


def _windows(data: torch.Tensor, block: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """batch random windows of block + 1 tokens: inputs [:, :-1], targets [:, 1:]."""
    starts = torch.randint(0, len(data) - block - 1, (batch,), generator=generator)
    return torch.stack([data[s: s + block + 1] for s in starts.tolist()])


def _bar(seconds: float):
    """update(elapsed, text): a tqdm bar over the seconds on stderr, or a line every 10 s."""
    try:
        from tqdm import tqdm
    except ImportError:
        last = [-math.inf]

        def update(elapsed, text):
            if elapsed is None or elapsed - last[0] >= 10:
                last[0] = elapsed if elapsed is not None else last[0]
                print(f"training: {text}", file=sys.stderr, flush=True)
        return update
    bar = tqdm(total=round(seconds), file=sys.stderr, dynamic_ncols=True,
               bar_format="training {n:.0f}/{total} s |{bar}| {desc}")

    def update(elapsed, text):
        if elapsed is None:
            bar.close()
            return
        bar.n = round(elapsed)
        bar.set_description_str(text, refresh=False)
        bar.refresh()
    return update


@torch.no_grad()
def evaluate(model: GPT, data: torch.Tensor, batches: int = 8, batch: int = 16) -> float:
    """Mean loss on fixed windows of held-out data."""
    model.eval()
    block, generator = model.config.block_size, torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(batches):
        window = _windows(data, block, batch, generator).to(model.lm_head.weight.device)
        losses.append(model(window[:, :-1], window[:, 1:])[1].item())
    return sum(losses) / len(losses)


def completions_in_batches(model: GPT, prompt: list[int], fillers: list[list[int]], new_tokens: int,
                           sizes=(1, 4, 16)) -> dict[int, tuple[int, torch.Tensor, torch.Tensor]]:
    """{batch size: (where the prompt sat, its greedy completion, their log-probabilities)}: the
    prompt alone, then among batch size - 1 other prompts of different lengths, at a position
    that moves."""
    out = {}
    for size in sizes:
        position = (size * 5) // 7 if size > 1 else 0         # somewhere inside, not always first
        others = fillers[: size - 1]
        prompts = others[:position] + [prompt] + others[position:]
        result = model.generate(prompts, new_tokens)
        out[size] = (position, result.tokens[position], result.logprobs[position])
    return out


def main(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    text = load_corpus()
    vocab = Vocab("".join(sorted(set(text))))
    data = torch.tensor(vocab.encode(text), dtype=torch.int64)
    split = int(0.9 * len(data))
    config = GPTConfig(vocab_size=len(vocab.chars), **CONFIG)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = GPT(config).to(device)
    where = f"{torch.get_num_threads()} CPU threads" if device.type == "cpu" else str(device)
    print(f"corpus: {len(text):,} characters of Python's standard library, {len(vocab.chars)} distinct; "
          f"model: {config.n_layer} layers, {config.n_embd} wide, {model.num_parameters():,} parameters; "
          f"training for {args.seconds:g} s on {where}")
    steps, loss = train(model, data[:split], args.seconds, args.batch_size, args.lr, args.seed,
                        progress=not args.no_progress)
    print(f"trained {steps} steps: train loss {loss:.3f}, held-out loss {evaluate(model, data[split:]):.3f}")
    torch.save(dict(state_dict=model.state_dict(), config=asdict(config), vocab=vocab.chars,
                    steps=steps), args.out)
    print(f"saved {args.out}")

    # the prompt, alone and among other prompts: lines of held-out source of different lengths
    prompt = vocab.encode(args.prompt)
    lines = [line for line in text[int(0.9 * len(text)):].splitlines() if line.strip()]
    fillers = [vocab.encode(line[: 5 + (7 * i) % 30]) for i, line in enumerate(lines[:15])]
    new_tokens = min(args.tokens, config.block_size - max(len(prompt), *map(len, fillers)))
    model.eval()
    plain = PlainGPT(config).to(device).eval()   # the same weights on torch.nn layers, for comparison
    plain.load_state_dict(model.state_dict())
    ok, (yes, no), texts = True, _marks(), {}
    worst = {}
    for name, m in (("fusedtx", model), ("plain PyTorch", plain)):
        results = completions_in_batches(m, prompt, fillers, new_tokens)
        alone, alone_logprobs = results[1][1], results[1][2]
        worst[name] = 0.0
        texts[name] = args.prompt + vocab.decode(alone)
        print(f"\n{name}, greedy (temperature 0), {new_tokens} new characters:", end="")
        if texts[name] == texts["fusedtx"] and name != "fusedtx":
            print(" the same text as fusedtx")
        else:
            print("".join("\n    " + line.rstrip() for line in texts[name].split("\n")))
        for size, (position, tokens, logprobs) in results.items():
            if size == 1:
                print("  batch size  1 (alone): the text above")
                continue
            same = torch.equal(tokens, alone)
            # log-probabilities up to the first character that differs (after it, other contexts)
            upto = len(tokens) if same else int((tokens != alone).nonzero()[0]) + 1
            diff = float((logprobs[:upto] - alone_logprobs[:upto]).abs().max()) if upto else 0.0
            worst[name] = max(worst[name], diff)
            ok &= (same and diff == 0.0) or name != "fusedtx"
            mark = f"{yes} the same" if same else \
                f"{no} differs from character {upto - 1} on: " + repr(vocab.decode(tokens))
            lp = "log-probabilities identical" if diff == 0.0 else f"log-probabilities differ by up to {diff:.1e}"
            print(f"  batch size {size:>2} (at position {position} of {size}): {mark}; {lp}")
    print(f"\nlargest log-probability change with the batch: fusedtx {worst['fusedtx']:.1e}, plain PyTorch "
          f"{worst['plain PyTorch']:.1e}.")
    if worst["plain PyTorch"] > 0.0:
        print("An RL trainer that re-scores the sampler's tokens in its own batch gets other log-probabilities "
              "from plain PyTorch:\nthe importance ratio is not 1 and the sampler-trainer KL is not 0, even when "
              "the text is the same. With fusedtx they are the same bits: KL exactly 0.")
    return 0 if ok else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=60, help="training time (default 60)")
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--out", default="fusedtx-demo.pt", help="checkpoint path (default ./fusedtx-demo.pt)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"default {DEFAULT_PROMPT!r}")
    parser.add_argument("--tokens", type=int, default=100, help="characters to generate (default 100)")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size (default 16)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
