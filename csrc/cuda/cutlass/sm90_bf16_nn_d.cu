// One CUTLASS grouped GEMM instantiation (tc_kernels.cuh, tc_entry.h): sm90_bf16_nn_d.
#define MOE_TC_SM90
#include "cuda/cutlass/tc_kernels.cuh"

namespace moe_kernels::cuda::tc {
MOE_TC_DEFINE_SM90(sm90_bf16_nn_d, cutlass::bfloat16_t, 0, 1, cutlass::bfloat16_t)
}  // namespace moe_kernels::cuda::tc
