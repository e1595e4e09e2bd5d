// Every moe_kernels operator schema, declared once.  Kernels attach per dispatch key:
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL CPU) and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL CUDA).
// Fake (meta) kernels and autograd are registered in Python (moe_kernels/_registry.py).
// These strings must match moe_kernels/_schemas.py (checked by tests/test_registry.py).
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include "cpu/cpu_info.h"
#include "cpu/cpu_utils.h"
#include "cpu/gemm.h"

TORCH_LIBRARY(moe_kernels, m) {
  m.def(
      "topk_gating(Tensor router_logits, int top_k, str scoring, bool renormalize, "
      "Tensor? correction_bias, int num_expert_groups, int topk_groups, "
      "float routed_scaling_factor) -> (Tensor, Tensor)");
  m.def(
      "topk_gating_backward(Tensor grad_weights, Tensor router_logits, Tensor topk_ids, "
      "str scoring, bool renormalize, float routed_scaling_factor) -> Tensor");
  m.def(
      "route(Tensor topk_ids, int num_experts, int block_size) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("permute(Tensor x, Tensor row_of_slot, Tensor slot_of_row) -> Tensor");
  m.def(
      "unpermute(Tensor y, Tensor row_of_slot, Tensor slot_of_row, Tensor? topk_weights) "
      "-> Tensor");
  m.def(
      "unpermute_backward(Tensor grad_out, Tensor y, Tensor row_of_slot, Tensor slot_of_row, "
      "Tensor? topk_weights, bool need_grad_y, bool need_grad_weights) -> (Tensor, Tensor)");
  m.def("grouped_gemm(Tensor a, Tensor b, Tensor offs, bool trans_b) -> Tensor");
  m.def(
      "grouped_gemm_backward(Tensor grad_out, Tensor a, Tensor b, Tensor offs, bool trans_b, "
      "bool need_grad_a, bool need_grad_b) -> (Tensor, Tensor)");
  m.def(
      "moe_ffn(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor topk_weights, "
      "Tensor topk_ids, Tensor? gate_up_bias, Tensor? down_bias, str activation, float alpha, "
      "float limit, bool interleaved) -> Tensor");
  m.def(
      "moe_ffn_backward(Tensor grad_out, Tensor x, Tensor w_gate_up, Tensor w_down, "
      "Tensor topk_weights, Tensor topk_ids, Tensor? gate_up_bias, Tensor? down_bias, "
      "str activation, float alpha, float limit, bool interleaved) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

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
// ~70-100 us per call when the caches are cold, as in decode (bench/NOTES.md v15).  The GIL is
// released while the op runs; TORCH_WARN becomes a Python warning and errors keep their Python
// types.  moe_kernels/_backends.py calls these when no argument has a __torch_function__
// override (or a torch function mode is active) and torch.compile is not tracing.
template <class Sig>
struct TypedCall;
template <class R, class... Args>
struct TypedCall<R(Args...)> {
  static void def(py::module_& m, const char* op) {
    const auto handle = c10::Dispatcher::singleton()
                            .findSchemaOrThrow((std::string("moe_kernels::") + op).c_str(), "")
                            .typed<R(Args...)>();
    m.def(
        op,
        [handle](typename PyArg<std::decay_t<Args>>::type... args) -> R {
          HANDLE_TH_ERRORS
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
  m.doc() = "moe_kernels compiled operators (schemas + CPU kernels)";
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
  m.def("set_debug_mode", &moe_kernels::cpu::set_debug_mode, py::arg("on"),
        "Switch the CPU kernels' debug mode (NaN / INT_MIN-poisoned outputs); its initial value "
        "is MOE_KERNELS_DEBUG's at load.  Use moe_kernels.set_debug_mode, which switches every "
        "backend.");
  m.def("debug_mode", &moe_kernels::cpu::debug_mode, "Whether the CPU kernels' debug mode is on.");
  m.def("_set_test_fault", &moe_kernels::cpu::set_test_fault, py::arg("name"),
        "Tests only: make one CPU kernel leave part of its output unwritten ('permute': its last "
        "row; 'moe_ffn': its last token row), to show the poisoned-output checks catch it; '' "
        "turns it off.");
}
