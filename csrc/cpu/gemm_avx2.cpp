// AVX2 + FMA (+F16C) GEMM kernels.  bf16/fp16 operands are widened to fp32 on the fly.
//
// Packed path: 6x16 register tile (12 ymm accumulators, 2 B vectors, 1 broadcast of A), the
// classic shape for 16 ymm registers; K-contiguous B is packed with 8x8 in-register transposes.
// Dot path (few rows, K-contiguous B such as nn.Linear weights): 4 weight rows x up to 2 token
// rows per pass, 8 accumulators; the weights are read exactly once from memory, which is what
// bounds decode.  bf16 weights skip the widening instruction (dot_bf16_eo: even/odd halves of
// each 32-bit lane, token rows stored to match), and short rows with 1-2 token rows are read one
// weight row at a time as a single sequential stream; fp16 and fp32 use dot_t.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu/gemm_impl.h"

#define MOE_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace moe_kernels::cpu::gemm_detail {
namespace {

constexpr int kMr = 6, kNr = 16;

template <DType D>
MOE_AVX2 inline __m256 ld8(const char* p) {
  if constexpr (D == DType::kF32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  } else if constexpr (D == DType::kBF16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

template <DType D>
constexpr int64_t esize() {
  return D == DType::kF32 ? 4 : 2;
}

MOE_AVX2 inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

MOE_AVX2 inline void transpose8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4,
                                __m256& r5, __m256& r6, __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r0 = _mm256_permute2f128_ps(s0, s4, 0x20);
  r1 = _mm256_permute2f128_ps(s1, s5, 0x20);
  r2 = _mm256_permute2f128_ps(s2, s6, 0x20);
  r3 = _mm256_permute2f128_ps(s3, s7, 0x20);
  r4 = _mm256_permute2f128_ps(s0, s4, 0x31);
  r5 = _mm256_permute2f128_ps(s1, s5, 0x31);
  r6 = _mm256_permute2f128_ps(s2, s6, 0x31);
  r7 = _mm256_permute2f128_ps(s3, s7, 0x31);
}

template <int MR>
MOE_AVX2 void micro_t(int64_t kc, const float* a, int64_t lda, const float* b, float* c,
                      int64_t ldc, bool accumulate) {
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * kNr), b1 = _mm256_loadu_ps(b + k * kNr + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * lda + k);
      acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    if (accumulate) {
      acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_loadu_ps(ci));
      acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_loadu_ps(ci + 8));
    }
    _mm256_storeu_ps(ci, acc[i][0]);
    _mm256_storeu_ps(ci + 8, acc[i][1]);
  }
}

// Remainder rows get a kernel of their own height instead of a zero-padded full tile.
MOE_AVX2 void micro_avx2(int64_t kc, const float* a, int64_t lda, const float* b, float* c,
                         int64_t ldc, bool accumulate, int rows) {
  switch (rows) {
    case 6: return micro_t<6>(kc, a, lda, b, c, ldc, accumulate);
    case 5: return micro_t<5>(kc, a, lda, b, c, ldc, accumulate);
    case 4: return micro_t<4>(kc, a, lda, b, c, ldc, accumulate);
    case 3: return micro_t<3>(kc, a, lda, b, c, ldc, accumulate);
    case 2: return micro_t<2>(kc, a, lda, b, c, ldc, accumulate);
    default: return micro_t<1>(kc, a, lda, b, c, ldc, accumulate);
  }
}

// B(n, k) with k contiguous: 8 rows x 8 k at a time, transposed in registers.
template <DType D>
MOE_AVX2 void pack_b_kcontig(int64_t N, int64_t kc, const Operand& B, float* dst) {
  thread_local std::vector<char> zeros;
  if (static_cast<int64_t>(zeros.size()) < kc * 4 + 64) zeros.assign(kc * 4 + 64, 0);
  const int64_t k8 = kc / 8 * 8;
  for (int64_t n0 = 0; n0 < N; n0 += kNr) {
    float* panel = dst + (n0 / kNr) * kc * kNr;
    for (int half = 0; half < 2; ++half) {
      const char* rp[8];
      for (int j = 0; j < 8; ++j) {
        const int64_t n = n0 + half * 8 + j;
        rp[j] = n < N ? row_ptr(B, n) : zeros.data();
      }
      float* out = panel + half * 8;
      for (int64_t k = 0; k < k8; k += 8) {
        const int64_t off = k * esize<D>();
        __m256 r0 = ld8<D>(rp[0] + off), r1 = ld8<D>(rp[1] + off), r2 = ld8<D>(rp[2] + off),
               r3 = ld8<D>(rp[3] + off), r4 = ld8<D>(rp[4] + off), r5 = ld8<D>(rp[5] + off),
               r6 = ld8<D>(rp[6] + off), r7 = ld8<D>(rp[7] + off);
        transpose8(r0, r1, r2, r3, r4, r5, r6, r7);
        float* o = out + k * kNr;
        _mm256_storeu_ps(o + 0 * kNr, r0);
        _mm256_storeu_ps(o + 1 * kNr, r1);
        _mm256_storeu_ps(o + 2 * kNr, r2);
        _mm256_storeu_ps(o + 3 * kNr, r3);
        _mm256_storeu_ps(o + 4 * kNr, r4);
        _mm256_storeu_ps(o + 5 * kNr, r5);
        _mm256_storeu_ps(o + 6 * kNr, r6);
        _mm256_storeu_ps(o + 7 * kNr, r7);
      }
      for (int64_t k = k8; k < kc; ++k)
        for (int j = 0; j < 8; ++j) out[k * kNr + j] = load_elem(rp[j], D, k);
    }
  }
}

// B(n, k) with n contiguous (no gather): each k is one contiguous run of 16 columns.
template <DType D>
MOE_AVX2 void pack_b_ncontig(int64_t N, int64_t kc, const Operand& B, float* dst) {
  const char* base = static_cast<const char*>(B.p);
  const int64_t kstride = B.s1 * esize<D>();
  for (int64_t n0 = 0; n0 < N; n0 += kNr) {
    float* panel = dst + (n0 / kNr) * kc * kNr;
    const int64_t nv = std::min<int64_t>(kNr, N - n0);
    const char* col = base + n0 * esize<D>();
    if (nv == kNr) {
      for (int64_t k = 0; k < kc; ++k) {
        const char* p = col + k * kstride;
        _mm256_storeu_ps(panel + k * kNr, ld8<D>(p));
        _mm256_storeu_ps(panel + k * kNr + 8, ld8<D>(p + 8 * esize<D>()));
      }
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int j = 0; j < kNr; ++j)
          panel[k * kNr + j] = j < nv ? load_elem(col + k * kstride, D, j) : 0.f;
    }
  }
}

template <DType D>
MOE_AVX2 void pack_b_t(int64_t N, int64_t kc, const Operand& B, float* dst) {
  if (B.s1 == 1) return pack_b_kcontig<D>(N, kc, B, dst);
  if (B.s0 == 1 && B.gather == nullptr) return pack_b_ncontig<D>(N, kc, B, dst);
  pack_b_generic(N, kc, B, dst, kNr);
}

MOE_AVX2 void pack_b_avx2(int64_t N, int64_t kc, const Operand& B, float* dst) {
  switch (B.dt) {
    case DType::kF32: return pack_b_t<DType::kF32>(N, kc, B, dst);
    case DType::kBF16: return pack_b_t<DType::kBF16>(N, kc, B, dst);
    default: return pack_b_t<DType::kF16>(N, kc, B, dst);
  }
}

template <DType D>
MOE_AVX2 void load_a_t(int64_t M, int64_t kc, const Operand& A, float* dst, int64_t lda) {
  const int64_t k8 = kc / 8 * 8;
  for (int64_t m = 0; m < M; ++m) {
    const char* rp = row_ptr(A, m);
    float* o = dst + m * lda;
    for (int64_t k = 0; k < k8; k += 8) _mm256_storeu_ps(o + k, ld8<D>(rp + k * esize<D>()));
    for (int64_t k = k8; k < kc; ++k) o[k] = load_elem(rp, D, k);
  }
}

MOE_AVX2 void load_a_avx2(int64_t M, int64_t kc, const Operand& A, float* dst, int64_t lda) {
  if (A.s1 != 1) return load_a_generic(M, kc, A, dst, lda);
  switch (A.dt) {
    case DType::kF32: return load_a_t<DType::kF32>(M, kc, A, dst, lda);
    case DType::kBF16: return load_a_t<DType::kBF16>(M, kc, A, dst, lda);
    default: return load_a_t<DType::kF16>(M, kc, A, dst, lda);
  }
}

// NN weight rows x MM token rows, full K.  pf (or null): rows of the next column group, touched
// one cache line ahead per 64 bytes so that their DRAM streams are already running when that
// group starts (the hardware prefetcher needs a few misses per new 4 KiB row to lock on).
template <DType D, int NN, int MM>
MOE_AVX2 void dot_tile(int64_t K, const float* a, int64_t lda, const char* const* bp, float* C,
                       int64_t ldc, const char* const* pf) {
  __m256 acc[MM][NN];
#pragma GCC unroll 8
  for (int i = 0; i < MM; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NN; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t k8 = K / 8 * 8;
  constexpr int64_t kPerLine = 64 / esize<D>();
  for (int64_t k = 0; k < k8; k += 8) {
    if (pf != nullptr && (k % kPerLine) == 0) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) _mm_prefetch(pf[j] + k * esize<D>(), _MM_HINT_T1);
    }
    __m256 bv[NN];
#pragma GCC unroll 8
    for (int j = 0; j < NN; ++j) bv[j] = ld8<D>(bp[j] + k * esize<D>());
#pragma GCC unroll 8
    for (int i = 0; i < MM; ++i) {
      const __m256 av = _mm256_loadu_ps(a + i * lda + k);
#pragma GCC unroll 8
      for (int j = 0; j < NN; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MM; ++i) {
    for (int j = 0; j < NN; ++j) {
      C[i * ldc + j] = dot_tail(hsum(acc[i][j]), a + i * lda, bp[j], D, k8, K);
    }
  }
}

// The first pass over a column group streams it from memory (and prefetches the next group);
// later row blocks re-read it from L1/L2.  Blocks of four token rows take the weight rows two at
// a time (8 accumulators + 2 weight vectors + 1 token vector fit the 16 ymm registers), so each
// weight vector is widened to fp32 once per four token rows instead of once per two: on AVX2 the
// widening, not the FMAs, is what competes with the weight stream at 2-16 rows per expert.
template <DType D, int NN>
MOE_AVX2 void dot_cols(int64_t M, int64_t K, const float* a, int64_t lda, const char* const* bp,
                       float* C, int64_t ldc, const char* const* pf) {
  int64_t m = 0;
  if constexpr (NN % 2 == 0) {
    for (; m + 4 <= M; m += 4) {
      for (int j = 0; j < NN; j += 2) {
        dot_tile<D, 2, 4>(K, a + m * lda, lda, bp + j, C + m * ldc + j, ldc,
                          m == 0 && j == 0 ? pf : nullptr);
      }
    }
  }
  for (; m + 2 <= M; m += 2) {
    dot_tile<D, NN, 2>(K, a + m * lda, lda, bp, C + m * ldc, ldc, m == 0 ? pf : nullptr);
  }
  if (m < M) dot_tile<D, NN, 1>(K, a + m * lda, lda, bp, C + m * ldc, ldc, m == 0 ? pf : nullptr);
}

// bf16 weights, 16 per 256-bit load, without a widening instruction: in each 32-bit lane of the
// raw load, the low bf16 shifted up 16 bits is the even element as fp32 and the lane with its low
// half masked off is the odd element.  The token rows are stored to match (per 16 elements: the 8
// even ones, then the 8 odd ones; see interleave_even_odd), so one pass needs 1 load + 2 integer
// ops per 16 weights where the widening load needs 2 loads + 4 ops.  The sum over k is reordered,
// which fp32 accumulation of bf16 products tolerates like any other blocking.
//
// acc[i * S] += the 16 bf16 weights at w[k, k + 16) times token row i's matching elements (even
// then odd, as stored by interleave_even_odd), for the MM token rows of a (row stride lda).
template <int MM, int S>
MOE_AVX2 __attribute__((always_inline)) inline void fma16_bf16_eo(const char* w, int64_t k,
                                                                  const float* a, int64_t lda,
                                                                  __m256i hi_mask, __m256* acc) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 2));
  const __m256 w_even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  const __m256 w_odd = _mm256_castsi256_ps(_mm256_and_si256(v, hi_mask));
#pragma GCC unroll 8
  for (int i = 0; i < MM; ++i) {
    acc[i * S] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i * lda + k), w_even, acc[i * S]);
    acc[i * S] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i * lda + k + 8), w_odd, acc[i * S]);
  }
}

// NN weight rows x MM token rows over all of K.  pf (or null): the next column group's rows; this
// pass touches one line of them per 64 * pf_div bytes it reads, starting pf_off bytes in, so that
// pf_div passes over the same weight rows (token row pairs re-reading them from L1/L2) share the
// prefetch and DRAM stays busy through all of them, not only through the first.
template <int NN, int MM>
MOE_AVX2 void dot_tile_bf16_eo(int64_t K, const float* a, int64_t lda, const char* const* bp,
                               float* C, int64_t ldc, const char* const* pf, int64_t pf_off,
                               int64_t pf_div) {
  __m256 acc[MM][NN];
#pragma GCC unroll 8
  for (int i = 0; i < MM; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NN; ++j) acc[i][j] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t k16 = K / 16 * 16;
  // Chunks of 32 * pf_div elements, one prefetched line per next row each: the chunk loop keeps
  // the inner loop free of the division a `k % (32 * pf_div)` test costs on every step (measured:
  // the hot 4 x 2 tile 31-50% faster without it, bench/NOTES.md v11).
  const int64_t chunk = 32 * pf_div;
  const char* next[4] = {};
  if (pf != nullptr) {
    for (int j = 0; j < 4; ++j) next[j] = pf[j] + pf_off;
  }
  for (int64_t kb = 0; kb < k16; kb += chunk) {
    if (pf != nullptr) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        _mm_prefetch(next[j], _MM_HINT_T1);
        next[j] += 64;
      }
    }
    const int64_t ke = std::min(k16, kb + chunk);
    for (int64_t k = kb; k < ke; k += 16) {
#pragma GCC unroll 8
      for (int j = 0; j < NN; ++j) fma16_bf16_eo<MM, NN>(bp[j], k, a, lda, hi_mask, &acc[0][j]);
    }
  }
  for (int i = 0; i < MM; ++i) {
    for (int j = 0; j < NN; ++j) {
      C[i * ldc + j] = dot_tail(hsum(acc[i][j]), a + i * lda, bp[j], DType::kBF16, k16, K);
    }
  }
}

// In place: each full block of 16 of a's rows reordered to its 8 even then 8 odd elements (the
// tail after K / 16 * 16 unchanged).
MOE_AVX2 void interleave_even_odd(int64_t M, int64_t K, float* a, int64_t lda) {
  const int64_t k16 = K / 16 * 16;
  for (int64_t m = 0; m < M; ++m) {
    float* d = a + m * lda;
    for (int64_t k = 0; k < k16; k += 16) {
      const __m256 lo = _mm256_loadu_ps(d + k), hi = _mm256_loadu_ps(d + k + 8);
      // per 128-bit lane: (lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6), then the 64-bit pairs reordered
      const __m256 ev = _mm256_shuffle_ps(lo, hi, 0x88), od = _mm256_shuffle_ps(lo, hi, 0xDD);
      _mm256_storeu_ps(d + k, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xD8)));
      _mm256_storeu_ps(d + k + 8,
                       _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), 0xD8)));
    }
  }
}

// Token rows two at a time under four weight rows (8 accumulators): the 4 x 2 tile measured
// faster than 2 x 4 (bench/NOTES.md v6-v7), so blocks of more rows re-read the four weight rows
// from L1/L2 once per row pair.
template <int NN>
MOE_AVX2 void dot_cols_bf16_eo(int64_t M, int64_t K, const float* a, int64_t lda,
                               const char* const* bp, float* C, int64_t ldc,
                               const char* const* pf) {
  const int64_t passes = (M + 1) / 2;
  const int64_t seg = K * 2 / passes / 64 * 64;  // bytes of the next rows each pass prefetches
  int64_t m = 0;
  for (; m + 2 <= M; m += 2)
    dot_tile_bf16_eo<NN, 2>(K, a + m * lda, lda, bp, C + m * ldc, ldc, pf, m / 2 * seg, passes);
  if (m < M)
    dot_tile_bf16_eo<NN, 1>(K, a + m * lda, lda, bp, C + m * ldc, ldc, pf, m / 2 * seg, passes);
}

// Short weight rows with 1-2 token rows (dot_rows_sequential): one weight row at a time, so a
// column block is read as one sequential stream instead of four interleaved 1.5-4 KiB streams,
// with the next row prefetched as a row starts.  Four accumulators per token row over consecutive
// blocks of 16 hide the FMA latency.
template <int MM>
MOE_AVX2 void dot_rows_seq_bf16_eo(int64_t N, int64_t K, const float* a, int64_t lda,
                                   const Operand& B, float* C, int64_t ldc) {
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t k16 = K / 16 * 16, k64 = K / 64 * 64;
  for (int64_t n = 0; n < N; ++n) {
    const char* w = row_ptr(B, n);
    if (n + 1 < N) {
      const char* next = row_ptr(B, n + 1);
      for (int64_t off = 0; off < K * 2; off += 64) _mm_prefetch(next + off, _MM_HINT_T1);
    }
    __m256 acc[MM][4];
#pragma GCC unroll 4
    for (int i = 0; i < MM; ++i)
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) acc[i][q] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k64; k += 64) {
      fma16_bf16_eo<MM, 4>(w, k, a, lda, hi_mask, &acc[0][0]);
      fma16_bf16_eo<MM, 4>(w, k + 16, a, lda, hi_mask, &acc[0][1]);
      fma16_bf16_eo<MM, 4>(w, k + 32, a, lda, hi_mask, &acc[0][2]);
      fma16_bf16_eo<MM, 4>(w, k + 48, a, lda, hi_mask, &acc[0][3]);
    }
    for (int64_t k = k64; k < k16; k += 16) fma16_bf16_eo<MM, 4>(w, k, a, lda, hi_mask, &acc[0][0]);
    for (int i = 0; i < MM; ++i) {
      const float s = hsum(
          _mm256_add_ps(_mm256_add_ps(acc[i][0], acc[i][1]), _mm256_add_ps(acc[i][2], acc[i][3])));
      C[i * ldc + n] = dot_tail(s, a + i * lda, w, DType::kBF16, k16, K);
    }
  }
}

MOE_AVX2 void dot_bf16_eo(int64_t M, int64_t N, int64_t K, float* a, int64_t lda, const Operand& B,
                          float* C, int64_t ldc) {
  interleave_even_odd(M, K, a, lda);
  if (dot_rows_sequential(M, K)) {
    if (M == 2) return dot_rows_seq_bf16_eo<2>(N, K, a, lda, B, C, ldc);
    return dot_rows_seq_bf16_eo<1>(N, K, a, lda, B, C, ldc);
  }
  for_row_groups(
      N, B,
      [&](int64_t n, const char* const* bp, const char* const* pf) {
        dot_cols_bf16_eo<4>(M, K, a, lda, bp, C + n, ldc, pf);
      },
      [&](int64_t n) {
        const char* bp = row_ptr(B, n);
        dot_cols_bf16_eo<1>(M, K, a, lda, &bp, C + n, ldc, nullptr);
      });
}

template <DType D>
MOE_AVX2 void dot_t(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const Operand& B,
                    float* C, int64_t ldc) {
  for_row_groups(
      N, B,
      [&](int64_t n, const char* const* bp, const char* const* pf) {
        dot_cols<D, 4>(M, K, a, lda, bp, C + n, ldc, pf);
      },
      [&](int64_t n) {
        const char* bp = row_ptr(B, n);
        dot_cols<D, 1>(M, K, a, lda, &bp, C + n, ldc, nullptr);
      });
}

MOE_AVX2 void dot_avx2(int64_t M, int64_t N, int64_t K, float* a, int64_t lda, const Operand& B,
                       float* C, int64_t ldc, int /*a_terms: fp32 products throughout*/) {
  switch (B.dt) {
    case DType::kF32: return dot_t<DType::kF32>(M, N, K, a, lda, B, C, ldc);
    case DType::kBF16: return dot_bf16_eo(M, N, K, a, lda, B, C, ldc);
    default: return dot_t<DType::kF16>(M, N, K, a, lda, B, C, ldc);
  }
}

}  // namespace

const KernelSet& avx2_kernels() {
  // kc 256: a 256 x 16 fp32 B micro-panel is 16 KiB (half of L1d); mc 96 x kc A block 100 KiB and
  // an nc 256 B block 256 KiB share a 512 KiB-1 MiB L2.
  // dot path up to 16 rows: below that, transposing a weight block into the packed layout costs
  // more than re-widening it from L1 for every pair of rows (bench/NOTES.md v3).
  static const KernelSet ks{kMr, kNr,         256,          96,           256,
                            16,  &micro_avx2, &pack_b_avx2, &load_a_avx2, &dot_avx2};
  return ks;
}

}  // namespace moe_kernels::cpu::gemm_detail
