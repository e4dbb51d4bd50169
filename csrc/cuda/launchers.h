// Host entry points of the CUDA kernels: raw pointers and a cudaStream_t, no torch types, so
// that the .cu files compile with nvcc alone (the torch glue lives in <op>_glue.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fusedtx::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// y = act(x) (activation_forward) and grad_x = grad_y * act'(x) (activation_backward) over n
// contiguous elements, as reference.activation_forward / activation_backward; activation is a
// reference.ACT_* code: 1 gelu, 2 gelu_tanh, 4 silu (another gives cudaErrorInvalidValue).
cudaError_t activation_forward(const void* x, void* y, int64_t n, int activation, DType dtype, cudaStream_t stream);
cudaError_t activation_backward(const void* grad_y, const void* x, void* grad_x, int64_t n, int activation, DType dtype,
                                cudaStream_t stream);

// softmax(scale * x) over each row of a contiguous (rows, cols) tensor; `lanes` threads per
// row (a power of two in [32, 1024]) are the lanes of reference.lane_sum. Causal: row r is
// query r % n_queries and sees keys j <= r % n_queries + cols - n_queries.
cudaError_t softmax_forward(const void* x, void* y, int64_t rows, int64_t cols, float scale, bool causal,
                            int64_t n_queries, int lanes, DType dtype, cudaStream_t stream);

// dx = scale * y * (dy - sum(dy * y)) per row.
cudaError_t softmax_backward(const void* grad_y, const void* y, void* grad_x, int64_t rows, int64_t cols,
                             float scale, int lanes, DType dtype, cudaStream_t stream);

// log_softmax over each row of a contiguous (rows, cols) tensor, as reference.log_softmax_forward;
// `lanes` threads per row (a power of two in [32, 1024]) are the lanes of reference.lane_sum.
cudaError_t log_softmax_forward(const void* x, void* y, int64_t rows, int64_t cols, int lanes, DType dtype,
                                cudaStream_t stream);

// dx = dy - exp_f32(y) * sum(dy) per row, as reference.log_softmax_backward.
cudaError_t log_softmax_backward(const void* grad_y, const void* y, void* grad_x, int64_t rows, int64_t cols,
                                 int lanes, DType dtype, cudaStream_t stream);

// LayerNorm of each row of a contiguous (rows, n) tensor x, as reference.layer_norm_forward:
// one block of `lanes` threads (a power of two in [32, 1024], the lanes of reference.lane_sum)
// per row. x and y have dtype `dtype`; weight and bias are (n,) or nullptr, of dtype
// `param_dtype` (x's dtype or kFloat32); mean and rstd are (rows,) in the compute dtype
// (double for kFloat64 x, float otherwise).
cudaError_t layer_norm_forward(const void* x, const void* weight, const void* bias, void* y, void* mean, void* rstd,
                               int64_t rows, int64_t n, double eps, int lanes, DType dtype, DType param_dtype,
                               cudaStream_t stream);

// Compute-dtype elements of the workspace layer_norm_backward needs when need_param_grads: the
// (groups, n) partials of dweight and of dbias.
inline int64_t layer_norm_backward_workspace_elems(int64_t n, int64_t groups) { return 2 * groups * n; }

// Gradients of layer_norm_forward, as reference.layer_norm_backward: grad_x (dtype `dtype`, like
// grad_y and x) and, when need_param_grads, dweight and dbias ((n,), compute dtype) reduced over
// `groups` fixed row groups through `workspace` (layer_norm_backward_workspace_elems elements);
// otherwise dweight, dbias and workspace are unused and may be nullptr. mean and rstd are
// layer_norm_forward's; weight is (n,) of `param_dtype` or nullptr. rows == 0 launches no kernel
// (and zero-fills dweight and dbias).
cudaError_t layer_norm_backward(const void* grad_y, const void* x, const void* mean, const void* rstd,
                                const void* weight, void* grad_x, void* dweight, void* dbias, void* workspace,
                                int64_t rows, int64_t n, bool need_param_grads, int lanes, int groups, DType dtype,
                                DType param_dtype, cudaStream_t stream);

// RMSNorm of each row of a contiguous (rows, n) tensor x, as reference.rms_norm_forward: one
// block of `lanes` threads (a power of two in [32, 1024]) per row. x and y have dtype `dtype`;
// weight is (n,) or nullptr, of dtype `param_dtype` (x's dtype or kFloat32); rstd is (rows,) in
// the compute dtype (double for kFloat64 x, float otherwise).
cudaError_t rms_norm_forward(const void* x, const void* weight, void* y, void* rstd, int64_t rows, int64_t n,
                             double eps, int lanes, DType dtype, DType param_dtype, cudaStream_t stream);

// Compute-dtype elements of the workspace rms_norm_backward needs when need_param_grads: the
// (groups, n) partials of dweight.
inline int64_t rms_norm_backward_workspace_elems(int64_t n, int64_t groups) { return groups * n; }

// Gradients of rms_norm_forward, as reference.rms_norm_backward: grad_x (dtype `dtype`, like
// grad_y and x) and, when need_param_grads, dweight ((n,), compute dtype) reduced over `groups`
// fixed row groups through `workspace` (rms_norm_backward_workspace_elems elements); otherwise
// dweight and workspace are unused and may be nullptr. rows == 0 launches no kernel (and
// zero-fills dweight).
cudaError_t rms_norm_backward(const void* grad_y, const void* x, const void* rstd, const void* weight, void* grad_x,
                              void* dweight, void* workspace, int64_t rows, int64_t n, bool need_param_grads,
                              int lanes, int groups, DType dtype, DType param_dtype, cudaStream_t stream);

// y = act(a @ b + bias) as reference.linear_matmul: a (m, k) and b (k, n) with any strides (in
// elements), bias (n,) contiguous or nullptr, all of dtype `dtype` (float32, float16 or
// bfloat16); y and preact contiguous (m, n) of that dtype. Every element is one float32 FMA
// chain from +0 per block of kLinearKBlock k's, k ascending, the block sums added in order;
// `activation` is reference.ACT_* (0 none, 1 gelu, 2 gelu_tanh, 3 swiglu: n even, b's columns
// gate/up pairs, y (m, n / 2)). preact (the pre-activation h, (m, n)) is written when not nullptr
// and activation != 0. m == 0 or n == 0 launches nothing.
// K is summed in blocks of this many k's (reference.linear_matmul's k_block), compiled in.
constexpr int64_t kLinearKBlock = 128;

cudaError_t linear_matmul(const void* a, int64_t a_stride_m, int64_t a_stride_k, const void* b, int64_t b_stride_k,
                          int64_t b_stride_n, const void* bias, void* y, void* preact, int64_t m, int64_t n, int64_t k,
                          int activation, DType dtype, cudaStream_t stream);

// float32 elements of the workspace linear_bias_act_backward needs when need_bias_grad: the (groups, n)
// partials of grad_bias.
inline int64_t linear_bias_act_backward_workspace_elems(int64_t n, int64_t groups) { return groups * n; }

// The elementwise part of the Linear backward on contiguous (rows, n) tensors, as
// reference.linear_bias_act_backward: grad_preact = grad_y * act'(preact) in `dtype` (written only when
// activation != 0; grad_preact and preact may be nullptr otherwise) and, when need_bias_grad,
// grad_bias ((n,), float32) = row_group_sum over `groups` fixed row groups of grad_preact as
// stored (of grad_y without an activation), through `workspace`
// (linear_bias_act_backward_workspace_elems floats). rows == 0 zero-fills grad_bias. For swiglu
// (activation 3) n is preact's and grad_preact's width, grad_y's is n / 2.
cudaError_t linear_bias_act_backward(const void* grad_y, const void* preact, void* grad_preact, void* grad_bias,
                                     void* workspace, int64_t rows, int64_t n, int activation, bool need_bias_grad,
                                     int groups, DType dtype, cudaStream_t stream);

// The largest head dim causal_attention_forward takes (its shared-memory tiles and registers are sized for it).
constexpr int64_t kAttentionMaxHeadDim = 128;

// Causal attention with a fixed split size, as reference.causal_attention_forward: q (batch, heads,
// n_queries, dim), k and v (batch, kv_heads, t_max, dim), all of dtype `dtype` (float32, float16
// or bfloat16), last dim contiguous, the other strides (batch, head, position; in elements) given
// as 3-element arrays; query head h reads kv head h / (heads / kv_heads). seqlens (batch,) int64 on
// the device: sequence b's queries sit at positions seqlens[b] - n_queries ... seqlens[b] - 1 and
// keys at or beyond seqlens[b] are never read (a seqlens[b] outside [n_queries, t_max] gives NaN
// rows). o (batch, heads, n_queries, dim) contiguous in `dtype`; m and l (batch, heads, n_queries)
// float32. dim in [1, kAttentionMaxHeadDim]; split_size a power of two >= 16.
cudaError_t causal_attention_forward(const void* q, const int64_t* q_strides, const void* k, const int64_t* k_strides,
                                     const void* v, const int64_t* v_strides, const int64_t* seqlens, void* o, float* m,
                                     float* l, int64_t batch, int64_t heads, int64_t kv_heads, int64_t n_queries,
                                     int64_t t_max, int64_t dim, float scale, int64_t split_size, DType dtype,
                                     cudaStream_t stream);

// float32 elements of the workspace causal_attention_backward needs: D_i (batch, heads, length) and, for a
// grouped-query (heads > kv_heads) backward in float16 / bfloat16, the float32 running sums of dk
// and dv over a group's heads (2 x (batch, kv_heads, length, dim)).
inline int64_t causal_attention_backward_workspace_elems(int64_t batch, int64_t heads, int64_t kv_heads, int64_t length,
                                                         int64_t dim, DType dtype) {
  const bool head_sums = kv_heads > 0 && heads > kv_heads && dtype != DType::kFloat32;
  return batch * heads * length + (head_sums ? 2 * batch * kv_heads * length * dim : 0);
}

// Gradients of a full causal causal_attention_forward (Tq = Tk = length), as reference.causal_attention_backward:
// grad_o and q (batch, heads, length, dim), k and v (batch, kv_heads, length, dim), all of dtype
// `dtype` (float32, float16 or bfloat16), last dim contiguous, the other strides (batch, head,
// position; in elements) given as 3-element arrays; m and l the forward's float32 row statistics,
// contiguous (batch, heads, length). dq (batch, heads, length, dim), dk and dv (batch, kv_heads,
// length, dim) contiguous in `dtype`; `workspace` has causal_attention_backward_workspace_elems floats.
// dim in [1, kAttentionMaxHeadDim]; split_size a power of two >= 16. Two kernels on `stream`, no
// atomics: the same bits run after run.
cudaError_t causal_attention_backward(const void* grad_o, const int64_t* go_strides, const void* q,
                                      const int64_t* q_strides, const void* k, const int64_t* k_strides, const void* v,
                                      const int64_t* v_strides, const float* m, const float* l, void* dq, void* dk,
                                      void* dv, float* workspace, int64_t batch, int64_t heads, int64_t kv_heads,
                                      int64_t length, int64_t dim, float scale, int64_t split_size, DType dtype,
                                      cudaStream_t stream);

// Threads per block of the rope kernel, one thread a pair (elementwise: the count changes no bit).
constexpr int kRopeThreads = 256;

// Rotary position embeddings, as reference.rope_forward: x (batch, heads, tokens, dim) of dtype
// `dtype` (float32, float16, bfloat16 or float64), last dim contiguous, the other strides (batch,
// head, token; in elements) as a 3-element array on the host; positions (batch, tokens) int64 and
// cos, sin (n_positions, dim / 2) float32, contiguous, on the device; y (batch, heads, tokens,
// dim) contiguous in `dtype`. dim even; a position outside [0, n_positions) reads nothing and
// gives a NaN row.
cudaError_t rope_forward(const void* x, const int64_t* x_strides, const int64_t* positions, const float* cos,
                         const float* sin, void* y, int64_t batch, int64_t heads, int64_t tokens, int64_t dim,
                         int64_t n_positions, DType dtype, cudaStream_t stream);

// Its gradient with respect to x, as reference.rope_backward (the transposed rotation), with the
// same layouts: grad_y as x, grad_x as y.
cudaError_t rope_backward(const void* grad_y, const int64_t* strides, const int64_t* positions, const float* cos,
                          const float* sin, void* grad_x, int64_t batch, int64_t heads, int64_t tokens, int64_t dim,
                          int64_t n_positions, DType dtype, cudaStream_t stream);

}  // namespace fusedtx::cuda
