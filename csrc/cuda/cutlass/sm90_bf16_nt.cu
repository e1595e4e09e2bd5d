// One CUTLASS grouped GEMM instantiation (tc_kernels.cuh, tc_entry.h): sm90_bf16_nt.
#define MOE_TC_SM90
#include "cuda/cutlass/tc_kernels.cuh"

namespace moe_kernels::cuda::tc {
MOE_TC_DEFINE_SM90(sm90_bf16_nt, cutlass::bfloat16_t, 1, 0, cutlass::bfloat16_t)
}  // namespace moe_kernels::cuda::tc
