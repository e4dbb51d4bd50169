"""Benchmark the Llama family end to end: fusedtx.models.Llama against HuggingFace transformers.

    python benchmarks/bench_llama.py                       # SmolLM2-135M sizes on cuda (or cpu)
    python benchmarks/bench_llama.py --device cpu --no-compile --kernels prefill,generate
    python benchmarks/bench_llama.py --device cpu --dtype bfloat16 --kernels generate
    python benchmarks/bench_llama.py --preset qwen2.5-0.5b --device cpu
    python benchmarks/bench_llama.py --device cpu --quick --out /tmp/bench_test.csv

Every provider holds the same weights: the HF model of a fusedtx LlamaConfig preset's sizes
(--preset: smollm2-135m by default, qwen2.5-0.5b, llama-3.2-1b, qwen3-0.6b; LlamaForCausalLM,
Qwen2ForCausalLM or Qwen3ForCausalLM) with random weights from a fixed seed (--seed; no
network), loaded into fusedtx with Llama.from_hf. float32 on CPU, bfloat16 on CUDA (--dtype to
choose; bfloat16 weights on CPU are what decode-bound serving streams). Every model is in eval()
mode, also for the training step (the family has no dropout).

Kernels (CSV `kernel`, prefixed with the preset: smollm2_135m_prefill, ...), metric `throughput`
in tokens/s, as in bench_gpt.py:
  * <preset>_prefill (mode forward): logits for B x T tokens under no_grad; x = B T, shape B x T.
  * <preset>_generate (mode forward): greedy generation of N new tokens after B equal-length
    prompts of P tokens with a KV cache (HF's generate with its DynamicCache vs Llama.generate);
    new tokens/s = B N / time of the whole call; x = B, shape B x P x N. Also `weight_bandwidth`
    (GB/s): N steps x the weights' bytes / time, against the copy bandwidth.
  * <preset>_train (mode full): forward + cross-entropy + backward + AdamW step + zero_grad;
    x = B T, shape B x T.

Providers: fusedtx_native, fusedtx_triton (CUDA only): Llama with that backend, checked by a
profiled call to run fusedtx's linear, rms_norm, rope and attention and no aten matmul, RMSNorm,
softmax or SDPA; hf_eager, hf_sdpa (transformers' default), hf_sdpa_compile (prefill and
training; --no-compile skips it); hf_converted: the HF model after fusedtx.convert (fusedtx
layers and the "fusedtx" attention implementation, HF's own generate; checked to run fusedtx
attention and no aten matmul), the cost of invariance for a user who keeps their HF code
(target on CPU: >= 0.9x hf_eager). Each provider's first output is checked against a float64 copy
of the HF model as bench_gpt.py does (gradients: embed_tokens, the first q_proj, the last
down_proj, the final norm).

Timing, the checks and the summary: model_bench.py; the models and workloads: model_workloads.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_bench import main as bench_main  # noqa: E402
from model_workloads import llama_family  # noqa: E402

PRESETS = ("smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b", "qwen3-0.6b")


def add_args(parser) -> None:
    parser.add_argument("--preset", choices=PRESETS, default="smollm2-135m",
                        help="the model's sizes (fusedtx.models.LlamaConfig.preset; random weights)")


def main(argv=None) -> None:
    bench_main(lambda args: llama_family(args.preset), __doc__, argv, add_args)


if __name__ == "__main__":
    main()
