// The exact (SIMT, any layout) grouped GEMM path on the device: kernels/grouped_gemm.h through
// kernels/dispatch.h.
#include "cuda/exec.cuh"

namespace moe_kernels::cuda {

cudaError_t launch_segment_gemm(FloatType t, const SegmentGemmParams& p, cudaStream_t stream) {
  CudaExec ex;
  ex.stream = stream;
  segment_gemm_on(ex, t, p);
  return ex.err;
}

cudaError_t launch_ragged_k(FloatType t, const RaggedKParams& p, cudaStream_t stream) {
  CudaExec ex;
  ex.stream = stream;
  ragged_k_on(ex, t, p);
  return ex.err;
}

}  // namespace moe_kernels::cuda
