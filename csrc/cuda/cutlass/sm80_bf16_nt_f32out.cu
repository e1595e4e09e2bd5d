// One CUTLASS grouped GEMM instantiation (tc_kernels.cuh, tc_entry.h): sm80_bf16_nt_f32out.
#include "cuda/cutlass/tc_kernels.cuh"

namespace moe_kernels::cuda::tc {
MOE_TC_DEFINE_SM80(sm80_bf16_nt_f32out, cutlass::bfloat16_t, 1, 0, float)
}  // namespace moe_kernels::cuda::tc
