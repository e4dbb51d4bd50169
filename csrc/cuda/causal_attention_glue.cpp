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

void check_input(const at::Tensor& t, const at::Tensor& q, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (batch, heads, positions, head_dim), got sizes ", t.sizes());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, op, ": ", name,
              " must have a contiguous last dim (stride 1), got strides ", t.strides());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                      const at::Tensor& v, const at::Tensor& seqlens,
                                                                      double scale, int64_t split_size) {
  constexpr const char* op = "fusedtx causal_attention_forward";
  check_input(q, q, op, "q");
  check_input(k, q, op, "k");
  check_input(v, q, op, "v");
  const DType dtype = dtype_of(q, op);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ", v.scalar_type());
  const int64_t batch = q.size(0), heads = q.size(1), n_queries = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), t_max = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == batch, op, ": k and v must have q's batch size ", batch, ", got ", k.size(0));
  TORCH_CHECK(k.size(3) == dim, op, ": k and v must have q's head dim ", dim, ", got ", k.size(3));
  TORCH_CHECK(dim > 0 && dim <= kAttentionMaxHeadDim, op, ": the CUDA kernel takes head dims 1 ... ",
              kAttentionMaxHeadDim, ", got ", dim);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, op, ": q's head count ", heads,
              " must be a multiple of k and v's head count ", kv_heads);
  TORCH_CHECK(split_size >= 16 && (split_size & (split_size - 1)) == 0, op,
              ": split_size must be a power of two >= 16, got ", split_size);
  TORCH_CHECK(seqlens.scalar_type() == at::kLong, op, ": seqlens must be int64, got ", seqlens.scalar_type());
  TORCH_CHECK(seqlens.dim() == 1 && seqlens.size(0) == batch, op, ": seqlens must have shape (", batch, "), got ",
              seqlens.sizes());
  TORCH_CHECK(seqlens.device().is_cpu() || seqlens.device() == q.device(), op,
              ": seqlens must be a CPU tensor or on q's device ", q.device(), ", got ", seqlens.device());
  if (seqlens.device().is_cpu()) {
    const at::Tensor lengths = seqlens.contiguous();
    const int64_t* len = lengths.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(len[b] >= n_queries && len[b] <= t_max, op, ": seqlens[", b, "] = ", len[b],
                  " must lie between the query count ", n_queries, " and the cache length ", t_max);
    }
  }
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

TORCH_LIBRARY_IMPL(fusedtx_native, CUDA, m) { m.impl("causal_attention_forward", &fusedtx::cuda::causal_attention_forward_cuda); }
