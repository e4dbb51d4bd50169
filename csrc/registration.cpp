// The schemas of every native op, in one place, and the Python module stub of fusedtx._C.
//
// Native kernels live in the `fusedtx_native` namespace: csrc/cpu/<op>.cpp registers CPU
// implementations, csrc/cuda/<op>_glue.cpp CUDA ones. fusedtx/ops/<op>.py wraps them (with the
// Triton and reference backends) into the public `fusedtx::<op>` ops with autograd.
#include <Python.h>
#include <torch/library.h>

namespace {
bool built_with_cuda() {
#ifdef FUSEDTX_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY(fusedtx_native, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  // softmax over the last dim of a contiguous (rows, cols) tensor, as reference.softmax_forward
  // / softmax_backward; `lanes` is the lane count of the row sums (fusedtx/ops/softmax.py picks
  // it: fixed on CPU, the threads per row on CUDA).
  m.def("softmax_forward(Tensor x, float scale, bool causal, int n_queries, int lanes) -> Tensor");
  m.def("softmax_backward(Tensor grad_y, Tensor y, float scale, int lanes) -> Tensor");
  // LayerNorm over the last dim of a contiguous (rows, N) tensor, as reference.layer_norm_forward
  // / layer_norm_backward. mean, rstd, dweight and dbias are in the compute dtype (float64 for
  // float64 x, else float32); dweight and dbias are empty when need_param_grads is false.
  m.def("layer_norm_forward(Tensor x, Tensor? weight, Tensor? bias, float eps, int lanes) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
      "bool need_param_grads, int lanes, int groups) -> (Tensor, Tensor, Tensor)");
}

// Lets the ahead-of-time build be imported as `fusedtx._C` (which runs the registrations
// above); the just-in-time build loads the same library with torch.ops.load_library instead.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "fusedtx native kernels; the ops are torch.ops.fusedtx_native.*", -1, nullptr,
  };
  return PyModule_Create(&module);
}
