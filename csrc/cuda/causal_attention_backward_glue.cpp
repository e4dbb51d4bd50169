// Torch glue for csrc/cuda/causal_attention_backward.cu: checks, allocation, stream, and the CUDA
// registration of fusedtx_native::causal_attention_backward (schema in csrc/registration.cpp).
//
// grad_o, q, k and v may have any strides with a contiguous last dim (the kernels read them through
// their strides: no copy for a (B, T, H, D) -> (B, H, T, D) transpose); m and l are made
// contiguous. dq, dk and dv are contiguous in the inputs' dtype. The float32 workspace (D_i, and the
// head sums of a grouped-query backward in 16-bit dtypes) comes from the caching allocator.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "glue.h"

namespace fusedtx::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cuda(const at::Tensor& grad_o, const at::Tensor& q,
                                                                       const at::Tensor& k, const at::Tensor& v,
                                                                       const at::Tensor& m, const at::Tensor& l,
                                                                       double scale, int64_t split_size) {
  constexpr const char* op = "causal_attention_backward";
  const DType dtype = dtype_of(q, op);
  check_attention_backward_args(grad_o, q, k, v, m, l, split_size, at::kCUDA, op);
  const int64_t batch = q.size(0), heads = q.size(1), length = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1);
  TORCH_CHECK(dim <= kAttentionMaxHeadDim, op, ": the CUDA kernel takes head dims 1 ... ", kAttentionMaxHeadDim,
              ", got ", dim);
  TORCH_CHECK(length <= (int64_t{1} << 30), op, ": the CUDA kernel takes sequences of up to 2^30 positions, got ",
              length);
  const int64_t tiles = (length + 31) / 32;  // one thread block per (b, head, 32 positions)
  TORCH_CHECK(batch == 0 || heads == 0 || tiles <= INT32_MAX / heads / batch, op,
              ": too many (batch, head, tile) blocks for one launch: ", batch, " x ", heads, " x ", tiles);

  const c10::cuda::CUDAGuard guard(q.device());
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), opts);
  at::Tensor dk = at::empty(k.sizes(), opts);
  at::Tensor dv = at::empty(v.sizes(), opts);
  if (dq.numel() == 0) {  // no positions (or no batch / heads): dk and dv are empty or all zero
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor mc = m.contiguous(), lc = l.contiguous();
  at::Tensor workspace =
      at::empty({causal_attention_backward_workspace_elems(batch, heads, kv_heads, length, dim, dtype)},
                q.options().dtype(at::kFloat));

  const int64_t go_strides[3] = {grad_o.stride(0), grad_o.stride(1), grad_o.stride(2)};
  const int64_t q_strides[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const int64_t k_strides[3] = {k.stride(0), k.stride(1), k.stride(2)};
  const int64_t v_strides[3] = {v.stride(0), v.stride(1), v.stride(2)};
  check_launch(causal_attention_backward(grad_o.const_data_ptr(), go_strides, q.const_data_ptr(), q_strides,
                                  k.const_data_ptr(), k_strides, v.const_data_ptr(), v_strides,
                                  mc.const_data_ptr<float>(), lc.const_data_ptr<float>(), dq.mutable_data_ptr(),
                                  dk.mutable_data_ptr(), dv.mutable_data_ptr(), workspace.mutable_data_ptr<float>(),
                                  batch, heads, kv_heads, length, dim, static_cast<float>(scale), split_size, dtype,
                                  c10::cuda::getCurrentCUDAStream()),
               op);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fusedtx::cuda

TORCH_LIBRARY_IMPL(fusedtx_native, CUDA, m) {
  m.impl("causal_attention_backward", &fusedtx::cuda::causal_attention_backward_cuda);
}
