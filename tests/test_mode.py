"""fusedtx.batch_invariant_mode: a plain-PyTorch model written with torch.nn / F.* calls runs its
reductions on fusedtx kernels inside the mode (each call bitwise the fusedtx op's, forward and
backward) and is batch-invariant there; outside the mode it is not (the negative control).
strict=True names the calls it cannot serve."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedtx
from fusedtx.testing import assert_batch_invariant
from helpers import assert_bitwise_equal, make


class TinyLM(torch.nn.Module):
    """A causal LM as a user writes one in plain PyTorch: nn layers, x @ W, SDPA, F.rms_norm."""

    def __init__(self, vocab=300, d=64, heads=4):
        super().__init__()
        self.heads = heads
        self.emb = torch.nn.Embedding(vocab, d)
        self.ln = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Parameter(torch.randn(d, d) * d ** -0.5)
        self.norm_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d))
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, idx):
        b, t = idx.shape
        x = self.emb(idx)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.ln(x)).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.transpose(1, 2).reshape(b, t, -1) @ self.proj
        x = x + self.fc2(F.gelu(self.fc1(F.rms_norm(x, (x.shape[-1],), self.norm_weight))))
        return torch.softmax(self.head(x), dim=-1)


def tokens(shape, seed):
    return torch.randint(0, 300, shape, generator=torch.Generator().manual_seed(seed))


def make_model():
    torch.manual_seed(0)
    return TinyLM().eval()


def test_plain_model_is_batch_invariant_inside_the_mode():
    model = make_model()
    with fusedtx.batch_invariant_mode():
        assert_batch_invariant(model, tokens((2, 29), seed=1), extra_tokens=(0, 3, 19))


def test_negative_control_the_same_model_outside_the_mode_is_not():
    with pytest.raises(AssertionError, match="not batch-invariant"):
        assert_batch_invariant(make_model(), tokens((2, 29), seed=1), extra_tokens=(0, 3, 19))


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    return [out.detach()] + [t.grad for t in tensors]


CALLS = {
    # name: (call inside the mode, the fusedtx op it must equal, input shapes)
    "F.linear": (lambda x, w, b: F.linear(x, w, b), lambda x, w, b: fusedtx.linear(x, w, b), [(3, 5, 24), (40, 24), (40,)]),
    "x @ W": (lambda x, w: x @ w, lambda x, w: fusedtx.linear(x, w.t()), [(3, 5, 24), (24, 40)]),
    "torch.matmul": (lambda x, w: torch.matmul(x, w), lambda x, w: fusedtx.linear(x, w.t()), [(7, 24), (24, 40)]),
    "torch.mm": (lambda x, w: torch.mm(x, w), lambda x, w: fusedtx.linear(x, w.t()), [(7, 24), (24, 40)]),
    "torch.addmm": (lambda b, x, w: torch.addmm(b, x, w), lambda b, x, w: fusedtx.linear(x, w.t(), b),
                    [(40,), (7, 24), (24, 40)]),
    "F.layer_norm": (lambda x, w, b: F.layer_norm(x, (24,), w, b), lambda x, w, b: fusedtx.layer_norm(x, (24,), w, b),
                     [(6, 24), (24,), (24,)]),
    "F.rms_norm": (lambda x, w: F.rms_norm(x, (24,), w, 1e-6), lambda x, w: fusedtx.rms_norm(x, (24,), w, 1e-6),
                   [(6, 24), (24,)]),
    "torch.softmax": (lambda x: torch.softmax(x, -1), lambda x: fusedtx.softmax(x, -1), [(6, 24)]),
    "F.softmax": (lambda x: F.softmax(x, dim=1), lambda x: fusedtx.softmax(x, 1), [(6, 24, 3)]),
    "Tensor.softmax": (lambda x: x.softmax(-1), lambda x: fusedtx.softmax(x, -1), [(6, 24)]),
    "SDPA causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                    lambda q, k, v: fusedtx.causal_attention(q, k, v), [(2, 3, 9, 16)] * 3),
    "F.log_softmax": (lambda x: F.log_softmax(x, dim=-1), lambda x: fusedtx.log_softmax(x, -1), [(6, 24)]),
    "Tensor.log_softmax dtype": (lambda x: x.log_softmax(1, dtype=torch.bfloat16),
                                 lambda x: fusedtx.log_softmax(x.to(torch.bfloat16), 1), [(6, 24, 3)]),
    "F.silu": (lambda x: F.silu(x), lambda x: fusedtx.activation(x, "silu"), [(6, 37)]),
    "F.gelu": (lambda x: F.gelu(x), lambda x: fusedtx.activation(x, "gelu"), [(6, 37)]),
    "F.gelu tanh": (lambda x: F.gelu(x, approximate="tanh"), lambda x: fusedtx.activation(x, "gelu_tanh"), [(6, 37)]),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_each_served_call_is_the_fusedtx_op_forward_and_backward(name):
    inside, op, shapes = CALLS[name]
    tensors = [make(s, torch.float32, "cpu", seed=i) for i, s in enumerate(shapes)]
    with fusedtx.batch_invariant_mode(strict=True):
        got = _grads(inside, *tensors)
    want = _grads(op, *tensors)
    for g, w in zip(got, want):
        assert_bitwise_equal(g, w, name)


UNSERVED = {
    "bmm": (lambda: torch.bmm(torch.randn(2, 3, 4), torch.randn(2, 4, 5)), "bmm"),
    "matmul of batched activations": (lambda: torch.randn(2, 3, 4) @ torch.randn(2, 4, 5), "product of two batched"),
    "SDPA with a mask": (lambda: F.scaled_dot_product_attention(*[torch.randn(1, 2, 4, 8)] * 3,
                                                                attn_mask=torch.ones(4, 4, dtype=torch.bool)),
                         "attn_mask"),
    "SDPA not causal": (lambda: F.scaled_dot_product_attention(*[torch.randn(1, 2, 4, 8)] * 3), "is_causal=False"),
    "einsum": (lambda: torch.einsum("bij,bjk->bik", torch.randn(2, 3, 4), torch.randn(2, 4, 5)),
               "einsum has no fusedtx kernel"),
    "float64 linear": (lambda: F.linear(torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)),
                       "torch.float64"),
    "addmm with beta": (lambda: torch.addmm(torch.randn(5), torch.randn(3, 4), torch.randn(4, 5), beta=0.5), "beta=0.5"),
    "sigmoid on CPU": (lambda: torch.sigmoid(torch.randn(3, 37)), "sigmoid on CPU: PyTorch's kernel gives an element"),
    "silu in place": (lambda: F.silu(torch.randn(3, 37), inplace=True), "silu with inplace=True"),
}


@pytest.mark.parametrize("name", list(UNSERVED))
def test_strict_names_what_it_cannot_serve_and_lenient_runs_it_as_pytorch(name):
    call, why = UNSERVED[name]
    with fusedtx.batch_invariant_mode(strict=True):
        with pytest.raises(RuntimeError, match=f"batch_invariant_mode\\(strict=True\\): .*{why}"):
            call()
    torch.manual_seed(0)
    with fusedtx.batch_invariant_mode():
        lenient = call()
    torch.manual_seed(0)
    assert_bitwise_equal(lenient, call(), f"{name}: not PyTorch's own result")


def test_fusedtx_layers_pass_through_and_bad_arguments_are_refused():
    layer = fusedtx.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with fusedtx.batch_invariant_mode(strict=True):
        inside = layer(x)
    assert_bitwise_equal(inside, layer(x), "a fusedtx layer inside the mode")
    with pytest.raises(TypeError, match="strict must be a bool"):
        fusedtx.batch_invariant_mode(strict="yes")
