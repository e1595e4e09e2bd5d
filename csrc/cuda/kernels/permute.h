#pragma once
// Bodies of the CUDA permute / unpermute / unpermute_backward kernels, written against simt.h so
// the CPU tests run them.  One warp per output row, four rows per block at a time, grid-stride
// loops; 64-bit row and element offsets.
//
// Vectorised variants (VecBytes = 16) move rows in 16-byte pieces, one 128-bit load or store per
// lane and piece; they need 16-byte aligned rows (the launcher checks base pointers, row strides
// and row sizes).  Anything else (odd H, strided or misaligned views) takes the element-wise
// variant (VecBytes = element size for permute, 0 for the float kernels).  A plan entry outside
// the valid range (slot outside [0, T*k), row outside [0, R)) reads nothing: the row or slot
// counts as dropped.  The combine adds the k slots of a token in slot order in fp32, no atomics.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/float_convert.h"
#include "cuda/simt.h"

namespace moe_kernels::cuda {

// A B-byte unit of a row: loaded and stored as one instruction.
template <int B>
struct Unit {
  unsigned char b[B];
};
template <int B>
MOE_HOST_DEVICE MOE_FORCEINLINE Unit<B> load_unit(const unsigned char* p) {
  Unit<B> u;
  if constexpr (B == 16) {
    const Vec16 v = load16(p);
    memcpy(u.b, &v, 16);
  } else if constexpr (B == 8) {
    const uint64_t v = *reinterpret_cast<const uint64_t*>(p);
    memcpy(u.b, &v, 8);
  } else if constexpr (B == 4) {
    const uint32_t v = *reinterpret_cast<const uint32_t*>(p);
    memcpy(u.b, &v, 4);
  } else if constexpr (B == 2) {
    const uint16_t v = *reinterpret_cast<const uint16_t*>(p);
    memcpy(u.b, &v, 2);
  } else {
    u.b[0] = *p;
  }
  return u;
}
template <int B>
MOE_HOST_DEVICE MOE_FORCEINLINE void store_unit(unsigned char* p, const Unit<B>& u) {
  if constexpr (B == 16) {
    Vec16 v;
    memcpy(&v, u.b, 16);
    store16(p, v);
  } else if constexpr (B == 8) {
    uint64_t v;
    memcpy(&v, u.b, 8);
    *reinterpret_cast<uint64_t*>(p) = v;
  } else if constexpr (B == 4) {
    uint32_t v;
    memcpy(&v, u.b, 4);
    *reinterpret_cast<uint32_t*>(p) = v;
  } else if constexpr (B == 2) {
    uint16_t v;
    memcpy(&v, u.b, 2);
    *reinterpret_cast<uint16_t*>(p) = v;
  } else {
    *p = u.b[0];
  }
}

struct PermuteParams {
  const unsigned char* x = nullptr;  // [T, H] rows, any element type
  int64_t x_row_bytes = 0;           // x.stride(0) in bytes
  int64_t x_unit_stride = 1;         // distance of consecutive units of a row, in units
  int64_t row_units = 0;             // units per row (H, or H * elem / 16 when vectorised)
  int64_t k = 1, TK = 0, R = 0;
  const int32_t* slot_of_row = nullptr;  // [R]
  unsigned char* out = nullptr;          // [R, H] contiguous
};

// out[r] = x[slot_of_row[r] / k], zeros where slot_of_row[r] < 0.
template <int B>
struct PermuteRows {
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  PermuteParams p;
  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    const int64_t nwarps = c.nbid() * kWarps;
    for (int64_t r = c.bid() * kWarps + c.warp(); r < p.R; r += nwarps) {
      const int64_t slot = p.slot_of_row[r];
      const bool used = slot >= 0 && slot < p.TK;
      const unsigned char* src = p.x + (used ? slot / p.k : 0) * p.x_row_bytes;
      unsigned char* dst = p.out + r * p.row_units * B;
      for (int64_t u = c.lane(); u < p.row_units; u += 32) {
        Unit<B> v{};
        if (used) v = load_unit<B>(src + u * p.x_unit_stride * B);
        store_unit<B>(dst + u * B, v);
      }
    }
  }
};

// N floats from N consecutive elements of T at p (VEC: in 16-byte loads, p 16-byte aligned).
template <class T, int N, bool VEC>
MOE_HOST_DEVICE MOE_FORCEINLINE void load_floats(const T* p, int64_t stride, float* out) {
  if constexpr (VEC) {
    static_assert(N * sizeof(T) % 16 == 0, "whole 16-byte pieces");
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int q = 0; q < N / kPer; ++q) {
      const Vec16 v = load16(p + q * kPer);
      T tmp[kPer];
      memcpy(tmp, &v, 16);
#pragma unroll
      for (int i = 0; i < kPer; ++i) out[q * kPer + i] = to_f32(tmp[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_f32(p[i * stride]);
  }
}
template <class T, int N, bool VEC>
MOE_HOST_DEVICE MOE_FORCEINLINE void store_floats(T* p, const float* in) {
  if constexpr (VEC) {
    static_assert(N * sizeof(T) == 16, "one 16-byte piece");
    T tmp[N];
#pragma unroll
    for (int i = 0; i < N; ++i) tmp[i] = from_f32<T>(in[i]);
    Vec16 v;
    memcpy(&v, tmp, 16);
    store16(p, v);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = from_f32<T>(in[i]);
  }
}

// Elements of a row handled per lane and step: a 16-byte piece of T, or one element.
template <class T, int VecBytes>
constexpr int kElems = VecBytes == 16 ? static_cast<int>(16 / sizeof(T)) : 1;

struct UnpermuteParams {
  const void* y = nullptr;  // [R, H] of T, element strides (y_s0, y_s1)
  int64_t y_s0 = 0, y_s1 = 1, R = 0, H = 0;
  int64_t T = 0, k = 1;
  const int32_t* row_of_slot = nullptr;  // [T, k]
  const float* weights = nullptr;        // [T, k] fp32 or null
  void* out = nullptr;                   // [T, H] of T, contiguous
};

// out[t] = sum over s of w[t, s] * y[row_of_slot[t, s]] (slot order, fp32).
template <class T, int VecBytes>
struct UnpermuteRows {
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int N = kElems<T, VecBytes>;
  UnpermuteParams p;
  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    const T* y = static_cast<const T*>(p.y);
    T* out = static_cast<T*>(p.out);
    const int64_t nwarps = c.nbid() * kWarps;
    const int64_t pieces = p.H / N;
    for (int64_t t = c.bid() * kWarps + c.warp(); t < p.T; t += nwarps) {
      for (int64_t q = c.lane(); q < pieces; q += 32) {
        float acc[N];
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] = 0.f;
        for (int64_t s = 0; s < p.k; ++s) {
          const int64_t r = p.row_of_slot[t * p.k + s];
          if (r < 0 || r >= p.R) continue;
          const float w = p.weights ? p.weights[t * p.k + s] : 1.f;
          float v[N];
          load_floats<T, N, VecBytes == 16>(y + r * p.y_s0 + q * N * p.y_s1, p.y_s1, v);
#pragma unroll
          for (int i = 0; i < N; ++i) acc[i] += w * v[i];
        }
        store_floats<T, N, VecBytes == 16>(out + t * p.H + q * N, acc);
      }
    }
  }
};

struct UnpermuteBackwardParams {
  const void* grad_out = nullptr;  // [T, H] of G, contiguous
  const void* y = nullptr;         // [R, H] of T, element strides (y_s0, y_s1)
  int64_t y_s0 = 0, y_s1 = 1, R = 0, H = 0;
  int64_t T = 0, k = 1;
  const int32_t* row_of_slot = nullptr;  // [T, k]
  const int32_t* slot_of_row = nullptr;  // [R]
  const float* weights = nullptr;        // [T, k] fp32 or null
  void* grad_y = nullptr;                // [R, H] of T, contiguous
  float* grad_w = nullptr;               // [T, k] fp32
};

// grad_y[r] = w[slot] * grad_out[slot / k] (slot = slot_of_row[r]; zeros for padding rows).
template <class T, class G, int VecBytes>
struct UnpermuteGradY {
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int N = kElems<T, VecBytes>;
  UnpermuteBackwardParams p;
  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    const G* g = static_cast<const G*>(p.grad_out);
    T* gy = static_cast<T*>(p.grad_y);
    const int64_t nwarps = c.nbid() * kWarps, TK = p.T * p.k;
    const int64_t pieces = p.H / N;
    for (int64_t r = c.bid() * kWarps + c.warp(); r < p.R; r += nwarps) {
      const int64_t slot = p.slot_of_row[r];
      const bool used = slot >= 0 && slot < TK;
      const float w = used && p.weights ? p.weights[slot] : 1.f;
      const G* src = g + (used ? slot / p.k : 0) * p.H;
      for (int64_t q = c.lane(); q < pieces; q += 32) {
        float v[N];
        if (used) {
          load_floats<G, N, VecBytes == 16>(src + q * N, 1, v);
#pragma unroll
          for (int i = 0; i < N; ++i) v[i] *= w;
        } else {
#pragma unroll
          for (int i = 0; i < N; ++i) v[i] = 0.f;
        }
        store_floats<T, N, VecBytes == 16>(gy + r * p.H + q * N, v);
      }
    }
  }
};

// grad_w[i] = <grad_out[i / k], y[row_of_slot[i]]> (fp32; 0 for a dropped slot): one warp per
// slot, a butterfly sum of the lanes' partial sums.
template <class T, class G, int VecBytes>
struct UnpermuteGradW {
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int N = kElems<T, VecBytes>;
  UnpermuteBackwardParams p;
  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    const G* g = static_cast<const G*>(p.grad_out);
    const T* y = static_cast<const T*>(p.y);
    const int64_t nwarps = c.nbid() * kWarps, TK = p.T * p.k;
    const int64_t pieces = p.H / N;
    for (int64_t i = c.bid() * kWarps + c.warp(); i < TK; i += nwarps) {
      const int64_t r = p.row_of_slot[i];
      float acc = 0.f;
      if (r >= 0 && r < p.R) {
        const G* go = g + (i / p.k) * p.H;
        const T* yr = y + r * p.y_s0;
        for (int64_t q = c.lane(); q < pieces; q += 32) {
          float a[N], b[N];
          load_floats<G, N, VecBytes == 16>(go + q * N, 1, a);
          load_floats<T, N, VecBytes == 16>(yr + q * N * p.y_s1, p.y_s1, b);
#pragma unroll
          for (int e = 0; e < N; ++e) acc += a[e] * b[e];
        }
        acc = warp_sum(c, acc);
      }
      if (c.lane() == 0) p.grad_w[i] = acc;
    }
  }
};

template <int B, class Exec>
void run_permute(Exec& ex, const PermuteParams& p) {
  if (p.R == 0 || p.row_units == 0) return;
  ex.launch(PermuteRows<B>{p}, std::min<int64_t>((p.R + 3) / 4, ex.max_blocks()), 0);
}

template <class T, int VecBytes, class Exec>
void run_unpermute(Exec& ex, const UnpermuteParams& p) {
  if (p.T == 0 || p.H == 0) return;
  ex.launch(UnpermuteRows<T, VecBytes>{p}, std::min<int64_t>((p.T + 3) / 4, ex.max_blocks()), 0);
}

// need_y / need_w: which gradients to compute (grad_w needs weights).
template <class T, class G, int VecBytes, class Exec>
void run_unpermute_backward(Exec& ex, const UnpermuteBackwardParams& p, bool need_y, bool need_w) {
  if (need_y && p.R > 0 && p.H > 0)
    ex.launch(UnpermuteGradY<T, G, VecBytes>{p}, std::min<int64_t>((p.R + 3) / 4, ex.max_blocks()),
              0);
  if (need_w && p.T * p.k > 0)
    ex.launch(UnpermuteGradW<T, G, VecBytes>{p},
              std::min<int64_t>((p.T * p.k + 3) / 4, ex.max_blocks()), 0);
}

}  // namespace moe_kernels::cuda
