"""Benchmark GPT-2 (124M) end to end: fusedtx.models.GPT against HuggingFace transformers' GPT-2.

    python benchmarks/bench_gpt.py                        # GPT-2 124M on cuda (or cpu)
    python benchmarks/bench_gpt.py --device cpu --no-compile --kernels gpt2_prefill,gpt2_generate
    python benchmarks/bench_gpt.py --device cpu --quick --out /tmp/bench_test.csv

Every provider holds the same weights: a GPT2LMHeadModel built from transformers.GPT2Config()
defaults with random weights from a fixed seed (--seed; no network), loaded into fusedtx with
GPT.from_hf. float32 on CPU, bfloat16 on CUDA. All models are in eval() mode, also for the
training step: GPT-2's only train-mode difference is dropout, which fusedtx's model does not
have, so every provider computes the same function.

Kernels (CSV `kernel`), metric `throughput` in tokens/s:
  * gpt2_prefill (mode forward): logits for B x T tokens under no_grad; tokens/s = B T / time.
    x = tokens per call (B T), CSV shape B x T.
  * gpt2_generate (mode forward): greedy generation of N new tokens after B prompts of P tokens,
    with a KV cache: HF's model.generate(do_sample=False, use_cache=True) (its DynamicCache) vs
    fusedtx's GPT.generate. The prompts all have the same length (no padding, no attention-mask
    question) and no EOS stops generation early. new tokens/s = B N / time of the whole call,
    the prompt's prefill included. x = B, CSV shape B x P x N.
  * gpt2_train (mode full): forward + cross-entropy + backward + AdamW step + zero_grad (the same
    torch.optim.AdamW and loss for every provider). tokens/s = B T / time. x = B T, shape B x T.
hf_sdpa_compile also records `compile_time` (s): its first call at each shape, compilation
included (the timed calls come after it), with inductor's caches in a fresh directory (a cold
compile; set TORCHINDUCTOR_CACHE_DIR to use your own).

Providers:
  * fusedtx_native, fusedtx_triton (compiled, CUDA only): fusedtx.models.GPT with that backend.
    A profiled call checks that its linears, layer norms and attention are fusedtx ops
    (fusedtx_native::* on the native backend) and that no aten matmul / layer_norm / softmax /
    SDPA runs.
  * hf_sdpa: GPT2LMHeadModel with attn_implementation="sdpa", transformers' default and the main
    peer (aten::scaled_dot_product_attention is checked to run).
  * hf_eager: the same with attn_implementation="eager" (matmul + softmax attention; checked).
  * hf_sdpa_compile: torch.compile(hf_sdpa model, dynamic=False), prefill and training only (a
    compiled forward under HF generate's DynamicCache would recompile at every new length; HF's
    compiled decoding needs its static cache, not benchmarked here). --no-compile skips it.
    It runs by default, its compile cost recorded apart (compile_time, above).

Correctness guard, before any figure is recorded: every provider's output is compared with a
float64 copy of the HF model (eager attention). Prefill: the logits of the last positions
within a float32 (bf16) tolerance. Generation: every generated token must be the reference's
argmax given the same prefix, up to ties within the tolerance. Training: the first step's loss
and the gradients of a few weights (embedding, first c_attn, last mlp c_proj, ln_f).
A provider that fails the guard or errors is skipped for that shape, with the reason.

Timing: timing.time_fn, wall clock per call (on CUDA too: host overhead and syncs are part of
a model's cost). Median with 20th/80th percentiles over repetitions (CPU: at least
5 and 3 s of them; --min-reps / --min-time override). Each timing also measures the CPU time
other processes took meanwhile (/proc/stat): above 5% of the machine the figure is flagged
UNRELIABLE in the summary (on a shared machine every parallel region then waits for a
descheduled thread, so the figure is the other processes' as much as the model's).
"""
from __future__ import annotations

import atexit
import copy
import dataclasses
import functools
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import get_ceilings  # noqa: E402
from cli import finish, parse_args  # noqa: E402
from results_csv import Recorder, device_name, dtype_str, fusedtx, shape_str  # noqa: E402,F401
from runner import first_line, fusedtx_unavailable, note  # noqa: E402
from summary import fmt_num, fmt_ratio, print_target  # noqa: E402
from timing import peak_memory_mb, rate, same, synchronize, time_fn  # noqa: E402

KERNELS = ("gpt2_prefill", "gpt2_generate", "gpt2_train")
MODE = {"gpt2_prefill": "forward", "gpt2_generate": "forward", "gpt2_train": "full"}
PROVIDERS = ("fusedtx_native", "fusedtx_triton", "hf_eager", "hf_sdpa", "hf_sdpa_compile")
HF_ATTENTION = {"hf_eager": "eager", "hf_sdpa": "sdpa", "hf_sdpa_compile": "sdpa"}
# Ops that must not run in a fusedtx model: every matmul, normalisation and softmax is fusedtx's.
TORCH_KERNEL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::native_layer_norm",
                    "aten::_softmax", "aten::scaled_dot_product_attention")
BUSY_SHARE = 0.05  # other processes' share of the CPU above which a figure is flagged as unreliable
QUICK_HF_CONFIG = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=512, n_positions=128,
                       bos_token_id=511, eos_token_id=511)


@dataclasses.dataclass(frozen=True)
class Sizes:
    prefill: tuple      # (B, T)
    generate: tuple     # (B, P, N)
    train: tuple        # (B, T)


def sizes(device: torch.device, quick: bool) -> Sizes:
    if quick:
        return Sizes(prefill=((1, 32), (2, 48)), generate=((1, 8, 4), (2, 8, 4)), train=((2, 16),))
    if device.type == "cuda":
        return Sizes(prefill=((1, 1024), (8, 1024), (32, 1024)),
                     generate=((1, 128, 128), (16, 128, 128), (64, 128, 128)),
                     train=((8, 1024), (16, 1024)))
    return Sizes(prefill=((1, 128), (1, 512), (4, 256)), generate=((1, 64, 32), (8, 64, 32)),
                 train=((2, 128), (4, 128)))


def tolerance(dtype: torch.dtype) -> float:
    """Max abs error of a logit (or of a gradient relative to its largest entry) vs float64."""
    return 1e-3 if dtype == torch.float32 else 0.25


class Skip(Exception):
    """A provider cannot or must not be benchmarked for this case (the message says why)."""


# ---------------------------------------------------------------------------------------------
# Models: one set of weights, every provider's model built from it
# ---------------------------------------------------------------------------------------------
class Models:
    def __init__(self, args):
        try:
            import transformers
        except ImportError as exc:
            raise SystemExit(f"bench_gpt.py compares with HuggingFace transformers' GPT-2: pip install transformers ({exc})")
        transformers.logging.set_verbosity_error()  # e.g. generate's notes on its own defaults
        self.device, self.dtype = args.device, (torch.float32 if args.device.type == "cpu" else torch.bfloat16)
        config = transformers.GPT2Config(**(QUICK_HF_CONFIG if args.quick else {}))
        torch.manual_seed(args.seed)
        self.hf = transformers.GPT2LMHeadModel(config).eval()  # float32, on CPU: the source of every copy
        self.config = config
        self._reference = None
        self._cache: dict[str, torch.nn.Module] = {}

    @property
    def reference(self):
        """A float64 copy with eager attention on the device: what every provider is checked against."""
        if self._reference is None:
            model = copy.deepcopy(self.hf)
            model.set_attn_implementation("eager")
            self._reference = model.to(device=self.device, dtype=torch.float64).eval()
        return self._reference

    def get(self, provider: str, fresh: bool = False) -> torch.nn.Module:
        """provider's model (kept for the inference workloads), or a new one with the seeded weights
        (for training, which changes them)."""
        if fresh:
            self._cache.pop(provider, None)
            return self.build(provider)
        if provider not in self._cache:
            self._cache[provider] = self.build(provider)
        return self._cache[provider]

    def build(self, provider: str) -> torch.nn.Module:
        """A new model for provider, holding the seeded weights, on the device in the bench dtype."""
        if provider.startswith("fusedtx_"):
            from fusedtx.models import GPT

            backend = provider.removeprefix("fusedtx_")
            model = GPT.from_hf(self.hf, backend=backend)
            layers = [m for m in model.modules() if hasattr(m, "backend")]
            assert layers and all(m.backend == backend for m in layers), f"{provider}: a layer's backend is not {backend}"
        else:
            model = copy.deepcopy(self.hf)
            model.set_attn_implementation(HF_ATTENTION[provider])
            assert model.config._attn_implementation == HF_ATTENTION[provider], model.config._attn_implementation
        model = model.to(device=self.device, dtype=self.dtype).eval()
        if provider == "hf_sdpa_compile":
            model = torch.compile(model, dynamic=False)
        return model


def is_fusedtx(provider: str) -> bool:
    return provider.startswith("fusedtx_")


def logits_of(provider: str, model, idx: torch.Tensor) -> torch.Tensor:
    return model(idx) if is_fusedtx(provider) else model(input_ids=idx, use_cache=False).logits


def unavailable_reason(provider: str, kernel: str, args) -> str | None:
    if provider == "hf_sdpa_compile":
        if args.no_compile:
            return "--no-compile"
        if kernel == "gpt2_generate":
            return ("HF generate with a DynamicCache changes shapes at every step (a compiled forward "
                    "recompiles); its compiled decoding (static cache) is not benchmarked")
    return fusedtx_unavailable(provider, args.device)


# ---------------------------------------------------------------------------------------------
# Checks: the right code path, the right numbers
# ---------------------------------------------------------------------------------------------
def check_path(provider: str, fn) -> str:
    """Run fn() under torch.profiler and check the provider's own kernels ran; returns a note."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events()}
    if is_fusedtx(provider):
        torch_ops = sorted(names & set(TORCH_KERNEL_OPS))
        if torch_ops:
            raise Skip(f"torch kernels ran inside the fusedtx model: {torch_ops}")
        ours = sorted(n for n in names if n.startswith("fusedtx_native::"))
        needed = {"fusedtx_native::linear_matmul", "fusedtx_native::layer_norm_forward", "fusedtx_native::causal_attention_forward"}
        if provider == "fusedtx_native" and not needed <= set(ours):
            raise Skip(f"the native kernels did not run (fusedtx ops seen: {ours})")
        if provider != "fusedtx_native" and ours:
            raise Skip(f"{provider} ran native kernels: {ours}")
        return "fusedtx ops: " + (", ".join(o.split("::")[1] for o in ours) or "(triton launches)")
    sdpa = "aten::scaled_dot_product_attention" in names
    if provider == "hf_eager" and (sdpa or "aten::_softmax" not in names):
        raise Skip("attn_implementation='eager' did not run matmul + softmax attention")
    if provider == "hf_sdpa" and not sdpa:
        raise Skip("attn_implementation='sdpa' did not run aten::scaled_dot_product_attention")
    return "attention: " + ("aten::scaled_dot_product_attention" if sdpa else "matmul + softmax")


def compiled_note() -> str:
    from torch._dynamo.utils import counters

    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    if graphs < 1:
        raise Skip("torch.compile captured no graph")
    return f"{graphs} graph(s), {breaks} graph break(s)"


def max_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return (y.double() - ref.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# The three workloads: each gives (fn, check) for a provider's model and a case
# ---------------------------------------------------------------------------------------------
class Workload:
    """One case of a kernel: make_fn(provider, model) is what one timed call runs; first_call
    (the untimed first call, which compiles) returns what check() verifies. `tokens`: the tokens
    one call processes (prefill, training) or generates; x_name/x_value: the CSV's x-axis."""
    kernel = x_name = ""
    fresh_model = False  # a new model per provider (training changes the weights)

    def __init__(self, models: Models, shape: tuple):
        self.models, self.shape = models, shape
        self.tokens = self.x_value = shape[0] * shape[1]

    def make_fn(self, provider, model):
        raise NotImplementedError

    def first_call(self, provider, model, fn):
        return fn()

    def check(self, out) -> str:
        raise NotImplementedError


class Prefill(Workload):
    kernel, x_name = "gpt2_prefill", "tokens"

    def __init__(self, models: Models, shape):
        super().__init__(models, shape)
        self.idx = torch.randint(0, models.config.vocab_size, shape, device=models.device)
        self.keep = min(shape[1], 64)  # checked positions: the last ones, which attend to every earlier token

    @functools.cached_property
    def ref(self) -> torch.Tensor:
        with torch.no_grad():
            return self.models.reference(input_ids=self.idx, use_cache=False, logits_to_keep=self.keep).logits

    def make_fn(self, provider, model):
        def fn():
            with torch.no_grad():
                return logits_of(provider, model, self.idx)
        return fn

    def check(self, out) -> str:
        err = max_err(out[:, -self.keep:], self.ref)
        tol = tolerance(self.models.dtype)
        if out.shape != (*self.shape, self.models.config.vocab_size) or not err <= tol:
            raise Skip(f"logits differ from the float64 reference: max abs err {err:.3g} > {tol} "
                       f"(shape {tuple(out.shape)})")
        return f"logits max abs err {err:.2g}"


class Generate(Workload):
    kernel, x_name = "gpt2_generate", "B"

    def __init__(self, models: Models, shape):
        super().__init__(models, shape)
        b, p, n = shape
        self.prompts = torch.randint(0, models.config.vocab_size, (b, p), device=models.device)
        self.tokens, self.x_value = b * n, b  # new tokens per call; batch

    def make_fn(self, provider, model):
        from transformers import GenerationConfig

        b, p, n = self.shape
        if is_fusedtx(provider):
            return lambda: model.generate(self.prompts, n).tokens
        # Greedy, exactly n new tokens (no EOS), equal-length prompts: no padding involved.
        config = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=1, use_cache=True,
                                  eos_token_id=None, pad_token_id=0)
        mask = torch.ones_like(self.prompts)

        def fn():
            with torch.no_grad():
                return model.generate(input_ids=self.prompts, attention_mask=mask, generation_config=config)[:, p:]
        return fn

    def check(self, out) -> str:
        b, p, n = self.shape
        if out.shape != (b, n):
            raise Skip(f"generated {tuple(out.shape)} tokens, expected {(b, n)}")
        seq = torch.cat([self.prompts, out.to(self.prompts.device)], 1)
        with torch.no_grad():  # the reference's logits for each generated token, given the same prefix
            ref = self.models.reference(input_ids=seq, use_cache=False, logits_to_keep=n + 1).logits[:, :n]
        chosen = ref.gather(-1, out.to(ref.device)[..., None])[..., 0]
        gap = (ref.max(-1).values - chosen).max().item()
        tol = tolerance(self.models.dtype)
        if not gap <= tol:
            raise Skip(f"a generated token is not the float64 reference's greedy choice: its logit is "
                       f"{gap:.3g} below the best (> {tol})")
        return f"greedy tokens agree with float64 (worst logit gap {gap:.2g})"


class Train(Workload):
    kernel, x_name = "gpt2_train", "tokens"
    fresh_model = True
    # Parameters whose gradients are checked (HF names; fusedtx uses the same, Conv1D ones transposed).
    CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    def __init__(self, models: Models, shape):
        super().__init__(models, shape)
        vocab = models.config.vocab_size
        self.idx = torch.randint(0, vocab, shape, device=models.device)
        self.targets = torch.randint(0, vocab, shape, device=models.device)
        last = models.config.n_layer - 1
        self.checked = ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight",
                        f"transformer.h.{last}.mlp.c_proj.weight", "transformer.ln_f.weight")

    @functools.cached_property
    def ref(self) -> tuple[float, dict]:
        """float64 loss and gradients of the checked parameters."""
        model = self.models.reference
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=self.idx, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), self.targets.flatten())
        loss.backward()
        params = dict(model.named_parameters())
        grads = {name: params[name].grad.clone() for name in self.checked}
        model.zero_grad(set_to_none=True)
        return loss.item(), grads

    def loss(self, provider, model):
        if is_fusedtx(provider):
            return model(self.idx, self.targets)[1]
        logits = model(input_ids=self.idx, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten())  # what GPT.forward computes

    def make_fn(self, provider, model):
        params = [p for p in model.parameters() if p.requires_grad]
        fused = {"fused": True} if self.models.device.type == "cuda" else {}
        opt = torch.optim.AdamW(params, lr=1e-5, **fused)

        def step():
            loss = self.loss(provider, model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return step

    def first_call(self, provider, model, fn):
        """Forward + backward without the optimizer step: the loss and gradients to check."""
        loss = self.loss(provider, model)
        loss.backward()
        params = dict(model.named_parameters())
        prefix = "_orig_mod." if provider == "hf_sdpa_compile" else ""
        grads = {}
        for name in self.checked:
            g = params[prefix + name].grad
            grads[name] = g.t() if is_fusedtx(provider) and name.endswith(self.CONV1D) else g
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    def check(self, out) -> str:
        loss, grads = out
        ref_loss, ref_grads = self.ref
        tol = tolerance(self.models.dtype)
        loss_err = abs(loss.item() - ref_loss)
        if not loss_err <= tol:
            raise Skip(f"loss {loss.item():.6g} differs from float64's {ref_loss:.6g} by {loss_err:.3g} > {tol}")
        worst = max((max_err(grads[n], ref_grads[n]) / ref_grads[n].abs().max().item(), n) for n in self.checked)
        if not worst[0] <= tol:
            raise Skip(f"gradient of {worst[1]} differs from float64's by {worst[0]:.3g} of its largest entry (> {tol})")
        return f"loss err {loss_err:.2g}, worst gradient err {worst[0]:.2g} of max ({worst[1].removeprefix('transformer.')})"


WORKLOADS = {"gpt2_prefill": Prefill, "gpt2_generate": Generate, "gpt2_train": Train}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
class OtherLoad:
    """The CPU time other processes used while it was open, as a share of the machine (Linux:
    /proc/stat's busy time minus this process's own). On a shared machine a figure measured
    while others ran is not this code's speed: each parallel region waits for descheduled threads."""

    def __init__(self):
        self.share = None

    @staticmethod
    def _sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime

    def __enter__(self):
        try:
            self._start = self._sample()
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def __exit__(self, *exc):
        if self._start is not None:
            (t0, busy0, own0), (t1, busy1, own1) = self._start, self._sample()
            self.share = max(0.0, (busy1 - busy0) - (own1 - own0)) / max((t1 - t0) * (os.cpu_count() or 1), 1e-9)
        return False


def flops_per_call(config, kernel: str, shape: tuple) -> float | None:
    """Model FLOPs of one prefill forward (x3 for training): 2 per weight per token for the blocks
    and the LM head, plus causal attention's two matmuls over half the scores."""
    if kernel == "gpt2_generate":
        return None
    b, t = shape
    d, layers, vocab = config.n_embd, config.n_layer, config.vocab_size
    per_token = 2 * (layers * 12 * d * d + d * vocab)
    attention = layers * 2 * b * t * t * d
    forward = b * t * per_token + attention
    return forward * (3 if kernel == "gpt2_train" else 1)


def run(args) -> tuple[Recorder, dict, Models]:
    known = set(PROVIDERS)
    if args.providers and not set(args.providers) <= known:
        raise SystemExit(f"--providers: unknown {sorted(set(args.providers) - known)}; known: {sorted(known)}")
    providers = [p for p in PROVIDERS if not args.providers or p in args.providers]
    rec = Recorder(args.out, args.device)
    args.contended = []
    ceilings = get_ceilings(args, rec)
    print(f"building GPT-2 ({'tiny config, --quick' if args.quick else '124M'}) with seed {args.seed} ...", flush=True)
    models = Models(args)
    size = sizes(args.device, args.quick)
    cases = [(kernel, shape) for kernel, shapes in zip(KERNELS, (size.prefill, size.generate, size.train))
             for shape in shapes if kernel in args.kernels]
    skipped: set = set()
    for kernel, shape in cases:
        case = WORKLOADS[kernel](models, shape)
        what = f"{kernel} {shape_str(shape)}"
        for provider in providers:
            if (kernel, provider) in skipped:
                continue
            reason = unavailable_reason(provider, kernel, args)
            if reason is not None:
                skipped.add((kernel, provider))
                note(f"skipping {provider} for {kernel}: {reason}")
                continue
            torch._dynamo.reset()  # each compiled case compiles afresh: a comparable compile_time
            torch._dynamo.utils.counters.clear()
            try:
                row, notes = measure(rec, models, case, provider, args)
            except Skip as exc:
                note(f"skipping {provider} for {what}: {exc}")
                continue
            except Exception as exc:  # out of memory, a compile error, ...: go on with the others
                note(f"skipping {provider} for {what}: {first_line(exc)}")
                if args.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            note(f"{what:22s} {provider:16s} {float(row['p50']):10.1f} tokens/s  [{notes}]")
        rec.flush()
    return rec, ceilings, models


def measure(rec: Recorder, models: Models, case, provider: str, args) -> tuple[dict, str]:
    model = models.get(provider, fresh=case.fresh_model)
    fn = case.make_fn(provider, model)
    synchronize(args.device)
    t0 = time.perf_counter()
    out = case.first_call(provider, model, fn)  # the first call: compiles (torch.compile), and is the one checked
    synchronize(args.device)
    first_s = time.perf_counter() - t0
    notes = [case.check(out)]
    if provider == "hf_sdpa_compile":
        notes.append(compiled_note())
        notes.append(f"compile + first call {first_s:.1f} s")
    else:
        notes.append(check_path(provider, fn))
    with OtherLoad() as others:
        timing = time_fn(fn, device=args.device, config=args.timing, hide_launch_overhead=False)
    if others.share is not None:
        notes.append(f"other processes {others.share:.0%} of the CPU")
        if others.share > BUSY_SHARE:
            args.contended.append(f"{case.kernel} {shape_str(case.shape)} {provider} ({others.share:.0%})")
    mode, kernel = MODE[case.kernel], case.kernel
    row = rec.add(kernel, provider, mode, "throughput", "tokens/s", case.x_name, case.x_value,
                  rate(case.tokens, timing), models.dtype, case.shape)
    if provider == "hf_sdpa_compile":
        rec.add(kernel, provider, mode, "compile_time", "s", case.x_name, case.x_value, same(first_s),
                models.dtype, case.shape)
    peak = peak_memory_mb(fn, args.device)
    if peak is not None:
        rec.add(kernel, provider, mode, "peak_memory", "MB", case.x_name, case.x_value, same(peak),
                models.dtype, case.shape)
    return row, "; ".join(notes)


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
def summarize(rows: list[dict], ceilings: dict, models: Models, args) -> None:
    cpu = args.device.type == "cpu"
    ours = "fusedtx_native" if cpu else "fusedtx_triton"
    rates = {(r["kernel"], r["shape"], r["provider"]): float(r["p50"]) for r in rows if r["metric"] == "throughput"}
    compile_s = {(r["kernel"], r["shape"]): float(r["p50"]) for r in rows if r["metric"] == "compile_time"}
    mm = ceilings.get("matmul")
    print()
    print(f"Summary: p50 tokens/s on {device_name(args.device)}, {dtype_str(models.dtype)}"
          + (f"; matmul ceiling (torch.mm) {mm:.3f} TFLOP/s" if mm else ""))
    print("  nat = fusedtx_native, tri = fusedtx_triton, eager = hf_eager, sdpa = hf_sdpa (HF's default), "
          "comp = hf_sdpa_compile; ratios of " + ours)
    short = {"fusedtx_native": "nat", "fusedtx_triton": "tri", "hf_eager": "eager", "hf_sdpa": "sdpa",
             "hf_sdpa_compile": "comp"}
    for kernel in KERNELS:
        shapes = sorted({k[1] for k in rates if k[0] == kernel}, key=lambda s: [int(v) for v in s.split("x")])
        if not shapes:
            continue
        print(f"\n{kernel} ({'new tokens/s, shape B x prompt x new' if kernel == 'gpt2_generate' else 'tokens/s, shape B x T'})")
        print(f"  {'shape':>10s} " + " ".join(f"{short[p]:>8s}" for p in PROVIDERS)
              + f" {'/eager':>7s} {'/sdpa':>7s} {'/comp':>7s} {'compile':>8s} {'TFLOP/s':>8s} {'of mm':>6s}")
        for shape in shapes:
            get = lambda p: rates.get((kernel, shape, p))  # noqa: E731
            mine = get(ours)
            dims = tuple(int(v) for v in shape.split("x"))
            flops = flops_per_call(models.config, kernel, dims)
            tflops = mine * flops / (dims[0] * dims[1]) / 1e12 if mine and flops else None
            comp = compile_s.get((kernel, shape))
            print(f"  {shape:>10s} " + " ".join(f"{fmt_num(get(p)):>8s}" for p in PROVIDERS)
                  + f" {fmt_ratio(mine, get('hf_eager')):>7s} {fmt_ratio(mine, get('hf_sdpa')):>7s}"
                  + f" {fmt_ratio(mine, get('hf_sdpa_compile')):>7s} {(f'{comp:.0f} s' if comp else '-'):>8s}"
                  + f" {(f'{tflops:.3f}' if tflops else '-'):>8s} {(f'{tflops / mm:.0%}' if tflops and mm else '-'):>6s}")
    print()
    print("Headline targets (printed, not asserted):")
    for kernel in ("gpt2_prefill", "gpt2_generate"):
        for (kern, shape, provider), value in sorted(rates.items()):
            if kern != kernel or provider != ours:
                continue
            if cpu:
                print_target(f"CPU {kernel} float32 {shape:>9s}: fusedtx_native >= 1.0x hf_eager", value,
                             rates.get((kern, shape, "hf_eager")), 1.0)
            else:
                print_target(f"GPU {kernel} bf16 {shape:>9s}: fusedtx_triton vs hf_sdpa (no target set)", value,
                             rates.get((kern, shape, "hf_sdpa")), 1.0)
    if args.quick:
        print("  (--quick: a tiny model, so the headline sizes were not measured)")
    if args.contended:
        print(f"  UNRELIABLE: other processes used > {BUSY_SHARE:.0%} of the CPU while timing "
              + ", ".join(args.contended))


def extra_args(parser) -> None:
    parser.add_argument("--no-compile", action="store_true", help="skip hf_sdpa_compile (torch.compile of HF's model)")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random GPT-2 weights and inputs")


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv, extra_args)
    args.kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    if not args.kernels or not set(args.kernels) <= set(KERNELS):
        raise SystemExit(f"--kernels: expected a subset of {list(KERNELS)}, got {args.kernels}")
    if args.device.type == "cpu" and not args.quick:
        # A model call is long on CPU: at least 5 of them and 3 s, however long that takes.
        args.timing = dataclasses.replace(args.timing, min_reps=args.min_reps or 5, min_time=args.min_time or 3.0,
                                          max_time=120.0)
    if not args.no_compile and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # compile_time of a cold compile: with inductor's on-disk caches it would depend on what
        # earlier runs left there.
        cache = tempfile.mkdtemp(prefix="bench_gpt_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    rec, ceilings, models = run(args)
    summarize(rec.rows, ceilings, models, args)
    finish(args, kernels=KERNELS)


if __name__ == "__main__":
    main()
