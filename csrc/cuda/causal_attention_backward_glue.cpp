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
#include <initializer_list>
#include <tuple>
#include <utility>

#include "glue.h"

namespace fusedtx::cuda {
namespace {

constexpr const char* kOp = "fusedtx causal_attention_backward";

void check_input(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda(), kOp, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == q.device(), kOp, ": ", name, " must be on q's device ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 4, kOp, ": ", name, " must be 4-D (batch, heads, positions, head_dim), got sizes ", t.sizes());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, kOp, ": ", name,
              " must have a contiguous last dim (stride 1), got strides ", t.strides());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward_cuda(const at::Tensor& grad_o, const at::Tensor& q,
                                                                       const at::Tensor& k, const at::Tensor& v,
                                                                       const at::Tensor& m, const at::Tensor& l,
                                                                       double scale, int64_t split_size) {
  check_input(q, q, "q");
  check_input(grad_o, q, "grad_o");
  check_input(k, q, "k");
  check_input(v, q, "v");
  const DType dtype = dtype_of(q, kOp);
  using Named = std::initializer_list<std::pair<const at::Tensor*, const char*>>;
  for (auto [t, name] : Named{{&grad_o, "grad_o"}, {&k, "k"}, {&v, "v"}}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), kOp, ": ", name, " must have q's dtype ", q.scalar_type(),
                ", got ", t->scalar_type());
  }
  const int64_t batch = q.size(0), heads = q.size(1), length = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1);
  TORCH_CHECK(grad_o.sizes() == q.sizes(), kOp, ": grad_o must have q's shape ", q.sizes(), ", got ", grad_o.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), kOp, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == batch, kOp, ": k and v must have q's batch size ", batch, ", got ", k.size(0));
  TORCH_CHECK(k.size(2) == length, kOp, ": k and v must have q's length ", length,
              " (the backward is for a full causal pass), got ", k.size(2));
  TORCH_CHECK(k.size(3) == dim, kOp, ": k and v must have q's head dim ", dim, ", got ", k.size(3));
  TORCH_CHECK(dim > 0 && dim <= kAttentionMaxHeadDim, kOp, ": the CUDA kernel takes head dims 1 ... ",
              kAttentionMaxHeadDim, ", got ", dim);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, kOp, ": q's head count ", heads,
              " must be a multiple of k and v's head count ", kv_heads);
  TORCH_CHECK(split_size >= 16 && (split_size & (split_size - 1)) == 0, kOp,
              ": split_size must be a power of two >= 16, got ", split_size);
  TORCH_CHECK(length <= (int64_t{1} << 30), kOp, ": the CUDA kernel takes sequences of up to 2^30 positions, got ",
              length);
  for (auto [t, name] : Named{{&m, "m"}, {&l, "l"}}) {
    TORCH_CHECK(t->device() == q.device(), kOp, ": ", name, " must be on q's device ", q.device(), ", got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat, kOp, ": ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 3 && t->size(0) == batch && t->size(1) == heads && t->size(2) == length, kOp, ": ", name,
                " must have shape (", batch, ", ", heads, ", ", length, "), got ", t->sizes());
  }
  const int64_t tiles = (length + 31) / 32;  // one thread block per (b, head, 32 positions)
  TORCH_CHECK(batch == 0 || heads == 0 || tiles <= INT32_MAX / heads / batch, kOp,
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
               kOp);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fusedtx::cuda

TORCH_LIBRARY_IMPL(fusedtx_native, CUDA, m) { m.impl("causal_attention_backward", &fusedtx::cuda::causal_attention_backward_cuda); }
