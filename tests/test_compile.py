"""torch.compile(fullgraph=True) over the public API with dynamic shapes, and over the GPT model:
every call traces into one graph (no graph break on the argument checks or on defaults such as
eps and scale=None) and gives eager's bits, forward and backward, at more than one shape.
"""
import pytest
import torch

import fusedtx
from fusedtx.models import GPT, GPTConfig

from helpers import assert_bitwise_equal, require

BACKEND = "native"


def compiled(fn, dynamic=True):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")


def assert_same_as_eager(fn, *inputs, dynamic=True):
    """fn compiled gives eager's outputs and input gradients, bit for bit."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = compiled(fn, dynamic)(*leaves)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref_leaves = [t.detach().requires_grad_() for t in inputs]
    ref = fn(*ref_leaves)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    assert_bitwise_equal(out, ref, "compiled output")
    for ours, theirs in zip(grads, ref_grads):
        assert_bitwise_equal(ours, theirs, "compiled gradient")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rows,n", [(4, 24), (7, 40)])
def test_layer_norm_default_eps_and_traced_normalized_shape(rows, n):
    require("cpu", BACKEND)
    layer = fusedtx.nn.LayerNorm(n, backend=BACKEND)
    assert_same_as_eager(lambda x: fusedtx.layer_norm(x, n, backend=BACKEND), randn(rows, n))
    assert_same_as_eager(lambda x: layer(x), randn(2, rows, n, seed=1))
    # normalized_shape read from x.shape: a SymInt when that dim is dynamic.
    x = randn(rows, n, seed=2)
    torch._dynamo.mark_dynamic(x, 1)
    assert_same_as_eager(lambda t: fusedtx.layer_norm(t, t.shape[-1], backend=BACKEND), x)


@pytest.mark.parametrize("tokens", [9, 17])
def test_causal_attention_default_scale(tokens):
    require("cpu", BACKEND)
    q, k, v = randn(3, 1, 2, tokens, 16).unbind(0)
    assert_same_as_eager(lambda a, b, c: fusedtx.causal_attention(a, b, c, split_size=16, backend=BACKEND), q, k, v)


def test_softmax_and_linear_with_dynamic_shapes():
    require("cpu", BACKEND)
    w, b = randn(12, 20, seed=3), randn(12, seed=4)
    for rows in (3, 6):
        assert_same_as_eager(lambda x: fusedtx.softmax(x, scale=0.5, causal=True, backend=BACKEND), randn(2, rows, rows))
        assert_same_as_eager(lambda x: fusedtx.linear(x, w, b, activation="gelu_tanh", backend=BACKEND), randn(rows, 20))


def test_log_softmax_with_dynamic_shapes_and_dims():
    require("cpu", BACKEND)
    for rows, cols in ((3, 17), (6, 40)):
        assert_same_as_eager(lambda x: fusedtx.log_softmax(x, backend=BACKEND), randn(2, rows, cols))
        assert_same_as_eager(lambda x: fusedtx.log_softmax(x, 1, dtype=torch.bfloat16, backend=BACKEND).float(),
                             randn(2, rows, cols))
    fn = compiled(lambda x, dim: fusedtx.log_softmax(x, dim, backend=BACKEND))
    for dim in (0, 1):
        x = randn(5, 7, seed=dim)
        assert_bitwise_equal(fn(x, dim), fusedtx.log_softmax(x, dim, backend=BACKEND), f"log_softmax dim={dim}")


def test_int_arguments_traced_as_symints():
    """dim and split_size passed into a dynamic=True compiled function arrive as SymInts (found
    by the property-based suite: they were rejected as "must be an int, got SymInt")."""
    require("cpu", BACKEND)
    fn = compiled(lambda x, dim: fusedtx.softmax(x, dim, backend=BACKEND))
    for dim in (0, 1):
        x = randn(5, 7, seed=dim)
        assert_bitwise_equal(fn(x, dim), fusedtx.softmax(x, dim, backend=BACKEND), f"softmax dim={dim}")
    q, k, v = randn(3, 1, 2, 40, 16).unbind(0)
    attend = compiled(lambda a, b, c, split: fusedtx.causal_attention(a, b, c, split_size=split, backend=BACKEND))
    for split in (16, 32):
        want = fusedtx.causal_attention(q, k, v, split_size=split, backend=BACKEND)
        assert_bitwise_equal(attend(q, k, v, split), want, f"split_size={split}")
    with pytest.raises(Exception, match="split size must be a power of two"):
        attend(q, k, v, 24)


def test_bad_scalars_still_raise_under_compile():
    """The checks that trace (comparisons, not math.isfinite) still reject what eager rejects."""
    require("cpu", BACKEND)
    x = randn(3, 8)
    with pytest.raises(Exception, match="eps must be a finite number >= 0"):
        compiled(lambda t: fusedtx.layer_norm(t, 8, eps=-1.0, backend=BACKEND))(x)
    with pytest.raises(Exception, match="scale must be a finite number"):
        compiled(lambda t: fusedtx.softmax(t, scale=float("nan"), backend=BACKEND))(x)


@pytest.mark.parametrize("dynamic", [False, True])
def test_gpt_forward_and_training_step_compile_fullgraph(dynamic):
    require("cpu", BACKEND)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32), backend=BACKEND)
    idx, targets = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9))
    step = compiled(lambda i, t: model(i, t)[1], dynamic)
    loss = step(idx, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = model(idx, targets)[1]
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert_bitwise_equal(loss, ref, "compiled loss")
    for ours, theirs in zip(grads, ref_grads):
        assert_bitwise_equal(ours, theirs, "compiled parameter gradient")
    with torch.no_grad():
        longer = torch.randint(0, 64, (3, 13))
        assert_bitwise_equal(compiled(model, dynamic)(longer), model(longer), "compiled logits, another shape")
