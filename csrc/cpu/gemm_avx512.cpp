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

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/gemm_impl.h"

namespace moe_kernels::cpu::gemm_detail {
namespace {

constexpr int kMr = 8, kNr = 32;

// 16 bf16 values widened to fp32.
MOE_AVX512 inline __m512 ld16_bf16(const char* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
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

// C[m, 0] = a[m, :] . B(0, :) for one bf16 weight row, fp32 FMAs (the vdpbf16ps kernel's last
// 1-3 weight rows).
MOE_AVX512 void dot_row_bf16(int64_t M, int64_t K, const float* a, int64_t lda, const Operand& B,
                             float* C, int64_t ldc) {
  const int64_t k16 = K / 16 * 16;
  const char* bp = row_ptr(B, 0);
  for (int64_t m = 0; m < M; ++m) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < k16; k += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + m * lda + k), ld16_bf16(bp + k * 2), acc);
    C[m * ldc] = dot_tail(hsum16(acc), a + m * lda, bp, DType::kBF16, k16, K);
  }
}

// ---- AVX-512-BF16 dot path (bf16 weights, few token rows: decode) ----------------------------
//
// vdpbf16ps multiplies 32 bf16 pairs and adds them into 16 fp32 lanes (the products of two bf16
// are exact in fp32).  The token rows are fp32 here (x converted, or fp32 activations), so each
// row is split into up to three bf16 rows whose sum is the fp32 value: hi = bf16(x),
// mid = bf16(x - hi), lo = bf16(x - hi - mid); 3 x 8 significant bits cover fp32's 24, so the
// result has fp32 accuracy.  A row that is already bf16 (x in a bf16 model) needs one term and
// costs one instruction per 32 weights; fp32 activations (the down projection) need three, which
// the weight stream hides only for a few rows (kDpMaxRows below).
#if defined(MOE_KERNELS_SIMDE)
#define MOE_AVX512BF16
#else
#define MOE_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma,f16c")))
#endif

inline uint16_t f32_to_bf16_rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

constexpr int kSplitTerms = 3;

// dst[(m * 3 + t) * ldd + k]: the t-th bf16 term of a[m, k] (zero where unused); returns the
// number of terms the rows need (1-3).
int split_bf16(int64_t M, int64_t K, const float* a, int64_t lda, uint16_t* dst, int64_t ldd) {
  int terms = 1;
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* d0 = dst + (m * kSplitTerms) * ldd;
    uint16_t* d1 = d0 + ldd;
    uint16_t* d2 = d1 + ldd;
    for (int64_t k = 0; k < K; ++k) {
      const float x = a[m * lda + k];
      const uint16_t h = f32_to_bf16_rne(x);
      const float r1 = x - bf16_bits_to_f32(h);
      const uint16_t md = f32_to_bf16_rne(r1);
      const float r2 = r1 - bf16_bits_to_f32(md);
      const uint16_t lo = f32_to_bf16_rne(r2);
      d0[k] = h;
      d1[k] = md;
      d2[k] = lo;
      if ((lo & 0x7fffu) != 0)
        terms = 3;
      else if ((md & 0x7fffu) != 0 && terms < 2)
        terms = 2;
    }
  }
  return terms;
}

template <int MM>
MOE_AVX512BF16 void dot_tile_dpbf16(int64_t K, const uint16_t* xs, int64_t ldx, int terms,
                                    const float* a, int64_t lda, const char* const* bp, float* C,
                                    int64_t ldc, const char* const* pf) {
  constexpr int NN = 4;
  __m512 acc[MM][NN];
  for (int i = 0; i < MM; ++i)
    for (int j = 0; j < NN; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t k32 = K / 32 * 32;
  for (int64_t k = 0; k < k32; k += 32) {
    if (pf != nullptr) {
      for (int j = 0; j < NN; ++j) _mm_prefetch(pf[j] + k * 2, _MM_HINT_T1);
    }
    __m512bh w[NN];
    for (int j = 0; j < NN; ++j) std::memcpy(&w[j], bp[j] + k * 2, 64);
    for (int i = 0; i < MM; ++i) {
      for (int t = 0; t < terms; ++t) {
        __m512bh xv;
        std::memcpy(&xv, xs + (i * kSplitTerms + t) * ldx + k, 64);
        for (int j = 0; j < NN; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, w[j]);
      }
    }
  }
  for (int i = 0; i < MM; ++i) {
    for (int j = 0; j < NN; ++j) {
      C[i * ldc + j] = dot_tail(hsum16(acc[i][j]), a + i * lda, bp[j], DType::kBF16, k32, K);
    }
  }
}

MOE_AVX512BF16 void dot_bf16_dp(int64_t M, int64_t N, int64_t K, float* a, int64_t lda,
                                const Operand& B, float* C, int64_t ldc) {
  thread_local std::vector<uint16_t> xs_buf;
  const int64_t ldx = (K + 31) / 32 * 32;
  if (static_cast<int64_t>(xs_buf.size()) < M * kSplitTerms * ldx)
    xs_buf.resize(M * kSplitTerms * ldx);
  uint16_t* xs = xs_buf.data();
  const int terms = split_bf16(M, K, a, lda, xs, ldx);
  for_row_groups(
      N, B,
      [&](int64_t n, const char* const* bp, const char* const* pf) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
          dot_tile_dpbf16<4>(K, xs + m * kSplitTerms * ldx, ldx, terms, a + m * lda, lda, bp,
                             C + m * ldc + n, ldc, m == 0 ? pf : nullptr);
        for (; m < M; ++m)
          dot_tile_dpbf16<1>(K, xs + m * kSplitTerms * ldx, ldx, terms, a + m * lda, lda, bp,
                             C + m * ldc + n, ldc, m == 0 ? pf : nullptr);
      },
      // the last 1-3 weight rows, one at a time
      [&](int64_t n) { dot_row_bf16(M, K, a, lda, B.shifted(n, 0), C + n, ldc); });
}

// Rows per call up to which bf16 weights take the vdpbf16ps kernel.  It splits the fp32 rows into
// bf16 terms on every call (gemm_nt's decode tasks each call it), and fp32 rows (the down
// projection's activations) need three terms, three instructions per row and 32 weights: past two
// rows that costs more than the AVX2 kernel's widening FMAs (bench/NOTES.md v16).
constexpr int64_t kDpMaxRows = 2;

// The dot path (up to 16 rows, as AVX2's): the AVX2 kernels' register tiles (four weight rows x
// two token rows, bf16 widened in registers, sequential streams and prefetch), except for bf16
// weights with at most kDpMaxRows rows on CPUs with AVX-512-BF16.  A plain AVX-512 loop, one row at
// a time under one weight row, measured slower than the AVX2 tiles at every row count, and rows
// sent to the packed path convert and pack every weight block per call (bench/NOTES.md v16).
MOE_AVX512 void dot_avx512(int64_t M, int64_t N, int64_t K, float* a, int64_t lda, const Operand& B,
                           float* C, int64_t ldc) {
  // "amx" = the CPU has AVX-512-BF16 (cpu_info.cpp)
  if (B.dt == DType::kBF16 && M <= kDpMaxRows && detected_isa() == Isa::kAmx)
    return dot_bf16_dp(M, N, K, a, lda, B, C, ldc);
  avx2_kernels().dot(M, N, K, a, lda, B, C, ldc);
}

}  // namespace

const KernelSet& avx512_kernels() {
  // A rows are converted by the AVX2 loader (vectorised; the dot path calls it per task).
  static const KernelSet ks{
      kMr,        kNr, 256, 96, 256, 16, &micro_avx512, &pack_b_avx512, avx2_kernels().load_a,
      &dot_avx512};
  return ks;
}

}  // namespace moe_kernels::cpu::gemm_detail
