// The single CPU registration block of moe_kernels (schemas: moe_kernels/_schemas.py).
#include "cpu/ops.h"

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  moe_kernels::cpu::register_gating(m);
  moe_kernels::cpu::register_routing(m);
  moe_kernels::cpu::register_grouped_gemm(m);
  moe_kernels::cpu::register_moe_ffn(m);
}
