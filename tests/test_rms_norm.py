"""What fusedtx.rms_norm has alone: its bfloat16 accuracy against HF's LlamaRMSNorm and torch's,
and torch's default eps. What it shares with layer_norm (accuracy of the output and of every
gradient, gradcheck, batch invariance, determinism, thread-count invariance, reference parity,
the drop-in test, errors, opcheck and torch.compile): tests/test_row_norm.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedtx
from helpers import DEVICE_BACKENDS, make, rel_error, require
from row_norm_helpers import make_params, RMS_NORM


def llama_rms_norm(x, weight, eps):
    """HF transformers' LlamaRMSNorm.forward: the normalised x is rounded to x's dtype before the
    weight multiply (fusedtx rounds once, after it)."""
    xf = x.float()
    hidden = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=["bf16-weight", "f32-weight"])
def test_bf16_accuracy_against_hf_llama_and_torch(device, backend, w_dtype):
    """In bfloat16 the one rounding at the end is no worse than 2x the error of HF's two roundings
    (their output: HF's promotes to float32 beside a float32 weight) nor of torch's."""
    require(device, backend)
    x = make((16, 512), torch.bfloat16, device, seed=4, scale=3.0, shift=0.0)
    (w,) = make_params(RMS_NORM, (512,), "weight", w_dtype, device)
    exact = F.rms_norm(x.double(), (512,), w.double(), 1e-6)
    ours = rel_error(fusedtx.rms_norm(x, 512, w, 1e-6, backend=backend), exact)
    for name, theirs in (("HF", llama_rms_norm(x, w, 1e-6)), ("torch", F.rms_norm(x, (512,), w, 1e-6))):
        assert ours <= 2 * rel_error(theirs, exact), f"{backend}: error {ours:.3e} vs {name}'s {rel_error(theirs, exact):.3e}"


def test_eps_default_is_torch_default():
    """eps None: torch.rms_norm takes the epsilon of the compute dtype (float32's for bfloat16 x,
    not bfloat16's 2**-7), which matters for rows of small magnitude."""
    x = torch.full((2, 8), 1e-4, dtype=torch.bfloat16)
    torch.testing.assert_close(fusedtx.rms_norm(x, 8), F.rms_norm(x, (8,)), rtol=0, atol=0)
    x64 = torch.full((2, 8), 1e-9, dtype=torch.float64)
    torch.testing.assert_close(fusedtx.rms_norm(x64, 8), F.rms_norm(x64, (8,)))
