// One CUTLASS grouped GEMM instantiation (tc_kernels.cuh, tc_entry.h): sm80_f16_nn_d.
#include "cuda/cutlass/tc_kernels.cuh"

namespace moe_kernels::cuda::tc {
MOE_TC_DEFINE_SM80(sm80_f16_nn_d, cutlass::half_t, 0, 1)
}  // namespace moe_kernels::cuda::tc
