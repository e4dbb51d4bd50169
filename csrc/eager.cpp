// The Python module fusedtx._C, whose functions are the native backend's eager fast paths: the
// common case of an op's body (fusedtx/ops/<op>.py) on CPU tensors, in one call from Python.
//
// A body in Python costs host time on every call: reshapes and views, a policy lookup, the
// kernel found, and torch.ops' argument parsing against the schema -- on a decode step's
// one-row calls several times the kernel's own time. Each function here does the same steps in
// C++ and calls the same kernel through the dispatcher (so the profiler, and every
// dispatch-level mode or subclass, still sees "fusedtx_native::<kernel>"): the same bits, the
// same output shapes, strides and views as the Python body.
//
// Each returns None wherever its case does not hold -- another device, float64 or an empty
// input where the body takes the reference backend, a tensor subclass or a __torch_function__
// mode (which must see the body's own calls), a value out of range -- and the body then runs in
// Python, which also raises the clear errors. The Python body stays the specification of these
// paths; tests/test_eager_native.py compares the two bit for bit, case by case.
//
// The *_call functions go one layer further up: a public call of fusedtx.functional (linear,
// swiglu_ffn, layer_norm, rms_norm, activation, rope, attention_with_kv_cache) for inference, before the backend is resolved or an argument checked.
// fusedtx.functional offers them a call only where its backend is native on CPU tensors without
// resolving and nothing traces (fusedtx.functional._native_lane); each then also returns None
// where the Python checks would raise (so they raise), where a gradient is to be recorded, under
// a dispatch mode or a torch.func transform (which must see the registered op fusedtx::<name>),
// and wherever the op's Python body would not reach its native fast path above.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <exception>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace {

using Matmul = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                  int64_t, bool, int64_t, const std::optional<at::Tensor>&, int64_t);
using RowNorm = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&, double, int64_t);
using LayerNorm = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                                 const std::optional<at::Tensor>&, double, int64_t);
using Activation = at::Tensor(const at::Tensor&, int64_t);
using Rope = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
using Attention = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, double, int64_t);

// A kernel's typed dispatcher handle, found on first use (the registrations have run by then).
template <typename Signature>
c10::TypedOperatorHandle<Signature> kernel(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

PyObject* parameter_type = nullptr;  // torch.nn.Parameter, set when the module is made

// A torch.Tensor or torch.nn.Parameter (whose __torch_function__ is torch's disabled one): an
// argument whose every call the dispatcher alone sees. A subclass may override
// __torch_function__ and must see the body's calls in Python.
bool plain(PyObject* obj) {
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(obj));
  return type == THPVariableClass || type == parameter_type;
}

// The arguments' tensors, or nothing when one is neither None (where allowed) nor plain.
struct Tensors {
  bool ok = true;

  const at::Tensor* required(PyObject* obj) {
    if (!ok || !plain(obj)) {
      ok = false;
      return nullptr;
    }
    return &THPVariable_Unpack(obj);
  }
  std::optional<at::Tensor> optional(PyObject* obj) {
    if (obj == Py_None) return std::nullopt;
    const at::Tensor* t = required(obj);
    return t == nullptr ? std::nullopt : std::optional<at::Tensor>(*t);
  }
};

bool cpu(const at::Tensor& t) { return t.device().is_cpu(); }

// fusedtx/ops/linear.py _same_steps: b's strides are a's along every dim longer than 1.
bool steps_match(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// The conditions of the *_call functions that C++ sees: no dispatch mode (it must see the
// registered op), no torch.func transform (functorch's dynamic layer keys are included while
// one runs), and no gradient to record (grad mode off, or no input requiring one).
bool untracked(std::initializer_list<const at::Tensor*> inputs) {
  if (c10::impl::dispatch_mode_enabled()) return false;
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  if (included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode)) {
    return false;
  }
  if (!c10::GradMode::is_enabled()) return true;
  return std::none_of(inputs.begin(), inputs.end(), [](const at::Tensor* t) { return t != nullptr && t->requires_grad(); });
}

// fusedtx/ops/linear.py SUPPORTED_DTYPES: the dtypes of the matmul's operands.
bool matmul_dtype(const at::Tensor& t) {
  const at::ScalarType s = t.scalar_type();
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf;
}

// A CPU tensor of `like`'s dtype (the linear checks' check_like_x), or absent.
bool like(const std::optional<at::Tensor>& t, const at::Tensor& x) {
  return !t || (cpu(*t) && t->scalar_type() == x.scalar_type());
}

// A Python int that is not a bool (the ops' _is_size), as int64; nullopt otherwise.
std::optional<int64_t> size_value(PyObject* obj) {
  if (!PyLong_CheckExact(obj)) return std::nullopt;
  const long long v = PyLong_AsLongLong(obj);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return std::nullopt;
  }
  return v;
}

// Python ints and floats that the caller (fusedtx/ops) passes already checked (anything else
// leaves a Python error set, which the caller returns).
int64_t integer(PyObject* obj) { return PyLong_AsLongLong(obj); }
double real(PyObject* obj) { return PyFloat_AsDouble(obj); }

// Releases the GIL while the kernel runs, as torch.ops does (other Python threads go on).
struct WithoutGil {
  PyThreadState* state = PyEval_SaveThread();
  ~WithoutGil() { PyEval_RestoreThread(state); }
  WithoutGil() = default;
  WithoutGil(const WithoutGil&) = delete;
  WithoutGil& operator=(const WithoutGil&) = delete;
};

PyObject* none() { Py_RETURN_NONE; }

PyObject* pair(const at::Tensor& a, const at::Tensor& b) {
  PyObject* out = PyTuple_New(2);
  if (out == nullptr) return nullptr;
  PyTuple_SET_ITEM(out, 0, THPVariable_Wrap(a));
  PyTuple_SET_ITEM(out, 1, THPVariable_Wrap(b));
  return out;
}

// Runs a fast path: a kernel's error becomes the Python exception torch.ops would raise, never
// a C++ exception through the interpreter.
template <typename Body>
PyObject* guarded(const char* name, Py_ssize_t nargs, Py_ssize_t expected, Body body) {
  if (nargs != expected) {
    PyErr_Format(PyExc_TypeError, "fusedtx._C.%s takes %zd arguments, got %zd", name, expected, nargs);
    return nullptr;
  }
  // A TorchFunctionMode must see the body's Python calls.
  if (at::impl::torch_function_mode_enabled()) return none();
  try {
    return body();
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
  } catch (const c10::IndexError& e) {
    PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
  } catch (const c10::NotImplementedError& e) {
    PyErr_SetString(PyExc_NotImplementedError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// The matmul of fusedtx/ops/linear.py _forward without save_preact: act(x @ weight.T + bias) of
// shape (..., out_features), a view of the kernel's (M, N) output; the kernel reads weight (and
// weight_odd, the SwiGLU pair) where it lies, transposed. Called without the GIL.
at::Tensor matmul_rows(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       int64_t activation, int64_t k_block, const std::optional<at::Tensor>& odd) {
  static const auto matmul = kernel<Matmul>("fusedtx_native::linear_matmul");
  const std::optional<at::Tensor> b_odd = odd ? std::optional<at::Tensor>(odd->t()) : std::nullopt;
  at::Tensor out = std::get<0>(matmul.call(x.reshape({-1, x.size(-1)}), weight.t(), bias, activation, false, k_block,
                                           b_odd, odd ? 1 : 0));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out.size(1);  // out_features: the weight's rows, half of them for SwiGLU
  return out.contiguous().view(shape);
}

// fusedtx/ops/linear.py _forward without save_preact (inference):
//   linear(x, weight, bias, activation, k_block, weight_odd) -> (y, empty preact)
PyObject* linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded("linear", nargs, 6, [&]() -> PyObject* {
    Tensors tensors;
    const at::Tensor* x = tensors.required(args[0]);
    const at::Tensor* weight = tensors.required(args[1]);
    const std::optional<at::Tensor> bias = tensors.optional(args[2]);
    const std::optional<at::Tensor> odd = tensors.optional(args[5]);
    if (!tensors.ok || !cpu(*x) || x->scalar_type() == at::kDouble || x->dim() < 1) return none();
    const int64_t activation = integer(args[3]), k_block = integer(args[4]);
    if (PyErr_Occurred()) return nullptr;
    if (x->numel() == 0 || weight->size(0) == 0) return none();  // the body's reference path: no kernel
    // The kernel steps both halves of the pair with weight's strides (the body copies otherwise).
    if (odd && (odd->sizes() != weight->sizes() || !steps_match(*weight, *odd))) return none();
    at::Tensor y, preact;
    {
      WithoutGil released;
      y = matmul_rows(*x, *weight, bias, activation, k_block, odd);
      preact = at::empty({0}, x->options());
    }
    return pair(y, preact);
  });
}

// What fusedtx/ops/linear.py check_args accepts of x (..., K), and the body's native case: a
// CPU tensor of a matmul dtype with at least one element (an empty one takes the reference).
bool matmul_rows_ok(const at::Tensor& x) { return cpu(x) && matmul_dtype(x) && x.dim() >= 1 && x.numel() > 0; }

// What check_args accepts of weight (N, K) and bias (N) beside x (..., K) (a CPU tensor of
// weight's dtype), and the body's native case (N > 0).
bool weight_ok(const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t k) {
  return like(weight, x) && weight.dim() == 2 && weight.size(1) == k && weight.size(0) > 0 && like(bias, x) &&
         (!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0)));
}

// fusedtx.functional.linear(x, weight, bias, activation=...) for inference:
//   linear_call(k_block, x, weight, bias, activation) -> y
// activation: the code of None, "gelu" or "gelu_tanh" (reference.ACTIVATIONS); -1 for another.
PyObject* linear_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded("linear_call", nargs, 5, [&]() -> PyObject* {
    Tensors tensors;
    const at::Tensor* x = tensors.required(args[1]);
    const at::Tensor* weight = tensors.required(args[2]);
    const std::optional<at::Tensor> bias = tensors.optional(args[3]);
    const std::optional<int64_t> k_block = size_value(args[0]), activation = size_value(args[4]);
    if (!tensors.ok || !k_block || !activation || *activation < 0 || *activation > 2) return none();
    if (!matmul_rows_ok(*x) || !weight_ok(*weight, bias, *x, x->size(-1)) || !untracked({x, weight, bias ? &*bias : nullptr})) {
      return none();
    }
    at::Tensor y;
    {
      WithoutGil released;
      y = matmul_rows(*x, *weight, bias, *activation, *k_block, std::nullopt);
    }
    return THPVariable_Wrap(y);
  });
}

// fusedtx.functional.swiglu_ffn(x, gate_weight, up_weight, down_weight, ...) for inference,
// without gate and up biases (the body packs them in Python):
//   swiglu_ffn_call(k_block, x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias) -> y
// The body's two matmuls: gate and up read where they are with silu(g) * u in the epilogue
// (reference.ACT_SWIGLU), then down.
PyObject* swiglu_ffn_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded("swiglu_ffn_call", nargs, 8, [&]() -> PyObject* {
    constexpr int64_t kSwiglu = 3;  // reference.ACT_SWIGLU
    Tensors tensors;
    const at::Tensor* x = tensors.required(args[1]);
    const at::Tensor* gate = tensors.required(args[2]);
    const at::Tensor* up = tensors.required(args[3]);
    const at::Tensor* down = tensors.required(args[4]);
    const std::optional<at::Tensor> down_bias = tensors.optional(args[7]);
    const std::optional<int64_t> k_block = size_value(args[0]);
    if (!tensors.ok || !k_block || args[5] != Py_None || args[6] != Py_None) return none();
    if (!matmul_rows_ok(*x) || !weight_ok(*gate, std::nullopt, *x, x->size(-1)) || !like(*up, *x) ||
        up->sizes() != gate->sizes() || !steps_match(*gate, *up) || !weight_ok(*down, down_bias, *x, gate->size(0)) ||
        !untracked({x, gate, up, down, down_bias ? &*down_bias : nullptr})) {
      return none();
    }
    at::Tensor y;
    {
      WithoutGil released;
      const at::Tensor hidden = matmul_rows(*x, *gate, std::nullopt, kSwiglu, *k_block, *up);
      y = matmul_rows(hidden, *down, down_bias, 0, *k_block, std::nullopt);
    }
    return THPVariable_Wrap(y);
  });
}

// fusedtx/ops/_row_norm.py as_rows: t as a contiguous (rows, n) tensor, t itself when it is one.
at::Tensor as_rows(const at::Tensor& t, int64_t n) {
  return t.dim() == 2 && t.size(1) == n && t.is_contiguous() ? t : t.contiguous().view({-1, n});
}

// fusedtx/ops/_row_norm.py flat: a parameter as a contiguous 1-D tensor.
std::optional<at::Tensor> flat(const std::optional<at::Tensor>& p) {
  if (!p || (p->dim() == 1 && p->is_contiguous())) return p;
  return p->contiguous().view({-1});
}

// The kernel call of fusedtx/ops/rms_norm.py _forward: y like x, rstd of x's leading dims (views
// of the kernel's (rows, n) and (rows,) outputs unless x is (rows, n) already). Without the GIL.
std::tuple<at::Tensor, at::Tensor> rms_norm_rows(const at::Tensor& x, int64_t n, int64_t dims,
                                                 const std::optional<at::Tensor>& weight, double eps, int64_t lanes) {
  static const auto forward = kernel<RowNorm>("fusedtx_native::rms_norm_forward");
  auto [y, rstd] = forward.call(as_rows(x, n), flat(weight), eps, lanes);
  if (y.sizes() != x.sizes()) {
    y = y.view(x.sizes());
    rstd = rstd.view(x.sizes().slice(0, x.dim() - dims));
  }
  return {y, rstd};
}

// fusedtx/ops/rms_norm.py _forward:
//   rms_norm(x, n, normalized_dims, weight, eps, lanes) -> (y, rstd)
// x normalised over its trailing normalized_dims dims (n elements).
PyObject* rms_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded("rms_norm", nargs, 6, [&]() -> PyObject* {
    Tensors tensors;
    const at::Tensor* x = tensors.required(args[0]);
    const std::optional<at::Tensor> weight = tensors.optional(args[3]);
    if (!tensors.ok || !cpu(*x) || x->numel() == 0) return none();
    const int64_t n = integer(args[1]), dims = integer(args[2]), lanes = integer(args[5]);
    const double eps = real(args[4]);
    if (PyErr_Occurred()) return nullptr;
    at::Tensor y, rstd;
    {
      WithoutGil released;
      std::tie(y, rstd) = rms_norm_rows(*x, n, dims, weight, eps, lanes);
    }
    return pair(y, rstd);
  });
}

// What fusedtx/ops/_row_norm.py normalize_shape and check_norm_args accept as normalized_shape
// for x: an int, or a tuple (torch.Size) or list of ints, non-empty, positive, x's trailing
// dims. Its element count, or nullopt.
std::optional<int64_t> normalized_numel(PyObject* shape, const at::Tensor& x, int64_t* dims) {
  std::vector<int64_t> sizes;
  if (const std::optional<int64_t> one = size_value(shape)) {
    sizes.push_back(*one);
  } else if (PyTuple_Check(shape) || PyList_Check(shape)) {
    const Py_ssize_t len = PySequence_Fast_GET_SIZE(shape);
    PyObject** items = PySequence_Fast_ITEMS(shape);
    for (Py_ssize_t i = 0; i < len; ++i) {
      const std::optional<int64_t> d = size_value(items[i]);
      if (!d) return std::nullopt;
      sizes.push_back(*d);
    }
  } else {
    return std::nullopt;
  }
  const int64_t count = static_cast<int64_t>(sizes.size());
  if (count == 0 || count > x.dim()) return std::nullopt;
  int64_t n = 1;
  for (int64_t i = 0; i < count; ++i) {
    if (sizes[i] < 1 || x.size(x.dim() - count + i) != sizes[i]) return std::nullopt;
    n *= sizes[i];
  }
  *dims = count;
  return n;
}

// What fusedtx/ops/_row_norm.py check_norm_args accepts of x's dtype.
bool norm_dtype_ok(const at::Tensor& x) { return matmul_dtype(x) || x.scalar_type() == at::kDouble; }

// What check_norm_args accepts of a weight or bias beside x normalised over its last `dims`
// dims: absent, or a CPU tensor of that shape with x's dtype (or float32 beside a float16 /
// bfloat16 x).
bool norm_param_ok(const std::optional<at::Tensor>& param, const at::Tensor& x, int64_t dims) {
  if (!param) return true;
  const at::ScalarType dtype = x.scalar_type();
  const bool low = dtype == at::kHalf || dtype == at::kBFloat16;
  return cpu(*param) && param->sizes() == x.sizes().slice(x.dim() - dims) &&
         (param->scalar_type() == dtype || (low && param->scalar_type() == at::kFloat));
}

// An eps the checks accept (check_real with least=0) and the lane takes: a Python float,
// finite and >= 0, or None for `if_none`; nullopt otherwise (an int eps takes the Python path).
std::optional<double> eps_value(PyObject* obj, std::optional<double> if_none) {
  if (obj == Py_None) return if_none;
  if (!PyFloat_CheckExact(obj)) return std::nullopt;
  const double eps = PyFloat_AS_DOUBLE(obj);
  return std::isfinite(eps) && eps >= 0 ? std::optional<double>(eps) : std::nullopt;
}

// fusedtx.functional.rms_norm(x, normalized_shape, weight, eps) for inference:
//   rms_norm_call(lanes, x, normalized_shape, weight, eps) -> y
// eps None is the machine epsilon of the compute dtype (float64's for float64 x, else float32's).
PyObject* rms_norm_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded("rms_norm_call", nargs, 5, [&]() -> PyObject* {
    Tensors tensors;
    const at::Tensor* x = tensors.required(args[1]);
    const std::optional<at::Tensor> weight = tensors.optional(args[3]);
    const std::optional<int64_t> lanes = size_value(args[0]);
    if (!tensors.ok || !lanes || !cpu(*x) || x->numel() == 0 || !norm_dtype_ok(*x)) return none();
    int64_t dims = 0;
    const std::optional<int64_t> n = normalized_numel(args[2], *x, &dims);
    const std::optional<double> eps = eps_value(args[4], x->scalar_type() == at::kDouble ? DBL_EPSILON : FLT_EPSILON);
    if (!n || !eps || !norm_param_ok(weight, *x, dims) || !untracked({x, weight ? &*weight : nullptr})) return none();
    at::Tensor y;
    {
      WithoutGil released;
      y = std::get<0>(rms_norm_rows(*x, *n, dims, weight, *eps, *lanes));
    }
    return THPVariable_Wrap(y);
  });
}

// fusedtx.functional.layer_norm(x, normalized_shape, weight, bias, eps) for inference:
//   layer_norm_call(lanes, x, normalized_shape, weight, bias, eps) -> y
// fusedtx/ops/layer_norm.py _forward: the kernel on x as (rows, n), y viewed back as x.
PyObject* layer_norm_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded("layer_norm_call", nargs, 6, [&]() -> PyObject* {
    Tensors tensors;
    const at::Tensor* x = tensors.required(args[1]);
    const std::optional<at::Tensor> weight = tensors.optional(args[3]);
    const std::optional<at::Tensor> bias = tensors.optional(args[4]);
    const std::optional<int64_t> lanes = size_value(args[0]);
    if (!tensors.ok || !lanes || !cpu(*x) || x->numel() == 0 || !norm_dtype_ok(*x)) return none();
    int64_t dims = 0;
    const std::optional<int64_t> n = normalized_numel(args[2], *x, &dims);
    const std::optional<double> eps = eps_value(args[5], std::nullopt);
    if (!n || !eps || !norm_param_ok(weight, *x, dims) || !norm_param_ok(bias, *x, dims) ||
        (weight && bias && weight->scalar_type() != bias->scalar_type()) ||
        !untracked({x, weight ? &*weight : nullptr, bias ? &*bias : nullptr})) {
      return none();
    }
    at::Tensor y;
    {
      WithoutGil released;
      static const auto forward = kernel<LayerNorm>("fusedtx_native::layer_norm_forward");
      y = std::get<0>(forward.call(as_rows(*x, *n), flat(weight), flat(bias), *eps, *lanes));
      if (y.sizes() != x->sizes()) y = y.view(x->sizes());
    }
    return THPVariable_Wrap(y);
  });
}

// fusedtx.functional.activation(x, activation) for inference:
//   activation_call(x, activation code) -> y
// activation: the code of "gelu", "gelu_tanh" or "silu" (reference.ELEMENTWISE); -1 for another.
// fusedtx/ops/activation.py _forward: the kernel on x as one contiguous row, y viewed back as x.
PyObject* activation_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded("activation_call", nargs, 2, [&]() -> PyObject* {
    Tensors tensors;
    const at::Tensor* x = tensors.required(args[0]);
    const std::optional<int64_t> code = size_value(args[1]);
    if (!tensors.ok || !code || *code < 0 || !cpu(*x) || x->numel() == 0 || !matmul_dtype(*x) || !untracked({x})) {
      return none();
    }
    at::Tensor y;
    {
      WithoutGil released;
      static const auto forward = kernel<Activation>("fusedtx_native::activation_forward");
      y = forward.call(x->is_contiguous() ? x->reshape({-1}) : x->contiguous().view({-1}), *code).view(x->sizes());
    }
    return THPVariable_Wrap(y);
  });
}

// fusedtx/ops/causal_attention.py unit_head_dim: a unit-stride last dim (copied once otherwise).
at::Tensor unit_head_dim(const at::Tensor& t) { return t.stride(-1) == 1 || t.size(-1) <= 1 ? t : t.contiguous(); }

// The least and greatest of a contiguous CPU int64 tensor's values (one or more).
std::pair<int64_t, int64_t> bounds(const at::Tensor& t) {
  const int64_t* v = t.data_ptr<int64_t>();
  int64_t lo = v[0], hi = v[0];
  for (int64_t i = 1; i < t.numel(); ++i) {
    lo = std::min(lo, v[i]);
    hi = std::max(hi, v[i]);
  }
  return {lo, hi};
}

// The kernel call of fusedtx/ops/rope.py _forward, or an undefined tensor when a position lies
// outside the table (the body raises check_positions' error). Without the GIL.
at::Tensor rope_rows(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  const at::Tensor pos = positions.contiguous();
  const auto [lo, hi] = bounds(pos);
  if (lo < 0 || hi >= cos.size(0)) return {};
  static const auto forward = kernel<Rope>("fusedtx_native::rope_forward");
  return forward.call(unit_head_dim(x), pos, cos.contiguous(), sin.contiguous());
}

// fusedtx/ops/rope.py _forward:
//   rope(x, positions, cos, sin) -> y
PyObject* rope(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded("rope", nargs, 4, [&]() -> PyObject* {
    Tensors tensors;
    const at::Tensor* x = tensors.required(args[0]);
    const at::Tensor* positions = tensors.required(args[1]);
    const at::Tensor* cos = tensors.required(args[2]);
    const at::Tensor* sin = tensors.required(args[3]);
    if (!tensors.ok || !cpu(*x) || !cpu(*positions) || x->numel() == 0) return none();
    at::Tensor y;
    {
      WithoutGil released;
      y = rope_rows(*x, *positions, *cos, *sin);
    }
    return y.defined() ? THPVariable_Wrap(y) : none();
  });
}

// fusedtx.functional.rope(x, positions, cos, sin) for inference:
//   rope_call(x, positions, cos, sin) -> y
// What fusedtx/ops/rope.py check_args accepts, on CPU tensors, x not empty.
PyObject* rope_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded("rope_call", nargs, 4, [&]() -> PyObject* {
    Tensors tensors;
    const at::Tensor* x = tensors.required(args[0]);
    const at::Tensor* positions = tensors.required(args[1]);
    const at::Tensor* cos = tensors.required(args[2]);
    const at::Tensor* sin = tensors.required(args[3]);
    if (!tensors.ok || !cpu(*x) || !cpu(*positions) || x->numel() == 0 || x->dim() != 4) return none();
    const at::ScalarType dtype = x->scalar_type();
    if (!(matmul_dtype(*x) || dtype == at::kDouble)) return none();
    const int64_t dim = x->size(3);
    if (dim < 2 || dim % 2 || positions->scalar_type() != at::kLong || positions->dim() != 2 ||
        positions->size(0) != x->size(0) || positions->size(1) != x->size(2)) {
      return none();
    }
    for (const at::Tensor* t : {cos, sin}) {
      if (!cpu(*t) || t->scalar_type() != at::kFloat || t->dim() != 2 || t->size(1) != dim / 2 || t->size(0) < 1 ||
          t->requires_grad()) {
        return none();
      }
    }
    if (cos->sizes() != sin->sizes() || !untracked({x})) return none();
    at::Tensor y;
    {
      WithoutGil released;
      y = rope_rows(*x, *positions, *cos, *sin);
    }
    return y.defined() ? THPVariable_Wrap(y) : none();
  });
}

// The kernel call of fusedtx/ops/causal_attention.py _kv_cache_forward, or an undefined tensor
// when a length cannot hold its queries or exceeds the cache (the body raises check_seqlens'
// error). Without the GIL.
at::Tensor attention_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seqlens,
                          double scale, int64_t split_size) {
  const at::Tensor lengths = seqlens.to(at::kLong).contiguous();
  const auto [lo, hi] = bounds(lengths);
  if (lo < q.size(2) || hi > k.size(2)) return {};
  static const auto forward = kernel<Attention>("fusedtx_native::causal_attention_forward");
  return std::get<0>(forward.call(unit_head_dim(q), unit_head_dim(k), unit_head_dim(v), lengths, scale, split_size));
}

// fusedtx/ops/causal_attention.py _kv_cache_forward:
//   attention_with_kv_cache(q, k_cache, v_cache, seqlens, scale, split_size) -> o
PyObject* attention_with_kv_cache(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded("attention_with_kv_cache", nargs, 6, [&]() -> PyObject* {
    Tensors tensors;
    const at::Tensor* q = tensors.required(args[0]);
    const at::Tensor* k = tensors.required(args[1]);
    const at::Tensor* v = tensors.required(args[2]);
    const at::Tensor* seqlens = tensors.required(args[3]);
    if (!tensors.ok || !cpu(*q) || !cpu(*seqlens) || q->numel() == 0) return none();
    const double scale = real(args[4]);
    const int64_t split_size = integer(args[5]);
    if (PyErr_Occurred()) return nullptr;
    at::Tensor o;
    {
      WithoutGil released;
      o = attention_rows(*q, *k, *v, *seqlens, scale, split_size);
    }
    return o.defined() ? THPVariable_Wrap(o) : none();
  });
}

// fusedtx.functional.attention_with_kv_cache(q, k_cache, v_cache, seqlens, scale=, split_size=):
//   attention_with_kv_cache_call(q, k_cache, v_cache, seqlens, scale or None, split_size) -> o
// What fusedtx/ops/causal_attention.py check_kv_cache_args accepts, on CPU tensors, q not empty;
// scale None is 1 / sqrt(head_dim), as the Python path computes it (both roundings correct).
PyObject* attention_with_kv_cache_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded("attention_with_kv_cache_call", nargs, 6, [&]() -> PyObject* {
    Tensors tensors;
    const at::Tensor* q = tensors.required(args[0]);
    const at::Tensor* k = tensors.required(args[1]);
    const at::Tensor* v = tensors.required(args[2]);
    const at::Tensor* seqlens = tensors.required(args[3]);
    const std::optional<int64_t> split_size = size_value(args[5]);
    if (!tensors.ok || !split_size || *split_size < 16 || (*split_size & (*split_size - 1))) return none();
    if (!cpu(*q) || !matmul_dtype(*q) || q->dim() != 4 || q->numel() == 0 || !like(*k, *q) || !like(*v, *q) ||
        k->dim() != 4 || k->sizes() != v->sizes() || k->size(0) != q->size(0) || k->size(3) != q->size(3) ||
        k->size(1) < 1 || q->size(1) % k->size(1)) {
      return none();
    }
    const at::ScalarType lengths = seqlens->scalar_type();
    if (!cpu(*seqlens) || !(lengths == at::kLong || lengths == at::kInt) || seqlens->dim() != 1 ||
        seqlens->size(0) != q->size(0)) {
      return none();
    }
    double scale = 1.0 / std::sqrt(static_cast<double>(q->size(3)));
    if (args[4] != Py_None) {
      if (!PyFloat_CheckExact(args[4])) return none();
      scale = PyFloat_AS_DOUBLE(args[4]);
      if (!std::isfinite(scale)) return none();
    }
    if (!untracked({q, k, v})) return none();
    at::Tensor o;
    {
      WithoutGil released;
      o = attention_rows(*q, *k, *v, *seqlens, scale, *split_size);
    }
    return o.defined() ? THPVariable_Wrap(o) : none();
  });
}

PyMethodDef methods[] = {
    {"linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&linear)), METH_FASTCALL,
     "fusedtx.ops.linear's body on the native backend, its common case (else None)"},
    {"linear_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&linear_call)), METH_FASTCALL,
     "fusedtx.functional.linear's inference call on the native backend, its common case (else None)"},
    {"swiglu_ffn_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&swiglu_ffn_call)), METH_FASTCALL,
     "fusedtx.functional.swiglu_ffn's inference call on the native backend, its common case (else None)"},
    {"rms_norm_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&rms_norm_call)), METH_FASTCALL,
     "fusedtx.functional.rms_norm's inference call on the native backend, its common case (else None)"},
    {"layer_norm_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&layer_norm_call)), METH_FASTCALL,
     "fusedtx.functional.layer_norm's inference call on the native backend, its common case (else None)"},
    {"activation_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&activation_call)), METH_FASTCALL,
     "fusedtx.functional.activation's inference call on the native backend, its common case (else None)"},
    {"rms_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&rms_norm)), METH_FASTCALL,
     "fusedtx.ops.rms_norm's body on the native backend, its common case (else None)"},
    {"rope_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&rope_call)), METH_FASTCALL,
     "fusedtx.functional.rope's inference call on the native backend, its common case (else None)"},
    {"attention_with_kv_cache_call",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&attention_with_kv_cache_call)), METH_FASTCALL,
     "fusedtx.functional.attention_with_kv_cache's call on the native backend, its common case (else None)"},
    {"rope", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&rope)), METH_FASTCALL,
     "fusedtx.ops.rope's body on the native backend, its common case (else None)"},
    {"attention_with_kv_cache",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&attention_with_kv_cache)), METH_FASTCALL,
     "fusedtx.ops.causal_attention's KV-cache body on the native backend, its common case (else None)"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C", "fusedtx native kernels (torch.ops.fusedtx_native.*) and their eager fast paths",
    -1, methods,
};

}  // namespace

#define FUSEDTX_CONCAT_(a, b) a##b
#define FUSEDTX_CONCAT(a, b) FUSEDTX_CONCAT_(a, b)

// `import fusedtx._C` (the ahead-of-time build) and the just-in-time build's import, under its
// own name, both land here; loading the library has run the registrations already.
PyMODINIT_FUNC FUSEDTX_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* parameter_module = PyImport_ImportModule("torch.nn.parameter");
  if (parameter_module == nullptr) return nullptr;
  parameter_type = PyObject_GetAttrString(parameter_module, "Parameter");
  Py_DECREF(parameter_module);
  if (parameter_type == nullptr) return nullptr;
  return PyModule_Create(&module_def);
}
