#pragma once
// MOE_HOST_DEVICE marks helpers compiled for both the CPU kernels and the CUDA kernels.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MOE_HOST_DEVICE __host__ __device__
#define MOE_FORCEINLINE __forceinline__
#else
#define MOE_HOST_DEVICE
#define MOE_FORCEINLINE inline __attribute__((always_inline))
#endif
