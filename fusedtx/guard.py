"""fusedtx.guard: which reductions in my model still run outside fusedtx, and in which module?

    with fusedtx.guard(model) as g:          # mode="warn" (default): a warning listing them at exit
        model(idx).logits.sum().backward()
    print(g)                                 # each reduction: ATen op, module path, calls
    with fusedtx.guard(model, mode="raise"):
        model(idx)                           # RuntimeError at the first one, naming op and module

A TorchDispatchMode: it sees every ATen operator that runs, forward and backward, below
torch.autograd. A floating-point reduction there — a matmul, a sum or mean, a norm, a softmax,
an attention kernel, a convolution, a cumulative sum — is where bits can come to depend on the
batch (a kernel chosen by the batch's shape, a reduction split across threads); fusedtx's own
kernels are not ATen operators, so a converted model records none. Exact ones are skipped:
integer and boolean reductions, max / min / argmax, and matmuls whose contraction has length 1
(one product per element, e.g. HF's rotary angles). On CPU it also records the elementwise
activations whose PyTorch kernels give an element other bits in their vector body than in
their scalar tail (silu, gelu, sigmoid, softplus, mish, elu, exp2 and their backwards): which
elements take the tail depends on the tensor's size, so on the batch. Forward calls are attributed to the module
path running them (forward hooks); the backward's to "(backward)".
"""
from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ATen reductions (forward and backward) whose floating-point result depends on the order of
# their sums. Named as strings: an op this PyTorch lacks is skipped.
_REDUCTION_NAMES = (
    "mm", "addmm", "bmm", "baddbmm", "matmul", "dot", "mv", "addmv", "linear", "sum", "mean", "var", "std",
    "var_mean", "std_mean", "norm", "linalg_vector_norm", "prod", "cumsum", "cumprod", "logsumexp", "_softmax",
    "_log_softmax", "native_layer_norm", "native_batch_norm", "native_group_norm", "_fused_rms_norm", "convolution",
    "nll_loss_forward", "nll_loss2d_forward", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
    "native_layer_norm_backward", "_softmax_backward_data", "_log_softmax_backward_data", "convolution_backward",
    "native_batch_norm_backward", "native_group_norm_backward", "_fused_rms_norm_backward",
    "embedding_dense_backward", "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
)
_REDUCTIONS = {getattr(aten, name) for name in _REDUCTION_NAMES if hasattr(aten, name)}
# Elementwise ops whose CPU kernels are not position invariant: their vector body and scalar
# tail compute an element with different operations, so its last bit depends on where it sits.
_POSITION_DEPENDENT_NAMES = ("silu", "silu_backward", "gelu", "gelu_backward", "sigmoid", "sigmoid_backward",
                             "softplus", "softplus_backward", "mish", "mish_backward", "elu", "elu_backward", "exp2")
_POSITION_DEPENDENT = {getattr(aten, name) for name in _POSITION_DEPENDENT_NAMES if hasattr(aten, name)}
# Matmuls: the argument whose last dim is the contraction (length 1: one product per element, exact).
_MATMUL_FIRST = {aten.mm: 0, aten.addmm: 1, aten.bmm: 0, aten.baddbmm: 1, aten.matmul: 0, aten.mv: 0, aten.addmv: 1}


def _is_reduction(func, args) -> bool:
    """A floating-point reduction, or (on CPU) a position-dependent elementwise op."""
    packet = getattr(func, "overloadpacket", None)
    if packet in _POSITION_DEPENDENT:
        return any(isinstance(a, torch.Tensor) and a.is_floating_point() and a.device.type == "cpu" for a in args)
    if packet not in _REDUCTIONS:
        return False
    if not any(isinstance(a, torch.Tensor) and a.is_floating_point() for a in args):
        return False  # integer and boolean sums are exact
    i = _MATMUL_FIRST.get(packet)
    if i is not None and len(args) > i and isinstance(args[i], torch.Tensor) and args[i].shape[-1:] == (1,):
        return False
    return True


class Guard(TorchDispatchMode):
    """See the module docstring. records: Counter of (ATen op, module path) -> calls."""

    def __init__(self, model: torch.nn.Module | None = None, mode: str = "warn"):
        super().__init__()
        if mode not in ("warn", "raise"):
            raise ValueError(f"guard: mode must be 'warn' or 'raise', got {mode!r}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"guard: model must be a torch.nn.Module or None, got {type(model).__name__}")
        self.mode = mode
        self.records: Counter = Counter()
        self._stack: list[str] = []
        self._names = {id(m): n for n, m in model.named_modules()} if model is not None else {}
        self._hooks = []

    def _path(self) -> str:
        if torch._C._current_graph_task_id() != -1:
            return "(backward)"
        return self._stack[-1] if self._stack else "(outside any module)"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_reduction(func, args):
            where = self._path()
            if self.mode == "raise":
                raise RuntimeError(f"fusedtx.guard: {func} ran outside fusedtx in {where}: an op whose bits may "
                                   "depend on the batch (convert the module: fusedtx.convert)")
            self.records[(str(func.overloadpacket), where)] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        def pre(module, args):
            self._stack.append(self._names.get(id(module), type(module).__name__))

        def post(module, args, out):
            if self._stack:
                self._stack.pop()

        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
                       torch.nn.modules.module.register_module_forward_hook(post)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        result = super().__exit__(*exc)
        if self.mode == "warn" and self.records and exc[0] is None:
            warnings.warn(f"fusedtx.guard: {sum(self.records.values())} reduction(s) ran outside fusedtx:\n{self}",
                          stacklevel=2)
        return result

    def __str__(self) -> str:
        if not self.records:
            return "fusedtx.guard: no reduction ran outside fusedtx"
        width = max(len(op) for op, _ in self.records)
        return "\n".join(f"  {op:<{width}}  {where}  x{n}" for (op, where), n in sorted(self.records.items()))


def guard(model: torch.nn.Module | None = None, mode: str = "warn") -> Guard:
    """The context manager (see the module docstring). model: names the module paths."""
    return Guard(model, mode)
