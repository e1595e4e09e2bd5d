// Every moe_kernels operator schema, declared once.  Kernels attach per dispatch key:
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL CPU) and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL CUDA).
// Fake (meta) kernels and autograd are registered in Python (moe_kernels/_registry.py).
// These strings must match moe_kernels/_schemas.py (checked by tests/test_registry.py).
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include "common/cpu_info.h"
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moe_kernels compiled operators (schemas + CPU kernels)";
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
}
