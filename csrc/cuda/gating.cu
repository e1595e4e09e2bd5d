// topk_gating / topk_gating_backward on the device: kernels/gating.h through kernels/dispatch.h.
#include "cuda/exec.cuh"

namespace moe_kernels::cuda {

cudaError_t launch_topk_gating(FloatType in, const GatingParams& p, cudaStream_t stream) {
  CudaExec ex;
  ex.stream = stream;
  topk_gating_on(ex, in, p);
  return ex.err;
}

cudaError_t launch_topk_gating_backward(FloatType in, const GatingBackwardParams& p,
                                        cudaStream_t stream) {
  CudaExec ex;
  ex.stream = stream;
  topk_gating_backward_on(ex, in, p);
  return ex.err;
}

}  // namespace moe_kernels::cuda
