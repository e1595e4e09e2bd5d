#pragma once
// Entry points of the CUTLASS grouped GEMM instantiations (csrc/cuda/cutlass/*.cu, one
// instantiation per file so that they compile in parallel).  No CUTLASS or torch header here: the
// dispatcher (csrc/cuda/tc_gemm.cu) and the bindings include this.
//
// Every instantiation computes, for each group g of a launch, D_g = A_g * B_g (fp32 accumulation,
// no source operand) over the per-group arrays that the device-side builder (kernels/tc_gemm.h)
// writes from `offs`: problem sizes (m, n, k) as int32 triples, operand pointers and leading
// dimensions.  D is row-major, in the operands' type or fp32 (the *_f32out instantiations); A
// and B are row- or column-major by the instantiation's layout:
//   nn: A row-major, B row-major       (forward with b [E, K, N]; dA with b [E, N, K])
//   nt: A row-major, B column-major    (forward with b [E, N, K]; dA with b [E, K, N])
//   tn: A column-major, B row-major    (the weight gradient: a segment's rows are the K axis)
#if defined(MOE_KERNELS_CUDA_EMULATION)
#include "cuda/launchers.h"
#else
#include <cuda_runtime_api.h>
#endif

#include <cstddef>
#include <cstdint>

#include "cuda/kernels/tc_gemm.h"  // MOE_TC_KERNELS, the list of instantiations

namespace moe_kernels::cuda::tc {

// The per-group arrays of one launch (device memory) and where to run it.
struct TcLaunch {
  int groups = 0;
  int32_t* shapes = nullptr;  // [groups][3]: m, n, k
  void** ptr_a = nullptr;
  void** ptr_b = nullptr;
  void** ptr_d = nullptr;
  int64_t* lda = nullptr;
  int64_t* ldb = nullptr;
  int64_t* ldd = nullptr;
  void* workspace = nullptr;  // tc_workspace_<name>(groups, sm_count) bytes, 256-byte aligned
  int device = 0;
  int sm_count = 0;
  cudaStream_t stream = nullptr;
};

#define MOE_TC_DECLARE(name, sm, dtype, layout, tile, out) \
  size_t tc_workspace_##name(int groups, int sm_count);    \
  cudaError_t tc_run_##name(const TcLaunch& launch);
MOE_TC_KERNELS(MOE_TC_DECLARE)
#undef MOE_TC_DECLARE

}  // namespace moe_kernels::cuda::tc
