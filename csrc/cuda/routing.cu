// route: the kernels of kernels/routing.h and CUB's exclusive scan.
#include "cuda/exec.cuh"

namespace moe_kernels::cuda {

size_t route_scan_temp_bytes(int64_t n) {
  size_t bytes = 0;
  if (n > 0) {
    cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), n);
  }
  return bytes;
}

cudaError_t launch_route(const RouteParams& p, void* scan_temp, size_t scan_temp_bytes,
                         cudaStream_t stream) {
  CudaExec ex;
  ex.stream = stream;
  ex.scan_temp = scan_temp;
  ex.scan_temp_bytes = scan_temp_bytes;
  run_route(ex, p);
  return ex.err;
}

}  // namespace moe_kernels::cuda
