// One CUTLASS grouped GEMM instantiation (tc_kernels.cuh, tc_entry.h): sm80_f16_nt_d.
#include "cuda/cutlass/tc_kernels.cuh"

namespace moe_kernels::cuda::tc {
MOE_TC_DEFINE_SM80(sm80_f16_nt_d, cutlass::half_t, 1, 1)
}  // namespace moe_kernels::cuda::tc
