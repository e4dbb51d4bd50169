// Argument checks shared by the CPU ops (csrc/cpu) and the CUDA glue (csrc/cuda/*_glue.cpp):
// torch headers, host compiler only. Each names the op first ("<op>_<part>: ..."), so that a
// wrong call says which native op refused it and why (docs/design.md, "The contract", point 7).
// `device` is the device type the op's implementation runs on (at::kCPU or at::kCUDA).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

namespace fusedtx {

inline void check_device(const at::Tensor& t, at::DeviceType device, const char* op, const char* name) {
  TORCH_CHECK(t.device().type() == device, op, ": ", name, " must be a ", at::DeviceTypeName(device),
              " tensor, got one on ", t.device());
}

// A contiguous (rows, cols) tensor: the layout of the row-wise ops.
inline void check_rows(const at::Tensor& t, at::DeviceType device, const char* op, const char* name) {
  check_device(t, device, op, name);
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), op, ": ", name, " must be a contiguous 2-D tensor, got sizes ",
              t.sizes());
}

// A contiguous 1-D tensor: the layout of the elementwise ops.
inline void check_flat(const at::Tensor& t, at::DeviceType device, const char* op, const char* name) {
  check_device(t, device, op, name);
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), op, ": ", name, " must be a contiguous 1-D tensor, got sizes ",
              t.sizes());
}

// An attention operand: (batch, heads, positions, head_dim) on q's device, any strides but a
// contiguous last dim (the kernels read rows through the other three strides).
inline void check_attention_operand(const at::Tensor& t, const at::Tensor& q, at::DeviceType device, const char* op,
                                    const char* name) {
  check_device(t, device, op, name);
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (batch, heads, positions, head_dim), got sizes ", t.sizes());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, op, ": ", name,
              " must have a contiguous last dim (stride 1), got strides ", t.strides());
}

// k and v against q (all checked by check_attention_operand): one shape for k and v, q's batch
// and head dim, a head count that divides q's (grouped-query attention); a positive head dim and
// a split size that is a power of two >= 16 (docs/design.md, "Attention split size").
inline void check_attention_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t split_size,
                                   const char* op) {
  const int64_t heads = q.size(1), kv_heads = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), op, ": k and v must have q's batch size ", q.size(0), ", got ", k.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), op, ": k and v must have q's head dim ", q.size(3), ", got ", k.size(3));
  TORCH_CHECK(q.size(3) > 0, op, ": the head dim must be positive, got ", q.size(3));
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, op, ": q's head count ", heads,
              " must be a multiple of k and v's head count ", kv_heads);
  TORCH_CHECK(split_size >= 16 && (split_size & (split_size - 1)) == 0, op,
              ": split_size must be a power of two >= 16, got ", split_size);
}

// The attention forward's q, k and v: operands on one device, of one dtype, with matching shapes.
inline void check_attention_forward_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         int64_t split_size, at::DeviceType device, const char* op) {
  check_attention_operand(q, q, device, op, "q");
  check_attention_operand(k, q, device, op, "k");
  check_attention_operand(v, q, device, op, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ", v.scalar_type());
  check_attention_shapes(q, k, v, split_size, op);
}

// seqlens of the attention forward, on the CPU (contiguous int64, one per sequence): sequence b
// has its n_queries queries at the end of its seqlens[b] valid keys, within the cache's t_max.
inline void check_seqlens_values(const at::Tensor& seqlens, int64_t n_queries, int64_t t_max, const char* op) {
  const int64_t* len = seqlens.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < seqlens.size(0); ++b) {
    TORCH_CHECK(len[b] >= n_queries && len[b] <= t_max, op, ": seqlens[", b, "] = ", len[b],
                " must lie between the query count ", n_queries, " and the cache length ", t_max);
  }
}

// The attention backward's inputs: grad_o, q, k, v as the forward's operands, of q's dtype, for a
// full causal pass (k's length is q's); m and l the forward's float32 (batch, heads, length) row
// statistics on q's device.
inline void check_attention_backward_args(const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& m, const at::Tensor& l,
                                          int64_t split_size, at::DeviceType device, const char* op) {
  using Named = std::initializer_list<std::pair<const at::Tensor*, const char*>>;
  check_attention_operand(q, q, device, op, "q");
  for (auto [t, name] : Named{{&grad_o, "grad_o"}, {&k, "k"}, {&v, "v"}}) {
    check_attention_operand(*t, q, device, op, name);
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
                ", got ", t->scalar_type());
  }
  const int64_t batch = q.size(0), heads = q.size(1), length = q.size(2);
  TORCH_CHECK(grad_o.sizes() == q.sizes(), op, ": grad_o must have q's shape ", q.sizes(), ", got ", grad_o.sizes());
  TORCH_CHECK(k.size(2) == length, op, ": k and v must have q's length ", length,
              " (the backward is for a full causal pass), got ", k.size(2));
  check_attention_shapes(q, k, v, split_size, op);
  for (auto [t, name] : Named{{&m, "m"}, {&l, "l"}}) {
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 3 && t->size(0) == batch && t->size(1) == heads && t->size(2) == length, op, ": ", name,
                " must have shape (", batch, ", ", heads, ", ", length, "), got ", t->sizes());
  }
}

}  // namespace fusedtx
