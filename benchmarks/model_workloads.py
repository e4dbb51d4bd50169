"""The models of bench_gpt.py and bench_llama.py: one set of seeded weights in every provider's
model, and the three workloads (prefill, generation, training), each a timed call and a check of
its first output against a float64 copy of the HF model. A Family says what differs between GPT-2
and the Llama family: how the HF model and fusedtx's are built, which kernels must run, which
gradients are checked."""
from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Callable

import torch
import torch.nn.functional as F

HF_ATTENTION = {"hf_eager": "eager", "hf_sdpa": "sdpa", "hf_sdpa_compile": "sdpa"}


def tolerance(dtype: torch.dtype) -> float:
    """Max abs error of a logit (or of a gradient relative to its largest entry) vs float64."""
    return 1e-3 if dtype == torch.float32 else 0.25


class Skip(Exception):
    """A provider cannot or must not be benchmarked for this case (the message says why)."""


# ---------------------------------------------------------------------------------------------
# Families: what differs between GPT-2 and the Llama family
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Family:
    """One model family as the benchmark sees it. `prefix` names its CSV kernels (prefix_prefill,
    prefix_generate, prefix_train); `hf_model(quick)` builds the HF model (float32, random weights
    from the current seed); `from_hf(hf, backend)` fusedtx's copy; `native_ops` must run in a
    fusedtx_native model; `checked(config)`: the parameters whose gradients the training check
    compares, and `transposed` those stored transposed in fusedtx (GPT-2's Conv1D)."""
    prefix: str
    title: str
    hf_model: Callable
    from_hf: Callable
    native_ops: frozenset
    checked: Callable
    transposed: tuple = ()


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise SystemExit(f"the model benchmarks compare with HuggingFace transformers: pip install transformers ({exc})")
    transformers.logging.set_verbosity_error()  # e.g. generate's notes on its own defaults
    return transformers


GPT2_QUICK = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=512, n_positions=128, bos_token_id=511, eos_token_id=511)


def gpt2_family() -> Family:
    def hf_model(quick: bool):
        transformers = _transformers()
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**(GPT2_QUICK if quick else {})))

    def from_hf(hf, backend: str):
        from fusedtx.models import GPT
        return GPT.from_hf(hf, backend=backend)

    def checked(config):
        return ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight",
                f"transformer.h.{config.n_layer - 1}.mlp.c_proj.weight", "transformer.ln_f.weight")

    return Family("gpt2", "GPT-2 124M", hf_model, from_hf,
                  frozenset({"linear_matmul", "layer_norm_forward", "causal_attention_forward"}), checked,
                  transposed=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))


def llama_family(preset: str) -> Family:
    """A fusedtx LlamaConfig preset's sizes (smollm2-135m, qwen2.5-0.5b, ...) in the matching HF
    class (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM); --quick: the "tiny" preset."""
    from fusedtx.models import LlamaConfig

    def hf_model(quick: bool):
        transformers = _transformers()
        c = LlamaConfig.preset("tiny" if quick else preset)
        hf_class, config_class = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
                                  "qwen3": ("Qwen3ForCausalLM", "Qwen3Config"),
                                  "mistral": ("MistralForCausalLM", "MistralConfig")}[c.model_type]
        rope = {"rope_theta": c.rope_theta, "rope_type": "default", **c.rope}
        config = getattr(transformers, config_class)(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.kv_heads, head_dim=c.head_size, rms_norm_eps=c.rms_norm_eps, rope_parameters=rope,
            max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
            attention_bias=c.attention_bias, bos_token_id=c.vocab_size - 1, eos_token_id=c.vocab_size - 1)
        return getattr(transformers, hf_class)(config)

    def from_hf(hf, backend: str):
        from fusedtx.models import Llama
        return Llama.from_hf(hf, backend=backend, dtype=torch.float32)

    def checked(config):
        return ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                f"model.layers.{config.num_hidden_layers - 1}.mlp.down_proj.weight", "model.norm.weight")

    return Family(preset.replace("-", "_").replace(".", "_"), preset, hf_model, from_hf,
                  frozenset({"linear_matmul", "rms_norm_forward", "rope_forward", "causal_attention_forward"}), checked)


# ---------------------------------------------------------------------------------------------
# Models: one set of weights, every provider's model built from it
# ---------------------------------------------------------------------------------------------
class Models:
    def __init__(self, args, family: Family):
        self.family = family
        self.device, self.dtype = args.device, args.dtype
        torch.manual_seed(args.seed)
        self.hf = family.hf_model(args.quick).eval()  # float32, on CPU: the source of every copy
        self.config = self.hf.config
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
            backend = provider.removeprefix("fusedtx_")
            model = self.family.from_hf(self.hf, backend)
            layers = [m for m in model.modules() if hasattr(m, "backend")]
            assert layers and all(m.backend == backend for m in layers), f"{provider}: a layer's backend is not {backend}"
        elif provider == "hf_converted":  # the user's HF model, kept, under fusedtx.convert
            import fusedtx

            model = copy.deepcopy(self.hf)
            report = fusedtx.convert(model)
            assert not report.left and model.config._attn_implementation == "fusedtx", str(report)
        else:
            model = copy.deepcopy(self.hf)
            model.set_attn_implementation(HF_ATTENTION[provider])
            assert model.config._attn_implementation == HF_ATTENTION[provider], model.config._attn_implementation
        model = model.to(device=self.device, dtype=self.dtype).eval()
        if provider == "hf_sdpa_compile":
            model = torch.compile(model, dynamic=False)
        return model

    def weight_bytes(self) -> int:
        """Bytes of weights one decode step streams: every parameter once in the bench dtype (the
        LM head's matrix is the tied embedding where they are tied, read once as the head)."""
        return sum(p.numel() for p in self.hf.parameters()) * self.dtype.itemsize

    def matmul_weights(self) -> int:
        """Weight elements a token meets in matmuls: every matrix but the input embeddings, and the
        LM head (vocab x hidden) whether or not it is tied."""
        inputs = {id(m.weight) for m in self.hf.modules() if isinstance(m, torch.nn.Embedding)}
        blocks = sum(p.numel() for p in self.hf.parameters() if p.dim() == 2 and id(p) not in inputs)
        head = self.hf.get_output_embeddings().weight
        return blocks + (head.numel() if id(head) in inputs else 0)


def is_fusedtx(provider: str) -> bool:
    return provider.startswith("fusedtx_")


def logits_of(provider: str, model, idx: torch.Tensor) -> torch.Tensor:
    return model(idx) if is_fusedtx(provider) else model(input_ids=idx, use_cache=False).logits


def max_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return (y.double() - ref.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# The three workloads: each gives (fn, check) for a provider's model and a case
# ---------------------------------------------------------------------------------------------
class Workload:
    """One case of a kernel: make_fn(provider, model) is what one timed call runs; first_call
    (the untimed first call, which compiles) returns what check() verifies. `tokens`: the tokens
    one call processes (prefill, training) or generates; x_name/x_value: the CSV's x-axis."""
    kind = x_name = ""
    fresh_model = False  # a new model per provider (training changes the weights)

    def __init__(self, models: Models, shape: tuple):
        self.models, self.shape = models, shape
        self.kernel = f"{models.family.prefix}_{self.kind}"
        self.tokens = self.x_value = shape[0] * shape[1]

    def make_fn(self, provider, model):
        raise NotImplementedError

    def first_call(self, provider, model, fn):
        return fn()

    def check(self, out) -> str:
        raise NotImplementedError


class Prefill(Workload):
    kind, x_name = "prefill", "tokens"

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
    kind, x_name = "generate", "B"

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
    kind, x_name = "train", "tokens"
    fresh_model = True

    def __init__(self, models: Models, shape):
        super().__init__(models, shape)
        vocab = models.config.vocab_size
        self.idx = torch.randint(0, vocab, shape, device=models.device)
        self.targets = torch.randint(0, vocab, shape, device=models.device)
        self.checked = models.family.checked(models.config)  # HF names; fusedtx uses the same

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
            grads[name] = g.t() if is_fusedtx(provider) and name.endswith(self.models.family.transposed) else g
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
        return f"loss err {loss_err:.2g}, worst gradient err {worst[0]:.2g} of max ({worst[1].removeprefix('transformer.').removeprefix('model.')})"


WORKLOADS = {"prefill": Prefill, "generate": Generate, "train": Train}
