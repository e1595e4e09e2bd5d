// One CUTLASS grouped GEMM instantiation (tc_kernels.cuh, tc_entry.h): sm80_tf32_nn.
#include "cuda/cutlass/tc_kernels.cuh"

namespace moe_kernels::cuda::tc {
MOE_TC_DEFINE_SM80(sm80_tf32_nn, float, 0, 0, float)
}  // namespace moe_kernels::cuda::tc
