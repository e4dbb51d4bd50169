"""fusedtx.rope_table and fusedtx.rope on every backend: the table against HF transformers and
float64, accuracy, position and batch invariance, determinism, thread counts, reference parity,
errors, opcheck, torch.compile, gradcheck and the nn module."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fusedtx
from fusedtx import reference
from helpers import (
    DEVICE_BACKENDS,
    DTYPES,
    assert_accuracy,
    assert_bitwise_equal,
    assert_compiled_equals_eager,
    bitwise_equal,
    garbage_like,
    poisoned_outputs,
    record_bitexact,
    repeats,
    require,
    under_each_thread_count,
)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
SCALINGS = [None, LLAMA3]
SCALING_IDS = ["default", "llama3"]


def make_input(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype).to(device)


def make_positions(batch, tokens, max_positions, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, max_positions, (batch, tokens), generator=g)


def hf_rotary(head_dim, max_positions, theta, rope_scaling):
    pytest.importorskip("transformers")  # the test extra; absent where the wheel test runs these
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    # transformers 5 reads theta from the rope parameters dict (rope_theta beside it is ignored)
    parameters = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": theta}
    config = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                         max_position_embeddings=max_positions, rope_parameters=parameters)
    return LlamaRotaryEmbedding(config)


def hf_apply(x, cos_full, sin_full):
    """HF's apply_rotary_pos_emb on x alone (cos/sin (B, T, D) in x's dtype, as HF passes them)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(x, x, cos_full, sin_full)[0]


def float64_rotation(x, positions, inv_freq):
    """The exact rotation by the float32 angles (what the table rounds): cos/sin in float64."""
    angle = (positions.float()[..., None] * inv_freq).double()
    c, s = angle.cos()[:, None], angle.sin()[:, None]
    h = x.shape[-1] // 2
    x = x.double()
    return torch.cat([x[..., :h] * c - x[..., h:] * s, x[..., h:] * c + x[..., :h] * s], -1)


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope_scaling", SCALINGS, ids=SCALING_IDS)
@pytest.mark.parametrize("head_dim,theta", [(64, 10000.0), (128, 500000.0), (6, 10.0)])
def test_table_matches_hf_and_float64(rope_scaling, head_dim, theta):
    max_positions = 3000
    cos, sin = fusedtx.rope_table(head_dim, max_positions, theta, rope_scaling)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (max_positions, head_dim // 2)
    hf = hf_rotary(head_dim, max_positions, theta, rope_scaling)
    assert torch.equal(reference.rope_inv_freq(head_dim, theta, rope_scaling), hf.inv_freq), "inv_freq is not HF's"
    hf_cos, hf_sin = hf(torch.ones(1), torch.arange(max_positions)[None])
    for ours, theirs in ((cos, hf_cos[0]), (sin, hf_sin[0])):
        assert torch.equal(theirs[:, :head_dim // 2], theirs[:, head_dim // 2:])
        # within one float32 ulp of HF's float32 cos/sin (HF takes them in float32)
        ulp = torch.nextafter(ours.abs(), torch.tensor(math.inf)) - ours.abs()
        assert ((theirs[:, :head_dim // 2] - ours).abs() <= ulp).all()
    # == an independent float64 recomputation (numpy's cos/sin of the float32 angles), rounded
    angle = (torch.arange(max_positions).float()[:, None] * hf.inv_freq).numpy().astype(np.float64)
    assert torch.equal(cos, torch.from_numpy(np.cos(angle).astype(np.float32)))
    assert torch.equal(sin, torch.from_numpy(np.sin(angle).astype(np.float32)))


def test_table_moves_to_the_device_unchanged():
    cos, sin = fusedtx.rope_table(16, 50)
    meta_cos, _ = fusedtx.rope_table(16, 50, device="meta")
    assert meta_cos.device.type == "meta" and meta_cos.shape == cos.shape
    assert_bitwise_equal(fusedtx.rope_table(16, 50, device="cpu")[1], sin, "device='cpu'")


def test_table_errors():
    with pytest.raises(ValueError, match="head_dim must be even.*got 7"):
        fusedtx.rope_table(7, 10)
    with pytest.raises(ValueError, match="head_dim must be >= 2, got 0"):
        fusedtx.rope_table(0, 10)
    with pytest.raises(TypeError, match="head_dim must be an int"):
        fusedtx.rope_table(8.0, 10)
    with pytest.raises(ValueError, match="max_positions must be >= 1, got 0"):
        fusedtx.rope_table(8, 0)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="theta must be a finite number > 0"):
            fusedtx.rope_table(8, 10, bad)
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        fusedtx.rope_table(8, 10, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="rope_scaling type 'linear' is not supported"):
        fusedtx.rope_table(8, 10, rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match=r"missing \['high_freq_factor'"):
        fusedtx.rope_table(8, 10, rope_scaling={k: v for k, v in LLAMA3.items() if k != "high_freq_factor"})
    with pytest.raises(TypeError, match="rope_scaling must be a dict"):
        fusedtx.rope_table(8, 10, rope_scaling="llama3")
    default = fusedtx.rope_table(8, 10)
    assert_bitwise_equal(fusedtx.rope_table(8, 10, rope_scaling={"rope_type": "default"})[0], default[0], "default")


# ---------------------------------------------------------------------------------------------
# accuracy (contract point 1) and reference parity (point 6)
# ---------------------------------------------------------------------------------------------
SHAPES = [((2, 3, 5, 64), 100), ((1, 2, 3, 6), 8)]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_forward_backward_accuracy(device, backend, dtype):
    """Output and gradient vs float64, at most 2x HF apply_rotary_pos_emb's error in the dtype."""
    require(device, backend)
    shape, max_positions = (2, 3, 9, 64), 5000
    cos, sin = fusedtx.rope_table(64, max_positions, 500000.0, LLAMA3, device=device)
    x = make_input(shape, dtype, device).requires_grad_()
    grad = make_input(shape, dtype, device, seed=1)
    positions = make_positions(2, 9, max_positions)
    with poisoned_outputs():
        y = fusedtx.rope(x, positions.to(device), cos, sin, backend=backend)
        (dx,) = torch.autograd.grad(y, x, grad)
    hf = hf_rotary(64, max_positions, 500000.0, LLAMA3).to(device)
    x_hf = x.detach().clone().requires_grad_()
    hf_cos, hf_sin = hf(x_hf, positions.to(device))
    y_hf = hf_apply(x_hf, hf_cos, hf_sin)
    (dx_hf,) = torch.autograd.grad(y_hf, x_hf, grad)
    x64 = x.detach().double().requires_grad_()
    y64 = float64_rotation(x64, positions.to(device), hf.inv_freq)
    (dx64,) = torch.autograd.grad(y64, x64, grad.double())
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert_accuracy(y, y_hf, y64, f"{backend} forward")
    assert_accuracy(dx, dx_hf, dx64, f"{backend} backward")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["contiguous", "bthd", "strided"])
def test_bitwise_equal_to_reference(device, backend, dtype, layout):
    require(device, backend)
    if backend == "reference":
        pytest.skip("the reference is compared with itself by the determinism test")
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend computes in float32 only")
    cos, sin = fusedtx.rope_table(66, 40, device=device)
    base = make_input((2, 7, 3, 66 * 2), dtype, device)
    x = {"contiguous": base[..., :66].contiguous().transpose(1, 2).contiguous(),
         "bthd": base[..., :66].transpose(1, 2),          # (B, H, T, D) view of a (B, T, H, D) buffer
         "strided": base[..., ::2].transpose(1, 2)}[layout]  # head dim of stride 2: copied once
    dy = make_input(x.shape, dtype, device, seed=1)
    positions = make_positions(2, 7, 40).to(device)
    with poisoned_outputs():
        y = fusedtx.rope(x, positions, cos, sin, backend=backend)
        dx = torch.ops.fusedtx.rope_backward(dy, positions, cos, sin, backend)
    y_ref = reference.rope_forward(x, positions, cos, sin)
    dx_ref = reference.rope_backward(dy, positions, cos, sin)
    record_bitexact("rope", device, backend, dtype, bitwise_equal(y, y_ref) and bitwise_equal(dx, dx_ref))
    assert_bitwise_equal(y, y_ref, f"{backend} forward vs reference")
    assert_bitwise_equal(dx, dx_ref, f"{backend} backward vs reference")


def test_reference_is_hf_in_float32_with_the_same_table():
    """In float32, the spec's y[i] = x[i] c - x[i+h] s is HF's x c + rotate_half(x) s bit for bit:
    (-a) s = -(a s) and p + (-q) = p - q exactly."""
    cos, sin = fusedtx.rope_table(32, 64)
    x = make_input((2, 3, 6, 32), torch.float32, "cpu")
    positions = make_positions(2, 6, 64)
    full_cos, full_sin = torch.cat([cos, cos], -1)[positions], torch.cat([sin, sin], -1)[positions]
    assert_bitwise_equal(reference.rope_forward(x, positions, cos, sin), hf_apply(x, full_cos, full_sin), "HF")


def test_negative_control_a_fused_multiply_add_is_caught():
    """The parity comparison can fail: the same rotation with x[i] c - x[i+h] s as one fused
    multiply-add (reference.fma_f32, one rounding) differs from the spec in some bits."""
    cos, sin = fusedtx.rope_table(64, 512)
    x = make_input((2, 2, 8, 64), torch.float32, "cpu")
    positions = make_positions(2, 8, 512)
    c, s = cos[positions][:, None], sin[positions][:, None]
    x1, x2 = x[..., :32], x[..., 32:]
    fused = torch.cat([reference.fma_f32(x1, c, -(x2 * s)), reference.fma_f32(x2, c, x1 * s)], -1)
    spec = reference.rope_forward(x, positions, cos, sin)
    torch.testing.assert_close(fused, spec)  # a correct rotation...
    assert not bitwise_equal(fused, spec)  # ...rounded otherwise


def test_poisoning_reaches_kernel_outputs():
    """Control for the poisoning above: an output element no kernel wrote would read NaN."""
    with poisoned_outputs():
        assert torch.empty(2, 3, 7, 66).isnan().all()


# ---------------------------------------------------------------------------------------------
# position invariance (point 3: full pass == chunked prefill == decode) and batch invariance
# (point 2), with negative controls
# ---------------------------------------------------------------------------------------------
def fusedtx_rope(x, positions, cos, sin, backend):
    return fusedtx.rope(x, positions, cos, sin, backend=backend)


def relative_position_rope(x, positions, cos, sin, backend):
    """A rope that rotates by each token's index in the call rather than its absolute position:
    right for a full pass, wrong for a chunk or a decode step. A negative control."""
    local = torch.arange(x.shape[2], device=x.device).expand(x.shape[0], -1)
    return reference.rope_forward(x, local, cos, sin)


def left_aligned_rope(x, positions, cos, sin, backend):
    """A rope that subtracts the batch's first position (a left-padding bug): a token's rotation
    then depends on its batch neighbours. A negative control."""
    return reference.rope_forward(x, positions - positions.min(), cos, sin)


def position_failures(fn, backend, device, dtype):
    """Tokens whose bits differ between a full pass, chunks of 3 and one token at a time."""
    cos, sin = fusedtx.rope_table(16, 64, device=device)
    x = make_input((2, 2, 8, 16), dtype, device)
    positions = torch.arange(8).expand(2, 8).to(device)
    full = fn(x, positions, cos, sin, backend)
    failures = []
    for step in (3, 1):
        for start in range(0, 8, step):
            part = fn(x[:, :, start:start + step], positions[:, start:start + step], cos, sin, backend)
            if not bitwise_equal(part, full[:, :, start:start + step]):
                failures.append((step, start))
    return failures


def batch_failures(fn, backend, device, dtype):
    """Sequences whose bits change beside garbage neighbours at other positions."""
    cos, sin = fusedtx.rope_table(16, 64, device=device)
    g = torch.Generator().manual_seed(5)
    probe = make_input((1, 2, 3, 16), dtype, device)
    probe_positions = torch.tensor([[20, 21, 22]]).to(device)
    alone = fn(probe, probe_positions, cos, sin, backend)
    failures = []
    for batch in (2, 5):
        for index in (0, batch - 1):
            x = garbage_like(torch.empty((batch, 2, 3, 16), dtype=dtype), g).to(device)
            positions = torch.randint(0, 64, (batch, 3), generator=g).to(device)
            x[index], positions[index] = probe[0], probe_positions[0]
            if not bitwise_equal(fn(x, positions, cos, sin, backend)[index:index + 1], alone):
                failures.append((batch, index))
    return failures


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_position_invariance(device, backend, dtype):
    require(device, backend)
    assert position_failures(fusedtx_rope, backend, device, dtype) == []


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_batch_invariance(device, backend, dtype):
    require(device, backend)
    assert batch_failures(fusedtx_rope, backend, device, dtype) == []


def test_negative_controls_invariance():
    assert position_failures(relative_position_rope, None, "cpu", torch.float32), "missed a relative-position rope"
    assert batch_failures(left_aligned_rope, None, "cpu", torch.float32), "missed a batch-dependent rope"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_backward_batch_and_position_invariance(device, backend):
    require(device, backend)
    cos, sin = fusedtx.rope_table(16, 64, device=device)
    g = make_input((3, 2, 6, 16), torch.float32, device, seed=3)
    positions = make_positions(3, 6, 64).to(device)

    def grad_of(x, dy, pos):
        x = x.clone().requires_grad_()
        return torch.autograd.grad(fusedtx.rope(x, pos, cos, sin, backend=backend), x, dy)[0]

    x = make_input((3, 2, 6, 16), torch.float32, device)
    full = grad_of(x, g, positions)
    assert_bitwise_equal(grad_of(x[1:2, :, 2:4], g[1:2, :, 2:4], positions[1:2, 2:4]), full[1:2, :, 2:4], "dx alone")


# ---------------------------------------------------------------------------------------------
# determinism and thread counts (point 5)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_run_to_run_determinism(device, backend):
    require(device, backend)
    cos, sin = fusedtx.rope_table(64, 512, device=device)
    batch, tokens = (1, 2) if backend == "triton" and device == "cpu" else (2, 16)  # interpreter: a program a token
    x = make_input((batch, 4, tokens, 64), torch.bfloat16, device).requires_grad_()
    dy = make_input(x.shape, torch.bfloat16, device, seed=2)
    positions = make_positions(batch, tokens, 512).to(device)
    first = None
    for _ in range(repeats(device, backend)):
        y = fusedtx.rope(x, positions, cos, sin, backend=backend)
        out = torch.cat([y.detach(), torch.autograd.grad(y, x, dy)[0]])
        if first is None:
            first = out
        assert_bitwise_equal(out, first, "forward and backward, repeated")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_native_thread_count_invariance(dtype):
    require("cpu", "native")
    cos, sin = fusedtx.rope_table(128, 4096)
    x = make_input((2, 8, 257, 128), dtype, "cpu").requires_grad_()
    dy = make_input(x.shape, dtype, "cpu", seed=1)
    positions = make_positions(2, 257, 4096)

    def run():
        y = fusedtx.rope(x, positions, cos, sin, backend="native")
        return torch.cat([y.detach(), torch.autograd.grad(y, x, dy)[0]])

    outs = under_each_thread_count(run)
    for out in outs[1:]:
        assert_bitwise_equal(out, outs[0], "1 vs 2 vs 3 threads")


def test_negative_control_thread_count():
    """The same thread check flags a result whose sum torch splits between threads."""
    x = make_input((1, 4_000_000), torch.float32, "cpu")
    outs = under_each_thread_count(lambda: x.sum(-1))
    assert any(not bitwise_equal(o, outs[0]) for o in outs[1:]), "thread check failed to flag torch.sum"


# ---------------------------------------------------------------------------------------------
# errors (point 7)
# ---------------------------------------------------------------------------------------------
def test_bad_input_errors():
    cos, sin = fusedtx.rope_table(8, 16)
    x, positions = torch.randn(2, 3, 4, 8), torch.arange(4).expand(2, 4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fusedtx.rope([1.0], positions, cos, sin)
    with pytest.raises(TypeError, match="x must be float32, bfloat16, float16 or float64, got torch.int64"):
        fusedtx.rope(x.long(), positions, cos, sin)
    with pytest.raises(ValueError, match=r"x must be 4-D .*got shape \[3, 4, 8\]"):
        fusedtx.rope(x[0], positions, cos, sin)
    with pytest.raises(ValueError, match="head_dim must be even and >= 2.*got 7"):
        fusedtx.rope(x[..., :7], positions, cos, sin)
    with pytest.raises(TypeError, match="positions must be an int64 tensor, got torch.int32"):
        fusedtx.rope(x, positions.int(), cos, sin)
    with pytest.raises(TypeError, match="positions must be an int64 tensor, got torch.float32"):
        fusedtx.rope(x, positions.float(), cos, sin)
    with pytest.raises(ValueError, match=r"positions must have shape \[batch=2, tokens=4\].*got \[2, 3\]"):
        fusedtx.rope(x, positions[:, :3], cos, sin)
    with pytest.raises(ValueError, match=r"positions must have shape .*got \[4\]"):
        fusedtx.rope(x, positions[0], cos, sin)
    with pytest.raises(TypeError, match="cos must be float32.*torch.float64"):
        fusedtx.rope(x, positions, cos.double(), sin)
    with pytest.raises(ValueError, match=r"sin must have shape \[max_positions, head_dim / 2 = 4\], got \[16, 3\]"):
        fusedtx.rope(x, positions, cos, sin[:, :3])
    with pytest.raises(ValueError, match="cos and sin must have one shape"):
        fusedtx.rope(x, positions, cos, sin[:8])
    with pytest.raises(ValueError, match="cos requires grad"):
        fusedtx.rope(x, positions, cos.clone().requires_grad_(), sin)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 15\].*from 13 to 16"):
        fusedtx.rope(x, positions + 13, cos, sin)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 15\].*from -1 to 2"):
        fusedtx.rope(x, positions - 1, cos, sin)
    long_x, long_positions = torch.randn(2, 1, 40, 8), torch.arange(40).expand(2, 40)  # 80 positions: one reduction
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 15\].*from 0 to 39"):
        fusedtx.rope(long_x, long_positions, cos, sin)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 15\].*from -3 to 2"):
        fusedtx.rope(long_x, long_positions % 6 - 3, cos, sin)
    with pytest.raises(ValueError, match="backend.*'cuda'"):
        fusedtx.rope(x, positions, cos, sin, backend="cuda")
    with pytest.raises(TypeError, match="triton backend .* float64"):
        fusedtx.rope(x.double(), positions, cos, sin, backend="triton")
    with pytest.raises(ValueError, match="cos is on meta but x is on cpu"):
        fusedtx.rope(x, positions, cos.to("meta"), sin)


@pytest.mark.parametrize("backend", ["native", "reference", "triton"])
def test_kernels_never_read_outside_the_table(backend):
    """Called directly, past the op's check, a position outside the table gives a NaN row and
    reads nothing (the native kernel is also run by the emulator tests with such positions)."""
    require("cpu", backend)
    from fusedtx.ops.rope import forward_kernel

    cos, sin = fusedtx.rope_table(8, 16)
    x = make_input((1, 2, 4, 8), torch.float32, "cpu")
    positions = torch.tensor([[3, -1, 16, 1 << 40]])
    y = forward_kernel(backend, x.device)(x, positions, cos, sin)
    assert y[:, :, 1:].isnan().all() and not y[:, :, 0].isnan().any()
    assert_bitwise_equal(y[:, :, :1], reference.rope_forward(x[:, :, :1], positions[:, :1], cos, sin), "valid row")


# ---------------------------------------------------------------------------------------------
# torch.library integration, autograd, module
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    require(device, backend)
    cos, sin = fusedtx.rope_table(8, 16, device=device)
    x = make_input((2, 3, 2, 8), torch.float32, device).requires_grad_()
    positions = make_positions(2, 2, 16).to(device)
    torch.library.opcheck(torch.ops.fusedtx.rope.default, (x, positions, cos, sin, backend))
    torch.library.opcheck(torch.ops.fusedtx.rope_backward.default, (x.detach(), positions, cos, sin, backend))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    require(device, backend)
    torch._dynamo.reset()
    cos, sin = fusedtx.rope_table(8, 16, device=device)
    positions = make_positions(2, 4, 16).to(device)

    def f(x):
        return fusedtx.rope(x * 2.0, positions, cos, sin, backend=backend).square().sum()

    assert_compiled_equals_eager(f, make_input((2, 3, 4, 8), torch.float32, device))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_eager_path_equals_registered_op(backend):
    require("cpu", backend)
    cos, sin = fusedtx.rope_table(8, 16)
    x = make_input((2, 3, 4, 8), torch.bfloat16, "cpu").requires_grad_()
    dy = make_input(x.shape, torch.bfloat16, "cpu", seed=1)
    positions = make_positions(2, 4, 16)
    y = fusedtx.rope(x, positions, cos, sin, backend=backend)
    y_op = torch.ops.fusedtx.rope(x, positions, cos, sin, backend)
    assert_bitwise_equal(y, y_op, "eager vs registered forward")
    assert_bitwise_equal(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(y_op, x, dy)[0], "backward")


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_gradcheck_float64(backend):
    require("cpu", backend)
    cos, sin = fusedtx.rope_table(6, 10)
    x = make_input((2, 2, 3, 6), torch.float64, "cpu").requires_grad_()
    positions = make_positions(2, 3, 10)
    assert torch.autograd.gradcheck(lambda t: fusedtx.rope(t, positions, cos, sin, backend=backend), (x,))


def test_empty_inputs():
    cos, sin = fusedtx.rope_table(8, 16)
    for shape in ((0, 2, 3, 8), (2, 0, 3, 8), (2, 2, 0, 8)):
        x = torch.randn(shape, requires_grad=True)
        y = fusedtx.rope(x, torch.zeros(shape[0], shape[2], dtype=torch.int64), cos, sin)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape


def test_module():
    m = fusedtx.nn.RotaryEmbedding(16, 64, 500000.0, LLAMA3)
    cos, sin = fusedtx.rope_table(16, 64, 500000.0, LLAMA3)
    assert_bitwise_equal(m.cos, cos, "buffer cos")
    assert m.state_dict() == {} and "llama3" in repr(m)
    q, k = make_input((2, 4, 5, 16), torch.float32, "cpu"), make_input((2, 2, 5, 16), torch.float32, "cpu", seed=1)
    positions = make_positions(2, 5, 64)
    q_rot, k_rot = m(q, k, positions)
    assert_bitwise_equal(q_rot, fusedtx.rope(q, positions, cos, sin), "q")
    assert_bitwise_equal(k_rot, fusedtx.rope(k, positions, cos, sin), "k")
    m.to(torch.bfloat16)  # the table stays float32, the same bits
    assert_bitwise_equal(m.sin, sin, "after .to(bfloat16)")
    assert_bitwise_equal(m(q.bfloat16(), k.bfloat16(), positions)[0], fusedtx.rope(q.bfloat16(), positions, cos, sin), "bf16")
