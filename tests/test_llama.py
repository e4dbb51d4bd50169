"""The Llama family (fusedtx.models.llama) on random weights, offline, bit for bit unless said otherwise:

1. parity with HuggingFace's LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM and
   MistralForCausalLM (float32, within 2x HF's own error against float64): logits, loss and
   the loss's gradients; loading from_hf, from_pretrained (sharded safetensors) and bfloat16;
2. batch invariance: a sequence's logits alone == inside a batch of others with garbage padding;
3. generation consistency: every step of generate() == a full forward; chunked prefill == full;
4. on-policy: generate()'s log-probabilities == logprobs() of the finished sequences (KL 0);
5. configs: what the family varies is read from HF configs; what fusedtx cannot compute (another
   RoPE scaling, positions past a sliding window) is refused with the reason.
The plain-PyTorch twin (PlainLlama) runs the invariance checks as the negative control.
"""
from __future__ import annotations

import pytest
import torch

from fusedtx.models import Llama, LlamaConfig, PlainLlama
from helpers import adamw_trained, assert_bitwise_equal, bitwise_equal, generation_mismatches, rel_error, require

BACKENDS = ["native", "reference"]  # the Triton interpreter runs the model in tests/test_properties.py only
HF_FAMILIES = {
    # name: (transformers class names, config overrides): GQA everywhere; untied + llama3 RoPE
    # scaling (Llama), q/k/v biases + tied (Qwen2), q/k norm + head_dim != hidden / heads (Qwen3),
    # a sliding window beyond the test's positions (Mistral)
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32}, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=96, tie_word_embeddings=False)),
}


def hf_model(family: str, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, overrides = HF_FAMILIES[family]
    config = getattr(transformers, config_cls)(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
        attn_implementation="eager", **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # spread the weights past init's 0.02 (RMSNorm weights away from 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tokens(shape, seed, vocab=256):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def make_model(backend, cls=Llama, preset="tiny", seed=0):
    torch.manual_seed(seed)
    return cls(LlamaConfig.preset(preset), backend=backend).eval()


# ---------------------------------------------------------------------------------------------
# 1. HuggingFace parity and loading
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_parity_with_huggingface(family, backend):
    require("cpu", backend)
    hf = hf_model(family)
    ours = Llama.from_hf(hf, backend=backend)
    assert ours.config.model_type == family
    idx = tokens((2, 24 if backend == "reference" else 70), seed=1, vocab=300)
    targets = tokens(idx.shape, seed=2, vocab=300)
    hf64 = hf_model(family).double()
    theirs = hf(idx, labels=targets)
    exact = hf64(idx, labels=targets)
    logits, loss = ours(idx, _shifted(targets))
    ours_err, theirs_err = rel_error(logits, exact.logits), rel_error(theirs.logits, exact.logits)
    assert ours_err <= max(2 * theirs_err, 1e-6), (ours_err, theirs_err)
    assert abs(loss.item() - exact.loss.item()) <= max(2 * abs(theirs.loss.item() - exact.loss.item()), 1e-6)
    # the loss's gradients, parameter by parameter (HF names: the same state_dict keys)
    loss.backward()
    theirs.loss.backward()
    exact.loss.backward()
    ours_grads = dict(ours.named_parameters())
    for name, p64 in hf64.named_parameters():
        if name not in ours_grads:  # a tied lm_head appears once
            continue
        g, g32 = ours_grads[name].grad, dict(hf.named_parameters())[name].grad
        ours_err, theirs_err = rel_error(g, p64.grad), rel_error(g32, p64.grad)
        assert ours_err <= max(2 * theirs_err, 1e-6), f"{name}: {ours_err:.3e} vs HF's {theirs_err:.3e}"


def _shifted(targets):
    """HF shifts labels inside the model (logits[t] predict labels[t + 1]); ours takes targets
    aligned with the logits: the same loss, with -1 for the last position."""
    return torch.cat([targets[:, 1:], torch.full_like(targets[:, :1], -1)], 1)


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_state_dict_names_are_huggingface_names(family):
    hf = hf_model(family)
    ours = Llama.from_hf(hf, backend="native")
    hf_state = {k: v for k, v in hf.state_dict().items() if not k.endswith("inv_freq")}
    assert set(ours.state_dict()) == set(hf_state)
    for name, tensor in hf_state.items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == hf.config.tie_word_embeddings


def test_from_pretrained_reads_sharded_safetensors(tmp_path):
    hf = hf_model("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = Llama.from_pretrained(tmp_path, backend="native")
    direct = Llama.from_hf(hf, backend="native")
    idx = tokens((2, 20), seed=2, vocab=300)
    with torch.no_grad():
        assert_bitwise_equal(loaded(idx), direct(idx), "from_pretrained (sharded) vs from_hf")


def test_bfloat16_weights_follow_huggingface_bfloat16():
    hf = hf_model("llama")
    ours = Llama.from_hf(hf, backend="native", dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    idx = tokens((2, 30), seed=3, vocab=300)
    with torch.no_grad():
        exact = hf_model("llama").double()(idx).logits
        theirs = hf.to(torch.bfloat16)(idx).logits
        logits = ours(idx)
    assert logits.dtype == torch.bfloat16
    assert rel_error(logits, exact) <= 2 * rel_error(theirs, exact) + 1e-3


def test_loading_errors_name_the_problem(tmp_path):
    hf = hf_model("llama")
    with pytest.raises(ValueError, match="needs config"):
        Llama.from_hf(hf.state_dict())
    with pytest.raises(ValueError, match="does not fit|has shape"):
        Llama.from_hf(hf.state_dict(), LlamaConfig.preset("tiny"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        Llama.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        Llama.from_hf(hf, dtype=torch.float16)


# ---------------------------------------------------------------------------------------------
# 5. configs
# ---------------------------------------------------------------------------------------------
def test_config_reads_what_the_family_varies():
    transformers = pytest.importorskip("transformers")
    qwen3 = LlamaConfig.from_hf(hf_model("qwen3").config)
    assert qwen3.qk_norm and qwen3.head_size == 24 and qwen3.kv_heads == 2 and not qwen3.tie_word_embeddings
    qwen2 = LlamaConfig.from_hf(hf_model("qwen2").config)
    assert qwen2.qkv_bias and not qwen2.attention_bias and qwen2.sliding_window is None
    llama = LlamaConfig.from_hf(hf_model("llama").config)
    assert llama.rope["rope_type"] == "llama3" and llama.rope["factor"] == 8.0
    # an older config.json: rope_theta and rope_scaling at the top level, "type" for the kind
    old = LlamaConfig.from_hf(dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                                   num_hidden_layers=1, num_attention_heads=2, rope_theta=5e5,
                                   rope_scaling={"type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}))
    assert old.rope_theta == 5e5 and old.rope["rope_type"] == "llama3"
    assert LlamaConfig.from_hf(transformers.MistralConfig(sliding_window=None)).sliding_window is None
    sizes = {name: LlamaConfig.preset(name) for name in ("smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b", "qwen3-0.6b")}
    assert sizes["smollm2-135m"].hidden_size == 576 and sizes["qwen2.5-0.5b"].qkv_bias
    assert sizes["llama-3.2-1b"].rope["rope_type"] == "llama3" and sizes["qwen3-0.6b"].head_size == 128


def test_unsupported_configs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        LlamaConfig.from_hf(dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.from_hf(dict(model_type="gemma", vocab_size=10))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig.preset("tiny", num_key_value_heads=3)
    with pytest.raises(ValueError, match="hidden_size"):
        LlamaConfig.preset("tiny", hidden_size=66)
    with pytest.raises(ValueError, match="rms_norm_eps"):
        LlamaConfig.preset("tiny", rms_norm_eps=float("nan"))
    model = Llama(LlamaConfig.preset("tiny", sliding_window=8), backend="native")
    model(tokens((1, 8), seed=0))  # positions 0 .. 7: before the window, full == sliding
    with pytest.raises(ValueError, match="sliding_window"):
        model(tokens((1, 9), seed=0))
    with pytest.raises(ValueError, match="sliding_window"):
        model.generate([[1, 2, 3]], 6)


# ---------------------------------------------------------------------------------------------
# 2-4. the promise, on every preset shape of the family, and the negative control
# ---------------------------------------------------------------------------------------------
def batch_failures(model, sequence, compositions):
    alone = model(sequence[None])[0]
    failures = 0
    for case, others in enumerate(compositions):
        width = max([len(sequence), *others])
        batch = tokens((len(others) + 1, width), seed=100 + case)  # garbage beyond every length
        index = case % (len(others) + 1)
        batch[index, :len(sequence)] = sequence
        failures += not bitwise_equal(model(batch)[index, :len(sequence)], alone)
    return failures


COMPOSITIONS = [[5] * 9, [40, 3], [1, 17, 33, 2]]


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-qwen3"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_invariance_of_logits(backend, preset):
    require("cpu", backend)
    model = make_model(backend, preset=preset)
    compositions = COMPOSITIONS[1:2] if backend == "reference" else COMPOSITIONS
    with torch.no_grad():
        assert batch_failures(model, tokens((29,), seed=3), compositions) == 0


def test_negative_control_plain_pytorch_is_not_batch_invariant():
    model = make_model(None, cls=PlainLlama)
    with torch.no_grad():
        assert batch_failures(model, tokens((29,), seed=3), COMPOSITIONS * 3) > 0, \
            "plain PyTorch passed: the batch-invariance check cannot fail"


PROMPTS = [tokens((n,), seed=10 + n).tolist() for n in (5, 17, 1, 33)]


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_step_logits_equal_full_forward(backend, preset):
    require("cpu", backend)
    model = make_model(backend, preset=preset)
    prompts, steps = (PROMPTS[:2], 4) if backend == "reference" else (PROMPTS, 12)
    with torch.no_grad():
        _, greedy = generation_mismatches(model, prompts, steps)
        _, sampled = generation_mismatches(model, prompts, steps, temperature=0.8, top_k=50,
                                           generator=torch.Generator().manual_seed(5))
    assert greedy == 0 and sampled == 0, f"{greedy} greedy and {sampled} sampled steps differ from the full forward"


def test_negative_control_plain_pytorch_decode_differs_from_full_forward():
    with torch.no_grad():
        _, mismatches = generation_mismatches(make_model(None, cls=PlainLlama), PROMPTS, 16)
    assert mismatches > 0, "plain PyTorch passed: the generation-consistency check cannot fail"


@pytest.mark.parametrize("chunks", [[1] * 40, [16, 17, 7], [3, 30, 1, 6]], ids=["1", "S,S+1", "random"])
def test_chunked_prefill_equals_full_prefill(chunks):
    model = make_model("native", preset="tiny-qwen3")
    idx = tokens((2, 40), seed=6)
    with torch.no_grad():
        full = model.hidden_states(idx)
        cache, start, parts = model.new_kv_cache(2, 64), 0, []
        for size in chunks:
            parts.append(model.hidden_states(idx[:, start:start + size], cache))
            start += size
    assert_bitwise_equal(torch.cat(parts, 1), full, f"prefill in chunks {chunks}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_logprobs_equal_training_forward_logprobs(backend):
    require("cpu", backend)
    model = make_model(backend, preset="tiny-qwen2")
    prompts, steps = (PROMPTS[:2], 4) if backend == "reference" else (PROMPTS, 10)
    with torch.no_grad():
        out = model.generate(prompts, steps, temperature=0.7, generator=torch.Generator().manual_seed(7))
        sequences = [p + out.tokens[b].tolist() for b, p in enumerate(prompts)][::-1]
        batch = tokens((len(sequences), max(map(len, sequences)) + 3), seed=8)
        for row, seq in enumerate(sequences):
            batch[row, :len(seq)] = torch.tensor(seq)
        trainer = model.logprobs(batch, temperature=0.7)
    for b, prompt in enumerate(prompts):
        theirs = trainer[len(prompts) - 1 - b, len(prompt) - 1:len(prompt) - 1 + steps]
        assert_bitwise_equal(out.logprobs[b], theirs, f"sequence {b}: sampler vs trainer log-probs")


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2"])
def test_inference_stacked_qkv_equals_the_training_forward(preset):
    """Without autograd q, k and v come from one matmul on the stacked weights and q and k are
    rotated in one call (LlamaAttention.project); with autograd each projection runs alone. The
    logits -- what a sampler and a trainer see -- must be the same bits, with and without biases
    (Qwen2), after an in-place weight update (the stacked cache is rebuilt), and with a hook on a
    projection (which turns the stacking off, so that the hook sees its call)."""
    model = make_model("native", preset=preset)
    idx = tokens((3, 21), seed=4)
    attn = model.model.layers[0].self_attn

    def both():
        trained = model(idx)[0]
        with torch.no_grad():
            inferred = model(idx)[0]
        return trained.detach(), inferred

    trained, inferred = both()
    assert attn._stacked.value is not None, "the inference forward did not take the stacked path"
    assert_bitwise_equal(inferred, trained, "stacked q/k/v vs separate projections")
    stacked = attn._stacked.value[0]
    with torch.no_grad():
        attn.v_proj.weight.mul_(1.5)
    trained2, inferred2 = both()
    assert attn._stacked.value[0] is not stacked and not torch.equal(inferred2, inferred)
    assert_bitwise_equal(inferred2, trained2, "after an in-place update of v_proj")
    calls = []
    attn.k_proj.register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    with torch.no_grad():
        assert_bitwise_equal(model(idx)[0], inferred2, "with a hook on k_proj")
    assert len(calls) == 1, "the hook on k_proj did not see its call"


def test_negative_control_stacked_qkv_sees_a_wrong_stacking():
    """The check above can fail: a stacked cache that no longer matches the projections (its key
    faked) gives other logits."""
    model = make_model("native")
    idx = tokens((2, 9), seed=5)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        good = model(idx)[0]
        weight, bias = attn._stacked.value
        attn._stacked.value = (weight.flip(0), bias)
        assert not torch.equal(model(idx)[0], good)


# A tiny Qwen3 (q/k norm, GQA) with an odd FFN width, on 3 x 95 tokens: its F.silu input, 3 x 95 x
# 129 elements, is past PyTorch's parallel grain (32768), so 2 threads split it at element 18383,
# no multiple of the vector loop's step (16 floats on AVX2): the 15 elements before the split take
# the scalar tail on 2 threads and the vector body on 1, and scalar and vector silu differ in the
# last bit for a few percent of inputs. Over 4 steps of 2 layers, forward and backward, plain
# PyTorch's bits change with the thread count (the negative control); fusedtx's must not.
TRAIN_CONFIG = LlamaConfig.preset("tiny-qwen3", intermediate_size=129)
TRAIN_TOKENS, TRAIN_STEPS = (3, 95), 4


def train(threads, cls=Llama):
    """The parameters after TRAIN_STEPS AdamW steps of TRAIN_CONFIG on `threads` threads."""
    def make():
        torch.manual_seed(0)
        return cls(TRAIN_CONFIG, backend="native")

    idx = tokens(TRAIN_TOKENS, seed=9)
    return adamw_trained(make, lambda model: model(idx, _shifted(idx))[1], threads, TRAIN_STEPS)


def test_training_is_deterministic_across_runs_and_threads():
    first, again, other = train(2), train(2), train(1)
    for a, b, c in zip(first, again, other):
        assert_bitwise_equal(a, b, "run vs run")
        assert_bitwise_equal(a, c, "2 threads vs 1")


def test_negative_control_plain_llama_training_changes_with_thread_count():
    """The same training on plain PyTorch layers (PlainLlama) ends in other bits on 1 thread than
    on 2 (F.silu's scalar tail at the thread split: see TRAIN_CONFIG)."""
    one, two = train(1, PlainLlama), train(2, PlainLlama)
    assert not all(bitwise_equal(a, b) for a, b in zip(one, two)), "plain PyTorch training: 1 and 2 threads agree"
