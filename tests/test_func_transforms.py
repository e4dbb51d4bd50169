"""torch.func over every op: grad, vjp, jacrev and vmap give the bits of plain autograd and of
per-sample calls; forward-mode AD and second derivatives raise a clear error instead of a silently
wrong (zero) answer.
"""
import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fusedtx

from helpers import assert_bitwise_equal, require

BACKENDS = ["native", "reference"]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


W, B = randn(6, 8, seed=1), randn(6, seed=2)
ROPE_TABLE, ROPE_POSITIONS = fusedtx.rope_table(8, 16), torch.tensor([[3, 15, 0, 7, 7]])
OPS = {
    "softmax": (lambda t, be: fusedtx.softmax(t, scale=0.7, causal=True, backend=be), (3, 5, 5)),
    "log_softmax": (lambda t, be: fusedtx.log_softmax(t, 1, backend=be), (3, 4, 8)),
    "layer_norm": (lambda t, be: fusedtx.layer_norm(t, 8, backend=be), (3, 4, 8)),
    "linear": (lambda t, be: fusedtx.linear(t, W, B, activation="gelu", backend=be), (3, 4, 8)),
    "causal_attention": (lambda t, be: fusedtx.causal_attention(t, t * 0.5, t, split_size=16, backend=be),
                         (3, 2, 5, 8)),
    "rope": (lambda t, be: fusedtx.rope(t, ROPE_POSITIONS, *ROPE_TABLE, backend=be), (1, 2, 5, 8)),
}


def autograd_vjp(fn, x, cotangent):
    leaf = x.clone().requires_grad_()
    fn(leaf).backward(cotangent)
    return leaf.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_grad_vjp_and_jacrev_equal_autograd(op, backend):
    require("cpu", backend)
    fn, shape = OPS[op]
    f = lambda t: fn(t, backend)  # noqa: E731
    x = randn(*shape, seed=3)
    cotangent = randn(*f(x).shape, seed=4)
    out, pullback = vjp(f, x)
    assert_bitwise_equal(out, f(x), "vjp's output")
    assert_bitwise_equal(pullback(cotangent)[0], autograd_vjp(f, x, cotangent), "vjp")
    assert_bitwise_equal(grad(lambda t: (f(t) * cotangent).sum())(x), autograd_vjp(f, x, cotangent), "grad")
    x1 = x[:1]  # a small Jacobian: one row of the (size x size) matrix per output element
    jac = jacrev(f)(x1)
    expected = torch.autograd.functional.jacobian(f, x1)
    assert_bitwise_equal(jac, expected, "jacrev")


@pytest.mark.parametrize("op", OPS)
def test_vmap_is_per_sample_calls(op):
    require("cpu", "native")
    fn, shape = OPS[op]
    xs = randn(4, *shape, seed=5)
    batched = vmap(lambda t: fn(t, "native"))(xs)
    for i in range(xs.shape[0]):
        assert_bitwise_equal(batched[i], fn(xs[i], "native"), f"vmap sample {i}")


def test_per_sample_gradients_of_a_module():
    """The classic torch.func recipe: vmap(grad(loss)) over functional_call of a fusedtx layer
    gives each sample the gradient its own backward gives."""
    require("cpu", "native")
    model = torch.nn.Sequential(fusedtx.nn.Linear(8, 16, backend="native"), fusedtx.nn.LayerNorm(16, backend="native"),
                                fusedtx.nn.Linear(16, 3, backend="native"))
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs, ys = randn(5, 8, seed=6), randn(5, 3, seed=7)

    def loss(p, x, y):
        return (functional_call(model, p, (x[None],))[0] - y).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    for i in range(xs.shape[0]):
        model.zero_grad()
        (model(xs[i:i + 1])[0] - ys[i]).square().sum().backward()
        for name, p in model.named_parameters():
            assert_bitwise_equal(per_sample[name][i], p.grad, f"sample {i}, {name}")


def test_forward_mode_and_second_derivatives_raise_clearly():
    require("cpu", "native")
    x = randn(3, 8, seed=8)
    f = lambda t: fusedtx.layer_norm(t, 8, backend="native")  # noqa: E731
    for transform in (lambda: jvp(f, (x,), (torch.ones_like(x),)), lambda: jacfwd(f)(x),
                      lambda: hessian(lambda t: f(t).square().sum())(x)):
        with pytest.raises(NotImplementedError, match="fusedtx::layer_norm: forward-mode AD .* is not supported"):
            transform()
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        f(forward_ad.make_dual(x, torch.ones_like(x)))
    with pytest.raises(RuntimeError, match="layer_norm_backward has no derivative"):
        grad(lambda t: grad(lambda u: f(u).square().sum())(t).sum())(x)
