"""`python -m fusedtx check --hf PATH`: the promises of `check`, on a user's own local Hugging Face
checkpoint, converted with fusedtx.convert, beside the same checkpoint unconverted.

The directory is loaded twice with transformers' AutoModelForCausalLM (local files only,
float32, eval mode: no dropout); one copy is converted (fusedtx layers, the "fusedtx" attention
implementation). Each copy is checked for:

  2. batch invariance: a sequence's logits alone == inside batches of garbage sequences of more
     rows and more tokens (right-padded, no mask: causal), at every index tried;
  3. generate == full forward: HF's own greedy generate() with its cache, every step's logits ==
     a full forward over the sequence so far; chunked prefill through HF's DynamicCache (chunks
     of 1, 7 and random sizes) == the full prefill;
  4. on-policy: generate()'s log-probabilities of its tokens == log_softmax of a training-style
     forward over the same sequences in a differently composed batch;
  5. training: a few AdamW steps twice from the same weights give the same loss and weights;
     on CPU also with 1 thread vs 2.

Property 1 (accuracy) and 6 (serving) are fusedtx-model properties: `check` without --hf runs
them. Exit code 1 when the converted copy fails a property; the unconverted copy is the
comparison column (it usually fails some: that is what conversion is for).
"""
from __future__ import annotations

import copy
import inspect
import time
from dataclasses import asdict

import torch

from . import __version__, check
from .check_properties import Cell, compare
from .convert import convert
from .testing import _output

# check's rows but accuracy and serving (fusedtx-model properties)
PROPERTIES = [(key, label) for key, label in check.PROPERTIES if key not in ("accuracy", "serving", "serving_sampled")]
COLUMNS = ("fusedtx.convert", "unconverted")


def load(path: str, device: torch.device):
    """The checkpoint at path as a float32 causal LM in eval mode (local files only)."""
    try:
        import transformers
    except ImportError as exc:
        raise SystemExit(f"check --hf needs Hugging Face transformers: pip install transformers ({exc})")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model.to(device).eval()


def _tokens(rng, vocab, *shape):
    return torch.randint(0, vocab, shape, generator=rng)


def _cell(pairs) -> Cell:
    same, worst = compare(pairs)
    return Cell("pass" if same else "fail", worst)


@torch.no_grad()
def batch_invariance(model, vocab, rng, device, quick) -> Cell:
    pairs = []
    for trial in range(2 if quick else 4):
        length = int(torch.randint(4, 24, (), generator=rng))
        seq = _tokens(rng, vocab, length)
        alone = _output(model(seq[None].to(device)))[0]
        rows = (2, 5, 9, 16)[trial % 4]
        index = int(torch.randint(0, rows, (), generator=rng))
        batch = _tokens(rng, vocab, rows, length + int(torch.randint(0, 12, (), generator=rng)))
        batch[index, :length] = seq
        pairs.append((_output(model(batch.to(device)))[index, :length], alone))
    return _cell(pairs)


@torch.no_grad()
def generate_vs_forward(model, vocab, rng, device, quick) -> tuple[Cell, list]:
    prompts = _tokens(rng, vocab, 2, 9).to(device)
    steps = 6 if quick else 12
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    full = _output(model(out.sequences))
    pairs = [(logits, full[:, prompts.shape[1] - 1 + i]) for i, logits in enumerate(out.logits)]
    return _cell(pairs), [out.sequences, torch.stack(out.logits, 1), prompts.shape[1]]


@torch.no_grad()
def chunked_prefill(model, vocab, rng, device, quick) -> Cell:
    from transformers import DynamicCache

    idx = _tokens(rng, vocab, 1, 20 if quick else 30).to(device)
    full = _output(model(idx))
    # transformers 5.2x calls the cache argument `cache`; earlier releases `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    pairs = []
    for chunks in ([1] * idx.shape[1], [7] * (idx.shape[1] // 7) + [idx.shape[1] % 7], None):
        if chunks is None:  # random chunk sizes
            chunks, left = [], idx.shape[1]
            while left:
                chunks.append(min(left, int(torch.randint(1, 9, (), generator=rng))))
                left -= chunks[-1]
        cache, start, parts = DynamicCache(), 0, []
        for size in (c for c in chunks if c):
            out = model(idx[:, start:start + size], use_cache=True, **{cache_arg: cache})
            parts.append(_output(out))
            start += size
        pairs.append((torch.cat(parts, 1), full))
    return _cell(pairs)


@torch.no_grad()
def on_policy(model, vocab, rng, device, generated) -> Cell:
    sequences, logits, prompt_len = generated
    tokens = sequences[:, prompt_len:]
    sampler = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]
    # The trainer's batch: the sequences in the other order, beside a garbage one, 5 tokens longer.
    batch = _tokens(rng, vocab, sequences.shape[0] + 1, sequences.shape[1] + 5).to(device)
    batch[1:, :sequences.shape[1]] = sequences.flip(0)
    trainer_logits = _output(model(batch))[1:].flip(0)[:, prompt_len - 1:sequences.shape[1] - 1]
    trainer = torch.log_softmax(trainer_logits.float(), -1).gather(-1, tokens[..., None])[..., 0]
    return _cell([(sampler, trainer)])


def _train(make, vocab, seed, device, threads=None):
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model = make()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        rng = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(2):
            idx = _tokens(rng, vocab, 2, 16).to(device)
            loss = model(idx, labels=idx).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        return [torch.stack(losses)] + [p.detach().clone() for p in model.parameters()]
    finally:
        torch.set_num_threads(before)


def training(make, vocab, seed, device) -> dict:
    first = _train(make, vocab, seed, device)
    repeat = _cell(list(zip(first, _train(make, vocab, seed, device))))
    if device.type != "cpu":
        return {"training_repeat": repeat, "training_threads": Cell("skipped", detail="CPU only")}
    threads = _cell(list(zip(_train(make, vocab, seed, device, threads=1), _train(make, vocab, seed, device, 2))))
    return {"training_repeat": repeat, "training_threads": threads}


def run_hf_check(path: str, device: torch.device, seed: int = 0, quick: bool = False) -> dict:
    """Every property on the converted and the unconverted checkpoint: a report like check's."""
    base = load(path, device)
    vocab = base.config.vocab_size
    converted = copy.deepcopy(base)
    conversion = convert(converted).summary()
    makers = {"fusedtx.convert": lambda: convert_copy(base), "unconverted": lambda: copy.deepcopy(base)}
    results, started = {}, time.perf_counter()
    for name, model in (("fusedtx.convert", converted), ("unconverted", base)):
        rng = torch.Generator().manual_seed(seed)
        cells, t0 = {}, time.perf_counter()
        for key, task in (("batch_invariance", lambda: batch_invariance(model, vocab, rng, device, quick)),
                          ("generate", lambda: generate_vs_forward(model, vocab, rng, device, quick)),
                          ("chunked_prefill", lambda: chunked_prefill(model, vocab, rng, device, quick)),
                          ("training", lambda: training(makers[name], vocab, seed, device))):
            try:
                outcome = task()
            except Exception as exc:  # a crash is a failed cell, reported
                outcome = Cell("error", detail=f"{type(exc).__name__}: {exc}")
                if key == "generate":
                    outcome = (outcome, None)
            if key == "generate":
                cells["generate_vs_forward"], generated = outcome
                cells["on_policy"] = (on_policy(model, vocab, rng, device, generated) if generated is not None
                                      else Cell("skipped", detail="generate failed"))
            elif key == "training":
                cells.update(outcome if isinstance(outcome, dict) else
                             {"training_repeat": outcome, "training_threads": outcome})
            else:
                cells[key] = outcome
        results[name] = dict(cells={k: asdict(cells[k]) for k, _ in PROPERTIES}, seconds=time.perf_counter() - t0)
    failed = [f"fusedtx.convert: {k}" for k, c in results["fusedtx.convert"]["cells"].items()
              if c["status"] in ("fail", "error")]
    return dict(passed=not failed, failed=failed, path=str(path), conversion=conversion,
                model=dict(model_type=base.config.model_type, vocab_size=vocab,
                           parameters=sum(p.numel() for p in base.parameters())),
                versions=dict(fusedtx=__version__, torch=torch.__version__), device=dict(type=device.type),
                seed=seed, columns=[dict(name=c, fusedtx=c == "fusedtx.convert") for c in COLUMNS],
                results=results, seconds=time.perf_counter() - started)


def convert_copy(base):
    model = copy.deepcopy(base)
    convert(model)
    return model


def print_hf_report(report: dict, file=None) -> None:
    yes, no = check._marks()
    m = report["model"]
    print(f"fusedtx {report['versions']['fusedtx']} check --hf {report['path']}: {m['model_type']}, "
          f"{m['parameters'] / 1e6:.1f}M parameters, vocab {m['vocab_size']}, float32, on {report['device']['type']}",
          file=file)
    print(f"{yes} = bitwise identical, else {no} and the largest |difference|.\n", file=file)
    print(check.format_table(report, PROPERTIES), file=file)
    print("\n" + report["conversion"], file=file)
    for column in report["columns"]:
        for key, cell in report["results"][column["name"]]["cells"].items():
            if cell["status"] == "error":
                print(f"{column['name']}, {key}: error — {cell['detail']}", file=file)
    if report["passed"]:
        print(f"\nfusedtx: every property holds on the converted checkpoint ({report['seconds']:.0f} s).", file=file)
    else:
        print(f"\nfusedtx FAILED: {', '.join(report['failed'])}", file=file)
