// One CUTLASS grouped GEMM instantiation (tc_kernels.cuh, tc_entry.h): sm80_f16_nt.
#include "cuda/cutlass/tc_kernels.cuh"

namespace moe_kernels::cuda::tc {
MOE_TC_DEFINE_SM80(sm80_f16_nt, cutlass::half_t, 1, 0, cutlass::half_t)
}  // namespace moe_kernels::cuda::tc
