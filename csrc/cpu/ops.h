#pragma once
// Registration of the CPU kernels: each op family's file registers its kernels into the one
// TORCH_LIBRARY_IMPL(moe_kernels, CPU) block of register.cpp.
#include <torch/library.h>

namespace moe_kernels::cpu {

void register_gating(torch::Library& m);        // topk_gating(+backward)
void register_routing(torch::Library& m);       // route, permute, unpermute(+backward)
void register_grouped_gemm(torch::Library& m);  // grouped_gemm(+backward)
void register_moe_ffn(torch::Library& m);       // moe_ffn(+backward)

}  // namespace moe_kernels::cpu
