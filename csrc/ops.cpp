// The Python module moe_kernels._C: typed dispatcher calls of the public ops and CPU queries.
//
// No operator schema is written in C++: moe_kernels/_schemas.py is their one source, and
// moe_kernels/_registry.py defines every `moe_kernels::X` from it when moe_kernels is imported.
// The kernels (csrc/cpu/*.cpp: TORCH_LIBRARY_IMPL(moe_kernels, CPU); csrc/cuda: CUDA) register
// when this library loads, before that definition: the dispatcher holds kernels of a not yet
// defined op and checks each kernel's signature, inferred from its C++ type, against the schema
// when the schema arrives (a mismatch fails the definition with a RuntimeError).
// Fake (meta) kernels and autograd are registered in Python too.
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include <mutex>
#include <optional>

#include "cpu/cpu_info.h"
#include "cpu/cpu_utils.h"
#include "cpu/gemm.h"

namespace {

// Python types of the typed-call arguments: a schema `str` arrives as std::string.
template <class T>
struct PyArg {
  using type = T;
};
template <>
struct PyArg<c10::string_view> {
  using type = std::string;
};

inline bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && requires_grad(*t);
}
template <class T>
bool requires_grad(const T&) {
  return false;
}

// `_C.typed.<op>(*args)` runs what `torch.ops.moe_kernels.<op>.default(*args)` runs -- below the
// autograd layer (as under `torch._C._AutoDispatchBelowAutograd()`) when no tensor argument
// needs a gradient, through it otherwise -- as one typed call of the C++ dispatcher, so
// everything keyed on dispatch keys (Python dispatch modes, tracing, functorch, the profiler)
// still sees the op; what it skips is the boxed, schema-driven parsing of the Python arguments,
// a large part of a cold call's fixed cost (bench/NOTES.md, "Per-call cost of the public ops").
// The GIL is released while the op runs; TORCH_WARN becomes a Python warning and errors keep their
// Python types.  moe_kernels/_backends.py calls these when no argument has a __torch_function__
// override (or a torch function mode is active) and torch.compile is not tracing.
template <class Sig>
struct TypedCall;
template <class R, class... Args>
struct TypedCall<R(Args...)> {
  using Handle = c10::TypedOperatorHandle<R(Args...)>;

  // The op's dispatcher handle, looked up at the first call: the schema is defined from Python
  // after this module loads.  `typed<>()` checks the C++ signature against the schema then.  A
  // failed lookup (schema not defined yet) throws and is retried at the next call.
  struct LazyHandle {
    std::string name;
    std::once_flag once;
    std::optional<Handle> handle;
    const Handle& get() {
      std::call_once(once, [this] {
        handle.emplace(
            c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "").typed<R(Args...)>());
      });
      return *handle;
    }
  };

  static void def(py::module_& m, const char* op) {
    auto lazy = std::make_shared<LazyHandle>();
    lazy->name = std::string("moe_kernels::") + op;
    m.def(
        op,
        [lazy](typename PyArg<std::decay_t<Args>>::type... args) -> R {
          HANDLE_TH_ERRORS
          const Handle& handle = lazy->get();
          const bool grad = at::GradMode::is_enabled() && (requires_grad(args) || ...);
          py::gil_scoped_release no_gil;
          if (grad) return handle.call(args...);  // through the autograd layer
          at::AutoDispatchBelowAutograd below;
          return handle.call(args...);
          END_HANDLE_TH_ERRORS_PYBIND
        },
        (std::string("torch.ops.moe_kernels.") + op +
         ".default(*args) as one typed C++ dispatcher call (below the autograd layer when no "
         "tensor argument needs a gradient)")
            .c_str());
  }
};

using OptTensor = std::optional<at::Tensor>;
using T2 = std::tuple<at::Tensor, at::Tensor>;
using T5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void def_typed_calls(py::module_& m) {
  using Tensor = at::Tensor;
  TypedCall<T2(const Tensor&, int64_t, c10::string_view, bool, const OptTensor&, int64_t, int64_t,
               double)>::def(m, "topk_gating");
  TypedCall<T5(const Tensor&, int64_t, int64_t)>::def(m, "route");
  TypedCall<Tensor(const Tensor&, const Tensor&, const Tensor&)>::def(m, "permute");
  TypedCall<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&)>::def(
      m, "unpermute");
  TypedCall<Tensor(const Tensor&, const Tensor&, const Tensor&, bool)>::def(m, "grouped_gemm");
  TypedCall<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                   const OptTensor&, const OptTensor&, c10::string_view, double, double,
                   bool)>::def(m, "moe_ffn");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moe_kernels compiled operators (CPU kernels; schemas: moe_kernels/_schemas.py)";
  py::module_ typed = m.def_submodule("typed",
                                      "Typed C++ dispatcher calls of the public ops (below the "
                                      "autograd layer when no gradient is needed).");
  def_typed_calls(typed);
  m.def("cpu_isa", &moe_kernels::cpu::detected_isa_name,
        "Best CPU instruction set the kernels will use (after MOE_KERNELS_CPU_ISA).");
  m.def(
      "cpu_brgemm_usable",
      [](const std::string& dtype) {
        const at::ScalarType t = dtype == "bf16"   ? at::kBFloat16
                                 : dtype == "fp16" ? at::kHalf
                                                   : at::kFloat;
        return at::native::cpublas::could_pack(t);
      },
      "Whether oneDNN's brgemm (at::native::cpublas) has a packed kernel for dtype "
      "('bf16', 'fp16' or 'fp32') on this CPU.");
  m.def("cpu_brgemm_route", &moe_kernels::cpu::brgemm_route_name,
        "The brgemm route of bf16 weights with many rows (after MOE_KERNELS_CPU_BRGEMM): "
        "'vnni' (oneDNN's packed kernel, AMX), 'plain' (forced, reference brgemm) or 'off'.");
  m.def("cpu_amx_kernel", &moe_kernels::cpu::brgemm_amx_kernel,
        "Whether the 'vnni' brgemm route runs its 32-row weight runs on moe_kernels' own AMX "
        "kernel (self-checked; MOE_KERNELS_CPU_AMX_KERNEL=0 turns it off) rather than oneDNN's "
        "brgemm.");
  m.def(
      "cpu_cache_info",
      [] {
        const auto i = moe_kernels::cpu::block_cache_info();
        py::dict d;
        d["cached_bytes"] = i.cached_bytes;
        d["cached_blocks"] = i.cached_blocks;
        d["limit_bytes"] = i.limit_bytes;
        d["min_bytes"] = i.min_bytes;
        return d;
      },
      "The CPU ops' block cache of large tensors: bytes and blocks cached (freed, kept for reuse), "
      "its limit (MOE_KERNELS_CPU_CACHE_MB) and the smallest tensor it serves, in bytes.");
  m.def("cpu_cache_empty", &moe_kernels::cpu::block_cache_empty,
        "Unmap every block the CPU ops' block cache holds (tensors in use are not affected).");
  m.def("set_debug_mode", &moe_kernels::cpu::set_debug_mode, py::arg("on"),
        "Switch the CPU kernels' debug mode (NaN / INT_MIN-poisoned outputs); its initial value "
        "is MOE_KERNELS_DEBUG's at load.  Use moe_kernels._debug.set_debug_mode, which switches "
        "every backend.");
  m.def("debug_mode", &moe_kernels::cpu::debug_mode, "Whether the CPU kernels' debug mode is on.");
  m.def("_set_test_fault", &moe_kernels::cpu::set_test_fault, py::arg("name"),
        "Tests only: make one CPU kernel leave part of its output unwritten ('permute': its last "
        "row; 'moe_ffn': its last token row), to show the poisoned-output checks catch it; '' "
        "turns it off.");
}
