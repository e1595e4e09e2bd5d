#pragma once
// The device executor of the kernel launch sequences (kernels/*.h `run_*` templates): CUDA
// launches of kernel_entry<K>, memsets and CUB's scan on one stream.  The host harness
// (tests/cpp/cuda_emulator.cpp) has the same interface.
#include <cub/device/device_scan.cuh>

#include "cuda/launchers.h"
#include "cuda/simt.h"

namespace moe_kernels::cuda {

struct CudaExec {
  cudaStream_t stream = nullptr;
  void* scan_temp = nullptr;
  size_t scan_temp_bytes = 0;
  cudaError_t err = cudaSuccess;

  int64_t max_blocks() const { return kMaxBlocks; }

  template <class K>
  void launch(const K& k, int64_t blocks, size_t smem) {
    if (blocks <= 0 || err != cudaSuccess) return;
    if (smem > 48 * 1024) {
      err = cudaFuncSetAttribute(kernel_entry<K>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(smem));
      if (err != cudaSuccess) return;
    }
    kernel_entry<K><<<static_cast<unsigned>(blocks), K::kThreads, smem, stream>>>(k);
    err = cudaGetLastError();
  }

  void fill_bytes(void* p, int value, size_t bytes) {
    if (err == cudaSuccess) err = cudaMemsetAsync(p, value, bytes, stream);
  }

  void exclusive_sum(const int32_t* in, int32_t* out, int64_t n) {
    if (err != cudaSuccess) return;
    size_t bytes = scan_temp_bytes;
    err = cub::DeviceScan::ExclusiveSum(scan_temp, bytes, in, out, n, stream);
  }
};

}  // namespace moe_kernels::cuda
