// AVX-512 GEMM kernels (also used under "amx": the fp32 micro-kernel runs on AVX-512 units).
// 8x32 register tile: 16 zmm accumulators, 2 B vectors, 1 broadcast.
//
// Built with MOE_KERNELS_SIMDE defined (tests/cpp/gemm_check.cpp does this), the same source
// compiles against SIMDe's portable implementations of the AVX-512 intrinsics, so that this path
// is executed and checked on machines without AVX-512.
#if defined(MOE_KERNELS_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define MOE_AVX512
#else
#include <immintrin.h>
#define MOE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))
#endif

#include <vector>

#include "cpu/gemm_impl.h"

namespace moe_kernels::cpu::gemm_detail {
namespace {

constexpr int kMr = 8, kNr = 32;

template <DType D>
MOE_AVX512 inline __m512 ld16(const char* p) {
  if constexpr (D == DType::kF32) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
  } else if constexpr (D == DType::kBF16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

// Sum of the 16 lanes in a fixed order.
MOE_AVX512 inline float hsum16(__m512 v) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += t[i];
  return s;
}

MOE_AVX512 void micro_full(int64_t kc, const float* a, int64_t lda, const float* b, float* c,
                           int64_t ldc, bool accumulate) {
  __m512 acc[kMr][2];
#pragma GCC unroll 8
  for (int i = 0; i < kMr; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * kNr), b1 = _mm512_loadu_ps(b + k * kNr + 16);
#pragma GCC unroll 8
    for (int i = 0; i < kMr; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + k]);
      acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kMr; ++i) {
    float* ci = c + i * ldc;
    if (accumulate) {
      acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_loadu_ps(ci));
      acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_loadu_ps(ci + 16));
    }
    _mm512_storeu_ps(ci, acc[i][0]);
    _mm512_storeu_ps(ci + 16, acc[i][1]);
  }
}

// Fewer rows than the tile: run the full tile on a zero-padded copy of A and keep the rows.
MOE_AVX512 void micro_avx512(int64_t kc, const float* a, int64_t lda, const float* b, float* c,
                             int64_t ldc, bool accumulate, int rows) {
  if (rows == kMr) return micro_full(kc, a, lda, b, c, ldc, accumulate);
  thread_local std::vector<float> ap, cp;
  ap.assign(static_cast<size_t>(kMr) * kc, 0.f);
  cp.resize(static_cast<size_t>(kMr) * kNr);
  for (int i = 0; i < rows; ++i)
    for (int64_t k = 0; k < kc; ++k) ap[i * kc + k] = a[i * lda + k];
  micro_full(kc, ap.data(), kc, b, cp.data(), kNr, false);
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < kNr; ++j)
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + cp[i * kNr + j] : cp[i * kNr + j];
}

void pack_b_avx512(int64_t N, int64_t kc, const Operand& B, float* dst) {
  pack_b_generic(N, kc, B, dst, kNr);
}

template <DType D>
MOE_AVX512 void dot_t(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda,
                      const Operand& B, float* C, int64_t ldc) {
  const int64_t es = D == DType::kF32 ? 4 : 2;
  const int64_t k16 = K / 16 * 16;
  for (int64_t n = 0; n < N; ++n) {
    const char* bp = row_ptr(B, n);
    for (int64_t m = 0; m < M; ++m) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < k16; k += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + m * lda + k), ld16<D>(bp + k * es), acc);
      float s = hsum16(acc);
      for (int64_t k = k16; k < K; ++k) s += a[m * lda + k] * load_elem(bp, D, k);
      C[m * ldc + n] = s;
    }
  }
}

MOE_AVX512 void dot_avx512(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda,
                           const Operand& B, float* C, int64_t ldc) {
  switch (B.dt) {
    case DType::kF32: return dot_t<DType::kF32>(M, N, K, a, lda, B, C, ldc);
    case DType::kBF16: return dot_t<DType::kBF16>(M, N, K, a, lda, B, C, ldc);
    default: return dot_t<DType::kF16>(M, N, K, a, lda, B, C, ldc);
  }
}

}  // namespace

const KernelSet& avx512_kernels() {
  static const KernelSet ks{kMr, kNr, 256, 96, 256, 4,
                            &micro_avx512, &pack_b_avx512, &load_a_generic, &dot_avx512};
  return ks;
}

}  // namespace moe_kernels::cpu::gemm_detail
