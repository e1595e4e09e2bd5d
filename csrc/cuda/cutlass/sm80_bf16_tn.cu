// One CUTLASS grouped GEMM instantiation (tc_kernels.cuh, tc_entry.h): sm80_bf16_tn.
#include "cuda/cutlass/tc_kernels.cuh"

namespace moe_kernels::cuda::tc {
MOE_TC_DEFINE_SM80(sm80_bf16_tn, cutlass::bfloat16_t, 2, 0, cutlass::bfloat16_t)
}  // namespace moe_kernels::cuda::tc
