// The exact (SIMT, any layout) grouped GEMM path and moe_ffn's element-wise kernels on the
// device: kernels/grouped_gemm.h and kernels/expert_ffn.h through kernels/dispatch.h.
#include "cuda/exec.cuh"

namespace moe_kernels::cuda {

cudaError_t launch_segment_gemm(FloatType t, GemmTypes types, const SegmentGemmParams& p,
                                cudaStream_t stream) {
  CudaExec ex;
  ex.stream = stream;
  segment_gemm_on(ex, t, types, p);
  return ex.err;
}

cudaError_t launch_ragged_k(FloatType t, GemmTypes types, const RaggedKParams& p,
                            cudaStream_t stream) {
  CudaExec ex;
  ex.stream = stream;
  ragged_k_on(ex, t, types, p);
  return ex.err;
}

cudaError_t launch_expert_elementwise(ExpertOp op, FloatType t, const ExpertEltParams& p,
                                      void* sums, cudaStream_t stream) {
  CudaExec ex;
  ex.stream = stream;
  expert_elementwise_on(ex, op, t, p, sums);
  return ex.err;
}

}  // namespace moe_kernels::cuda
