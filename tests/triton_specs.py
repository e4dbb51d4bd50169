"""The specialisations of every Triton kernel that tests/_lower_triton.py lowers to PTX.

One function per fusedtx/kernels/<op>.py module, returning (kernel, signature, constexprs,
options[, attrs]) tuples with the GPU tile configurations of fusedtx/policy.py; every
@triton.jit kernel of a module must appear (the helpers kernels call are listed in the module's
JIT_HELPERS). attrs, where given, are Triton's launch-time specialisation of arguments divisible
by 16 (`aligned`); unit strides are constexpr 1, as Triton specialises them at launch. Test-side
only: the kernel modules hold kernels and launchers.
"""
import torch

from fusedtx import policy, reference
from fusedtx.kernels import (activation, causal_attention, causal_attention_backward, layer_norm, linear, log_softmax,
                             rms_norm, rope, softmax)
from fusedtx.kernels._common import log2


def aligned(fn, signature: dict, odd=()) -> dict:
    """The attrs of a launch whose pointers are 16-byte aligned (every torch allocation is) and
    whose integer arguments are multiples of 16, except those named in `odd` and the kernel's
    do_not_specialize ones: Triton marks each such argument tt.divisibility 16 at launch, which
    lets it vectorise loads and pipeline them with cp.async — another binary, with another
    register allocation, than an unaligned launch's."""
    names = list(signature)
    skip = {names[a] if isinstance(a, int) else a for a in fn.do_not_specialize} | set(odd)
    return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(signature.items())
            if name not in skip and (ty.startswith("*") or ty == "i32")}


# attention's head counts and the split kernels' tile and slot counts: any number
HEAD_COUNTS = ("n_heads", "kv_group", "n_tiles", "n_slots")


def softmax_specs():
    """(kernel, signature, constexprs, options) tuples the PTX lowering test compiles."""
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        for block in (1024, policy.TRITON_MAX_BLOCK):
            for causal in (False, True):
                sig = {"X": f"*{dtype}", "Y": f"*{dtype}", "n_cols": "i32", "scale": "fp32", "n_queries": "i32",
                       "CAUSAL": "constexpr", "BLOCK": "constexpr", "LOG2_BLOCK": "constexpr", "ROUND_BF16": "constexpr"}
                # n_cols=block+1 would be runtime; constexprs cover both branches via BLOCK >= n_cols at runtime
                specs.append((softmax._softmax_fwd, sig, {"CAUSAL": causal, "BLOCK": block, "LOG2_BLOCK": log2(block),
                                                  "ROUND_BF16": False}, {"num_warps": policy.triton_row_warps(block)}))
            sig = {"DY": f"*{dtype}", "Y": f"*{dtype}", "DX": f"*{dtype}", "n_cols": "i32", "scale": "fp32",
                   "BLOCK": "constexpr", "LOG2_BLOCK": "constexpr", "ROUND_BF16": "constexpr"}
            specs.append((softmax._softmax_bwd, sig, {"BLOCK": block, "LOG2_BLOCK": log2(block), "ROUND_BF16": False},
                          {"num_warps": policy.triton_row_warps(block)}))
    return specs


def log_softmax_specs():
    """(kernel, signature, constexprs, options) tuples the PTX lowering test compiles: per dtype,
    a block of 1024 and the widest (both paths are in each binary: BLOCK >= n_cols at runtime)."""
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        for block in (1024, policy.TRITON_MAX_BLOCK):
            constexprs = {"BLOCK": block, "LOG2_BLOCK": log2(block), "ROUND_BF16": False}
            options = {"num_warps": policy.triton_row_warps(block)}
            tail = {"n_cols": "i32", "BLOCK": "constexpr", "LOG2_BLOCK": "constexpr", "ROUND_BF16": "constexpr"}
            specs.append((log_softmax._log_softmax_fwd, {"X": f"*{dtype}", "Y": f"*{dtype}", **tail}, constexprs, options))
            specs.append((log_softmax._log_softmax_bwd, {"DY": f"*{dtype}", "Y": f"*{dtype}", "DX": f"*{dtype}", **tail},
                          constexprs, options))
    return specs


def layer_norm_specs():
    """(kernel, signature, constexprs, options) tuples the PTX lowering test compiles.

    Per dtype: the single-block path at a small width without parameters, at the widest width
    with them (float32 parameters: the mixed-precision case for bf16/fp16), and the looped path."""
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        for w_dtype, block, looped, params in ((dtype, 1024, False, False), ("fp32", policy.TRITON_MAX_BLOCK, False, True),
                                                (dtype, policy.TRITON_MAX_BLOCK, True, True)):
            sig = {"X": f"*{dtype}", "W": f"*{w_dtype}", "B": f"*{w_dtype}", "Y": f"*{dtype}",
                   "Mean": "*fp32", "Rstd": "*fp32", "n_cols": "i32", "eps": "fp32",
                   "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr", "LOOPED": "constexpr",
                   "BLOCK": "constexpr", "LOG2_BLOCK": "constexpr", "ROUND_BF16": "constexpr"}
            specs.append((layer_norm._layer_norm_fwd, sig,
                          {"HAS_WEIGHT": params, "HAS_BIAS": params, "LOOPED": looped, "BLOCK": block,
                           "LOG2_BLOCK": log2(block), "ROUND_BF16": False}, {"num_warps": policy.triton_layer_norm_forward_warps(block)}))
            sig = {"DY": f"*{dtype}", "X": f"*{dtype}", "W": f"*{w_dtype}", "Mean": "*fp32", "Rstd": "*fp32",
                   "DX": f"*{dtype}", "DW_partial": "*fp32", "DB_partial": "*fp32",
                   "n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32",
                   "HAS_WEIGHT": "constexpr", "PARAM_GRADS": "constexpr", "LOOPED": "constexpr",
                   "BLOCK": "constexpr", "LOG2_BLOCK": "constexpr", "ROUND_BF16": "constexpr"}
            specs.append((layer_norm._layer_norm_bwd_dx_fused, sig,
                          {"HAS_WEIGHT": params, "PARAM_GRADS": params, "LOOPED": looped, "BLOCK": block,
                           "LOG2_BLOCK": log2(block), "ROUND_BF16": False}, {"num_warps": policy.triton_layer_norm_backward_warps(block)}))
    sig = {"DW_partial": "*fp32", "DB_partial": "*fp32", "DW": "*fp32", "DB": "*fp32",
           "n_groups": "i32", "n_cols": "i32", "BLOCK_N": "constexpr"}
    specs.append((layer_norm._layer_norm_bwd_dwdb, sig, {"BLOCK_N": layer_norm.DWDB_BLOCK}, {"num_warps": 1}))
    return specs


def rms_norm_specs():
    """(kernel, signature, constexprs, options) tuples the PTX lowering test compiles: layer_norm's
    three cases per dtype (small without a weight, widest with a float32 weight, looped)."""
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        for w_dtype, block, looped, params in ((dtype, 1024, False, False), ("fp32", policy.TRITON_MAX_BLOCK, False, True),
                                                (dtype, policy.TRITON_MAX_BLOCK, True, True)):
            sig = {"X": f"*{dtype}", "W": f"*{w_dtype}", "Y": f"*{dtype}", "Rstd": "*fp32", "n_cols": "i32", "eps": "fp32",
                   "HAS_WEIGHT": "constexpr", "LOOPED": "constexpr", "BLOCK": "constexpr", "LOG2_BLOCK": "constexpr",
                   "ROUND_BF16": "constexpr"}
            specs.append((rms_norm._rms_norm_fwd, sig,
                          {"HAS_WEIGHT": params, "LOOPED": looped, "BLOCK": block, "LOG2_BLOCK": log2(block),
                           "ROUND_BF16": False}, {"num_warps": policy.triton_layer_norm_forward_warps(block)}))
            sig = {"DY": f"*{dtype}", "X": f"*{dtype}", "W": f"*{w_dtype}", "Rstd": "*fp32", "DX": f"*{dtype}",
                   "DW_partial": "*fp32", "n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32",
                   "HAS_WEIGHT": "constexpr", "PARAM_GRADS": "constexpr", "LOOPED": "constexpr",
                   "BLOCK": "constexpr", "LOG2_BLOCK": "constexpr", "ROUND_BF16": "constexpr"}
            specs.append((rms_norm._rms_norm_bwd_dx_fused, sig,
                          {"HAS_WEIGHT": params, "PARAM_GRADS": params, "LOOPED": looped, "BLOCK": block,
                           "LOG2_BLOCK": log2(block), "ROUND_BF16": False},
                          {"num_warps": policy.triton_layer_norm_backward_warps(block)}))
    sig = {"DW_partial": "*fp32", "DW": "*fp32", "n_groups": "i32", "n_cols": "i32", "BLOCK_N": "constexpr"}
    specs.append((rms_norm._rms_norm_bwd_dw, sig, {"BLOCK_N": rms_norm.DW_BLOCK}, {"num_warps": 1}))
    return specs


def linear_specs():
    """(kernel, signature, constexprs, options) tuples the PTX lowering test compiles.

    The matmul per dtype (and TF32) with the table's GPU config, for the op's three layouts
    (unit strides are what Triton specialises to constexpr 1 at launch):
      forward  a = x (row-major), b = weight.t(): no bias / bias + gelu + preact with a ragged K /
               bias + gelu_tanh + preact;
      dx       a = g (row-major), b = weight (row-major);
      dweight  a = g.t() (column-major), b = x (row-major);
      swiglu   the forward's layout with the SwiGLU epilogue, preact saved (swiglu_ffn's gate/up);
    plus, for bf16, the shrunk tiles of tiny N and K with an activation. Each as launched on
    aligned tensors (`aligned`), N, K and strides multiples of 16 except where a variant says:
    the ragged-K forward has an odd K (x's row stride and weight.t()'s column stride with it),
    dweight's K is the token count, any number; the tiny shapes' sizes are odd. The backward
    kernels per dtype and activation."""
    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    specs = []
    variants = [  # (unit strides, HAS_BIAS, ACTIVATION, SAVE_PREACT, EVEN_K, arguments not multiples of 16)
        (("stride_ak", "stride_bk"), False, reference.ACT_NONE, False, True, ()),
        (("stride_ak", "stride_bk"), True, reference.ACT_GELU, True, False, ("K", "stride_am", "stride_bn")),
        (("stride_ak", "stride_bk"), True, reference.ACT_GELU_TANH, True, True, ()),
        (("stride_ak", "stride_bn"), False, reference.ACT_NONE, False, True, ()),
        (("stride_am", "stride_bn"), False, reference.ACT_NONE, False, False, ("K",)),
        (("stride_ak", "stride_bk"), False, reference.ACT_SWIGLU, True, True, ()),  # swiglu_ffn's gate/up
    ]
    small = [  # the shrunk tiles of small N and K (BLOCK_N 16 / 64, BLOCK_K 16), with the epilogue halves
        ((1, 1), (("stride_ak", "stride_bk"), True, reference.ACT_GELU, True, False, ("N", "K", "stride_am", "stride_bn"))),
        ((50, 7), (("stride_ak", "stride_bk"), True, reference.ACT_GELU_TANH, False, False, ("N", "K", "stride_am", "stride_bn"))),
    ]
    for dtype, precisions in (("fp32", ("ieee", "tf32")), ("bf16", (None,)), ("fp16", (None,))):
        for precision in precisions:
            shapes = [((4096, 4096), v) for v in variants] + (small if dtype == "bf16" else [])
            for (n, k), (unit, has_bias, act, save, even_k, odd) in shapes:
                cfg = policy.triton_linear_tiles(n, k, torch_dtypes[dtype], interpreted=False)
                sig = {"A": f"*{dtype}", "B": f"*{dtype}", "Bias": f"*{dtype}", "Y": f"*{dtype}", "H": f"*{dtype}",
                       "M": "i32", "N": "i32", "K": "i32",
                       **{name: "constexpr" if name in unit else "i32"
                          for name in ("stride_am", "stride_ak", "stride_bk", "stride_bn")},
                       **{name: "constexpr" for name in (
                           "HAS_BIAS", "ACTIVATION", "SAVE_PREACT", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M",
                           "EVEN_K", "INPUT_PRECISION", "SEQUENTIAL_SUM", "ROUND_BF16", "EPILOGUE_HALVES",
                           "K_BLOCKED", "K_STEPS")}}
                k_steps, k_blocked = linear.k_blocking(k, cfg.BLOCK_K, policy.MATMUL_K_BLOCK, torch_dtypes[dtype])
                specs.append((linear._matmul_fwd, sig,
                              {**{name: 1 for name in unit}, "HAS_BIAS": has_bias, "ACTIVATION": act,
                               "SAVE_PREACT": save, "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N,
                               "BLOCK_K": cfg.BLOCK_K, "GROUP_M": cfg.GROUP_M, "EVEN_K": even_k,
                               "INPUT_PRECISION": precision, "SEQUENTIAL_SUM": False, "ROUND_BF16": False,
                               "EPILOGUE_HALVES": act != reference.ACT_NONE, "K_BLOCKED": k_blocked,
                               "K_STEPS": k_steps},
                              {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                              aligned(linear._matmul_fwd, sig, odd)))
        for act in (reference.ACT_NONE, reference.ACT_GELU, reference.ACT_GELU_TANH, reference.ACT_SWIGLU):
            sig = {"DY": f"*{dtype}", "Hp": f"*{dtype}", "DH": f"*{dtype}", "Partial": "*fp32",
                   "n_rows": "i32", "n_cols": "i32", "n_groups": "i32", "rows_per_group": "i32",
                   "ACTIVATION": "constexpr", "BIAS_GRAD": "constexpr", "BLOCK_N": "constexpr",
                   "ROUND_BF16": "constexpr", "SEQUENTIAL_SUM": "constexpr", "GROUPS": "constexpr",
                   "ROW_CHUNK": "constexpr"}
            specs.append((linear._bias_act_bwd, sig, {"ACTIVATION": act, "BIAS_GRAD": act != reference.ACT_GELU,
                                               "BLOCK_N": policy.TRITON_LINEAR_BACKWARD_BLOCK_N, "ROUND_BF16": False, "SEQUENTIAL_SUM": False,
                                               "GROUPS": 1, "ROW_CHUNK": 1}, {"num_warps": policy.TRITON_LINEAR_BACKWARD_WARPS}))
    sig = {"Partial": "*fp32", "DB": "*fp32", "n_groups": "i32", "n_cols": "i32", "BLOCK_N": "constexpr"}
    specs.append((linear._bias_grad_sum, sig, {"BLOCK_N": policy.TRITON_LINEAR_BACKWARD_BLOCK_N}, {"num_warps": policy.TRITON_LINEAR_BACKWARD_WARPS}))
    return specs


def causal_attention_specs():
    """(kernel, signature, constexprs, options) tuples the PTX lowering test compiles: the prefill,
    split and merge kernels per dtype (float32, bfloat16, float16) and head dim (64, 128) at the
    default split size, plus D = 16 / S = 16 (the smallest tiles) for bfloat16. The head-dim stride
    is 1, the other strides multiples of 16 (`aligned`): every stride of a (B, H, T, D) tensor or
    a view of one is a multiple of D >= 16; head and slot counts any number."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    stride_names = [f"stride_{t}{a}" for t in "qkv" for a in "bhtd"]
    unit = {f"stride_{t}d" for t in "qkv"}
    strides = {name: "constexpr" if name in unit else "i32" for name in stride_names}
    tile_names = ("BLOCK_M", "BLOCK_N", "SPLIT", "HEAD_DIM", "INPUT_PRECISION", "SEQUENTIAL_SUM", "ROUND_BF16")
    cases = [(dt, d, policy.DEFAULT_SPLIT_SIZE) for dt in names for d in (64, 128)] + [(torch.bfloat16, 16, 16)]
    specs = []
    for dtype, dim, split in cases:
        dt = names[dtype]
        cfg = policy.triton_attention_tiles(dim, dtype, split, interpreted=False)
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        tiles = {"BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "SPLIT": split, "HEAD_DIM": dim,
                 "INPUT_PRECISION": causal_attention.input_precision(dtype), "SEQUENTIAL_SUM": False, "ROUND_BF16": False}
        consts = {**{name: 1 for name in unit}, **tiles}
        sizes = {"scale": "fp32", "n_queries": "i32", "n_heads": "i32", "kv_group": "i32"}
        sig = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "O": f"*{dt}", "Mout": "*fp32", "Lout": "*fp32",
               "Seqlens": "*i32", **sizes, **strides, **{name: "constexpr" for name in tile_names}}
        specs.append((causal_attention._attn_fwd, sig, consts, options, aligned(causal_attention._attn_fwd, sig, HEAD_COUNTS)))
        sig = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "Pm": "*fp32", "Pl": "*fp32", "Pacc": "*fp32",
               "Seqlens": "*i64", **sizes, "n_tiles": "i32", "n_slots": "i32", **strides,
               **{name: "constexpr" for name in tile_names}}
        specs.append((causal_attention._attn_fwd_split, sig, consts, options,
                      aligned(causal_attention._attn_fwd_split, sig, HEAD_COUNTS)))
        sig = {"Pm": "*fp32", "Pl": "*fp32", "Pacc": "*fp32", "O": f"*{dt}", "Mout": "*fp32", "Lout": "*fp32",
               "Seqlens": "*i64", "n_queries": "i32", "n_heads": "i32", "n_slots": "i32",
               "BLOCK_M": "constexpr", "SPLIT": "constexpr", "HEAD_DIM": "constexpr", "ROUND_BF16": "constexpr"}
        specs.append((causal_attention._attn_merge, sig, {"BLOCK_M": policy.triton_attention_merge_rows(interpreted=False), "SPLIT": split, "HEAD_DIM": dim,
                                         "ROUND_BF16": False}, {"num_warps": policy.TRITON_ATTENTION_MERGE_WARPS},
                      aligned(causal_attention._attn_merge, sig, HEAD_COUNTS)))
    return specs


def causal_attention_backward_specs():
    """(kernel, signature, constexprs, options) tuples the PTX lowering test compiles: the three
    kernels per dtype (float32, bfloat16, float16) and head dim (64, 128), plus D = 16 for
    bfloat16 (the smallest tiles); the preprocess for each key tile it takes, at the smallest
    (16) and the default split size. The head-dim strides are 1, the other strides multiples of
    16 (`aligned`), as in the forward."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    stride_names = [f"stride_{t}{a}" for t in "qkvg" for a in "bhtd"]
    unit = {f"stride_{t}d" for t in "qkvg"}
    strides = {name: "constexpr" if name in unit else "i32" for name in stride_names}
    tile_names = ("BLOCK_M", "BLOCK_N", "HEAD_DIM", "INPUT_PRECISION", "F32_DOTS", "ROUND_BF16")
    cases = [(dt, d) for dt in names for d in (64, 128)] + [(torch.bfloat16, 16)]
    specs = []
    for dtype, dim in cases:
        dt = names[dtype]
        cfg = policy.triton_attention_backward_tiles(dim, dtype, interpreted=False)
        sizes = {"scale": "fp32", "n_ctx": "i32", "n_heads": "i32", "kv_group": "i32"}
        ptrs = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "DO": f"*{dt}", "M": "*fp32", "L": "*fp32",
                "Delta": "*fp32"}
        fixed = {"HEAD_DIM": dim, "INPUT_PRECISION": causal_attention_backward.input_precision(dtype), "F32_DOTS": False, "ROUND_BF16": False}
        sig = {**ptrs, "DK": f"*{dt}", "DV": f"*{dt}", **sizes, **strides, **{n: "constexpr" for n in tile_names}}
        consts = {**{name: 1 for name in unit}, "BLOCK_M": cfg.BLOCK_M1, "BLOCK_N": cfg.BLOCK_N1, **fixed}
        specs.append((causal_attention_backward._attn_bwd_dkdv, sig, consts, {"num_warps": cfg.num_warps1, "num_stages": cfg.num_stages},
                      aligned(causal_attention_backward._attn_bwd_dkdv, sig, HEAD_COUNTS)))
        sig = {**ptrs, "DQ": f"*{dt}", **sizes, **strides, **{n: "constexpr" for n in tile_names}}
        consts = {**{name: 1 for name in unit}, "BLOCK_M": cfg.BLOCK_M2, "BLOCK_N": cfg.BLOCK_N2, **fixed}
        specs.append((causal_attention_backward._attn_bwd_dq, sig, consts, {"num_warps": cfg.num_warps2, "num_stages": cfg.num_stages},
                      aligned(causal_attention_backward._attn_bwd_dq, sig, HEAD_COUNTS)))
        sig = {**ptrs, **sizes, "split_size": "i32", **strides, **{n: "constexpr" for n in tile_names}}
        for block_n in sorted({causal_attention_backward.preprocess_block_n(cfg, s) for s in (16, policy.DEFAULT_SPLIT_SIZE)}):
            consts = {**{name: 1 for name in unit}, "BLOCK_M": cfg.BLOCK_M2, "BLOCK_N": block_n, **fixed}
            specs.append((causal_attention_backward._attn_bwd_preprocess, sig, consts,
                          {"num_warps": cfg.num_warps2, "num_stages": cfg.num_stages},
                          aligned(causal_attention_backward._attn_bwd_preprocess, sig, HEAD_COUNTS)))
    return specs


def rope_specs():
    """(kernel, signature, constexprs, options, attrs) tuples the PTX lowering test compiles: the
    rotation and its transpose per dtype, for Llama's head dims 64 and 128 at 32 heads (a (B, H,
    T, D) tensor or a view of one: strides multiples of D, `aligned`), and D = 6 with an odd head
    count and odd strides (a (B, T, H, D) view)."""
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        for heads, dim, odd in ((32, 64, ()), (32, 128, ()), (3, 6, ("n_heads", "half", "stride_xb", "stride_xh",
                                                                      "stride_xt"))):
            block_h, half_block = policy.triton_rope_tile(heads, dim)
            sig = {"X": f"*{dtype}", "Positions": "*i64", "Cos": "*fp32", "Sin": "*fp32", "Y": f"*{dtype}",
                   "n_heads": "i32", "n_tokens": "i32", "n_positions": "i32", "half": "i32",
                   "stride_xb": "i32", "stride_xh": "i32", "stride_xt": "i32",
                   "TRANSPOSED": "constexpr", "BLOCK_H": "constexpr", "HALF_BLOCK": "constexpr",
                   "ROUND_BF16": "constexpr"}
            for transposed in (False, True):
                specs.append((rope._rope, sig, {"TRANSPOSED": transposed, "BLOCK_H": block_h, "HALF_BLOCK": half_block,
                                                "ROUND_BF16": False}, {"num_warps": policy.TRITON_ROPE_WARPS},
                              aligned(rope._rope, sig, odd + ("n_tokens", "n_positions"))))
    return specs


def activation_specs():
    """(kernel, signature, constexprs, options, attrs) tuples the PTX lowering test compiles: the
    forward and backward of every activation in float32, and of SiLU (the one Llama-family models
    use) in bfloat16 and float16, on aligned tensors of any length."""
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        for code in sorted(reference.ELEMENTWISE.values()) if dtype == "fp32" else (reference.ACT_SILU,):
            constexprs = {"ACTIVATION": code, "BLOCK": activation.BLOCK, "ROUND_BF16": False}
            options = {"num_warps": activation.NUM_WARPS}
            sig = {"X": f"*{dtype}", "Y": f"*{dtype}", "n": "i32",
                   "ACTIVATION": "constexpr", "BLOCK": "constexpr", "ROUND_BF16": "constexpr"}
            specs.append((activation._activation_fwd, sig, constexprs, options,
                          aligned(activation._activation_fwd, sig, ("n",))))
            sig = {"DY": f"*{dtype}", "X": f"*{dtype}", "DX": f"*{dtype}", "n": "i32",
                   "ACTIVATION": "constexpr", "BLOCK": "constexpr", "ROUND_BF16": "constexpr"}
            specs.append((activation._activation_bwd, sig, constexprs, options,
                          aligned(activation._activation_bwd, sig, ("n",))))
    return specs


SPECS = {f"fusedtx.kernels.{fn.__name__[:-len('_specs')]}": fn for fn in (
    activation_specs, softmax_specs, log_softmax_specs, layer_norm_specs, rms_norm_specs, linear_specs, causal_attention_specs,
    causal_attention_backward_specs, rope_specs)}
