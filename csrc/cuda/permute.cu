// permute / unpermute / unpermute_backward on the device: kernels/permute.h through
// kernels/dispatch.h.
#include "cuda/exec.cuh"

namespace moe_kernels::cuda {

cudaError_t launch_permute(int unit_bytes, const PermuteParams& p, cudaStream_t stream) {
  CudaExec ex;
  ex.stream = stream;
  if (!permute_on(ex, unit_bytes, p)) return cudaErrorInvalidValue;
  return ex.err;
}

cudaError_t launch_unpermute(FloatType t, bool vec, const UnpermuteParams& p, cudaStream_t stream) {
  CudaExec ex;
  ex.stream = stream;
  unpermute_on(ex, t, vec, p);
  return ex.err;
}

cudaError_t launch_unpermute_backward(FloatType t, FloatType g, bool vec,
                                      const UnpermuteBackwardParams& p, bool need_grad_y,
                                      bool need_grad_w, cudaStream_t stream) {
  CudaExec ex;
  ex.stream = stream;
  unpermute_backward_on(ex, t, g, vec, p, need_grad_y, need_grad_w);
  return ex.err;
}

}  // namespace moe_kernels::cuda
