// One CUTLASS grouped GEMM instantiation (tc_kernels.cuh, tc_entry.h): sm90_f16_nn_d.
#define MOE_TC_SM90
#include "cuda/cutlass/tc_kernels.cuh"

namespace moe_kernels::cuda::tc {
MOE_TC_DEFINE_SM90(sm90_f16_nn_d, cutlass::half_t, 0, 1, cutlass::half_t)
}  // namespace moe_kernels::cuda::tc
