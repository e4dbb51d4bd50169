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
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
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

// fusedtx/ops/linear.py _forward without save_preact (inference):
//   linear(x, weight, bias, activation, k_block, weight_odd) -> (y, empty preact)
// y = act(x @ weight.T + bias) of shape (..., out_features), a view of the kernel's (M, N)
// output; the kernel reads weight (and weight_odd, the SwiGLU pair) where it lies, transposed.
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
      static const auto matmul = kernel<Matmul>("fusedtx_native::linear_matmul");
      const std::optional<at::Tensor> b_odd = odd ? std::optional<at::Tensor>(odd->t()) : std::nullopt;
      at::Tensor out = std::get<0>(matmul.call(x->reshape({-1, x->size(-1)}), weight->t(), bias, activation, false, k_block,
                                               b_odd, odd ? 1 : 0));
      std::vector<int64_t> shape(x->sizes().begin(), x->sizes().end());
      shape.back() = out.size(1);  // out_features: the weight's rows, half of them for SwiGLU
      y = out.contiguous().view(shape);
      preact = at::empty({0}, x->options());
    }
    return pair(y, preact);
  });
}

// fusedtx/ops/_row_norm.py as_rows: t as a contiguous (rows, n) tensor, t itself when it is one.
at::Tensor as_rows(const at::Tensor& t, int64_t n) {
  return t.dim() == 2 && t.size(1) == n && t.is_contiguous() ? t : t.contiguous().view({-1, n});
}

// fusedtx/ops/rms_norm.py _forward:
//   rms_norm(x, n, normalized_dims, weight, eps, lanes) -> (y, rstd)
// x normalised over its trailing normalized_dims dims (n elements); y like x, rstd of x's leading
// dims (views of the kernel's (rows, n) and (rows,) outputs unless x is (rows, n) already).
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
      static const auto forward = kernel<RowNorm>("fusedtx_native::rms_norm_forward");
      std::optional<at::Tensor> flat = weight;
      if (weight && !(weight->dim() == 1 && weight->is_contiguous())) flat = weight->contiguous().view(-1);
      std::tie(y, rstd) = forward.call(as_rows(*x, n), flat, eps, lanes);
      if (y.sizes() != x->sizes()) {
        y = y.view(x->sizes());
        rstd = rstd.view(x->sizes().slice(0, x->dim() - dims));
      }
    }
    return pair(y, rstd);
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

// fusedtx/ops/rope.py _forward:
//   rope(x, positions, cos, sin) -> y
// None also when a position lies outside the table: the body raises check_positions' error.
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
      const at::Tensor pos = positions->contiguous();
      const auto [lo, hi] = bounds(pos);
      if (lo >= 0 && hi < cos->size(0)) {
        static const auto forward = kernel<Rope>("fusedtx_native::rope_forward");
        y = forward.call(unit_head_dim(*x), pos, cos->contiguous(), sin->contiguous());
      }
    }
    return y.defined() ? THPVariable_Wrap(y) : none();
  });
}

// fusedtx/ops/causal_attention.py _kv_cache_forward:
//   attention_with_kv_cache(q, k_cache, v_cache, seqlens, scale, split_size) -> o
// None also when a length cannot hold its queries or exceeds the cache: the body raises
// check_seqlens' error.
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
      const at::Tensor lengths = seqlens->to(at::kLong).contiguous();
      const auto [lo, hi] = bounds(lengths);
      if (lo >= q->size(2) && hi <= k->size(2)) {
        static const auto forward = kernel<Attention>("fusedtx_native::causal_attention_forward");
        o = std::get<0>(forward.call(unit_head_dim(*q), unit_head_dim(*k), unit_head_dim(*v), lengths, scale,
                                     split_size));
      }
    }
    return o.defined() ? THPVariable_Wrap(o) : none();
  });
}

PyMethodDef methods[] = {
    {"linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&linear)), METH_FASTCALL,
     "fusedtx.ops.linear's body on the native backend, its common case (else None)"},
    {"rms_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&rms_norm)), METH_FASTCALL,
     "fusedtx.ops.rms_norm's body on the native backend, its common case (else None)"},
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
