"""Output hashes of every op x backend x dtype: proof that a change kept every output bit.

    python tests/output_hashes.py --write tests/output_hashes.json   # record the table
    python tests/output_hashes.py --check tests/output_hashes.json   # compare with it (exit 1 on a change)
    python tests/output_hashes.py --write tests/output_hashes.json --ops log_softmax   # one op's rows, merged in

Each row hashes the raw bits (shape, dtype and bit pattern) of one output or gradient of the
public API on inputs that are exact binary fractions drawn from integers (the same values on any
host, unlike torch.randn's vectorised paths). The native and reference rows are the same bits on
every x86-64 host (the kernels use only correctly rounded operations in a fixed order), and
tests/test_output_hashes.py checks them against the committed table. The Triton interpreter's
tl.dot goes through numpy's BLAS, whose order depends on the host: its rows (and float64
linear, which calls torch's float64 matmul) are compared only by --check, on one host, before
and after a change.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import fusedtx  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def exact_values(shape, seed: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Integers / 2**10 in about [-4, 4) x scale: exact in every dtype's conversion, host-independent."""
    g = torch.Generator().manual_seed(seed)
    ints = torch.randint(-4096, 4096, shape, generator=g, dtype=torch.int64)
    return (ints.double() / 1024.0 * scale).to(dtype)


def digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    h = hashlib.sha256(f"{list(t.shape)}|{t.dtype}|".encode())
    h.update(t.view(int_type).numpy().tobytes())
    return h.hexdigest()[:16]


def portable(op: str, backend: str, dtype: str) -> bool:
    """Rows whose bits do not depend on the host (see the module docstring). The model's gradients
    are not: they start from torch's own cross_entropy backward, whose vectorised exp differs
    between ATen's CPU capabilities (AVX2 vs AVX-512 hosts give other bits); the model's outputs
    are fusedtx's alone."""
    if op.startswith("gpt/grad_"):
        return False
    return backend in ("native", "reference") and not (op.startswith(("linear", "swiglu_ffn")) and dtype == "float64")


def _grads(out, inputs, seed):
    upstream = exact_values(out.shape, seed, out.dtype)
    return torch.autograd.grad(out, [t for t in inputs if t is not None], upstream, allow_unused=True)


def activation_rows(backend, dtype):
    for kind in ("silu", "gelu", "gelu_tanh"):
        x = exact_values((3, 5, 37), 1, dtype, 4.0)
        with torch.no_grad():
            yield f"activation/{kind}/forward", fusedtx.activation(x, kind, backend=backend)
        x.requires_grad_(True)
        (dx,) = _grads(fusedtx.activation(x, kind, backend=backend), [x], 2)
        yield f"activation/{kind}/dx", dx


def softmax_rows(backend, dtype):
    cases = {
        "plain": dict(shape=(3, 5, 37), dim=-1, scale=None, causal=False),
        "scaled_dim0": dict(shape=(19, 6), dim=0, scale=0.3, causal=False),
        "causal": dict(shape=(2, 3, 9, 21), dim=-1, scale=0.125, causal=True),
        "long_row": dict(shape=(2, 700), dim=-1, scale=0.7, causal=False),
    }
    for name, c in cases.items():
        x = exact_values(c["shape"], 1, dtype, 2.0)
        with torch.no_grad():
            yield f"softmax/{name}/forward", fusedtx.softmax(x, c["dim"], scale=c["scale"], causal=c["causal"],
                                                             backend=backend)
        x.requires_grad_(True)
        y = fusedtx.softmax(x, c["dim"], scale=c["scale"], causal=c["causal"], backend=backend)
        yield f"softmax/{name}/forward_grad_mode", y
        (dx,) = _grads(y, [x], 2)
        yield f"softmax/{name}/dx", dx


def log_softmax_rows(backend, dtype):
    cases = {"plain": ((3, 5, 37), -1), "dim0": ((19, 6), 0), "long_row": ((2, 700), -1)}
    for name, (shape, dim) in cases.items():
        x = exact_values(shape, 31, dtype, 2.0)
        with torch.no_grad():
            yield f"log_softmax/{name}/forward", fusedtx.log_softmax(x, dim, backend=backend)
        x.requires_grad_(True)
        y = fusedtx.log_softmax(x, dim, backend=backend)
        yield f"log_softmax/{name}/forward_grad_mode", y
        yield f"log_softmax/{name}/dx", _grads(y, [x], 32)[0]


def layer_norm_rows(backend, dtype):
    param_dtypes = [dtype] + ([torch.float32] if dtype in (torch.bfloat16, torch.float16) else [])
    for shape, norm in (((4, 3, 48), (48,)), ((5, 200), (200,)), ((3, 4, 6), (4, 6))):
        for pdt in param_dtypes:
            tag = f"{'x'.join(map(str, shape))}/params_{str(pdt).replace('torch.', '')}"
            x = exact_values(shape, 3, dtype, 3.0)
            w = exact_values(norm, 4, pdt).requires_grad_(True)
            b = exact_values(norm, 5, pdt).requires_grad_(True)
            with torch.no_grad():
                yield f"layer_norm/{tag}/forward", fusedtx.layer_norm(x, norm, w, b, 1e-5, backend=backend)
            x.requires_grad_(True)
            y = fusedtx.layer_norm(x, norm, w, b, 1e-5, backend=backend)
            yield f"layer_norm/{tag}/forward_grad_mode", y
            dx, dw, db = _grads(y, [x, w, b], 6)
            yield f"layer_norm/{tag}/dx", dx
            yield f"layer_norm/{tag}/dweight", dw
            yield f"layer_norm/{tag}/dbias", db
    x = exact_values((6, 40), 7, dtype).requires_grad_(True)
    y = fusedtx.layer_norm(x, (40,), None, None, 1e-3, backend=backend)
    yield "layer_norm/6x40/no_params/forward_grad_mode", y
    yield "layer_norm/6x40/no_params/dx", _grads(y, [x], 8)[0]


def rms_norm_rows(backend, dtype):
    weight_dtypes = [dtype] + ([torch.float32] if dtype in (torch.bfloat16, torch.float16) else [])
    for shape, norm in (((4, 3, 48), (48,)), ((5, 200), (200,)), ((3, 4, 6), (4, 6))):
        for wdt in weight_dtypes:
            tag = f"{'x'.join(map(str, shape))}/weight_{str(wdt).replace('torch.', '')}"
            x = exact_values(shape, 21, dtype, 3.0)
            w = exact_values(norm, 22, wdt).requires_grad_(True)
            with torch.no_grad():
                yield f"rms_norm/{tag}/forward", fusedtx.rms_norm(x, norm, w, 1e-5, backend=backend)
            x.requires_grad_(True)
            y = fusedtx.rms_norm(x, norm, w, 1e-5, backend=backend)
            yield f"rms_norm/{tag}/forward_grad_mode", y
            dx, dw = _grads(y, [x, w], 23)
            yield f"rms_norm/{tag}/dx", dx
            yield f"rms_norm/{tag}/dweight", dw
    x = exact_values((6, 40), 24, dtype).requires_grad_(True)
    y = fusedtx.rms_norm(x, (40,), backend=backend)  # eps None: torch's default
    yield "rms_norm/6x40/no_weight/forward_grad_mode", y
    yield "rms_norm/6x40/no_weight/dx", _grads(y, [x], 25)[0]


def linear_rows(backend, dtype):
    for act in (None, "gelu", "gelu_tanh"):
        for shape, k, n in (((7, 33), 33, 20), ((2, 3, 150), 150, 44)):
            tag = f"{act or 'none'}/{'x'.join(map(str, shape))}to{n}"
            x = exact_values(shape, 9, dtype, 0.5)
            w = exact_values((n, k), 10, dtype, 0.25).requires_grad_(True)
            b = exact_values((n,), 11, dtype).requires_grad_(True)
            with torch.no_grad():
                yield f"linear/{tag}/forward", fusedtx.linear(x, w, b, activation=act, backend=backend)
            x.requires_grad_(True)
            y = fusedtx.linear(x, w, b, activation=act, backend=backend)
            yield f"linear/{tag}/forward_grad_mode", y
            dx, dw, db = _grads(y, [x, w, b], 12)
            yield f"linear/{tag}/dx", dx
            yield f"linear/{tag}/dweight", dw
            yield f"linear/{tag}/dbias", db
    x = exact_values((5, 24), 13, dtype, 0.5).requires_grad_(True)
    w = exact_values((16, 24), 14, dtype, 0.25).requires_grad_(True)
    y = fusedtx.linear(x, w, None, backend=backend)
    yield "linear/nobias/5x24to16/forward_grad_mode", y
    dx, dw = _grads(y, [x, w], 15)
    yield "linear/nobias/5x24to16/dx", dx
    yield "linear/nobias/5x24to16/dweight", dw


def swiglu_rows(backend, dtype):
    for shape, d, hidden, bias in (((7, 33), 33, 20, False), ((2, 3, 150), 150, 44, True)):
        tag = f"{'bias' if bias else 'nobias'}/{'x'.join(map(str, shape))}h{hidden}"
        x = exact_values(shape, 21, dtype, 0.5)
        weights = [exact_values(s, 22 + i, dtype, 0.25).requires_grad_(True)
                   for i, s in enumerate(((hidden, d), (hidden, d), (d, hidden)))]
        biases = [exact_values((n,), 25 + i, dtype).requires_grad_(True) if bias else None
                  for i, n in enumerate((hidden, hidden, d))]

        def run(x):
            return fusedtx.swiglu_ffn(x, *weights, gate_bias=biases[0], up_bias=biases[1], down_bias=biases[2],
                                      backend=backend)

        with torch.no_grad():
            yield f"swiglu_ffn/{tag}/forward", run(x)
        x.requires_grad_(True)
        y = run(x)
        yield f"swiglu_ffn/{tag}/forward_grad_mode", y
        names = ["dx", "dgate", "dup", "ddown"] + (["dgate_bias", "dup_bias", "ddown_bias"] if bias else [])
        for name, grad in zip(names, _grads(y, [x, *weights, *biases], 28)):
            yield f"swiglu_ffn/{tag}/{name}", grad


def attention_rows(backend, dtype):
    for name, (b, h, hkv, t, d, split) in {"mha_d32": (2, 2, 2, 40, 32, 16), "gqa_d64": (1, 4, 2, 37, 64, 16),
                                            "d16_split256": (2, 1, 1, 23, 16, 256)}.items():
        q = exact_values((b, h, t, d), 16, dtype, 0.5)
        k = exact_values((b, hkv, t, d), 17, dtype, 0.5)
        v = exact_values((b, hkv, t, d), 18, dtype)
        with torch.no_grad():
            yield f"causal_attention/{name}/forward", fusedtx.causal_attention(q, k, v, split_size=split,
                                                                               backend=backend)
            lengths = torch.tensor([t - 3 - i for i in range(b)], dtype=torch.int64)
            for tq in (1, 3):
                qq = q[:, :, :tq].contiguous()
                yield (f"attention_with_kv_cache/{name}/tq{tq}",
                       fusedtx.attention_with_kv_cache(qq, k, v, lengths, split_size=split, backend=backend))
        q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
        o = fusedtx.causal_attention(q, k, v, split_size=split, backend=backend)
        yield f"causal_attention/{name}/forward_grad_mode", o
        dq, dk, dv = _grads(o, [q, k, v], 19)
        yield f"causal_attention/{name}/dq", dq
        yield f"causal_attention/{name}/dk", dk
        yield f"causal_attention/{name}/dv", dv


def rope_rows(backend, dtype):
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    for name, head_dim, theta, scaling in (("d16_default", 16, 10000.0, None), ("d64_llama3", 64, 500000.0, llama3)):
        cos, sin = fusedtx.rope_table(head_dim, 300, theta, scaling)
        if backend == "reference" and dtype == torch.float32:  # the table: one row per table, not per backend
            yield f"rope/{name}/table_cos", cos
            yield f"rope/{name}/table_sin", sin
        x = exact_values((2, 3, 5, head_dim), 30, dtype, 4.0)
        positions = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(31))
        with torch.no_grad():
            yield f"rope/{name}/forward", fusedtx.rope(x, positions, cos, sin, backend=backend)
        x.requires_grad_(True)
        y = fusedtx.rope(x, positions, cos, sin, backend=backend)
        yield f"rope/{name}/forward_grad_mode", y
        yield f"rope/{name}/dx", _grads(y, [x], 32)[0]


def model_rows(backend, dtype):
    from fusedtx.models import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=32, split_size=16)
    model = GPT(cfg)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(exact_values(p.shape, 100 + i, torch.float32, 0.05))
    model = model.to(dtype)
    with fusedtx.use_backend(backend):
        idx = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(20))
        logits, loss = model(idx[:, :-1], idx[:, 1:])
        yield "gpt/logits", logits
        yield "gpt/loss", loss
        grads = torch.autograd.grad(loss, list(model.parameters()))
        yield "gpt/grad_c_fc_weight_layer0", grads[[n for n, _ in model.named_parameters()].index(
            "transformer.h.0.mlp.c_fc.weight")]
        yield "gpt/grad_wte", grads[0]
        with torch.no_grad():
            out = model.generate([idx[0, :7].tolist(), idx[1, :12].tolist()], max_new_tokens=6)
        yield "gpt/generate_tokens", out.tokens
        yield "gpt/generate_logprobs", out.logprobs


OPS = {"activation": (activation_rows, ("float32", "bfloat16", "float16")),
       "softmax": (softmax_rows, ("float32", "bfloat16", "float16")),
       "log_softmax": (log_softmax_rows, ("float32", "bfloat16", "float16")),
       "layer_norm": (layer_norm_rows, ("float32", "bfloat16", "float16", "float64")),
       "rms_norm": (rms_norm_rows, ("float32", "bfloat16", "float16", "float64")),
       "linear": (linear_rows, ("float32", "bfloat16", "float16", "float64")),
       "swiglu_ffn": (swiglu_rows, ("float32", "bfloat16", "float16", "float64")),
       "causal_attention": (attention_rows, ("float32", "bfloat16", "float16")),
       "rope": (rope_rows, ("float32", "bfloat16", "float16", "float64")),
       "gpt": (model_rows, ("float32",))}


def table(backends=None, ops=None) -> dict[str, str]:
    rows = {}
    for backend in backends or fusedtx.available_backends("cpu"):
        for op, (make, dtypes) in OPS.items():
            if ops and op not in ops:
                continue
            for dtype in dtypes:
                if dtype == "float64" and backend == "triton":
                    continue
                if op in ("linear", "swiglu_ffn") and dtype == "float64" and backend != "reference":
                    continue
                for name, t in make(backend, DTYPES[dtype]):
                    key = f"{name}|{backend}|{dtype}"
                    assert key not in rows, key
                    rows[key] = digest(t)
                print(f"{op:<18}{backend:<11}{dtype:<10}done", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="JSON")
    group.add_argument("--check", metavar="JSON")
    parser.add_argument("--backends", nargs="*", help="default: every backend available on the CPU")
    parser.add_argument("--ops", nargs="*", choices=sorted(OPS),
                        help="only these ops' rows (default: all); --write merges them into the table")
    args = parser.parse_args()
    rows = table(args.backends, args.ops)
    if args.write:
        if args.ops and os.path.exists(args.write):  # the other ops' rows stay as they are
            with open(args.write) as f:
                rows = {**json.load(f), **rows}
        with open(args.write, "w") as f:
            json.dump(rows, f, indent=0, sort_keys=True)
            f.write("\n")
        print(f"{len(rows)} rows written to {args.write}")
        return 0
    with open(args.check) as f:
        expected = json.load(f)
    changed = sorted(k for k in rows if k in expected and rows[k] != expected[k])
    missing = sorted(k for k in expected if k not in rows and k.split("|")[1] in set(args.backends or rows_backends(rows))
                     and not args.ops)
    new = sorted(k for k in rows if k not in expected)
    for k in changed:
        print(f"CHANGED  {k}: {expected[k]} -> {rows[k]}")
    for k in missing:
        print(f"MISSING  {k}")
    for k in new:
        print(f"NEW      {k}")
    same = len(rows) - len(changed) - len(new)
    print(f"{same} rows identical, {len(changed)} changed, {len(missing)} missing, {len(new)} new")
    return 1 if changed or missing else 0


def rows_backends(rows) -> set[str]:
    return {k.split("|")[1] for k in rows}


if __name__ == "__main__":
    sys.exit(main())
