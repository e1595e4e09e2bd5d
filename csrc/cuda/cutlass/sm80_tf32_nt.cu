// One CUTLASS grouped GEMM instantiation (tc_kernels.cuh, tc_entry.h): sm80_tf32_nt.
#include "cuda/cutlass/tc_kernels.cuh"

namespace moe_kernels::cuda::tc {
MOE_TC_DEFINE_SM80(sm80_tf32_nt, float, 1, 0, float)
}  // namespace moe_kernels::cuda::tc
