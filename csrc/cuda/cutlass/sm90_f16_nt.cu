// One CUTLASS grouped GEMM instantiation (tc_kernels.cuh, tc_entry.h): sm90_f16_nt.
#define MOE_TC_SM90
#include "cuda/cutlass/tc_kernels.cuh"

namespace moe_kernels::cuda::tc {
MOE_TC_DEFINE_SM90(sm90_f16_nt, cutlass::half_t, 1, 0, cutlass::half_t)
}  // namespace moe_kernels::cuda::tc
