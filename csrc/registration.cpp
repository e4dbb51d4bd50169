// The schemas of every native op, in one place (csrc/eager.cpp makes the Python module fusedtx._C).
//
// Native kernels live in the `fusedtx_native` namespace, one op per part: <op>_<part>
// (softmax_forward, linear_bias_act_backward, ...). csrc/cpu/<op>*.cpp registers the CPU
// implementations, fusedtx::cpu::<op>_<part>_cpu; csrc/cuda/<op>*_glue.cpp the CUDA ones,
// fusedtx::cuda::<op>_<part>_cuda, which call the raw-pointer launchers fusedtx::cuda::<op>_<part>
// of csrc/cuda/launchers.h. fusedtx/ops/<op>.py wraps them (with the Triton and reference
// backends) into the public `fusedtx::<op>` ops with autograd.
#include <torch/library.h>

#include <string>

#include "cpu/isa.h"

namespace {
bool built_with_cuda() {
#ifdef FUSEDTX_WITH_CUDA
  return true;
#else
  return false;
#endif
}
std::string cpu_isa() { return FUSEDTX_CPU_ISA; }
}  // namespace

TORCH_LIBRARY(fusedtx_native, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  // The vector instruction set the CPU kernels were compiled for: "avx512", "avx2" or "scalar"
  // (cpu/isa.h). Every one computes the same bits; only the speed differs.
  m.def("cpu_isa() -> str", &cpu_isa);
  // y = act(x) / dx = dy * act'(x) elementwise on a contiguous 1-D tensor, as
  // reference.activation_forward / activation_backward; activation is a reference.ACT_* code
  // (1 gelu, 2 gelu_tanh, 4 silu).
  m.def("activation_forward(Tensor x, int activation) -> Tensor");
  m.def("activation_backward(Tensor grad_y, Tensor x, int activation) -> Tensor");
  // softmax over the last dim of a contiguous (rows, cols) tensor, as reference.softmax_forward
  // / softmax_backward; `lanes` is the lane count of the row sums (fusedtx/ops/softmax.py picks
  // it: fixed on CPU, the threads per row on CUDA).
  m.def("softmax_forward(Tensor x, float scale, bool causal, int n_queries, int lanes) -> Tensor");
  m.def("softmax_backward(Tensor grad_y, Tensor y, float scale, int lanes) -> Tensor");
  // log_softmax over the last dim of a contiguous (rows, cols) tensor, as
  // reference.log_softmax_forward / log_softmax_backward (the backward reads the output y);
  // `lanes` as for softmax.
  m.def("log_softmax_forward(Tensor x, int lanes) -> Tensor");
  m.def("log_softmax_backward(Tensor grad_y, Tensor y, int lanes) -> Tensor");
  // LayerNorm over the last dim of a contiguous (rows, N) tensor, as reference.layer_norm_forward
  // / layer_norm_backward. mean, rstd, dweight and dbias are in the compute dtype (float64 for
  // float64 x, else float32); dweight and dbias are empty when need_param_grads is false.
  m.def("layer_norm_forward(Tensor x, Tensor? weight, Tensor? bias, float eps, int lanes) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
      "bool need_param_grads, int lanes, int groups) -> (Tensor, Tensor, Tensor)");
  // RMSNorm over the last dim of a contiguous (rows, N) tensor, as reference.rms_norm_forward /
  // rms_norm_backward: rstd and dweight in the compute dtype (float64 for float64 x, else
  // float32); dweight is empty when need_param_grads is false.
  m.def("rms_norm_forward(Tensor x, Tensor? weight, float eps, int lanes) -> (Tensor, Tensor)");
  m.def(
      "rms_norm_backward(Tensor grad_y, Tensor x, Tensor rstd, Tensor? weight, bool need_param_grads, int lanes, "
      "int groups) -> (Tensor, Tensor)");
  // y = act(a @ b + bias) for 2-D a (M, K) and b (K, N) of any strides (the forward passes
  // weight.t(), the backward weight and grad.t()), as reference.linear_matmul: per element, an FMA
  // chain from +0 over each block of k_block (128) k's in ascending order, the block sums added in
  // order, then + bias, then the activation (reference.ACT_*: 0 none, 1 gelu, 2 gelu_tanh, 3 swiglu:
  // y (M, N / 2) from b's gate/up column pairs). a, b and bias share a dtype (float32, bfloat16,
  // float16); y is contiguous in that dtype. The second output is the pre-activation a @ b + bias
  // when save_preact (the backward's input), else an empty tensor. With b_odd (b's sizes, strides
  // and dtype) the operand b is b and b_odd interleaved along pair_dim, as
  // reference.interleave_pair: rows 2i / 2i + 1 = b[i] / b_odd[i] (0) or columns (1) -- SwiGLU's
  // gate and up weights read where they are, never packed into one tensor.
  m.def(
      "linear_matmul(Tensor a, Tensor b, Tensor? bias, int activation, bool save_preact, int k_block, "
      "Tensor? b_odd=None, int pair_dim=0) -> (Tensor, Tensor)");
  // The elementwise part of the Linear backward on contiguous (M, N) tensors, as
  // reference.linear_bias_act_backward: grad_preact = grad_y * act'(preact) in grad_y's dtype (an
  // empty tensor when activation is 0: the caller uses grad_y), grad_bias =
  // row_group_sum(grad_preact) in float32 over `groups` fixed row groups (an empty tensor unless
  // need_bias_grad). For swiglu (3) preact and grad_preact are (M, 2N): grad_y's N columns' pairs.
  m.def(
      "linear_bias_act_backward(Tensor grad_y, Tensor? preact, int activation, bool need_bias_grad, int groups) "
      "-> (Tensor, Tensor)");
  // Causal attention with a fixed split size, as reference.causal_attention_forward: q (B, H, Tq, D),
  // k and v (B, Hkv, Tmax, D) (H a multiple of Hkv; last dims contiguous), seqlens (B,) int64 on
  // the CPU: sequence b's queries sit at positions seqlens[b] - Tq ... seqlens[b] - 1 and it has
  // seqlens[b] valid keys (nothing beyond is read). Returns o (B, H, Tq, D) contiguous in q's
  // dtype and the float32 row statistics m, l (B, H, Tq) for the backward.
  m.def(
      "causal_attention_forward(Tensor q, Tensor k, Tensor v, Tensor seqlens, float scale, int split_size) "
      "-> (Tensor, Tensor, Tensor)");
  // Its backward for a full causal pass (Tq = Tk = T for every sequence), as
  // reference.causal_attention_backward: from q, k, v, grad_o and the forward's m, l (not its
  // output o: D_i is the row sum of P * dP), dq (B, H, T, D), dk and dv (B, Hkv, T, D),
  // contiguous, in the inputs' dtype; every sum in a fixed order (blocks of split_size), no
  // atomics.
  m.def(
      "causal_attention_backward(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor m, Tensor l, "
      "float scale, int split_size) -> (Tensor, Tensor, Tensor)");
  // Rotary position embeddings (rotate-half layout), as reference.rope_forward / rope_backward:
  // x (B, H, T, D) with a contiguous last dim (D even), positions (B, T) int64 (on the CPU for
  // the CPU kernels, on x's device for CUDA), cos and sin (P, D / 2) contiguous float32 on x's
  // device. Returns the rotated x (the backward: the transposed rotation of grad_y), contiguous in
  // x's dtype (float32, bfloat16, float16 or float64); a position outside [0, P) gives a NaN row.
  m.def("rope_forward(Tensor x, Tensor positions, Tensor cos, Tensor sin) -> Tensor");
  m.def("rope_backward(Tensor grad_y, Tensor positions, Tensor cos, Tensor sin) -> Tensor");
}
