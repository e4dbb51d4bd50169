// Torch glue for csrc/cuda/causal_attention.cu: checks, allocation, stream, and the CUDA registration of
// fusedtx_native::causal_attention_forward (schema in csrc/registration.cpp).
//
// q, k and v may have any strides with a contiguous last dim (the kernel reads them through their
// strides: no copy for a KV cache slice or a (B, T, H, D) -> (B, H, T, D) transpose). seqlens is
// int64 on the CPU (checked, then copied to q's device) or already on q's device (then not
// checked, which would need a sync: the kernel writes NaN rows for a length outside [Tq, Tmax]
// and never reads out of bounds).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "glue.h"

namespace fusedtx::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                      const at::Tensor& v, const at::Tensor& seqlens,
                                                                      double scale, int64_t split_size) {
  constexpr const char* op = "causal_attention_forward";
  const DType dtype = dtype_of(q, op);
  check_attention_forward_args(q, k, v, split_size, at::kCUDA, op);
  const int64_t batch = q.size(0), heads = q.size(1), n_queries = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), t_max = k.size(2);
  TORCH_CHECK(dim <= kAttentionMaxHeadDim, op, ": the CUDA kernel takes head dims 1 ... ", kAttentionMaxHeadDim,
              ", got ", dim);
  TORCH_CHECK(seqlens.scalar_type() == at::kLong, op, ": seqlens must be int64, got ", seqlens.scalar_type());
  TORCH_CHECK(seqlens.dim() == 1 && seqlens.size(0) == batch, op, ": seqlens must have shape (", batch, "), got ",
              seqlens.sizes());
  TORCH_CHECK(seqlens.device().is_cpu() || seqlens.device() == q.device(), op,
              ": seqlens must be a CPU tensor or on q's device ", q.device(), ", got ", seqlens.device());
  if (seqlens.device().is_cpu()) check_seqlens_values(seqlens.contiguous(), n_queries, t_max, op);
  const int64_t tiles = (n_queries + 15) / 16;  // one thread block per (b, h, 16 queries)
  TORCH_CHECK(batch == 0 || heads == 0 || tiles <= INT32_MAX / heads / batch, op,
              ": too many (batch, head, query tile) blocks for one launch: ", batch, " x ", heads, " x ", tiles);

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor m_out = at::empty({batch, heads, n_queries}, q.options().dtype(at::kFloat));
  at::Tensor l_out = at::empty({batch, heads, n_queries}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, m_out, l_out};
  const at::Tensor lengths = seqlens.to(q.device(), /*non_blocking=*/false, /*copy=*/false).contiguous();

  const int64_t q_strides[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const int64_t k_strides[3] = {k.stride(0), k.stride(1), k.stride(2)};
  const int64_t v_strides[3] = {v.stride(0), v.stride(1), v.stride(2)};
  check_launch(causal_attention_forward(q.const_data_ptr(), q_strides, k.const_data_ptr(), k_strides, v.const_data_ptr(),
                                 v_strides, lengths.const_data_ptr<int64_t>(), out.mutable_data_ptr(),
                                 m_out.mutable_data_ptr<float>(), l_out.mutable_data_ptr<float>(), batch, heads,
                                 kv_heads, n_queries, t_max, dim, static_cast<float>(scale), split_size, dtype,
                                 c10::cuda::getCurrentCUDAStream()),
               op);
  return {out, m_out, l_out};
}

}  // namespace
}  // namespace fusedtx::cuda

TORCH_LIBRARY_IMPL(fusedtx_native, CUDA, m) {
  m.impl("causal_attention_forward", &fusedtx::cuda::causal_attention_forward_cuda);
}
