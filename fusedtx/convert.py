"""fusedtx.convert: make a model a user already has batch-invariant, in place.

    report = fusedtx.convert(model)      # an HF transformers model or any torch.nn.Module
    print(report)                        # what was converted, what was left and why

Every layer with a reduction that fusedtx has a kernel for is swapped for the fusedtx layer
holding the SAME Parameter objects (tied weights stay tied, an optimizer built before keeps
working, the state_dict is unchanged):

    torch.nn.Linear                       -> fusedtx.nn.Linear
    torch.nn.LayerNorm                    -> fusedtx.nn.LayerNorm
    torch.nn.RMSNorm                      -> fusedtx.nn.RMSNorm
    torch.nn.Softmax                      -> fusedtx.nn.Softmax
    torch.nn.SiLU, torch.nn.GELU          -> fusedtx.nn.SiLU, fusedtx.nn.GELU
    a module that computes x @ W + b      -> fusedtx.nn.Conv1D (HF GPT-2's Conv1D)
      with W (in, out)
    a module that computes an RMSNorm     -> fusedtx.nn.RMSNorm (HF's LlamaRMSNorm, Qwen2RMSNorm, ...)
      or a LayerNorm of its last dim         or fusedtx.nn.LayerNorm
    a module that computes SiLU or GELU   -> fusedtx.nn.SiLU / fusedtx.nn.GELU (HF's SiLUActivation,
      (exact or tanh)                        GELUActivation, NewGELUActivation, GELUTanh, ...)
    a module of Linear children gate_proj, -> fusedtx.nn.SwiGLUFFN (HF's LlamaMLP, Qwen2MLP,
      up_proj, down_proj that computes        MistralMLP, ...: one matmul for gate and up with
      down(silu(gate(x)) * up(x))             silu(g) * u in its epilogue, x read once)

The gated feed-forward is recognised by its children and by behaviour (a probe input); one
with another activation (Gemma's GELU), a hooked child, or a child that is not a plain
torch.nn.Linear is left to the layer-by-layer conversion below it.
The activations are converted because PyTorch's CPU silu and gelu are not batch invariant
although elementwise: their vector body and scalar tail differ in the last bit, and which
elements take the tail depends on the tensor's size. The last three kinds are recognised by
behaviour, not by name: a leaf module whose parameters have the right shapes and that has an
epsilon attribute (or, for activations, one without parameters or buffers) is run once on a
probe input, and converted only when its output matches the fusedtx layer's (RMSNorm variants
that scale by 1 + weight, or normalise differently, a clipped or "quick" GELU, fail the probe
and are left). A transformers model is also
switched to fusedtx attention (fusedtx.hf). Subclasses of the torch layers (adapters, quantized
layers) have their own forward and are left, reported; so are other modules with parameters
fusedtx does not recognise. Forward hooks and the training flag move with each module.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as torch_F

from . import hf
from . import nn as fnn

# Leaf modules without a reduction: nothing to convert, nothing to report.
_NO_REDUCTION = (torch.nn.Embedding, torch.nn.Dropout, torch.nn.Identity, torch.nn.ReLU, torch.nn.Tanh)
_FUSEDTX_LAYERS = (fnn.Linear, fnn.LayerNorm, fnn.RMSNorm, fnn.Softmax, fnn.Conv1D, fnn.SiLU, fnn.GELU, fnn.SwiGLUFFN)
# Elementwise layers fusedtx has no kernel for whose PyTorch CPU kernels are not batch invariant
# (vector body and scalar tail differ): left, and said so.
_POSITION_DEPENDENT = (torch.nn.Sigmoid, torch.nn.Softplus, torch.nn.Mish, torch.nn.ELU, torch.nn.SELU)
# A module's forward-hook dicts, which move to its fusedtx layer.
_FORWARD_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                  "_forward_pre_hooks_with_kwargs")


@dataclass
class ConversionReport:
    """converted: (module path, its type, the fusedtx type); left: (module path, its type, why);
    attention: how attention runs after the conversion."""
    converted: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)
    attention: str = "unchanged: not a transformers model (use fusedtx layers or causal_attention for attention)"

    def summary(self) -> str:
        """One line per kind of conversion (counts), the modules left, and the attention."""
        kinds = Counter((was, now) for _, was, now in self.converted)
        return self._format([f"{n} x {was} -> {now}" for (was, now), n in sorted(kinds.items())])

    def __str__(self) -> str:
        return self._format([f"{path or '(root)'}: {was} -> {now}" for path, was, now in self.converted])

    def _format(self, converted: list[str]) -> str:
        lines = [f"fusedtx.convert: {len(self.converted)} module(s) converted, {len(self.left)} left"]
        lines += [f"  converted  {line}" for line in converted]
        lines += [f"  left       {path or '(root)'}: {kind}: {why}" for path, kind, why in self.left]
        lines.append(f"  attention  {self.attention}")
        return "\n".join(lines)


def convert(model: torch.nn.Module, *, backend: str | None = None, attention: bool = True) -> ConversionReport:
    """Swap model's layers for fusedtx layers in place (see the module docstring) and return
    the report. backend: the fusedtx backend of every converted layer (None: the default).
    attention: switch a transformers model to fusedtx attention (fusedtx.hf)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    report = ConversionReport()
    replaced: dict[int, torch.nn.Module] = {}  # a module shared by several parents is converted once
    root = _convert(model, backend, report, replaced, "")
    if root is not None:
        raise TypeError(f"convert: model itself is a {type(model).__name__}; convert a model that contains "
                        f"layers (or use the fusedtx layer {type(root).__name__} directly)")
    _walk(model, "", backend, report, replaced)
    if attention and hf.is_hf_model(model):
        hf.use_fusedtx_attention(model)
        report.attention = f"transformers attention implementation {hf.NAME!r} (fusedtx.hf)"
    return report


def _walk(parent: torch.nn.Module, prefix: str, backend, report: ConversionReport, replaced: dict) -> None:
    for name, child in list(parent.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        if id(child) in replaced:
            setattr(parent, name, replaced[id(child)])
            continue
        new = _convert(child, backend, report, replaced, path)
        if new is not None:
            setattr(parent, name, new)
        elif not isinstance(child, _FUSEDTX_LAYERS):
            _walk(child, path, backend, report, replaced)


def _convert(module: torch.nn.Module, backend, report: ConversionReport, replaced: dict, path: str):
    """The fusedtx layer for module (recorded in report and replaced), or None: left as it is
    (recorded in report.left when it holds a reduction fusedtx does not convert)."""
    kind = type(module).__name__
    new, why = _replacement(module, backend)
    if new is None:
        if why:
            report.left.append((path, kind, why))
        return None
    new.train(module.training)
    for hooks in _FORWARD_HOOKS:
        getattr(new, hooks).update(getattr(module, hooks))
    replaced[id(module)] = new
    report.converted.append((path, kind, f"fusedtx.nn.{type(new).__name__}"))
    return new


def _share(new: torch.nn.Module, module: torch.nn.Module, *names: str) -> torch.nn.Module:
    """new (built on the meta device) holding module's own parameters."""
    for name in names:
        setattr(new, name, getattr(module, name))
    return new


def _replacement(module: torch.nn.Module, backend) -> tuple[torch.nn.Module | None, str]:
    """(fusedtx layer holding module's parameters, "") or (None, why it is left; "" to say nothing)."""
    if isinstance(module, _FUSEDTX_LAYERS) or isinstance(module, _NO_REDUCTION):
        return None, ""
    t = type(module)
    if t is torch.nn.Linear:
        new = fnn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta",
                         backend=backend)
        return _share(new, module, "weight", "bias"), ""
    if t is torch.nn.LayerNorm:
        new = fnn.LayerNorm(module.normalized_shape, module.eps, module.elementwise_affine, module.bias is not None,
                            device="meta", backend=backend)
        return _share(new, module, "weight", "bias"), ""
    if t is torch.nn.RMSNorm:
        new = fnn.RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine, device="meta",
                          backend=backend)
        return _share(new, module, "weight"), ""
    if t is torch.nn.Softmax:
        return fnn.Softmax(-1 if module.dim is None else module.dim, backend=backend), ""
    if t is torch.nn.SiLU:
        return fnn.SiLU(backend=backend), ""
    if t is torch.nn.GELU:
        return fnn.GELU(module.approximate, backend=backend), ""
    if isinstance(module, _POSITION_DEPENDENT):
        return None, (f"elementwise {t.__name__}: PyTorch's CPU kernel gives an element other bits in the vector "
                      "body than in the scalar tail, so its bits may depend on the batch; fusedtx has no kernel for it")
    if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.Softmax, torch.nn.SiLU,
                           torch.nn.GELU)):
        return None, f"a subclass of torch.nn.{t.__mro__[1].__name__} with its own forward (an adapter, a quantized layer?)"
    if isinstance(module, torch.nn.MultiheadAttention):
        return None, "torch.nn.MultiheadAttention is not converted: use fusedtx.causal_attention in its place"
    params = dict(module.named_parameters(recurse=False))
    if list(module.children()):
        return _gated_ffn_by_behaviour(module, backend), ""  # None: its children are converted one by one
    if not params:
        return (_activation_by_behaviour(module, backend), "") if not list(module.buffers(recurse=False)) else (None, "")
    probed = _by_behaviour(module, params, backend)
    if probed is not None:
        return probed, ""
    shapes = ", ".join(f"{n} {list(p.shape)}" for n, p in params.items())
    return None, f"not recognised ({shapes}); if it sums or multiplies across features, its bits may depend on the batch"


def _eps(module: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon", "layer_norm_eps"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _probe_matches(module: torch.nn.Module, candidate, x: torch.Tensor) -> bool:
    """module(x) is candidate(x) within the rounding of x's dtype (where they may round in
    another order: HF's RMSNorm rounds before the weight, fusedtx's after)."""
    try:
        with torch.no_grad():
            got = module(x)
    except Exception:  # a module that cannot take a plain (rows, features) input is not one of these
        return False
    with torch.no_grad():
        want = candidate(x)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
        return False
    tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 3e-2
    return bool(torch.allclose(got.double(), want.double(), rtol=tol, atol=tol / 10))


# The activations a parameterless module may compute, and the fusedtx layer for each. The probe
# reaches |x| = 60, past any clip of a "clipped" GELU and where GELU and its tanh form part.
_ACTIVATIONS = (
    (lambda t: torch_F.silu(t), lambda backend: fnn.SiLU(backend=backend)),
    (lambda t: torch_F.gelu(t), lambda backend: fnn.GELU("none", backend=backend)),
    (lambda t: torch_F.gelu(t, approximate="tanh"), lambda backend: fnn.GELU("tanh", backend=backend)),
)


def _activation_probe() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(3, 64, generator=gen) * 3, torch.linspace(-60, 60, 64)[None]])


def _activation_by_behaviour(module: torch.nn.Module, backend) -> torch.nn.Module | None:
    """A parameterless leaf module that computes SiLU or GELU (exact or tanh): its fusedtx layer."""
    x = _activation_probe()
    for function, layer in _ACTIVATIONS:
        if _probe_matches(module, function, x):
            return layer(backend)
    return None


def _computes_silu(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.SiLU, fnn.SiLU)) or _probe_matches(module, torch_F.silu, _activation_probe())


def _by_behaviour(module: torch.nn.Module, params: dict, backend) -> torch.nn.Module | None:
    """HF's Conv1D and RMSNorm / LayerNorm variants, recognised by what they compute."""
    weight, bias = params.get("weight"), params.get("bias")
    if weight is None or weight.device.type == "meta" or not weight.is_floating_point():
        return None
    gen = torch.Generator().manual_seed(0)
    if set(params) <= {"weight", "bias"} and weight.dim() == 2 and (bias is None or bias.shape == (weight.shape[1],)):
        n_in, n_out = weight.shape
        x = torch.randn(3, n_in, generator=gen).to(weight.device, weight.dtype)
        if _probe_matches(module, lambda t: torch_F.linear(t, weight.t(), bias), x):
            new = fnn.Conv1D(n_out, n_in, bias is not None, device="meta", backend=backend)
            return _share(new, module, "weight", "bias")
        return None
    eps = _eps(module)
    if eps is None or weight.dim() != 1:
        return None
    n = weight.shape[0]
    x = torch.randn(3, n, generator=gen).to(weight.device, weight.dtype) * 3 + 0.5
    if set(params) == {"weight"} and _probe_matches(module, lambda t: torch_F.rms_norm(t, (n,), weight, eps), x):
        new = fnn.RMSNorm(n, eps, device="meta", backend=backend)
        return _share(new, module, "weight")
    if (set(params) <= {"weight", "bias"}
            and _probe_matches(module, lambda t: torch_F.layer_norm(t, (n,), weight, bias, eps), x)):
        new = fnn.LayerNorm(n, eps, bias=bias is not None, device="meta", backend=backend)
        return _share(new, module, "weight", "bias")
    return None


_GATED_FFN = ("gate_proj", "up_proj", "down_proj")


def _gated_ffn_by_behaviour(module: torch.nn.Module, backend) -> torch.nn.Module | None:
    """A module (HF's LlamaMLP and kin) whose children are plain torch.nn.Linear gate_proj, up_proj
    and down_proj, at most one parameterless activation beside them, and that computes
    down(silu(gate(x)) * up(x)): the fusedtx.nn.SwiGLUFFN holding the same Parameters (its
    children have those names, so the state_dict is unchanged). None for anything else."""
    if dict(module.named_parameters(recurse=False)) or list(module.buffers(recurse=False)):
        return None
    children = dict(module.named_children())
    if any(type(children.get(name)) is not torch.nn.Linear for name in _GATED_FFN):
        return None
    others = [m for name, m in children.items() if name not in _GATED_FFN]
    if len(others) > 1 or any(list(m.parameters()) or list(m.buffers()) or list(m.children()) for m in others):
        return None
    if others and not _computes_silu(others[0]):  # e.g. a dropout: the fused layer would drop it
        return None
    gate, up, down = (children[name] for name in _GATED_FFN)
    if any(getattr(m, hooks) for m in (gate, up, down, *others)
           for hooks in (*_FORWARD_HOOKS, "_backward_hooks", "_backward_pre_hooks")):
        return None  # a hook on a child must see that child's call
    weight = gate.weight
    if (up.weight.shape != weight.shape or down.in_features != gate.out_features
            or down.out_features != gate.in_features or len({m.bias is None for m in (gate, up, down)}) != 1
            or weight.device.type == "meta" or not weight.is_floating_point()):
        return None
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, gate.in_features, generator=gen) * 2).to(weight.device, weight.dtype)

    def swiglu(t):
        hidden = torch_F.silu(torch_F.linear(t, gate.weight, gate.bias)) * torch_F.linear(t, up.weight, up.bias)
        return torch_F.linear(hidden, down.weight, down.bias)

    if not _probe_matches(module, swiglu, x):
        return None
    new = fnn.SwiGLUFFN(gate.in_features, gate.out_features, bias=gate.bias is not None, device="meta",
                        backend=backend)
    for name, old in zip(_GATED_FFN, (gate, up, down)):
        _share(getattr(new, name), old, "weight", "bias")
    return new
