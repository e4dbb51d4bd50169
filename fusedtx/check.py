"""`python -m fusedtx check`: does fusedtx keep its promise on this machine?

Builds a small GPT with random weights from a fixed seed, loads the same weights into a GPT on
every fusedtx backend that can run here and into PlainGPT (the same model on plain torch.nn
layers and SDPA, for comparison), and checks each one for:

  1. accuracy: its logits are as close to a float64 PyTorch forward as PyTorch's own float32;
  2. batch invariance: a sequence's logits alone == inside batches of 1 ... 16 other sequences
     of other lengths, right-padded with garbage tokens, at any index;
  3. generation consistency: every step of generate() == a full forward over the sequence so
     far; chunked prefill (chunks of 1, 7, random sizes) through a KV cache == the full prefill;
  4. on-policy: generate()'s log-probabilities == logprobs() of a training-style forward over
     the same tokens in a differently composed batch (KL exactly 0);
  5. training determinism: a few AdamW steps twice from the same init give the same loss,
     gradients and parameters; on CPU also with 1 thread vs 2;
  6. continuous batching: N requests at temperature 0, served by a small continuous-batching
     loop several times with different random arrival schedules — unique completions per
     prompt (fusedtx: exactly 1).

Every cell is "bitwise identical" (✓) or not (✗, with the largest absolute difference). The
exit code is 1 if any fusedtx backend fails a property; PlainGPT failing is expected, not an
error — it is what the comparison is for.

What to expect from plain PyTorch on a CPU: its logits change in the 7th digit with the batch,
the cache path and the thread count (✗ ~1e-7), but a greedy completion changes only where the
top two logits are that close, and a small random model is rarely so unsure (its top-two gaps
are ~0.1; a longer generation, a bigger vocabulary or bfloat16 did not change that here). So its
serving row usually still shows one completion per prompt: the divergence the classic
experiment shows takes a trained model, long generations and a GPU's batch-dependent kernels.

Without a GPU, the Triton backend can only run under the Triton interpreter, a Python loop over
every program instance: even the reduced workload it gets here takes about two minutes, so it
runs only when asked for, and the interpreter must be chosen before triton is imported:
`TRITON_INTERPRET=1 python -m fusedtx check --backends triton`. The reference backend (float64
emulation of every fused multiply-add) gets a reduced workload too.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from . import __version__, backends
from .models import GPT, GPTConfig, PlainGPT
from .serving import Request, serve


# ---------------------------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """How much of each property to run (the sizes; the model is Options.preset)."""
    max_len: int = 48                 # longest sequence in the batch-invariance batches
    compositions: int = 4             # random batches the target sequence is placed in
    max_others: int = 16              # other sequences in the largest of them
    prompts: int = 4                  # prompts for generate() (properties 3 and 4)
    new_tokens: int = 24              # tokens generated per prompt (3 and 4)
    prefill_len: int = 40             # longest prompt (3, 4, 6); the chunked prefills' length (3)
    train_steps: int = 3              # AdamW steps per training run (5)
    train_batch: tuple = (4, 32)      # (sequences, tokens) per training step (5)
    requests: int = 16                # requests per serve (6)
    serves: int = 4                   # serves with different schedules (6); the first one alone
    max_slots: int = 8                # most requests decoded together (6)
    serve_new_tokens: tuple = (8, 32)   # each request wants between these many tokens (6)


WORKLOADS = {
    "default": Workload(),
    # --quick: the same code paths, seconds in all
    "quick": Workload(max_len=24, compositions=2, max_others=5, prompts=3, new_tokens=8, prefill_len=20,
                      train_steps=2, train_batch=(2, 16), requests=6, serves=3, max_slots=4,
                      serve_new_tokens=(4, 10)),
    # the pure-PyTorch spec emulates every fused multiply-add in float64: ~50x slower than native
    "reference": Workload(max_len=32, compositions=3, prompts=3, new_tokens=20, prefill_len=32,
                          requests=8, serves=3, max_slots=6, serve_new_tokens=(8, 16)),
    # the Triton interpreter on CPU: ~0.3 s per decode step of the tiny model
    "interpreter": Workload(max_len=20, compositions=2, max_others=4, prompts=2, new_tokens=6, prefill_len=18,
                            train_steps=2, train_batch=(2, 12), requests=4, serves=2, max_slots=3,
                            serve_new_tokens=(3, 6)),
}


@dataclass
class Options:
    device: str = "cpu"
    preset: str = "tiny"
    seed: int = 0
    quick: bool = False


@dataclass
class Column:
    """One column of the table: a way to build the model and the workload it gets."""
    name: str
    build: Callable[[GPTConfig], torch.nn.Module]   # an untrained model of this config
    workload: Workload
    is_fusedtx: bool = True


@dataclass
class Cell:
    status: str                       # "pass", "fail", "skipped" or "error"
    max_abs_diff: float | None = None
    detail: str = ""                  # what the table shows beside ✓ / ✗
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


PROPERTIES = [  # (key, label in the table)
    ("accuracy", "1 accuracy vs float64 (rel. err)"),
    ("batch_invariance", "2 batch invariance"),
    ("generate_vs_forward", "3 generate == full forward"),
    ("chunked_prefill", "  chunked prefill == full"),
    ("on_policy", "4 on-policy logprobs"),
    ("training_repeat", "5 training, run vs run"),
    ("training_threads", "  training, thread counts"),
    ("serving", "6 continuous batching"),
]


# ---------------------------------------------------------------------------------------------
# Comparing results
# ---------------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns, so that -0.0 != +0.0 and NaN == NaN of the same payload."""
    int_type = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(int_type)


def compare(pairs) -> tuple[bool, float]:
    """(all pairs bitwise identical, largest |a - b| over them) for pairs of tensors."""
    same, worst = True, 0.0
    for a, b in pairs:
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, math.inf
        if not torch.equal(_bits(a), _bits(b)):
            same = False
            diff = (a.detach().double() - b.detach().double()).abs()
            worst = max(worst, float(torch.nan_to_num(diff, nan=math.inf).max()))
    return same, worst


def _cell(same: bool, worst: float, detail: str = "", **extra) -> Cell:
    return Cell("pass" if same else "fail", worst, detail, extra=extra)


def _tokens(rng: torch.Generator, vocab: int, *shape) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=rng)


def _device(model: torch.nn.Module) -> torch.device:
    return model.transformer.wte.weight.device


# ---------------------------------------------------------------------------------------------
# The properties. Each takes a model factory (same weights every call), a workload and a seed.
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def check_accuracy(make, work: Workload, seed: int, reference_error: Callable) -> Cell:
    """Relative error of the logits against float64 PyTorch, within 2x PyTorch float32's own
    (contract point 1; the ops meet it one by one, and the model composes them)."""
    model = make()
    rng = torch.Generator().manual_seed(seed)
    idx = _tokens(rng, model.config.vocab_size, 4, work.max_len).to(_device(model))
    error, torch_error = reference_error(model(idx), idx)
    return Cell("pass" if error <= 2 * torch_error + 1e-9 else "fail", None, f"{error:.1e}",
                extra=dict(relative_error=error, torch_float32_relative_error=torch_error))


@torch.no_grad()
def check_batch_invariance(make, work: Workload, seed: int) -> Cell:
    """A sequence's logits alone == its logits inside batches of other sequences of other lengths,
    at a random index, every row right-padded with random garbage tokens."""
    model = make()
    rng, vocab, device = torch.Generator().manual_seed(seed), model.config.vocab_size, _device(model)
    pairs, shapes = [], []
    for trial in range(work.compositions):
        length = int(torch.randint(1, work.max_len + 1, (), generator=rng))
        sequence = _tokens(rng, vocab, length)
        alone = model(sequence[None].to(device))[0]
        # the last trial has the most others; the rest a random number of them
        others = work.max_others if trial == work.compositions - 1 else int(torch.randint(1, work.max_others + 1, (), generator=rng))
        index = int(torch.randint(0, others + 1, (), generator=rng))
        width = int(torch.randint(length, work.max_len + 1, (), generator=rng))
        batch = _tokens(rng, vocab, others + 1, width)                 # garbage everywhere ...
        batch[index, :length] = sequence                               # ... but the target's tokens
        pairs.append((model(batch.to(device))[index, :length], alone))
        shapes.append((others + 1, width, index, length))
    same, worst = compare(pairs)
    return _cell(same, worst, batches=shapes)


@torch.no_grad()
def check_generate_vs_forward(make, work: Workload, seed: int) -> Cell:
    """At every step of generate(return_logits=True), the logits == a full forward over the
    sequence so far (each sequence alone, no cache)."""
    model = make()
    rng, vocab, device = torch.Generator().manual_seed(seed), model.config.vocab_size, _device(model)
    prompts = [_tokens(rng, vocab, int(torch.randint(1, work.prefill_len + 1, (), generator=rng)))
               for _ in range(work.prompts)]
    out = model.generate(prompts, work.new_tokens, return_logits=True)
    pairs = []
    for b, prompt in enumerate(prompts):
        sequence = torch.cat([prompt, out.tokens[b].cpu()])
        full = model(sequence[None].to(device))[0]
        # the logits at position t predict token t + 1: the first new token comes from the prompt's last
        pairs.append((out.logits[b], full[len(prompt) - 1: len(prompt) - 1 + work.new_tokens]))
    same, worst = compare(pairs)
    return _cell(same, worst, prompt_lengths=[len(p) for p in prompts])


@torch.no_grad()
def check_chunked_prefill(make, work: Workload, seed: int) -> Cell:
    """Feeding a prompt through the KV cache in chunks (all of 1 token, all of 7, random sizes)
    gives the same logits as one full forward."""
    model = make()
    rng, vocab, device = torch.Generator().manual_seed(seed), model.config.vocab_size, _device(model)
    prompt = _tokens(rng, vocab, 1, work.prefill_len).to(device)
    full = model(prompt)
    schedules = {"1": [1] * work.prefill_len, "7": [7] * math.ceil(work.prefill_len / 7), "random": []}
    while sum(schedules["random"]) < work.prefill_len:
        schedules["random"].append(int(torch.randint(1, 13, (), generator=rng)))
    pairs = []
    for sizes in schedules.values():
        cache, start, chunks = model.new_kv_cache(1, work.prefill_len), 0, []
        for size in sizes:
            chunk = prompt[:, start: start + size]
            if chunk.shape[1]:
                chunks.append(model.lm_head(model.hidden_states(chunk, cache)))
            start += size
        pairs.append((torch.cat(chunks, 1), full))
    same, worst = compare(pairs)
    return _cell(same, worst, chunk_schedules=list(schedules.values()))


@torch.no_grad()
def check_on_policy(make, work: Workload, seed: int) -> Cell:
    """Sample at temperature 1 (as an RL sampler does); then a training-style forward over the
    finished sequences — shuffled, among extra sequences, right-padded with garbage — must give
    the sampler's log-probabilities bit for bit: KL(sampler || trainer) exactly 0."""
    model = make()
    rng, vocab, device = torch.Generator().manual_seed(seed), model.config.vocab_size, _device(model)
    prompts = [_tokens(rng, vocab, int(torch.randint(1, work.prefill_len + 1, (), generator=rng)))
               for _ in range(work.prompts)]
    out = model.generate(prompts, work.new_tokens, temperature=1.0, return_logits=True,
                         generator=torch.Generator().manual_seed(seed + 1))
    sequences = [torch.cat([p, t]) for p, t in zip(prompts, out.tokens.cpu())]
    extra = [_tokens(rng, vocab, int(torch.randint(2, work.max_len + 1, (), generator=rng))) for _ in range(3)]
    rows = torch.randperm(len(sequences) + len(extra), generator=rng).tolist()  # where sequence i goes
    width = max(len(s) for s in sequences + extra)
    batch = _tokens(rng, vocab, len(rows), width)
    for row, s in zip(rows, sequences + extra):
        batch[row, :len(s)] = s
    batch = batch.to(device)
    trainer_logprobs, trainer_logits = model.logprobs(batch), model(batch)
    pairs, kl = [], 0.0
    for i, prompt in enumerate(prompts):
        steps = slice(len(prompt) - 1, len(prompt) - 1 + work.new_tokens)
        pairs.append((out.logprobs[i], trainer_logprobs[rows[i], steps]))
        sampler, trainer = out.logits[i].double().log_softmax(-1), trainer_logits[rows[i], steps].double().log_softmax(-1)
        kl = max(kl, float((sampler.exp() * (sampler - trainer)).sum(-1).mean()))
    same, worst = compare(pairs)
    return _cell(same, worst, f"KL {kl:.0e}" if kl else "KL 0", kl=kl)


def _train(make, work: Workload, seed: int, threads: int | None = None):
    """A few AdamW steps on random tokens: (losses, gradients of every step, final parameters)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model = make().train()
        rng, vocab, device = torch.Generator().manual_seed(seed), model.config.vocab_size, _device(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        losses, grads = [], []
        for _ in range(work.train_steps):
            data = _tokens(rng, vocab, work.train_batch[0], work.train_batch[1] + 1).to(device)
            _, loss = model(data[:, :-1], data[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            losses.append(loss.detach())
            grads += [p.grad.clone() for p in model.parameters()]
            optimizer.step()
        return losses, grads, [p.detach().clone() for p in model.parameters()]
    finally:
        torch.set_num_threads(previous)


def _compare_runs(a, b) -> tuple[bool, float]:
    return compare([pair for part_a, part_b in zip(a, b) for pair in zip(part_a, part_b)])


def check_training(make, work: Workload, seed: int, device: torch.device) -> dict[str, Cell]:
    """Training determinism: two runs from the same init at the current thread count, and (on
    CPU) a third at another thread count. Gives the cells of both training rows."""
    now = torch.get_num_threads()
    first, second = _train(make, work, seed), _train(make, work, seed)
    same, worst = _compare_runs(first, second)
    cells = {"training_repeat": _cell(same, worst, steps=work.train_steps)}
    if device.type != "cpu":
        cells["training_threads"] = Cell("skipped", detail="CPU only")
    else:
        other = 1 if now > 1 else 2
        same, worst = _compare_runs(first, _train(make, work, seed, threads=other))
        cells["training_threads"] = _cell(same, worst, f"{min(now, other)} vs {max(now, other)} threads",
                                          threads=[now, other])
    return cells


def check_serving(make, work: Workload, seed: int) -> Cell:
    """Serve the same requests `serves` times with fusedtx.serving.serve — first each alone (one
    slot, in order), then with random arrival times, orders and slot counts — and count the
    unique completions per prompt."""
    model = make()
    rng, vocab = torch.Generator().manual_seed(seed), model.config.vocab_size
    low, high = work.serve_new_tokens
    specs = [(_tokens(rng, vocab, int(torch.randint(2, work.prefill_len + 1, (), generator=rng))),
              int(torch.randint(low, high + 1, (), generator=rng))) for _ in range(work.requests)]
    runs, schedules = [], []
    for serve_no in range(work.serves):
        requests = [Request(i, prompt, n) for i, (prompt, n) in enumerate(specs)]
        if serve_no == 0:
            slots = 1
        else:
            slots = int(torch.randint(2, work.max_slots + 1, (), generator=rng))
            span = int(torch.randint(1, 2 * work.requests, (), generator=rng))
            order = torch.randperm(len(requests), generator=rng).tolist()
            requests = [requests[i] for i in order]
            for r in requests:
                r.arrival = int(torch.randint(0, span, (), generator=rng))
        serve(model, requests, slots, garbage=torch.Generator().manual_seed(seed + serve_no))
        runs.append(sorted(requests, key=lambda r: r.id))
        schedules.append(dict(slots=slots, arrivals=[r.arrival for r in runs[-1]]))
    unique = [len({tuple(run[i].tokens) for run in runs}) for i in range(work.requests)]
    # logits against the first (alone) serve, up to and including the first differing token
    worst, same = 0.0, True
    for run in runs[1:]:
        for alone, r in zip(runs[0], run):
            for step, (a, b) in enumerate(zip(alone.logits, r.logits)):
                s, w = compare([(a, b)])
                same, worst = same and s, max(worst, w)
                if alone.tokens[step] != r.tokens[step]:
                    break
    diverged = sum(u > 1 for u in unique)
    detail = "1 per prompt" if not diverged else f"up to {max(unique)} per prompt ({diverged}/{work.requests})"
    return Cell("pass" if same and not diverged else "fail", worst, detail,
                extra=dict(unique_completions=unique, prompts_with_several=diverged, schedules=schedules))


# ---------------------------------------------------------------------------------------------
# Running the table
# ---------------------------------------------------------------------------------------------
def default_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(columns to run by default, {backend: why it is left out}) on this device: every fusedtx
    backend that can run here but the Triton interpreter, then plain PyTorch."""
    names, left_out = [], {}
    for name in backends.BACKENDS:
        why = _why_unavailable(name, device)
        if why is None and name == "triton" and device.type == "cpu":
            why = "runs under the Triton interpreter here, which takes about 2 minutes: --backends triton"
        if why is None:
            names.append(name)
        else:
            left_out[name] = why
    return names + ["plain"], left_out


def _why_unavailable(name: str, device: torch.device) -> str | None:
    if name == "triton" and device.type == "cpu" and backends.triton_mode() == "unavailable: no CUDA GPU":
        # @triton.jit picks the interpreter when our kernels are imported: too late to ask for it now
        return ("no CUDA GPU; to run its kernels under the Triton interpreter (about 2 minutes): "
                "TRITON_INTERPRET=1 python -m fusedtx check --backends triton")
    try:
        backends.resolve(name, device)
        return None
    except backends.BackendUnavailableError as exc:
        return str(exc)


def columns_for(names: list[str], quick: bool, device: torch.device) -> list[Column]:
    """The table's columns, in the order given: fusedtx backends and "plain" (plain PyTorch)."""
    columns = []
    for name in names:
        if name == "plain":
            columns.append(Column("plain PyTorch", PlainGPT, WORKLOADS["quick" if quick else "default"],
                                  is_fusedtx=False))
            continue
        if quick:
            work = WORKLOADS["quick"]
        elif device.type == "cpu" and name in ("reference", "triton"):
            work = WORKLOADS["reference" if name == "reference" else "interpreter"]
        else:
            work = WORKLOADS["default"]
        columns.append(Column(name, lambda config, backend=name: GPT(config, backend=backend), work))
    return columns


def _progress(total: int):
    """A tqdm bar on stderr, or a line per step when tqdm is not installed."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, file=sys.stderr, leave=False, dynamic_ncols=True, unit="check")
    except ImportError:
        class Lines:
            n = 0

            def set_description_str(self, text):
                print(f"[{self.n + 1}/{total}] {text}", file=sys.stderr, flush=True)

            def update(self, k=1):
                self.n += k

            def close(self):
                pass

        return Lines()


def run_check(columns: list[Column], options: Options, progress: bool = True) -> dict:
    """Run every property on every column; return the report (a JSON-ready dict)."""
    device = torch.device(options.device)
    config = GPTConfig.preset(options.preset)
    torch.manual_seed(options.seed)
    state = GPT(config).state_dict()        # one set of random weights for every column

    def maker(build):
        def make():
            model = build(config).to(device).eval()
            model.load_state_dict(state)
            return model
        return make

    plain64 = maker(PlainGPT)().double()
    plain32 = maker(PlainGPT)()

    def reference_error(logits, idx):
        truth = plain64(idx)
        error = lambda out: float((out.double() - truth).norm() / truth.norm())  # noqa: E731
        return error(logits), error(plain32(idx))

    bar = _progress(len(columns) * (len(PROPERTIES) - 1)) if progress else None
    results, started = {}, time.perf_counter()
    with warnings.catch_warnings():
        # the Triton interpreter runs masked-out lanes through numpy too (NaN there is harmless)
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")
        for column in columns:
            results[column.name] = _run_column(column, maker(column.build), options.seed, device,
                                               reference_error, bar)
    if bar is not None:
        bar.close()
    failed = [f"{c.name}: {key}" for c in columns if c.is_fusedtx
              for key, cell in results[c.name]["cells"].items() if cell["status"] in ("fail", "error")]
    return dict(
        passed=not failed,
        failed=failed,
        versions=dict(fusedtx=__version__, torch=torch.__version__, python=platform.python_version(),
                      triton=_triton_version()),
        device=dict(type=device.type, name=_device_name(device), cpu_threads=torch.get_num_threads()),
        seed=options.seed,
        options=asdict(options),
        model=dict(preset=options.preset, dtype="float32", **asdict(config)),
        columns=[dict(name=c.name, fusedtx=c.is_fusedtx) for c in columns],
        property_labels={key: label.strip() for key, label in PROPERTIES},
        results=results,
        seconds=time.perf_counter() - started,
    )


def _run_column(column: Column, make, seed: int, device: torch.device, reference_error, bar) -> dict:
    """{"cells": {property: cell as a dict}, "seconds", "workload"} for one column."""
    work = column.workload
    tasks = {  # training fills two rows
        "accuracy": lambda: check_accuracy(make, work, seed, reference_error),
        "batch_invariance": lambda: check_batch_invariance(make, work, seed),
        "generate_vs_forward": lambda: check_generate_vs_forward(make, work, seed),
        "chunked_prefill": lambda: check_chunked_prefill(make, work, seed),
        "on_policy": lambda: check_on_policy(make, work, seed),
        "training": lambda: check_training(make, work, seed, device),
        "serving": lambda: check_serving(make, work, seed),
    }
    cells = {}
    for key, task in tasks.items():
        if bar is not None:
            bar.set_description_str(f"{column.name}: {key.replace('_', ' ')}")
        start = time.perf_counter()
        try:
            outcome = task()
        except backends.BackendUnavailableError as exc:  # e.g. a kernel this backend lacks yet
            outcome = Cell("skipped", detail=str(exc))
        except Exception as exc:  # a crash is a failed cell, reported, not a crashed check
            outcome = Cell("error", detail=f"{type(exc).__name__}: {exc}")
        if not isinstance(outcome, dict):
            outcome = {"training_repeat": outcome, "training_threads": replace(outcome)} if key == "training" \
                else {key: outcome}
        seconds = time.perf_counter() - start
        for name, cell in outcome.items():
            cell.seconds = seconds / len(outcome)
            cells[name] = asdict(cell)
        if bar is not None:
            bar.update(1)
    return dict(cells={key: cells[key] for key, _ in PROPERTIES},
                seconds=sum(c["seconds"] for c in cells.values()), workload=asdict(work))


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------
def _marks() -> tuple[str, str]:
    try:
        "✓✗".encode(sys.stdout.encoding or "ascii")
        return "✓", "✗"
    except (UnicodeEncodeError, LookupError):
        return "ok", "FAIL"


def format_cell(cell: dict) -> str:
    yes, no = _marks()
    if cell["status"] == "skipped":
        return f"— {cell['detail']}" if len(cell["detail"]) <= 16 else "— not run (below)"
    if cell["status"] == "error":
        return f"{no} error"
    parts = [yes if cell["status"] == "pass" else no]
    if cell["max_abs_diff"]:
        parts.append(f"{cell['max_abs_diff']:.1e}")
    if cell["detail"]:
        parts.append(cell["detail"])
    elif cell["status"] == "pass":
        parts.append("identical")
    return " ".join(parts)


def format_table(report: dict) -> str:
    names = [c["name"] for c in report["columns"]]
    results = report["results"]
    rows = [[label] + [format_cell(results[n]["cells"][key]) for n in names] for key, label in PROPERTIES]
    rows.append(["seconds"] + [f"{results[n]['seconds']:.1f}" for n in names])
    header = ["property"] + names
    widths = [max(len(r[i]) for r in rows + [header]) + 2 for i in range(len(header))]
    line = lambda texts: "".join(t.ljust(w) for t, w in zip(texts, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * (w - 2) for w in widths])] + [line(r) for r in rows])


def print_report(report: dict, file=None) -> None:
    out = file or sys.stdout
    m, d = report["model"], report["device"]
    yes, no = _marks()
    print(f"fusedtx {report['versions']['fusedtx']} check: GPT {m['preset']!r} ({m['n_layer']} layers, "
          f"{m['n_embd']} wide, vocab {m['vocab_size']}, split size {m['split_size']}), random weights "
          f"(seed {report['seed']}), {m['dtype']}, on {d['type']} ({d['name']}, {d['cpu_threads']} threads)",
          file=out)
    print(f"{yes} = bitwise identical, else {no} and the largest |difference|; row 1: error within 2x "
          f"PyTorch float32's.\n", file=out)
    print(format_table(report), file=out)
    notes = [f"{name}: not run — {why}" for name, why in report.get("left_out", {}).items()]
    for column in report["columns"]:
        for key, cell in report["results"][column["name"]]["cells"].items():
            if cell["status"] == "error" or (cell["status"] == "skipped" and len(cell["detail"]) > 16):
                notes.append(f"{column['name']}, {key}: {cell['status']} — {cell['detail']}")
    if notes:
        print("\n" + "\n".join(notes), file=out)
    if report["passed"]:
        print(f"\nfusedtx: every property holds on every backend run ({report['seconds']:.0f} s).", file=out)
    else:
        print(f"\nfusedtx FAILED: {', '.join(report['failed'])}", file=out)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated columns from {', '.join(backends.BACKENDS)}, plain (default: "
                             "every fusedtx backend usable here but the Triton interpreter, then plain)")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="model size (default tiny)")
    parser.add_argument("--seed", type=int, default=0, help="weights, tokens and schedules (default 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: as is)")
    parser.add_argument("--quick", action="store_true", help="a smaller workload (seconds, not a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Exit code: 0 when every fusedtx backend run keeps every property, 1 when one does not, 2
    for a usage error (including a backend asked for by name that cannot run here)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from . import _extension

    if _extension._status is None and not args.no_progress:  # resolving "native" loads it, or builds it
        print("fusedtx check: loading the C++ extension (compiled on first use: about a minute) ...",
              file=sys.stderr, flush=True)
    if args.backends:
        names = list(dict.fromkeys(n.strip() for n in args.backends.split(",") if n.strip()))
        unknown = [n for n in names if n not in (*backends.BACKENDS, "plain")]
        if unknown or not names:
            print(f"fusedtx check: --backends takes names from {[*backends.BACKENDS, 'plain']}, got {args.backends!r}",
                  file=sys.stderr)
            return 2
        for name in names:
            why = None if name == "plain" else _why_unavailable(name, device)
            if why:
                print(f"fusedtx check: {name}: {why}", file=sys.stderr)
                return 2
        left_out = {}
    else:
        names, left_out = default_backends(device)
    options = Options(device=str(device), preset=args.preset, seed=args.seed, quick=args.quick)
    report = run_check(columns_for(names, args.quick, device), options, progress=not args.no_progress)
    report["left_out"] = left_out
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_json_safe(report), f, indent=1)
    return 0 if report["passed"] else 1


def _json_safe(value):
    """The report with inf / nan as strings (strict JSON has no such numbers)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
