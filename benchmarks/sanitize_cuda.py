"""A small run of every native CUDA kernel, forward and backward, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 9 python benchmarks/sanitize_cuda.py

Shapes are small (the sanitizer slows kernels down by orders of magnitude) but cover the edges:
short and wide rows, a row count that is not a tile multiple, causal masks, grouped KV heads, a
decode step against a cache longer than the sequences in it. gpu_check.sh runs it.
"""
import sys

import torch

import fusedtx


def main(dev: str = "cuda") -> None:
    """dev "cpu" runs the same calls on the native CPU kernels (a check of this script itself)."""
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sanitize_cuda.py needs a CUDA GPU (or pass cpu to check the script)")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape, causal in (((5, 3, 1000), False), ((2, 37, 64), True), ((3, 9000), False)):
            x = torch.randn(shape, device=dev, dtype=dtype, requires_grad=True)
            y = fusedtx.softmax(x, scale=0.5, causal=causal, backend="native")
            y.backward(torch.randn_like(y))
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for rows, n in ((5, 7), (300, 768), (3, 20000)):
            x = torch.randn(rows, n, device=dev, dtype=dtype, requires_grad=True)
            w = torch.randn(n, device=dev, dtype=dtype, requires_grad=True)
            b = torch.randn(n, device=dev, dtype=dtype, requires_grad=True)
            y = fusedtx.layer_norm(x, n, w, b, backend="native")
            y.backward(torch.randn_like(y))
            w_rms = (w.detach().float() if dtype == torch.bfloat16 else w.detach()).requires_grad_()  # HF's mix too
            y = fusedtx.rms_norm(x, n, w_rms, backend="native")
            y.backward(torch.randn_like(y))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for m, k, n, act in ((1, 7, 5, "gelu"), (130, 300, 129, "gelu_tanh"), (3, 768, 4099, None)):
            x = torch.randn(m, k, device=dev, dtype=dtype, requires_grad=True)
            w = torch.randn(n, k, device=dev, dtype=dtype, requires_grad=True)
            b = torch.randn(n, device=dev, dtype=dtype, requires_grad=True)
            y = fusedtx.linear(x, w, b, activation=act, backend="native")
            y.backward(torch.randn_like(y))
    for dtype in (torch.float32, torch.bfloat16):
        for b, h, hkv, t, d in ((1, 2, 1, 37, 64), (2, 4, 4, 5, 128), (1, 2, 2, 70, 16)):
            q = torch.randn(b, h, t, d, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(b, hkv, t, d, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(b, hkv, t, d, device=dev, dtype=dtype, requires_grad=True)
            o = fusedtx.causal_attention(q, k, v, split_size=32, backend="native")
            o.backward(torch.randn_like(o))
            # one decode step against a cache holding more slots than the sequences use
            cache_k = torch.randn(b, hkv, t + 9, d, device=dev, dtype=dtype)
            cache_v = torch.randn(b, hkv, t + 9, d, device=dev, dtype=dtype)
            lengths = torch.tensor([t - i for i in range(b)], device=dev)
            fusedtx.attention_with_kv_cache(q[:, :, -1:].detach(), cache_k, cache_v, lengths, split_size=32,
                                            backend="native")
    if dev == "cuda":
        torch.cuda.synchronize()
    print("sanitizer run finished")


if __name__ == "__main__":
    main(*sys.argv[1:2])
