#pragma once
// The thread/warp abstraction the CUDA kernel bodies are written against.
//
// A kernel body is a functor `K` with `template <class Ctx> MOE_HOST_DEVICE void operator()(Ctx&)
// const`, its parameters as members and `static constexpr int kThreads` (threads per block).
// `Ctx` gives what a CUDA thread can ask and do:
//
//   tid() ntid() bid() nbid()   threadIdx.x, blockDim.x, blockIdx.x, gridDim.x
//   lane() warp()               lane in the warp (0..31), warp in the block
//   shfl_xor(v, m) shfl(v, src) full-warp shuffles (all 32 lanes must take part)
//   sync() sync_warp()          __syncthreads(), __syncwarp()
//   shared<T>()                 the block's dynamic shared memory
//
// On the GPU `DeviceCtx` (below) maps each call to the intrinsic and `kernel_entry<K>` is the
// __global__ function.  On the CPU the test harness (tests/cpp/cuda_emulator.cpp) runs the same
// bodies with every thread of a block as a fiber and warps emulated in lock step: a shuffle is a
// write of every lane's value, a barrier of the warp and a read, exactly the hardware's exchange;
// a barrier that not every thread reaches is reported as an error.  So the arithmetic, the index
// math and the synchronisation of every kernel are executed by the CPU tests.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace moe_kernels::cuda {

constexpr int kWarpSize = 32;

// 16 bytes moved by one 128-bit global load or store.
struct alignas(16) Vec16 {
  uint32_t w[4];
};

// 128-bit loads/stores (the pointers must be 16-byte aligned).  On the device they are single
// LDG.E.128 / STG.E.128 instructions, read-only loads through the non-coherent cache.
MOE_HOST_DEVICE MOE_FORCEINLINE Vec16 load16(const void* p) {
#if defined(__CUDA_ARCH__)
  const uint4 v = __ldg(static_cast<const uint4*>(p));
  return Vec16{{v.x, v.y, v.z, v.w}};
#else
  Vec16 v;
  memcpy(&v, p, sizeof(v));
  return v;
#endif
}
MOE_HOST_DEVICE MOE_FORCEINLINE void store16(void* p, const Vec16& v) {
#if defined(__CUDA_ARCH__)
  *static_cast<uint4*>(p) = make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]);
#else
  memcpy(p, &v, sizeof(v));
#endif
}

// Butterfly reductions over the 32 lanes (xor distances 16, 8, 4, 2, 1): every lane gets the
// result, and the order of the additions is fixed, so results are bitwise reproducible.
template <class Ctx>
MOE_HOST_DEVICE MOE_FORCEINLINE float warp_sum(Ctx& c, float v) {
#pragma unroll
  for (int m = kWarpSize / 2; m >= 1; m >>= 1) v += c.shfl_xor(v, m);
  return v;
}
template <class Ctx>
MOE_HOST_DEVICE MOE_FORCEINLINE float warp_max(Ctx& c, float v) {
#pragma unroll
  for (int m = kWarpSize / 2; m >= 1; m >>= 1) v = fmaxf(v, c.shfl_xor(v, m));
  return v;
}

#if defined(__CUDACC__)
extern __shared__ __align__(16) unsigned char moe_dynamic_smem[];

struct DeviceCtx {
  __device__ __forceinline__ int tid() const { return static_cast<int>(threadIdx.x); }
  __device__ __forceinline__ int ntid() const { return static_cast<int>(blockDim.x); }
  __device__ __forceinline__ int64_t bid() const { return static_cast<int64_t>(blockIdx.x); }
  __device__ __forceinline__ int64_t nbid() const { return static_cast<int64_t>(gridDim.x); }
  __device__ __forceinline__ int lane() const { return static_cast<int>(threadIdx.x) & 31; }
  __device__ __forceinline__ int warp() const { return static_cast<int>(threadIdx.x) >> 5; }
  template <class T>
  __device__ __forceinline__ T shfl_xor(T v, int m) const {
    return __shfl_xor_sync(0xffffffffu, v, m);
  }
  template <class T>
  __device__ __forceinline__ T shfl(T v, int src) const {
    return __shfl_sync(0xffffffffu, v, src);
  }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ void sync_warp() const { __syncwarp(); }
  template <class T>
  __device__ __forceinline__ T* shared() const {
    return reinterpret_cast<T*>(moe_dynamic_smem);
  }
};

template <class K>
__global__ void __launch_bounds__(K::kThreads) kernel_entry(const K k) {
  DeviceCtx c;
  k(c);
}
#endif

}  // namespace moe_kernels::cuda
