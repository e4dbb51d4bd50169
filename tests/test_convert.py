"""Bring your own model: fusedtx.convert, the "fusedtx" attention implementation for Hugging Face
transformers (fusedtx.hf) and the assertions of fusedtx.testing, on HF models built from small
configs with random weights (offline).

Unconverted, the HF models are the negative controls: their bits change with the batch and
between a cached decode step and a full forward, so the same assertions fail on them.
"""
from __future__ import annotations

import pytest
import torch

import fusedtx
from fusedtx.testing import Divergence, assert_batch_invariant, assert_decode_consistent, first_divergence
from helpers import adamw_trained, assert_bitwise_equal, bitwise_equal

transformers = pytest.importorskip("transformers")

SEQ = 29


def hf_gpt2(seed=0):
    config = transformers.GPT2Config(vocab_size=300, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                     attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def hf_llama(family="llama", seed=0, intermediate_size=160):
    config_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[family]
    config = getattr(transformers, config_cls)(
        vocab_size=300, hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # RMSNorm weights away from 1, so that the probe sees them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tokens(shape, seed):
    return torch.randint(0, 300, shape, generator=torch.Generator().manual_seed(seed))


def converted(model):
    report = fusedtx.convert(model)
    return model, report


# ---------------------------------------------------------------------------------------------
# convert: what is swapped, what stays the same
# ---------------------------------------------------------------------------------------------
def test_convert_gpt2_swaps_conv1d_layernorm_and_linear_keeping_the_parameters():
    model = hf_gpt2()
    before = {k: v for k, v in model.state_dict().items()}
    params_before = {id(p) for p in model.parameters()}
    idx = tokens((2, SEQ), seed=1)
    with torch.no_grad():
        want = model(idx).logits
    report = fusedtx.convert(model)
    kinds = {path: now for path, _, now in report.converted}
    assert kinds["transformer.h.0.attn.c_attn"] == "fusedtx.nn.Conv1D"
    assert kinds["transformer.h.1.mlp.c_fc"] == "fusedtx.nn.Conv1D"
    assert kinds["transformer.h.0.ln_1"] == "fusedtx.nn.LayerNorm"
    assert kinds["transformer.ln_f"] == "fusedtx.nn.LayerNorm"
    assert kinds["lm_head"] == "fusedtx.nn.Linear"
    assert kinds["transformer.h.0.mlp.act"] == "fusedtx.nn.GELU"  # HF's NewGELUActivation, by behaviour
    assert report.left == [], str(report)
    assert "fusedtx" in report.attention and model.config._attn_implementation == "fusedtx"
    assert {id(p) for p in model.parameters()} == params_before, "convert must keep the Parameter objects"
    assert model.lm_head.weight is model.transformer.wte.weight, "tied weights came untied"
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert_bitwise_equal(after[k], before[k], k)
    with torch.no_grad():
        got = model(idx).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert "converted  lm_head: Linear -> fusedtx.nn.Linear" in str(report)
    assert "converted  8 x Conv1D -> fusedtx.nn.Conv1D" in report.summary()


def test_convert_llama_recognises_hf_rmsnorm_by_behaviour():
    model = hf_llama()
    report = fusedtx.convert(model)
    kinds = {path: (was, now) for path, was, now in report.converted}
    assert kinds["model.layers.0.input_layernorm"] == ("LlamaRMSNorm", "fusedtx.nn.RMSNorm")
    assert kinds["model.norm"] == ("LlamaRMSNorm", "fusedtx.nn.RMSNorm")
    assert kinds["model.layers.1.mlp"] == ("LlamaMLP", "fusedtx.nn.SwiGLUFFN")
    assert kinds["model.layers.1.self_attn.o_proj"] == ("Linear", "fusedtx.nn.Linear")
    assert report.left == [], str(report)


def test_convert_fuses_the_gated_ffn_keeping_parameters_and_float32_bits():
    """HF's LlamaMLP becomes one SwiGLUFFN holding the same Parameters (state_dict unchanged);
    in float32 the model gives the bits of converting its children one by one."""
    model, reference = hf_llama(), hf_llama()
    params = [p for layer in model.model.layers for p in layer.mlp.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fusedtx.convert(model)
    for layer in reference.model.layers:  # the same weights, converted child by child
        layer.mlp.gate_proj.register_forward_hook(lambda m, args, out: None)  # (a hooked child is not fused)
    fusedtx.convert(reference)
    for layer in reference.model.layers:
        layer.mlp.gate_proj._forward_hooks.clear()
    assert all(type(layer.mlp) is fusedtx.nn.SwiGLUFFN for layer in model.model.layers)
    assert [p for layer in model.model.layers for p in layer.mlp.parameters()] == params
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert type(reference.model.layers[0].mlp).__name__ == "LlamaMLP"
    ids = tokens((3, SEQ), seed=4)
    with torch.no_grad():
        assert_bitwise_equal(model(ids).logits, reference(ids).logits, "fused vs child by child")


def test_gated_ffns_it_cannot_fuse_are_converted_child_by_child():
    """A GELU-gated FFN (Gemma's) fails the probe; a hook on a child keeps that child's call; a
    dropout beside the projections (identity in eval(), where the probe runs) would be lost."""
    class DropoutFFN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(8, 12), torch.nn.Linear(8, 12)
            self.down_proj, self.dropout = torch.nn.Linear(12, 8), torch.nn.Dropout(0.1)

        def forward(self, x):
            return self.dropout(self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)))

    ffn = torch.nn.Sequential(DropoutFFN().eval())
    report = fusedtx.convert(ffn)
    assert type(ffn[0]) is DropoutFFN and type(ffn[0].gate_proj) is fusedtx.nn.Linear, str(report)
    plain = torch.nn.Sequential(DropoutFFN().eval())
    del plain[0].dropout
    plain[0].forward = lambda x, m=plain[0]: m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))
    fusedtx.convert(plain)  # negative control: the same FFN without the dropout is fused
    assert type(plain[0]) is fusedtx.nn.SwiGLUFFN
    model = hf_llama()
    model.model.layers[0].mlp.act_fn = transformers.activations.GELUTanh()
    seen = []
    model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    report = fusedtx.convert(model)
    kinds = {path: now for path, _, now in report.converted}
    for i, act in ((0, "fusedtx.nn.GELU"), (1, "fusedtx.nn.SiLU")):
        assert f"model.layers.{i}.mlp" not in kinds, str(report)
        assert kinds[f"model.layers.{i}.mlp.act_fn"] == act
        assert kinds[f"model.layers.{i}.mlp.up_proj"] == "fusedtx.nn.Linear"
    with torch.no_grad():
        model(tokens((1, 5), seed=5))
    assert seen == [torch.Size([1, 5, 160])]


def test_convert_reports_what_it_leaves_and_why():
    """A subclass of nn.Linear with its own forward (an adapter), an RMSNorm that scales by
    1 + weight (Gemma's: it fails the behaviour probe) and an unknown layer with parameters are
    left and reported; nothing is silently skipped."""

    class Adapter(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class OnePlusRMSNorm(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.randn(n)), 1e-6

        def forward(self, x):
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=self.eps) * (1 + self.weight)

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Adapter(8, 8), OnePlusRMSNorm(8), torch.nn.Conv1d(8, 8, 1),
                                torch.nn.GELU("tanh"), torch.nn.Sigmoid(), torch.nn.ReLU())
    report = fusedtx.convert(model)
    assert [(p, now) for p, _, now in report.converted] == [("0", "fusedtx.nn.Linear"), ("4", "fusedtx.nn.GELU")]
    assert model[4].approximate == "tanh"
    left = {path: why for path, _, why in report.left}
    assert set(left) == {"1", "2", "3", "5"}
    assert "subclass of torch.nn.Linear" in left["1"] and "not recognised" in left["2"]
    assert "elementwise Sigmoid: PyTorch's CPU kernel" in left["5"]
    assert isinstance(model[1], Adapter) and isinstance(model[0], fusedtx.nn.Linear)
    with pytest.raises(TypeError, match="convert: model itself is a Linear"):
        fusedtx.convert(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fusedtx.convert("gpt2")


# ---------------------------------------------------------------------------------------------
# the promise on converted HF models, and the unconverted ones as negative controls
# ---------------------------------------------------------------------------------------------
# An odd FFN width (129) puts a row's last SiLU inputs in PyTorch's scalar tail when it is alone
# and in its vector body inside a batch: the activation has to be converted too.
@pytest.mark.parametrize("make", [hf_gpt2, hf_llama, lambda: hf_llama("qwen2"), lambda: hf_llama(intermediate_size=129)],
                         ids=["gpt2", "llama", "qwen2", "llama-odd-ffn"])
def test_converted_hf_model_is_batch_invariant(make):
    model, _ = converted(make())
    assert_batch_invariant(model, tokens((2, SEQ), seed=2), extra_tokens=(0, 3, 19))


def test_negative_control_unconverted_hf_model_is_not_batch_invariant():
    with pytest.raises(AssertionError, match="not batch-invariant: row"):
        assert_batch_invariant(hf_llama(), tokens((3, SEQ), seed=2), extra_tokens=(0, 3, 19))


def test_negative_control_converted_linears_alone_leave_silu_batch_dependent():
    """Converting every layer but the activation (HF's SiLUActivation put back) is not enough."""
    model, _ = converted(hf_llama(intermediate_size=129))
    for layer in model.model.layers:  # HF's MLP back, around the converted Linears
        mlp = transformers.models.llama.modeling_llama.LlamaMLP(model.config)
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj
        mlp.act_fn = transformers.activations.SiLUActivation()
        layer.mlp = mlp
    with pytest.raises(AssertionError, match="not batch-invariant: row"):
        assert_batch_invariant(model, tokens((2, SEQ), seed=2), extra_tokens=(0, 3, 19))


@pytest.mark.parametrize("make", [hf_gpt2, hf_llama], ids=["gpt2", "llama"])
def test_hf_generate_with_cache_equals_full_forward_after_convert(make):
    model, _ = converted(make())
    assert_decode_consistent(model, tokens((2, 7), seed=3), max_new_tokens=12)


def test_negative_control_unconverted_hf_generate_differs_from_full_forward():
    with pytest.raises(AssertionError, match="generate\\(\\)'s logits differ"):
        assert_decode_consistent(hf_llama(), tokens((2, 7), seed=3), max_new_tokens=12)


def trained_parameters(threads, convert=True, steps=4):
    """The parameters of an HF Llama with an odd FFN width after `steps` AdamW steps on `threads`
    threads (test_llama's TRAIN_CONFIG recipe: one step's gradients can agree by chance, four
    steps of unconverted PyTorch do not)."""
    def make():
        model = hf_llama(intermediate_size=129)
        if convert:
            fusedtx.convert(model)
        return model

    idx = tokens((3, 95), seed=4)
    return adamw_trained(make, lambda model: model(idx, labels=idx).loss, threads, steps)


def test_converted_training_repeats_and_ignores_the_thread_count():
    first = trained_parameters(2)
    for other in (trained_parameters(2), trained_parameters(1)):
        for a, b in zip(first, other):
            assert_bitwise_equal(a, b, "trained parameter")


def test_negative_control_unconverted_training_follows_the_thread_count():
    one, two = trained_parameters(1, convert=False), trained_parameters(2, convert=False)
    assert not all(bitwise_equal(a, b) for a, b in zip(one, two)), "unconverted HF Llama: 1 and 2 threads agree"


def left_padded(lens, seed):
    """Prompts of lengths `lens` and the batch HF makes of them: left-padded with token 0, a mask."""
    prompts = [tokens((n,), seed + i) for i, n in enumerate(lens)]
    idx = torch.zeros(len(lens), max(lens), dtype=torch.int64)
    mask = torch.zeros_like(idx)
    for i, p in enumerate(prompts):
        idx[i, idx.shape[1] - len(p):] = p
        mask[i, idx.shape[1] - len(p):] = 1
    return prompts, idx, mask


def generate_logits(model, idx, mask):
    out = model.generate(idx, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, idx.shape[1]:], torch.stack(out.logits, 1)  # (B, new), (B, new, V)


def left_padded_generate_differences(model, lens=(7, 4, 10, 1)) -> list[float]:
    """Per prompt, the largest difference between its logits in HF's left-padded batch generate and
    generated alone (0.0 when the tokens and the logits of every step are the same bits)."""
    prompts, idx, mask = left_padded(lens, seed=10)
    with torch.no_grad():
        batch_tokens, batch_logits = generate_logits(model, idx, mask)
        worst = []
        for i, p in enumerate(prompts):
            alone_tokens, alone_logits = generate_logits(model, p[None], torch.ones(1, len(p), dtype=torch.int64))
            same = torch.equal(batch_tokens[i], alone_tokens[0]) and torch.equal(batch_logits[i], alone_logits[0])
            worst.append(0.0 if same else float((batch_logits[i] - alone_logits[0]).abs().max()))
    return worst


@pytest.mark.parametrize("make", [hf_gpt2, hf_llama], ids=["gpt2", "llama"])
def test_left_padded_hf_generate_gives_each_prompt_its_bits_alone(make):
    model, _ = converted(make())
    assert left_padded_generate_differences(model) == [0.0] * 4


def test_negative_control_unconverted_left_padded_generate_differs_from_alone():
    assert max(left_padded_generate_differences(hf_llama())) > 0.0


def test_left_padded_forward_equals_each_row_alone_and_trains():
    """A plain forward with left padding (positions from the mask, as generate numbers them) gives
    every real token the bits of its prompt alone; the same batch trains through the shift."""
    model, _ = converted(hf_llama("qwen2"))
    prompts, idx, mask = left_padded((9, 3, 33, 17), seed=20)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(idx, attention_mask=mask, position_ids=positions).logits
        for i, p in enumerate(prompts):
            alone = model(p[None]).logits[0]
            assert_bitwise_equal(logits[i, idx.shape[1] - len(p):], alone, f"row {i} (length {len(p)})")
    model.train()
    labels = idx.masked_fill(mask == 0, -100)
    model(idx, attention_mask=mask, position_ids=positions, labels=labels).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_masks_fusedtx_attention_cannot_serve_are_refused_clearly():
    from fusedtx import hf
    q, k, v = (torch.randn(2, 4, 6, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3))
    module = torch.nn.Module()
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    packed = causal.clone()
    packed[3:, :3] = False  # two sequences packed in one row
    with pytest.raises(ValueError, match="fusedtx attention: the attention mask is not causal from each row's"):
        hf.attention_forward(module, q, k, v, torch.stack([causal, packed])[:, None])
    # A decode chunk of 3 queries against 6 keys where row 0 has 4 padding keys: its first query is padding.
    chunk = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()[:, :, 3:]   # queries at positions 3, 4, 5
    chunk[0, :, :, :4] = False
    with pytest.raises(ValueError, match="a chunk whose queries are still padding"):
        hf.attention_forward(module, q[:, :, 3:], k, v, chunk)
    with pytest.raises(ValueError, match="expected a \\(batch, 1, 6, 6\\) attention mask"):
        hf.attention_forward(module, q, k, v, causal[None, None, :5])
    # Additive float masks (0 allowed, -inf / min refused) and a per-row left padding are served.
    padded = causal.clone()
    padded[:, :2] = False
    float_mask = torch.zeros(2, 1, 6, 6).masked_fill(~torch.stack([causal, padded])[:, None], torch.finfo(torch.float32).min)
    with torch.no_grad():
        out, _ = hf.attention_forward(module, q, k, v, float_mask)
        alone = fusedtx.causal_attention(q[1:, :, 2:], k[1:, :, 2:], v[1:, :, 2:]).transpose(1, 2)
    assert_bitwise_equal(out[1:, 2:], alone, "left-padded row")


# ---------------------------------------------------------------------------------------------
# first_divergence and the testing helpers' own failure modes
# ---------------------------------------------------------------------------------------------
class BatchMean(torch.nn.Module):
    """A layer whose output depends on the batch: it adds a little of the batch mean."""

    def forward(self, x):
        return x + 1e-3 * x.mean(dim=0, keepdim=True)


def test_first_divergence_names_the_layer_that_depends_on_the_batch():
    model, _ = converted(hf_gpt2())
    alone, batch = tokens((1, SEQ), seed=6), tokens((5, SEQ), seed=7)
    batch[3] = alone[0]
    assert first_divergence(model, alone, batch, row_a=0, row_b=3) is None
    model.transformer.h[1].mlp.act = BatchMean()
    found = first_divergence(model, alone, batch, row_a=0, row_b=3)
    assert isinstance(found, Divergence) and found.path == "transformer.h.1.mlp.act", found
    assert found.module_type == "BatchMean" and found.max_abs_diff > 0
    assert "transformer.h.1.mlp.act (BatchMean)" in str(found)


def test_assert_batch_invariant_fails_on_a_batch_dependent_function():
    x = torch.randn(3, 8)
    assert_batch_invariant(lambda t: t * 2 + 1, x)
    assert_batch_invariant(lambda t: t.cumsum(1), x, extra_tokens=(0, 5))  # causal along dim 1
    assert_batch_invariant(lambda t: t * 2, torch.randn(4))                  # rows that are scalars
    with pytest.raises(AssertionError, match="5 tokens longer"):
        assert_batch_invariant(lambda t: t - t.mean(1, keepdim=True), x, extra_tokens=(0, 5))  # not causal
    with pytest.raises(ValueError, match="extra_tokens must be ints"):
        assert_batch_invariant(lambda t: t, torch.randn(4), extra_tokens=(2,))
    with pytest.raises(AssertionError, match=r"row 0 alone vs at position 0 of a batch of 2 rows"):
        assert_batch_invariant(BatchMean(), x)
    with pytest.raises(ValueError, match="inputs must be a tensor with at least one row"):
        assert_batch_invariant(BatchMean(), torch.empty(0, 3))


def test_readme_bring_your_own_model_example_runs(capsys):
    """The README's example is code that runs, and what it prints is what it says."""
    from pathlib import Path
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Bring your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the README's 'Bring your own model' section has no python example"
    namespace = {"__name__": "readme_example"}  # the blocks run in order, as one script
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("fusedtx.convert:")
    assert any(line.startswith("  attention  transformers attention implementation 'fusedtx'") for line in printed)
    assert "None" in printed and printed[-1] == "fusedtx.guard: no reduction ran outside fusedtx"


# ---------------------------------------------------------------------------------------------
# guard: which reductions still run outside fusedtx, and where
# ---------------------------------------------------------------------------------------------
def test_guard_lists_the_unconverted_models_reductions_and_none_after_convert():
    model, idx = hf_gpt2(), tokens((2, SEQ), seed=8)
    with pytest.warns(UserWarning, match="reduction\\(s\\) ran outside fusedtx"):
        with fusedtx.guard(model) as g:
            model(idx).logits.sum().backward()
    where = {path for _, path in g.records}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "transformer.h.0.ln_1", "lm_head"} <= where, g
    assert "(backward)" in where
    assert any(op == "aten.addmm" and path == "transformer.h.0.attn.c_attn" for op, path in g.records)
    fusedtx.convert(model)
    model.zero_grad()
    with fusedtx.guard(model) as g:
        logits = model(idx).logits
    assert not g.records, f"a converted GPT-2 still runs reductions outside fusedtx:\n{g}"
    assert str(g) == "fusedtx.guard: no reduction ran outside fusedtx"
    # Its backward still sums the embeddings' gradients in ATen (the token and position tables:
    # sums over the batch, which fusedtx has no kernel for), and nothing else.
    with pytest.warns(UserWarning):
        with fusedtx.guard(model) as g:
            logits.backward(torch.ones_like(logits))
    assert {op for op, _ in g.records} <= {"aten.embedding_dense_backward", "aten.sum"}, g
    assert {path for _, path in g.records} == {"(backward)"}, g


def test_guard_raise_mode_names_the_op_and_module():
    model, _ = converted(hf_llama())
    model.model.layers[1].mlp.up_proj = torch.nn.Linear(64, 160, bias=False)  # one layer left unconverted
    with pytest.raises(RuntimeError, match=r"fusedtx.guard: aten.(mm|addmm|linear)\S* ran outside fusedtx in "
                                           r"model.layers.1.mlp.up_proj"):
        with torch.no_grad(), fusedtx.guard(model, mode="raise"):
            model(tokens((1, 5), seed=9))
    with pytest.raises(ValueError, match="mode must be 'warn' or 'raise'"):
        fusedtx.guard(model, mode="log")


# ---------------------------------------------------------------------------------------------
# python -m fusedtx check --hf PATH
# ---------------------------------------------------------------------------------------------
def test_check_hf_on_a_saved_checkpoint(tmp_path, capsys):
    """The properties on a save_pretrained directory: every one holds converted (exit code 0),
    and the unconverted column is there beside it."""
    import argparse
    import json

    from fusedtx import check

    hf_llama().save_pretrained(tmp_path / "ckpt")
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    out = tmp_path / "report.json"
    args = parser.parse_args(["--hf", str(tmp_path / "ckpt"), "--quick", "--no-progress", "--json", str(out)])
    assert check.main(args) == 0, capsys.readouterr().out
    printed = capsys.readouterr().out
    assert "check --hf" in printed and "fusedtx.convert" in printed and "unconverted" in printed
    assert "every property holds on the converted checkpoint" in printed
    report = json.loads(out.read_text())
    cells = report["results"]["fusedtx.convert"]["cells"]
    assert {c["status"] for c in cells.values()} == {"pass"}, cells
    assert set(report["results"]["unconverted"]["cells"]) == set(cells)
