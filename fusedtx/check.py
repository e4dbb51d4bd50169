"""`python -m fusedtx check`: does fusedtx keep its promise on this machine?

For each model family (GPT-2 and Llama: `--model`, both by default) it builds a small model with
random weights from a fixed seed, loads the same weights into the model on every fusedtx backend
that can run here and into its plain twin (PlainGPT / PlainLlama: the same model on plain
torch.nn layers and SDPA, for comparison), and checks each one for:

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
top two logits are that close, and a small random model is rarely so unsure. So its serving rows
usually still show one completion per prompt but other log-probabilities (✗): the divergence of
the text the classic experiment shows takes a trained model, long generations and a GPU's
batch-dependent kernels.

Without a GPU, the Triton backend can only run under the Triton interpreter, a Python loop over
every program instance: slow even on the reduced workload it gets here, so it runs only when
asked for, and the interpreter must be chosen before triton is imported:
`TRITON_INTERPRET=1 python -m fusedtx check --backends triton`. The reference backend (float64
emulation of every fused multiply-add) gets a reduced workload too.

`--hf PATH` checks a local Hugging Face checkpoint instead, converted with fusedtx.convert and
unconverted (fusedtx/check_hf.py). The properties themselves are in
fusedtx/check_properties.py, the continuous-batching engine of property 6 in fusedtx/serving.py;
this module picks the columns, runs the table, prints it and is the command line.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from . import __version__, backends
from . import check_properties as properties
from .check_properties import Cell, Workload
from .models import GPT, GPTConfig, Llama, LlamaConfig, PlainGPT, PlainLlama


# ---------------------------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------------------------
WORKLOADS = {
    "default": Workload(),
    # --quick: the same code paths on smaller sizes
    "quick": Workload(max_len=24, compositions=2, max_others=5, prompts=3, new_tokens=8, prefill_len=20,
                      train_steps=2, train_batch=(2, 16), requests=6, serves=3, max_slots=4,
                      serve_new_tokens=(4, 10)),
    # the pure-PyTorch spec emulates every fused multiply-add in float64, far slower than native
    "reference": Workload(max_len=32, compositions=3, prompts=3, new_tokens=20, prefill_len=32,
                          requests=8, serves=3, max_slots=6, serve_new_tokens=(8, 16)),
    # the Triton interpreter on CPU runs every program instance in Python: the smallest sizes
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
    model: str = "gpt"


MODELS = ("gpt", "llama")


def family(model: str):
    """(config class, fusedtx model class, plain twin) of a model family (read when called, so
    that tests can swap a class)."""
    if model == "gpt":
        return GPTConfig, GPT, PlainGPT
    if model == "llama":
        return LlamaConfig, Llama, PlainLlama
    raise ValueError(f"check: model must be one of {MODELS}, got {model!r}")


@dataclass
class Column:
    """One column of the table: a way to build the model and the workload it gets."""
    name: str
    build: Callable[[object], torch.nn.Module]      # an untrained model of this config
    workload: Workload
    is_fusedtx: bool = True


PROPERTIES = [  # (key, label in the table)
    ("accuracy", "1 accuracy vs float64 (rel. err)"),
    ("batch_invariance", "2 batch invariance"),
    ("generate_vs_forward", "3 generate == full forward"),
    ("chunked_prefill", "  chunked prefill == full"),
    ("on_policy", "4 on-policy logprobs"),
    ("training_repeat", "5 training, run vs run"),
    ("training_threads", "  training, thread counts"),
    ("serving", "6 continuous batching"),
    ("serving_sampled", "  sampled, per-request seeds"),
]


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


def columns_for(names: list[str], quick: bool, device: torch.device, model: str = "gpt") -> list[Column]:
    """The table's columns, in the order given: fusedtx backends and "plain" (plain PyTorch)."""
    _, fused, plain = family(model)
    columns = []
    for name in names:
        if name == "plain":
            columns.append(Column("plain PyTorch", plain, WORKLOADS["quick" if quick else "default"],
                                  is_fusedtx=False))
            continue
        if quick:
            work = WORKLOADS["quick"]
        elif device.type == "cpu" and name in ("reference", "triton"):
            work = WORKLOADS["reference" if name == "reference" else "interpreter"]
        else:
            work = WORKLOADS["default"]
        columns.append(Column(name, lambda config, backend=name: fused(config, backend=backend), work))
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
    config_cls, fused, plain = family(options.model)
    config = config_cls.preset(options.preset)
    torch.manual_seed(options.seed)
    state = fused(config).state_dict()      # one set of random weights for every column

    def maker(build):
        def make():
            model = build(config).to(device).eval()
            model.load_state_dict(state)
            return model
        return make

    plain64 = maker(plain)().double()
    plain32 = maker(plain)()

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
        model=dict(family=options.model, preset=options.preset, dtype="float32", **asdict(config)),
        columns=[dict(name=c.name, fusedtx=c.is_fusedtx) for c in columns],
        property_labels={key: label.strip() for key, label in PROPERTIES},
        results=results,
        seconds=time.perf_counter() - started,
    )


def _run_column(column: Column, make, seed: int, device: torch.device, reference_error, bar) -> dict:
    """{"cells": {property: cell as a dict}, "seconds", "workload"} for one column."""
    work = column.workload
    tasks = {  # training fills two rows
        "accuracy": lambda: properties.check_accuracy(make, work, seed, reference_error),
        "batch_invariance": lambda: properties.check_batch_invariance(make, work, seed),
        "generate_vs_forward": lambda: properties.check_generate_vs_forward(make, work, seed),
        "chunked_prefill": lambda: properties.check_chunked_prefill(make, work, seed),
        "on_policy": lambda: properties.check_on_policy(make, work, seed),
        "training": lambda: properties.check_training(make, work, seed, device),
        "serving": lambda: properties.check_serving(make, work, seed),
        "serving_sampled": lambda: properties.check_serving_sampled(make, work, seed),
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


def format_table(report: dict, properties=PROPERTIES) -> str:
    names = [c["name"] for c in report["columns"]]
    results = report["results"]
    rows = [[label] + [format_cell(results[n]["cells"][key]) for n in names] for key, label in properties]
    rows.append(["seconds"] + [f"{results[n]['seconds']:.1f}" for n in names])
    header = ["property"] + names
    widths = [max(len(r[i]) for r in rows + [header]) + 2 for i in range(len(header))]
    line = lambda texts: "".join(t.ljust(w) for t, w in zip(texts, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * (w - 2) for w in widths])] + [line(r) for r in rows])


def print_report(report: dict, file=None) -> None:
    out = file or sys.stdout
    m, d = report["model"], report["device"]
    yes, no = _marks()
    if m.get("family", "gpt") == "gpt":
        shape = f"GPT {m['preset']!r} ({m['n_layer']} layers, {m['n_embd']} wide"
    else:
        shape = (f"Llama {m['preset']!r} ({m['model_type']}, {m['num_hidden_layers']} layers, {m['hidden_size']} wide, "
                 f"{m['num_attention_heads']}/{m['num_key_value_heads']} heads")
    print(f"fusedtx {report['versions']['fusedtx']} check: {shape}, vocab {m['vocab_size']}, split size "
          f"{m['split_size']}), random weights (seed {report['seed']}), {m['dtype']}, on {d['type']} ({d['name']}, "
          f"{d['cpu_threads']} threads)", file=out)
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
    parser.add_argument("--model", default="all", choices=[*MODELS, "all"],
                        help="model family: GPT-2, Llama, or both one after the other (default all)")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="model size (default tiny)")
    parser.add_argument("--seed", type=int, default=0, help="weights, tokens and schedules (default 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: as is)")
    parser.add_argument("--quick", action="store_true", help="a smaller workload (seconds, not a minute)")
    parser.add_argument("--hf", metavar="PATH",
                        help="check a local Hugging Face checkpoint directory instead: converted with "
                             "fusedtx.convert, beside the same checkpoint unconverted")
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
    if getattr(args, "hf", None):
        from .check_hf import print_hf_report, run_hf_check

        report = run_hf_check(args.hf, device, args.seed, args.quick)
        print_hf_report(report)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(_json_safe(report), f, indent=1)
        return 0 if report["passed"] else 1
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
    models = MODELS if getattr(args, "model", "all") == "all" else (args.model,)
    reports = {}
    for model in models:
        options = Options(device=str(device), preset=args.preset, seed=args.seed, quick=args.quick, model=model)
        report = run_check(columns_for(names, args.quick, device, model), options, progress=not args.no_progress)
        report["left_out"] = left_out
        if reports:
            print()
        print_report(report)
        reports[model] = report
    if args.json:
        # one family: its report; several: {"passed", "failed", "reports": {family: report}}
        out = reports[models[0]] if len(models) == 1 else dict(
            passed=all(r["passed"] for r in reports.values()),
            failed=[f"{m}: {f}" for m, r in reports.items() for f in r["failed"]], reports=reports)
        with open(args.json, "w") as f:
            json.dump(_json_safe(out), f, indent=1)
    return 0 if all(r["passed"] for r in reports.values()) else 1


def _json_safe(value):
    """The report with inf / nan as strings (strict JSON has no such numbers)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
