"""Benchmark GPT-2 (124M) end to end: fusedtx.models.GPT against HuggingFace transformers' GPT-2.

    python benchmarks/bench_gpt.py                        # GPT-2 124M on cuda (or cpu)
    python benchmarks/bench_gpt.py --device cpu --no-compile --kernels prefill,generate
    python benchmarks/bench_gpt.py --device cpu --quick --out /tmp/bench_test.csv

Every provider holds the same weights: a GPT2LMHeadModel built from transformers.GPT2Config()
defaults with random weights from a fixed seed (--seed; no network), loaded into fusedtx with
GPT.from_hf. float32 on CPU, bfloat16 on CUDA (--dtype to choose). All models are in eval() mode, also for the
training step: GPT-2's only train-mode difference is dropout, which fusedtx's model does not
have, so every provider computes the same function.

Kernels (CSV `kernel`), metric `throughput` in tokens/s:
  * gpt2_prefill (mode forward): logits for B x T tokens under no_grad; tokens/s = B T / time.
    x = tokens per call (B T), CSV shape B x T.
  * gpt2_generate (mode forward): greedy generation of N new tokens after B prompts of P tokens,
    with a KV cache: HF's model.generate(do_sample=False, use_cache=True) (its DynamicCache) vs
    fusedtx's GPT.generate. The prompts all have the same length (no padding, no attention-mask
    question) and no EOS stops generation early. new tokens/s = B N / time of the whole call,
    the prompt's prefill included. x = B, CSV shape B x P x N. Also `weight_bandwidth` (GB/s):
    N steps x the weights' bytes / time, what one-token decoding is bound by (a lower bound: the
    prefill is in the time), printed beside the copy bandwidth.
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
  * hf_converted: the HF model after fusedtx.convert (its Conv1D, LayerNorm and lm_head as fusedtx
    layers, attention through the "fusedtx" implementation, HF's own generate), checked to run
    fusedtx attention and no aten matmul: what invariance costs a user who keeps their HF code
    (target on CPU: >= 0.9x hf_eager).

Correctness guard, before any figure is recorded: every provider's output is compared with a
float64 copy of the HF model (eager attention). Prefill: the logits of the last positions
within a float32 (bf16) tolerance. Generation: every generated token must be the reference's
argmax given the same prefix, up to ties within the tolerance. Training: the first step's loss
and the gradients of a few weights (embedding, first c_attn, last mlp c_proj, ln_f).
A provider that fails the guard or errors is skipped for that shape, with the reason.

Timing, the checks of each provider's code path and the summary: model_bench.py; the models and
workloads: model_workloads.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_bench import main as bench_main  # noqa: E402
from model_workloads import gpt2_family  # noqa: E402


def main(argv=None) -> None:
    bench_main(lambda args: gpt2_family(), __doc__, argv)


if __name__ == "__main__":
    main()
