"""Benchmark fusedtx.serving.Engine on a mixed workload against HF transformers' static batching.

    python benchmarks/bench_serving.py                         # GPT-2 124M and the SmolLM2-135M Llama
    python benchmarks/bench_serving.py --device cpu --quick --out /tmp/bench_test.csv

The workload (fixed seed): `requests` prompts of 16-128 tokens (8-24 with --quick), each wanting
8-64 new tokens (4-8), arriving over time: request i joins the engine at step arrival[i]
(arrivals spread over the first steps, a few per step). Greedy decoding (temperature 0) so that
every provider does the same work; the engine's seeded sampling costs one sample() call per
token either way.

Providers (one set of random weights, float32):
  engine_fusedtx   Engine(max_batch=8, prefill_chunk=64) over the fusedtx model (native backend)
  engine_plain     the same Engine over PlainGPT / PlainLlama (torch.nn layers): the cost of
                   invariance is engine_plain / engine_fusedtx
  hf_static        HF generate() on static batches of 8 requests in arrival order, left-padded,
                   each batch run to its longest request's max_new_tokens (what users do without
                   an engine); its requests' arrivals are ignored (all are there at the start)

Metrics (kernel <family>_serving, x = requests): throughput (requested new tokens / wall time,
tokens/s; p50 = p20 = p80: one run), and for the engines time to first token (from a request's
arrival step to its first token) and the time between a request's consecutive tokens, ms, as
p50 / p20 / p80 over requests / tokens (p99 printed). Targets (printed, not asserted), CPU
float32: engine_fusedtx >= 1.5x hf_static in throughput, and the cost of invariance
(engine_plain / engine_fusedtx throughput) <= 1.1.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import finish, parse_args  # noqa: E402
from model_workloads import Models, gpt2_family, llama_family  # noqa: E402
from results_csv import Recorder  # noqa: E402

PROVIDERS = ("engine_fusedtx", "engine_plain", "hf_static")
MAX_BATCH, PREFILL_CHUNK = 8, 64


def workload(vocab: int, n: int, quick: bool, seed: int = 0) -> list[tuple[list[int], int, int]]:
    """(prompt, new tokens, arrival step) of each request."""
    g = torch.Generator().manual_seed(seed)
    lo, hi, new_lo, new_hi = (8, 24, 4, 8) if quick else (16, 128, 8, 64)
    out, step = [], 0
    for _ in range(n):
        prompt = torch.randint(0, vocab - 1, (int(torch.randint(lo, hi + 1, (), generator=g)),), generator=g).tolist()
        out.append((prompt, int(torch.randint(new_lo, new_hi + 1, (), generator=g)), step))
        step += int(torch.randint(0, 3, (), generator=g))      # 0-2 steps between arrivals
    return out


def run_engine(model, work) -> dict:
    """Serve the workload; wall time, first-token and inter-token times."""
    from fusedtx.serving import Engine, SamplingParams

    max_len = max(len(p) + n for p, n, _ in work)
    engine = Engine(model, max_batch=MAX_BATCH, max_len=max_len, prefill_chunk=PREFILL_CHUNK)
    pending = sorted(range(len(work)), key=lambda i: work[i][2])
    arrived, seen, ttft, gaps = {}, {}, [], []
    step, start = 0, time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and work[pending[0]][2] <= step:
            i = pending.pop(0)
            rid = engine.add_request(work[i][0], SamplingParams(max_new_tokens=work[i][1]))
            arrived[rid], seen[rid] = time.perf_counter(), (0, None)
        finished = engine.step()
        now = time.perf_counter()
        for r in list(engine.running.values()) + finished:   # a token drawn in this step: its time
            count, last = seen[r.id]
            if len(r.tokens) > count:
                (ttft.append(now - arrived[r.id]) if count == 0 else gaps.append(now - last))
                seen[r.id] = (len(r.tokens), now)
        step += 1
    return dict(seconds=time.perf_counter() - start, ttft=ttft, gaps=gaps)


def run_hf_static(model, work) -> dict:
    order = sorted(range(len(work)), key=lambda i: work[i][2])
    start = time.perf_counter()
    for b in range(0, len(order), MAX_BATCH):
        batch = [work[i] for i in order[b:b + MAX_BATCH]]
        width = max(len(p) for p, _, _ in batch)
        idx = torch.zeros(len(batch), width, dtype=torch.int64)
        mask = torch.zeros_like(idx)
        for row, (p, _, _) in enumerate(batch):
            idx[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        n = max(new for _, new, _ in batch)
        model.generate(idx, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return dict(seconds=time.perf_counter() - start, ttft=[], gaps=[])


def quantiles(values: list[float], *qs: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    return [float(torch.quantile(t, q)) * 1e3 for q in qs]


def build(models: Models, family_name: str, provider: str):
    if provider == "engine_fusedtx":
        return models.get("fusedtx_native")
    if provider == "engine_plain":
        from fusedtx.models import PlainGPT, PlainLlama

        if family_name == "gpt2":
            return PlainGPT.from_hf(models.hf).eval()
        return PlainLlama.from_hf(models.hf, dtype=torch.float32).eval()
    return models.get("hf_sdpa")


def main(argv=None) -> None:
    def extra(parser):
        parser.add_argument("--requests", type=int, default=None, help="requests in the workload (default 48; 6 quick)")
        parser.add_argument("--families", default="gpt2,smollm2-135m", help="gpt2 and/or a Llama preset name")

    args = parse_args("Benchmark fusedtx.serving.Engine against HF static batching.", argv, extra)
    args.dtype, args.seed = torch.float32, 0
    if args.threads:
        torch.set_num_threads(args.threads)
    providers = args.providers.split(",") if args.providers else list(PROVIDERS)
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; known: {list(PROVIDERS)}")
    n = args.requests or (6 if args.quick else 48)
    rec = Recorder(args.out, args.device)
    kernels = []
    for name in args.families.split(","):
        family = gpt2_family() if name == "gpt2" else llama_family(name)
        models = Models(args, family)
        work = workload(models.config.vocab_size, n, args.quick)
        tokens = sum(new for _, new, _ in work)
        kernel, shape = f"{family.prefix}_serving", f"{n}req"
        kernels.append(kernel)
        results = {}
        for provider in providers:
            model = build(models, name, provider)
            run = run_engine if provider.startswith("engine") else run_hf_static
            with torch.no_grad():
                run(model, work[:2])                     # warm-up: allocations, the extension, caches
                result = run(model, work)
            results[provider] = result
            rate = tokens / result["seconds"]
            rec.add(kernel, provider, "forward", "throughput", "tokens/s", "requests", n, (rate, rate, rate),
                    torch.float32, shape)
            line = f"{kernel} {provider:<15} {rate:8.1f} tokens/s ({tokens} tokens in {result['seconds']:.1f} s)"
            if result["ttft"]:
                ttft = quantiles(result["ttft"], 0.5, 0.2, 0.8, 0.99)
                gaps = quantiles(result["gaps"], 0.5, 0.2, 0.8, 0.99)
                rec.add(kernel, provider, "forward", "time_to_first_token", "ms", "requests", n, tuple(ttft[:3]),
                        torch.float32, shape)
                rec.add(kernel, provider, "forward", "inter_token", "ms", "requests", n, tuple(gaps[:3]),
                        torch.float32, shape)
                line += f"; first token p50 {ttft[0]:.0f} / p99 {ttft[3]:.0f} ms; per token p50 {gaps[0]:.1f} / p99 {gaps[3]:.1f} ms"
            print(line, flush=True)
        rec.flush()
        rates = {p: tokens / r["seconds"] for p, r in results.items()}
        if {"engine_fusedtx", "hf_static"} <= rates.keys():
            ratio = rates["engine_fusedtx"] / rates["hf_static"]
            print(f"  target: engine_fusedtx >= 1.5x hf_static throughput: {ratio:.2f}x -> {'met' if ratio >= 1.5 else 'NOT met'}")
        if {"engine_fusedtx", "engine_plain"} <= rates.keys():
            cost = rates["engine_plain"] / rates["engine_fusedtx"]
            print(f"  target: cost of invariance (engine_plain / engine_fusedtx) <= 1.10: {cost:.2f} -> "
                  f"{'met' if cost <= 1.1 else 'NOT met'}")
    finish(args, kernels=kernels)


if __name__ == "__main__":
    main()
