#pragma once
// Scalar float conversions shared by host and device code: fp32 <-> bf16 / fp16 with IEEE
// round-to-nearest-even, NaN kept NaN, fp16 subnormals exact.  The CUDA kernels and the host
// harness that runs their bodies on the CPU (tests/cpp/cuda_emulator.cpp) both use these, so the
// harness checks the very conversions the kernels run.  On the device fp16 uses the hardware
// conversion instructions, which round the same way.
#include <cstdint>
#include <cstring>

#include "common/host_device.h"

#if defined(__CUDA_ARCH__)
#include <cuda_fp16.h>
#endif

namespace moe_kernels {

// Storage types of the 16-bit floats: just the bits (no torch or CUDA header needed).
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

MOE_HOST_DEVICE MOE_FORCEINLINE float f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}
MOE_HOST_DEVICE MOE_FORCEINLINE uint32_t bits_of_f32(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

MOE_HOST_DEVICE MOE_FORCEINLINE float to_f32(float v) { return v; }
MOE_HOST_DEVICE MOE_FORCEINLINE float to_f32(bf16_t v) {
  return f32_from_bits(static_cast<uint32_t>(v.bits) << 16);
}
MOE_HOST_DEVICE MOE_FORCEINLINE float to_f32(f16_t v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.bits));
#else
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu, mant = v.bits & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return f32_from_bits(bits_of_f32(mag) | sign);
  }
  if (exp == 31) return f32_from_bits(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

template <typename T>
MOE_HOST_DEVICE MOE_FORCEINLINE T from_f32(float v);

template <>
MOE_HOST_DEVICE MOE_FORCEINLINE float from_f32<float>(float v) {
  return v;
}
template <>
MOE_HOST_DEVICE MOE_FORCEINLINE bf16_t from_f32<bf16_t>(float v) {
  const uint32_t u = bits_of_f32(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};
  return bf16_t{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
template <>
MOE_HOST_DEVICE MOE_FORCEINLINE f16_t from_f32<f16_t>(float v) {
#if defined(__CUDA_ARCH__)
  return f16_t{__half_as_ushort(__float2half_rn(v))};
#else
  uint32_t x = bits_of_f32(v);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return f16_t{static_cast<uint16_t>(sign | 0x7e00u)};   // NaN
  if (x >= 0x477ff000u) return f16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (x < 0x38800000u) {  // below the smallest normal: a multiple of 2^-24, rounded to even
    const float scaled = f32_from_bits(x) * 16777216.0f;  // exact: a power-of-two scale
    uint32_t q = static_cast<uint32_t>(scaled);
    const float rem = scaled - static_cast<float>(q);
    if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
    return f16_t{static_cast<uint16_t>(sign | q)};  // q == 0x400 is the smallest normal
  }
  uint32_t r = x - 0x38000000u;  // rebias the exponent (127 - 15) << 23
  r += 0xfffu + ((r >> 13) & 1u);
  return f16_t{static_cast<uint16_t>(sign | (r >> 13))};
#endif
}

}  // namespace moe_kernels
