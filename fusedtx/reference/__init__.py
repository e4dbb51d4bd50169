"""The specification: readable pure-PyTorch implementations of every fusedtx algorithm.

Each kernel in fusedtx (Triton, C++ CPU, CUDA) performs the arithmetic written here, in the
same order, so that its results can be compared with this file bit for bit. Everything is
float32 and uses only correctly rounded elementary operations (+, -, *, /, max, compare), so
the bits do not depend on the device, the thread count, or how PyTorch vectorises them.

Two building blocks carry the promise:

* `exp_f32` — fusedtx's own exponential (Cody-Waite range reduction and a degree-6 polynomial,
  no fused multiply-add), and `log_f32`, its logarithm (Cephes' logf). Library `exp` and `log`
  functions differ between CPU, CUDA and Triton in the last bit; these are the same formula
  everywhere.
* `lane_sum` — a reduction with a fixed order: `lanes` accumulators starting at +0,
  accumulator `l` adding elements `l, l + lanes, l + 2*lanes, ...` in ascending order (elements
  past the end count as +0), then the accumulators folded in
  halves (`a[l] += a[l + w]` for w = lanes/2, lanes/4, ..., 1). The lane count is an argument:
  fusedtx/policy.py chooses it per backend and device from the row length, never from the batch.
  `lane_sum_compensated` adds in the same order and keeps every addition's rounding error
  (TwoSum), for the sums whose accuracy sets the result's (LayerNorm's variance).

Every such number (lanes, row groups, the matmul's K block, the attention split size) is an
argument here; this package holds the algorithms only, one file per op
beside common.py's building blocks (docs/design.md, "Reduction orders").
"""
from .causal_attention import causal_attention_backward, causal_attention_forward
from .common import (blocked_fma_matmul, compute_dtype, exp_f32, fma_f32, fma_matmul, lane_sum,
                     lane_sum_compensated, log_f32, row_group_sum, row_length, rstd_of, sqrt_rn, two_sum)
from .activation import (ACT_GELU, ACT_GELU_TANH, ACT_NONE, ACT_SILU, ACT_SWIGLU, ACTIVATIONS, ELEMENTWISE,
                         activation_backward, activation_derivative, activation_forward, erf_f32)
from .layer_norm import layer_norm_backward, layer_norm_forward
from .linear import (interleave_pair, linear_backward, linear_bias_act_backward, linear_matmul, swiglu_forward,
                     swiglu_grad_preact)
from .log_softmax import log_softmax_backward, log_softmax_forward
from .rms_norm import rms_norm_backward, rms_norm_forward
from .rope import rope_backward, rope_forward, rope_inv_freq, rope_table
from .softmax import causal_valid_counts, softmax_backward, softmax_forward

__all__ = [
    "exp_f32", "log_f32", "lane_sum", "lane_sum_compensated", "two_sum", "sqrt_rn", "row_group_sum", "row_length", "rstd_of", "compute_dtype", "fma_f32", "fma_matmul", "blocked_fma_matmul",
    "causal_valid_counts", "softmax_forward", "softmax_backward", "log_softmax_forward", "log_softmax_backward",
    "layer_norm_forward", "layer_norm_backward", "rms_norm_forward", "rms_norm_backward",
    "ACT_NONE", "ACT_GELU", "ACT_GELU_TANH", "ACT_SWIGLU", "ACT_SILU", "ACTIVATIONS", "ELEMENTWISE", "erf_f32",
    "activation_forward", "activation_derivative", "activation_backward", "swiglu_forward", "swiglu_grad_preact", "interleave_pair", "linear_matmul", "linear_bias_act_backward",
    "linear_backward",
    "causal_attention_forward", "causal_attention_backward",
    "rope_inv_freq", "rope_table", "rope_forward", "rope_backward",
]
