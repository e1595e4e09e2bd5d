// AVX-512 GEMM kernels of the avx512 and amx levels: the AVX-512-BF16 dot kernel for decode, and
// past the dot path (amx level) the transposed-product route for bf16 weights read in place, a
// route that pairs the K rows of bf16 weights stored along N in registers (up to 64 rows), and
// the pair-packed route for the other bf16 products (the backward's); the rest of the engine
// (the AVX2 dot tiles, the packed fp32 path) is the AVX2 kernels'.
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

// bf16(x) by round-to-nearest-even (NaN kept quiet), as fp32 values in 16 lanes: the exact
// counterpart of f32_to_bf16_rne, with no flush of denormals.
MOE_AVX512 inline __m512 round_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512i r =
      _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), hi);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan,
                            _mm512_and_si512(_mm512_or_si512(u, _mm512_set1_epi32(0x400000)), hi));
  return _mm512_castsi512_ps(r);
}

// The 16 bf16 values of 16 lanes that each hold a bf16 value as fp32, contiguous at dst.
MOE_AVX512 inline void store_bf16x16(__m512 v, uint16_t* dst) {
  // in each 64-bit lane, value 2i (bits 16..31) to the low half and 2i + 1 (bits 48..63) to the
  // high half of the low dword; then the 8 low dwords together
  const __m512i u = _mm512_castps_si512(v);
  const __m512i d =
      _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi64(u, 16), _mm512_set1_epi64(0xffff)),
                      _mm512_and_si512(_mm512_srli_epi64(u, 32), _mm512_set1_epi64(0xffff0000)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm512_castsi512_si256(_mm512_maskz_compress_epi32(0x5555, d)));
}

constexpr int kSplitTerms = 3;

// dst[(m * 3 + t) * ldd + k]: the t-th bf16 term of a[m, k] for t < max_terms (the rest left
// unwritten); returns the number of terms used (1-3: what the rows need, at most max_terms).
MOE_AVX512 int split_bf16(int64_t M, int64_t K, const float* a, int64_t lda, uint16_t* dst,
                          int64_t ldd, int max_terms) {
  if (max_terms == 1) {  // bf16(a): one rounding, vectorised
    const int64_t k16 = K / 16 * 16;
    for (int64_t m = 0; m < M; ++m) {
      uint16_t* d0 = dst + (m * kSplitTerms) * ldd;
      for (int64_t k = 0; k < k16; k += 16)
        store_bf16x16(round_bf16(_mm512_loadu_ps(a + m * lda + k)), d0 + k);
      for (int64_t k = k16; k < K; ++k) d0[k] = f32_to_bf16_rne(a[m * lda + k]);
    }
    return 1;
  }
  int terms = 1;
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* d0 = dst + (m * kSplitTerms) * ldd;
    uint16_t* d1 = d0 + ldd;
    uint16_t* d2 = d1 + ldd;
    for (int64_t k = 0; k < K; ++k) {
      const Bf16Terms sp = split_bf16_terms(a[m * lda + k]);
      d0[k] = sp.t[0];
      d1[k] = sp.t[1];
      d2[k] = sp.t[2];
      terms = std::max(terms, sp.needed);
    }
  }
  return std::min(terms, max_terms);
}

MOE_AVX512BF16 inline __m512bh as_bh(__m512i v) {
  __m512bh r;
  std::memcpy(&r, &v, 64);
  return r;
}
MOE_AVX512BF16 inline __m256bh as_bh256(__m256i v) {
  __m256bh r;
  std::memcpy(&r, &v, 32);
  return r;
}

// MM token rows x NN = 4 weight rows; the loops over the tile are unrolled (TERMS a template
// argument) so that the 4 MM accumulators stay in registers.
template <int MM, int TERMS>
MOE_AVX512BF16 void dot_tile_dpbf16(int64_t K, const uint16_t* xs, int64_t ldx, const float* a,
                                    int64_t lda, const char* const* bp, float* C, int64_t ldc,
                                    const char* const* pf) {
  constexpr int NN = 4;
  __m512 acc[MM][NN];
#pragma GCC unroll 4
  for (int i = 0; i < MM; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NN; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t k32 = K / 32 * 32;
  for (int64_t k = 0; k < k32; k += 32) {
    if (pf != nullptr) {
#pragma GCC unroll 4
      for (int j = 0; j < NN; ++j) _mm_prefetch(pf[j] + k * 2, _MM_HINT_T1);
    }
    __m512bh w[NN];
#pragma GCC unroll 4
    for (int j = 0; j < NN; ++j) w[j] = as_bh(_mm512_loadu_si512(bp[j] + k * 2));
#pragma GCC unroll 4
    for (int i = 0; i < MM; ++i) {
#pragma GCC unroll 3
      for (int t = 0; t < TERMS; ++t) {
        const __m512bh xv = as_bh(_mm512_loadu_si512(xs + (i * kSplitTerms + t) * ldx + k));
#pragma GCC unroll 4
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

template <int MM>
void dot_tile_dpbf16_terms(int terms, int64_t K, const uint16_t* xs, int64_t ldx, const float* a,
                           int64_t lda, const char* const* bp, float* C, int64_t ldc,
                           const char* const* pf) {
  switch (terms) {
    case 1: return dot_tile_dpbf16<MM, 1>(K, xs, ldx, a, lda, bp, C, ldc, pf);
    case 2: return dot_tile_dpbf16<MM, 2>(K, xs, ldx, a, lda, bp, C, ldc, pf);
    default: return dot_tile_dpbf16<MM, 3>(K, xs, ldx, a, lda, bp, C, ldc, pf);
  }
}

// Short weight rows with 1-2 token rows (dot_rows_sequential, as the AVX2 kernels'
// dot_rows_seq_bf16_eo): one weight row at a time, so that a call reads its weights as one
// sequential stream instead of four interleaved ones, with the next row asked for as a row
// starts.  Each value's arithmetic is dot_tile_dpbf16's (the same products added in the same
// order).
template <int MM, int TERMS>
MOE_AVX512BF16 void dot_rows_seq_dpbf16(int64_t N, int64_t K, const uint16_t* xs, int64_t ldx,
                                        const float* a, int64_t lda, const Operand& B, float* C,
                                        int64_t ldc) {
  const int64_t k32 = K / 32 * 32;
  for (int64_t n = 0; n < N; ++n) {
    const char* w = row_ptr(B, n);
    if (n + 1 < N) {
      const char* next = row_ptr(B, n + 1);
      for (int64_t off = 0; off < K * 2; off += 64) _mm_prefetch(next + off, _MM_HINT_T1);
    }
    __m512 acc[MM];
#pragma GCC unroll 2
    for (int i = 0; i < MM; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k32; k += 32) {
      const __m512bh wv = as_bh(_mm512_loadu_si512(w + k * 2));
#pragma GCC unroll 2
      for (int i = 0; i < MM; ++i) {
#pragma GCC unroll 3
        for (int t = 0; t < TERMS; ++t)
          acc[i] = _mm512_dpbf16_ps(
              acc[i], as_bh(_mm512_loadu_si512(xs + (i * kSplitTerms + t) * ldx + k)), wv);
      }
    }
    for (int i = 0; i < MM; ++i)
      C[i * ldc + n] = dot_tail(hsum16(acc[i]), a + i * lda, w, DType::kBF16, k32, K);
  }
}

template <int MM>
void dot_rows_seq_dpbf16_terms(int terms, int64_t N, int64_t K, const uint16_t* xs, int64_t ldx,
                               const float* a, int64_t lda, const Operand& B, float* C,
                               int64_t ldc) {
  switch (terms) {
    case 1: return dot_rows_seq_dpbf16<MM, 1>(N, K, xs, ldx, a, lda, B, C, ldc);
    case 2: return dot_rows_seq_dpbf16<MM, 2>(N, K, xs, ldx, a, lda, B, C, ldc);
    default: return dot_rows_seq_dpbf16<MM, 3>(N, K, xs, ldx, a, lda, B, C, ldc);
  }
}

MOE_AVX512BF16 void dot_bf16_dp(int64_t M, int64_t N, int64_t K, float* a, int64_t lda,
                                const Operand& B, float* C, int64_t ldc, int a_terms) {
  thread_local ScratchVector<uint16_t> xs_buf;
  const int64_t ldx = (K + 31) / 32 * 32;
  if (static_cast<int64_t>(xs_buf.size()) < M * kSplitTerms * ldx)
    xs_buf.resize(M * kSplitTerms * ldx);
  uint16_t* xs = xs_buf.data();
  const int terms = split_bf16(M, K, a, lda, xs, ldx, a_terms);
  if (dot_rows_sequential(M, K)) {
    if (M == 2) return dot_rows_seq_dpbf16_terms<2>(terms, N, K, xs, ldx, a, lda, B, C, ldc);
    return dot_rows_seq_dpbf16_terms<1>(terms, N, K, xs, ldx, a, lda, B, C, ldc);
  }
  for_row_groups(
      N, B,
      [&](int64_t n, const char* const* bp, const char* const* pf) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
          dot_tile_dpbf16_terms<4>(terms, K, xs + m * kSplitTerms * ldx, ldx, a + m * lda, lda, bp,
                                   C + m * ldc + n, ldc, m == 0 ? pf : nullptr);
        // the last 1-3 token rows in one tile (each weight row read once more, not 1-3 times)
        const uint16_t* xr = xs + m * kSplitTerms * ldx;
        const float* ar = a + m * lda;
        float* cr = C + m * ldc + n;
        const char* const* pr = m == 0 ? pf : nullptr;
        if (M - m == 3) dot_tile_dpbf16_terms<3>(terms, K, xr, ldx, ar, lda, bp, cr, ldc, pr);
        if (M - m == 2) dot_tile_dpbf16_terms<2>(terms, K, xr, ldx, ar, lda, bp, cr, ldc, pr);
        if (M - m == 1) dot_tile_dpbf16_terms<1>(terms, K, xr, ldx, ar, lda, bp, cr, ldc, pr);
      },
      // the last 1-3 weight rows, one at a time
      [&](int64_t n) { dot_row_bf16(M, K, a, lda, B.shifted(n, 0), C + n, ldc); });
}

// ---- AVX-512-BF16 transposed product (bf16 weights, more rows than the dot path: prefill) ----
//
// C^T = B . A^T, so that the weights are used where they lie: B's rows (K-contiguous bf16, as
// nn.Linear stores them) are read in place, one bf16 pair at a time broadcast to 16 lanes, and
// only the token rows (at most kTw per block) are re-laid out: split into bf16 terms as above and
// stored per K pair as [pair][token] dwords (the VNNI layout), so that one vdpbf16ps multiplies one
// weight pair with 16 tokens.  No weight is converted or copied; a block of kTw tokens costs its
// packing once and then reads the weights at 2 bytes per 2 x kTw FLOPs.  The register tile is NR
// weight rows x 16 TZ tokens (TZ = 1-4) with fp32 accumulators over the whole of K.
constexpr int64_t kTw = 64;  // tokens per block at most (four zmm of dwords)

// Lanes [0, n) of 16 from or to memory (n <= 16): the lanes past n read as zero and are never
// written.  Not masked loads and stores: SIMDe's portable ones, which the emulated kernel check
// compiles this file against, read and write all 16 lanes.
MOE_AVX512 inline __m512 load_ps_n(const float* p, int64_t n) {
  if (n >= 16) return _mm512_loadu_ps(p);
  alignas(64) float t[16] = {};
  if (n > 0) std::memcpy(t, p, n * 4);
  return _mm512_load_ps(t);
}
// 16 bf16 values widened to their bit patterns in the low half of 16 dwords.
MOE_AVX512 inline __m512i load_bf16_bits_n(const uint16_t* p, int64_t n) {
  if (n >= 16)
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  alignas(32) uint16_t t[16] = {};
  if (n > 0) std::memcpy(t, p, n * 2);
  return _mm512_cvtepu16_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(t)));
}
MOE_AVX512 inline void store_ps_n(float* p, __m512 v, int64_t n) {
  if (n >= 16) return _mm512_storeu_ps(p, v);
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  if (n > 0) std::memcpy(p, t, n * 4);
}
MOE_AVX512 inline void store_epi32_n(uint32_t* p, __m512i v, int64_t n) {
  if (n >= 16) return _mm512_storeu_si512(p, v);
  alignas(64) uint32_t t[16];
  _mm512_store_si512(t, v);
  if (n > 0) std::memcpy(p, t, n * 4);
}

// x as three bf16 terms (as fp32 lanes) whose sum is x; need2 / need3 collect the lanes whose
// second / third term is not zero.  An infinite first term stands alone (its remainder would be
// inf - inf).
struct Terms16 {
  __m512 t[3];
};
MOE_AVX512 inline Terms16 split_terms16(__m512 x, __mmask16& need2, __mmask16& need3) {
  const __m512 t0 = round_bf16(x);
  const __mmask16 fin =
      _mm512_cmp_ps_mask(_mm512_abs_ps(t0), _mm512_set1_ps(__builtin_inff()), _CMP_NEQ_UQ);
  const __m512 r1 = _mm512_maskz_sub_ps(fin, x, t0);
  const __m512 t1 = round_bf16(r1);
  const __m512 t2 = round_bf16(_mm512_sub_ps(r1, t1));
  need2 |= _mm512_test_epi32_mask(_mm512_castps_si512(t1), _mm512_set1_epi32(0x7fff0000));
  need3 |= _mm512_test_epi32_mask(_mm512_castps_si512(t2), _mm512_set1_epi32(0x7fff0000));
  return {{t0, t1, t2}};
}

// The term count of a packing: what the values need (need2 / need3 from split_terms16, terms
// from the scalar tails), at most max_terms.
inline int terms_used(int terms, __mmask16 need2, __mmask16 need3, int max_terms) {
  if (need3) terms = 3;
  if (need2 && terms < 2) terms = 2;
  return std::min(terms, max_terms);
}

// Packs the token rows (fp32 a[j, 0..K), j < mb <= wb) as bf16 terms into
// xp[(t * P + p) * wb + j] (dword = the pair k = 2p, 2p + 1; zeros for j >= mb and for k = K when
// K is odd) and returns the number of terms used: 1 when every value is a bf16, else 2 or 3
// (at most max_terms).
MOE_AVX512 int pack_tokens_f32(int64_t mb, int64_t K, const float* a, int64_t lda, int64_t wb,
                               int64_t P, int max_terms, uint32_t* xp) {
  const int64_t k16 = K / 16 * 16;
  __mmask16 need2 = 0, need3 = 0;
  int terms = 1;
  const __m512i lo16 = _mm512_set1_epi64(0xffff), hi16 = _mm512_set1_epi64(0xffff0000);
  for (int64_t j = 0; j < mb; ++j) {
    const float* row = a + j * lda;
    for (int64_t k = 0; k < k16; k += 16) {
      const __m512 x = _mm512_loadu_ps(row + k);
      // one term: the values rounded, no remainders to compute
      const Terms16 ts =
          max_terms == 1 ? Terms16{{round_bf16(x), x, x}} : split_terms16(x, need2, need3);
      for (int t = 0; t < max_terms; ++t) {
        // the 8 pairs of this chunk: in each 64-bit lane, bf16 k (bits 16..31) in the low half
        // of the low dword and bf16 k + 1 (bits 48..63) in its high half
        const __m512i v = _mm512_castps_si512(ts.t[t]);
        alignas(64) uint32_t d[16];
        _mm512_store_si512(d, _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi64(v, 16), lo16),
                                              _mm512_and_si512(_mm512_srli_epi64(v, 32), hi16)));
        uint32_t* o = xp + (t * P + k / 2) * wb + j;
        for (int i = 0; i < 8; ++i) o[i * wb] = d[2 * i];
      }
    }
    for (int64_t k = k16; k < 2 * P; ++k) {  // K tail, and the zero that pads an odd K
      const Bf16Terms sp = split_bf16_terms(k < K ? row[k] : 0.f);
      terms = std::max(terms, sp.needed);
      for (int t = 0; t < max_terms; ++t) {
        auto* o = reinterpret_cast<uint16_t*>(xp + (t * P + k / 2) * wb + j);
        o[k & 1] = sp.t[t];
      }
    }
  }
  terms = terms_used(terms, need2, need3, max_terms);
  for (int t = 0; t < terms; ++t)
    for (int64_t p = 0; p < P; ++p)
      for (int64_t j = mb; j < wb; ++j) xp[(t * P + p) * wb + j] = 0;
  return terms;
}

// Pairs ahead whose two source rows a bf16 packing prefetches: it reads two interleaved row
// streams, which the hardware prefetchers alone do not keep at the core's read rate
// (bench/NOTES.md v22).
constexpr int64_t kPackAhead = 2;

// pack_tokens' contract for fp32 or bf16 rows that lie next to each other in memory (s0 == 1,
// no gather: a [K, N] weight as stored, read along N, or the transposed activations of a weight
// gradient), for n rows split into blocks of bs (a multiple of 16): block b, at
// xp + b * blk_stride, holds rows b * bs.. in lanes of width wb (bs; wb_last for the last block),
// lanes past n zero.  The dwords of pair p interleave the stored rows k = 2p and 2p + 1 16 lanes
// at a time, so the source is read row after row, sequentially.
MOE_AVX512 int pack_cols_blocked(int64_t n, int64_t K, const Operand& A, int64_t bs,
                                 int64_t wb_last, int64_t blk_stride, int64_t P, uint32_t* xp) {
  const int max_terms = A.bf16_terms();
  const int64_t s1 = A.s1, nblk = (n + bs - 1) / bs;
  __mmask16 need2 = 0, need3 = 0;
  const __m512i hi16 = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t p = 0; p < P; ++p) {
    const int64_t k0 = 2 * p;
    const bool pair = k0 + 1 < K;  // an odd K's last pair holds one value and a zero
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t wb = blk + 1 < nblk ? bs : wb_last;
      uint32_t* out = xp + blk * blk_stride;
      for (int64_t j = 0; j < wb; j += 16) {
        const int64_t col = blk * bs + j;
        // nl: the lanes read (col < n); ns: the lanes stored (j < wb, not always a multiple of 16)
        const int64_t nl = std::clamp<int64_t>(n - col, 0, 16), ns = std::min<int64_t>(wb - j, 16);
        if (A.dt == DType::kBF16) {
          const uint16_t* r0 = static_cast<const uint16_t*>(A.p) + k0 * s1 + col;
          if ((col & 31) == 0 && p + kPackAhead < P) {
            _mm_prefetch(reinterpret_cast<const char*>(r0 + 2 * kPackAhead * s1), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(r0 + (2 * kPackAhead + 1) * s1),
                         _MM_HINT_T0);
          }
          const __m512i lo = load_bf16_bits_n(r0, nl);
          const __m512i hi =
              pair ? _mm512_slli_epi32(load_bf16_bits_n(r0 + s1, nl), 16) : _mm512_setzero_si512();
          store_epi32_n(out + p * wb + j, _mm512_or_si512(lo, hi), ns);
          continue;
        }
        const float* r0 = static_cast<const float*>(A.p) + k0 * s1 + col;
        const __m512 xa = load_ps_n(r0, nl);
        const __m512 xb = pair ? load_ps_n(r0 + s1, nl) : _mm512_setzero_ps();
        if (max_terms == 1) {  // the values rounded to bf16: no remainders to compute
          const __m512i d =
              _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(round_bf16(xa)), 16),
                              _mm512_and_si512(_mm512_castps_si512(round_bf16(xb)), hi16));
          store_epi32_n(out + p * wb + j, d, ns);
          continue;
        }
        const Terms16 a = split_terms16(xa, need2, need3);
        const Terms16 b = split_terms16(xb, need2, need3);
        for (int t = 0; t < max_terms; ++t) {
          const __m512i d = _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(a.t[t]), 16),
                                            _mm512_and_si512(_mm512_castps_si512(b.t[t]), hi16));
          store_epi32_n(out + (t * P + p) * wb + j, d, ns);
        }
      }
    }
  }
  return A.dt == DType::kBF16 ? 1 : terms_used(1, need2, need3, max_terms);
}

inline bool cols_adjacent(const Operand& A) {
  return A.s0 == 1 && A.s1 != 1 && !A.gather && A.dt != DType::kF16;
}

// The 16 x 16 dword matrix v (row i = v[i]) transposed in place: v[c] lane i = old v[i] lane c.
// Dwords within 128-bit lanes first (rows paired, then quads), then the 128-bit lanes.
MOE_AVX512 inline void transpose16_epi32(__m512i (&v)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  // u[4g + c], 128-bit lane L: rows 4g..4g + 3 of column 4L + c
  __m512i u[16];
  for (int g = 0; g < 16; g += 4) {
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i s01 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);  // lanes 0, 1 of groups 0, 1
    const __m512i s23 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xee);  // lanes 2, 3
    const __m512i r01 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i r23 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xee);
    v[c] = _mm512_shuffle_i32x4(s01, r01, 0x88);  // lane 0 of each group: column c
    v[4 + c] = _mm512_shuffle_i32x4(s01, r01, 0xdd);
    v[8 + c] = _mm512_shuffle_i32x4(s23, r23, 0x88);
    v[12 + c] = _mm512_shuffle_i32x4(s23, r23, 0xdd);
  }
}

MOE_AVX512 inline __m512i load_epi32_n(const void* p, int64_t n) {
  if (n >= 16) return _mm512_loadu_si512(p);
  alignas(64) uint32_t t[16] = {};
  if (n > 0) std::memcpy(t, p, n * 4);
  return _mm512_load_si512(t);
}

// The same for bf16 token rows with K-contiguous storage: one term, the rows' own pairs.  16
// rows x 16 pairs at a time, transposed in registers: each row is read sequentially and each
// pair's 16 lanes stored as one vector (lanes past mb zero).
MOE_AVX512 void pack_tokens_bf16(int64_t mb, int64_t K, const Operand& A, int64_t wb, int64_t P,
                                 uint32_t* xp) {
  const int64_t P2 = K / 2;
  const char* rows[16];
  for (int64_t j0 = 0; j0 < wb; j0 += 16) {
    const int64_t nj = std::clamp<int64_t>(mb - j0, 0, 16), ns = std::min<int64_t>(wb - j0, 16);
    for (int64_t i = 0; i < nj; ++i) rows[i] = row_ptr(A, j0 + i);
    for (int64_t p0 = 0; p0 < P2; p0 += 16) {
      const int64_t np = std::min<int64_t>(P2 - p0, 16);
      __m512i v[16];
      for (int64_t i = 0; i < 16; ++i)
        v[i] = i < nj ? load_epi32_n(rows[i] + p0 * 4, np) : _mm512_setzero_si512();
      transpose16_epi32(v);
      for (int64_t q = 0; q < np; ++q) store_epi32_n(xp + (p0 + q) * wb + j0, v[q], ns);
    }
    if (P > P2) {  // odd K: the last value and a zero
      alignas(64) uint32_t last[16] = {};
      for (int64_t i = 0; i < nj; ++i) {
        uint16_t b;
        std::memcpy(&b, rows[i] + P2 * 4, 2);
        last[i] = b;
      }
      store_epi32_n(xp + P2 * wb + j0, _mm512_load_si512(last), ns);
    }
  }
}

// pack_tokens_generic's contract (gemm_impl.h), vectorised.
int pack_tokens_avx512(int64_t mb, int64_t K, const Operand& A, int64_t wb, uint32_t* xp) {
  const int64_t P = (K + 1) / 2;
  if (A.dt == DType::kBF16 && A.s1 == 1) {
    pack_tokens_bf16(mb, K, A, wb, P, xp);
    return 1;
  }
  if (cols_adjacent(A)) return pack_cols_blocked(mb, K, A, wb, wb, 0, P, xp);
  if (A.dt == DType::kBF16) return pack_tokens_generic(mb, K, A, wb, xp);
  thread_local ScratchVector<float> a_buf;
  if (static_cast<int64_t>(a_buf.size()) < mb * K) a_buf.resize(mb * K);
  avx2_kernels().load_a(mb, K, A, a_buf.data(), K);
  return pack_tokens_f32(mb, K, a_buf.data(), K, wb, P, A.bf16_terms(), xp);
}

// The fp32 accumulators of an NR x TZ register tile, zeroed.
template <int NR, int TZ>
MOE_AVX512 __attribute__((always_inline)) inline void zero_tile(__m512 (&acc)[NR][TZ]) {
#pragma GCC unroll 32
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int z = 0; z < TZ; ++z) acc[r][z] = _mm512_setzero_ps();
}

// One K pair of the tile: acc[r][z] += W_r(pair p) . x(pair p, tokens of z), term by term (a
// weight pair is broadcast once per term: an L1 hit, and TZ x registers per term instead of
// TERMS x TZ); with HALF, also acch[r] += the same for the 8 tokens after the TZ groups (a ymm:
// on CPUs that run a zmm as two halves, 8 tokens for half the cost of 16).  LAST: the pair holds
// only the row's last weight (odd K), read alone.  wb: the packed tokens' lanes per pair.
template <int TZ, int NR, int TERMS, bool LAST, bool HALF>
MOE_AVX512BF16 __attribute__((always_inline)) inline void tdot_step(__m512 (&acc)[NR][TZ],
                                                                    __m256 (&acch)[HALF ? NR : 1],
                                                                    int64_t p, const char* const* w,
                                                                    const uint32_t* xp,
                                                                    int64_t term_ld) {
  constexpr int64_t wb = (TZ + HALF) * 16;
#pragma GCC unroll 3
  for (int t = 0; t < TERMS; ++t) {
    __m512bh xv[TZ];
#pragma GCC unroll 8
    for (int z = 0; z < TZ; ++z)
      xv[z] = as_bh(_mm512_loadu_si512(xp + t * term_ld + p * wb + z * 16));
    __m256bh xh{};
    if constexpr (HALF)
      xh = as_bh256(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(xp + t * term_ld + p * wb + TZ * 16)));
#pragma GCC unroll 32
    for (int r = 0; r < NR; ++r) {
      uint32_t pair = 0;
      if constexpr (LAST) {
        uint16_t v;
        std::memcpy(&v, w[r] + p * 4, 2);
        pair = v;
      } else {
        std::memcpy(&pair, w[r] + p * 4, 4);
      }
      const __m512i wi = _mm512_set1_epi32(static_cast<int>(pair));
      const __m512bh wv = as_bh(wi);
#pragma GCC unroll 8
      for (int z = 0; z < TZ; ++z) acc[r][z] = _mm512_dpbf16_ps(acc[r][z], wv, xv[z]);
      if constexpr (HALF)
        acch[r] = _mm256_dpbf16_ps(acch[r], as_bh256(_mm512_castsi512_si256(wi)), xh);
    }
  }
}

// Pairs ahead of the tile's current one that tdot_tile asks for (8 cache lines of each row).
constexpr int64_t kTdotAhead = 128;

// out[r * wb + j] = sum_k W_r(k) x_j(k) for NR weight rows w[r] (bf16, K = 2 * P2 + odd) and the
// packed tokens j < TZ * 16 (+ 8 with HALF) of wb = (TZ + HALF) * 16 lanes per pair (TERMS slabs
// of xp, term_ld dwords apart).  With HALF, lanes TZ * 16 + 8.. of out's rows are not written.
// wn: the next tile's NR rows (null: none), whose first lines are asked for as these rows end.
template <int TZ, int NR, int TERMS, bool HALF>
MOE_AVX512BF16 void tdot_tile(int64_t P2, bool odd, const char* const* w, const char* const* wn,
                              const uint32_t* xp, int64_t term_ld, float* out) {
  constexpr int64_t wb = (TZ + HALF) * 16;
  __m512 acc[NR][TZ];
  zero_tile(acc);
  __m256 acch[HALF ? NR : 1];
#pragma GCC unroll 32
  for (int r = 0; r < (HALF ? NR : 1); ++r) acch[r] = _mm256_setzero_ps();
  // The weight rows stream from L3 or DRAM: every 16 pairs (one cache line of each row), ask for
  // the line kTdotAhead pairs ahead; within the last kTdotAhead pairs, for the next tile's lines
  // instead, so that its rows do not start cold (their first 8 lines, a half to a quarter of a
  // row of 1-2 KiB, would otherwise be read on demand).
  int64_t p = 0;
  for (; p + 16 <= P2 && p + kTdotAhead < P2; p += 16) {
#pragma GCC unroll 32
    for (int r = 0; r < NR; ++r) _mm_prefetch(w[r] + (p + kTdotAhead) * 4, _MM_HINT_T0);
    for (int64_t q = p; q < p + 16; ++q)
      tdot_step<TZ, NR, TERMS, false, HALF>(acc, acch, q, w, xp, term_ld);
  }
  for (; p + 16 <= P2; p += 16) {
    if (wn != nullptr) {
#pragma GCC unroll 32
      for (int r = 0; r < NR; ++r) _mm_prefetch(wn[r] + (p + kTdotAhead - P2) * 4, _MM_HINT_T0);
    }
    for (int64_t q = p; q < p + 16; ++q)
      tdot_step<TZ, NR, TERMS, false, HALF>(acc, acch, q, w, xp, term_ld);
  }
  for (; p < P2; ++p) tdot_step<TZ, NR, TERMS, false, HALF>(acc, acch, p, w, xp, term_ld);
  if (odd) tdot_step<TZ, NR, TERMS, true, HALF>(acc, acch, P2, w, xp, term_ld);
#pragma GCC unroll 32
  for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 8
    for (int z = 0; z < TZ; ++z) _mm512_storeu_ps(out + r * wb + z * 16, acc[r][z]);
    if constexpr (HALF) _mm256_storeu_ps(out + r * wb + TZ * 16, acch[r]);
  }
}

// Rows of a register tile of TZ zmm columns: 24 accumulators (20 at TZ = 5), plus TZ operand
// registers and a broadcast.
constexpr int tile_rows(int tz) { return 24 / tz; }

// Weight rows per tile of the transposed product for TZ x 16 tokens (a half group counts as a
// whole one): tile_rows, at most 8.  Each row is a separate stream whose pointer the step reads,
// and rows whose length is a multiple of 4 KiB (K = 2048, 4096, 14336) put their current lines
// in one L1 set: 12 rows (TZ = 2) overflow an 8-way set and their pointers spill; 8 rows of 16
// accumulators avoid both (bench/NOTES.md v32).
constexpr int tdot_rows(int tz) { return std::min(8, tile_rows(tz)); }

// Rows up to which gemm_nt_tdot takes the call as one block of tokens (TZ up to 6): 65-96 rows
// as one block of 72-96 lanes rather than two of 40-48 (the lanes past the rows cost as much as
// the rows).
constexpr int64_t kTdotOneBlock = 96;

template <int TZ, bool HALF>
void tdot_tile_terms(int terms, int64_t P2, bool odd, const char* const* w, const char* const* wn,
                     const uint32_t* xp, int64_t term_ld, float* out) {
  constexpr int NR = tdot_rows(TZ + HALF);
  switch (terms) {
    case 1: return tdot_tile<TZ, NR, 1, HALF>(P2, odd, w, wn, xp, term_ld, out);
    case 2: return tdot_tile<TZ, NR, 2, HALF>(P2, odd, w, wn, xp, term_ld, out);
    default: return tdot_tile<TZ, NR, 3, HALF>(P2, odd, w, wn, xp, term_ld, out);
  }
}

// Weight rows whose results gemm_nt_tdot transposes into C together: a multiple of 16 (whole
// vectors of C's rows) and of every tile's row count (tdot_rows: 8, 6 or 4).
constexpr int64_t kTdotGroup = 48;

// A non-temporal store of 16 values to 64-byte aligned d (SIMDe has none: a plain store there).
MOE_AVX512 inline void stream_ps(float* d, __m512 v) {
#if defined(MOE_KERNELS_SIMDE)
  _mm512_store_ps(d, v);
#else
  _mm512_stream_ps(d, v);
#endif
}

// C[j, n] = out[n * wb + j] (add: C[j, n] += out[n * wb + j]) for n < gn and j < mb <= wb (wb a
// multiple of 16): 16 x 16 blocks transposed in registers, so each token's results are stored as
// vectors, not element by element.  nt (without add): whole 64-byte aligned vectors of C with
// non-temporal stores.
MOE_AVX512 void store_tdot_group(const float* out, int64_t wb, int64_t gn, int64_t mb, float* C,
                                 int64_t ldc, bool add = false, bool nt = false) {
  for (int64_t n0 = 0; n0 < gn; n0 += 16) {
    const int64_t cols = std::min<int64_t>(gn - n0, 16);
    for (int64_t j0 = 0; j0 < mb; j0 += 16) {
      __m512i v[16];
      for (int64_t i = 0; i < 16; ++i)
        v[i] = i < cols ? _mm512_loadu_si512(out + (n0 + i) * wb + j0) : _mm512_setzero_si512();
      transpose16_epi32(v);
      const int64_t rows = std::min<int64_t>(mb - j0, 16);
      for (int64_t l = 0; l < rows; ++l) {
        float* d = C + (j0 + l) * ldc + n0;
        const __m512 r = _mm512_castsi512_ps(v[l]);
        if (nt && !add && cols == 16 && (reinterpret_cast<uintptr_t>(d) & 63) == 0) {
          stream_ps(d, r);
          continue;
        }
        store_ps_n(d, add ? _mm512_add_ps(load_ps_n(d, cols), r) : r, cols);
      }
    }
  }
}

// store_transposed_generic's contract: 16 x 16 blocks transposed in registers.
MOE_AVX512 void store_transposed_avx512(const float* c, int64_t ldt, int64_t rows, int64_t mb,
                                        float* C, int64_t ldc, bool add, bool stream) {
  store_tdot_group(c, ldt, rows, mb, C, ldc, add, stream);
}

// gemm_nt's route for bf16 K-contiguous weights on CPUs with AVX-512-BF16 (the "amx" level) when
// the call has more rows than the dot path: the transposed product above.
bool gemm_nt_tdot(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B, float* C,
                  int64_t ldc, bool stream_c) {
  if (detected_isa() != Isa::kAmx || B.dt != DType::kBF16 || B.s1 != 1) return false;
  const int64_t P = (K + 1) / 2, P2 = K / 2;
  const bool odd = K % 2 != 0;
  // Token blocks rounded up to 16 (one zmm): up to kTdotOneBlock rows one block, more in blocks
  // of at most kTw rows, near-equal: 33 rows are one block of 48, 70 rows one of 80, 100 rows
  // blocks of 64 and 36 (as 48), so no block is a thin remainder (a 16-token tile broadcasts one
  // weight pair per vdpbf16ps and runs at half the rate of the wider ones).
  // Lanes in steps of 8 (at least 16): a last group of 8 is a half group, packed as 16 lanes (so
  // every pair's lanes stay 64-byte aligned) of which the tile reads and computes 8.
  const int64_t nblk = M <= kTdotOneBlock ? 1 : (M + kTw - 1) / kTw;
  const int64_t bs = std::max<int64_t>(16, ((M + nblk - 1) / nblk + 7) / 8 * 8);
  const int64_t wb_max = (bs + 15) / 16 * 16;
  thread_local ScratchVector<uint32_t> x_buf;
  if (static_cast<int64_t>(x_buf.size()) < 3 * P * wb_max) x_buf.resize(3 * P * wb_max);
  uint32_t* xp = x_buf.data();
  // zeroed: a half group's tiles leave 8 lanes of their rows unwritten, which the transposed
  // store reads (and drops)
  alignas(64) float out[kTdotGroup * 16 * 6] = {};
  const char* w[8];
  const char* w_next[8];
  // the weight rows of the tile at row n0 (rows past N repeat the last one, valid memory; their
  // results are not stored)
  auto tile_ptrs = [&](int64_t n0, int nr, const char** dst) {
    const int64_t nv = std::min<int64_t>(nr, N - n0);
    for (int r = 0; r < nr; ++r) dst[r] = row_ptr(B, n0 + std::min<int64_t>(r, nv - 1));
    return dst;
  };
  for (int64_t m0 = 0; m0 < M; m0 += bs) {
    const int64_t mb = std::min(bs, M - m0);
    const int64_t lanes = std::max<int64_t>(16, (mb + 7) / 8 * 8);
    const int tz = static_cast<int>(lanes / 16);
    const bool half = lanes % 16 != 0;
    const int64_t wb = 16 * (tz + half);
    const int nr = tdot_rows(tz + half);
    const int terms = pack_tokens_avx512(mb, K, A.shifted(m0, 0), wb, xp);
    for (int64_t g0 = 0; g0 < N; g0 += kTdotGroup) {
      const int64_t gn = std::min(kTdotGroup, N - g0);
      // the group's tiles (kTdotGroup is a multiple of every nr: none crosses the group's end)
      for (int64_t n0 = g0; n0 < g0 + gn; n0 += nr) {
        tile_ptrs(n0, nr, w);
        // the next tile's rows: the group's next, the next group's first, or for the next token
        // block the first tile's; none after the call's last tile
        const int64_t nn = n0 + nr < N ? n0 + nr : (m0 + bs < M ? 0 : -1);
        const char* const* wn = nn >= 0 ? tile_ptrs(nn, nr, w_next) : nullptr;
        float* o = out + (n0 - g0) * wb;
        switch (2 * tz + half) {
          case 2: tdot_tile_terms<1, false>(terms, P2, odd, w, wn, xp, P * wb, o); break;
          case 3: tdot_tile_terms<1, true>(terms, P2, odd, w, wn, xp, P * wb, o); break;
          case 4: tdot_tile_terms<2, false>(terms, P2, odd, w, wn, xp, P * wb, o); break;
          case 5: tdot_tile_terms<2, true>(terms, P2, odd, w, wn, xp, P * wb, o); break;
          case 6: tdot_tile_terms<3, false>(terms, P2, odd, w, wn, xp, P * wb, o); break;
          case 7: tdot_tile_terms<3, true>(terms, P2, odd, w, wn, xp, P * wb, o); break;
          case 8: tdot_tile_terms<4, false>(terms, P2, odd, w, wn, xp, P * wb, o); break;
          case 9: tdot_tile_terms<4, true>(terms, P2, odd, w, wn, xp, P * wb, o); break;
          case 10: tdot_tile_terms<5, false>(terms, P2, odd, w, wn, xp, P * wb, o); break;
          case 11: tdot_tile_terms<5, true>(terms, P2, odd, w, wn, xp, P * wb, o); break;
          default: tdot_tile_terms<6, false>(terms, P2, odd, w, wn, xp, P * wb, o); break;
        }
      }
      store_tdot_group(out, wb, gn, mb, C + m0 * ldc + g0, ldc, false, stream_c);
    }
  }
  if (stream_c) _mm_sfence();  // the non-temporal stores before C is read by another thread
  return true;
}

// ---- AVX-512-BF16 pair-packed product (bf16 products whose B is not K-contiguous) -----------
//
// What the transposed product cannot read in place: B stored along N (a [K, N] weight read as
// W^T, as the backward's data gradients do) or any other layout, and B an fp32 operand that
// may be rounded to bf16 (Operand::max_terms == 1: the backward's activations and gradients of a
// bf16 model).  Both operands are packed per K pair (the VNNI layout of pack_tokens): A whole, as
// [term][P][ma] dwords, and B per block of up to kTw columns as [P][wb] dwords, once per call.
// The register tile is NR rows of A (each K pair broadcast, term by term) x 16 TZ columns of B,
// fp32 accumulators over K blocks of kPairKc pairs: a block of B (kPairKc x wb dwords, 16 KiB)
// then stays in L1 while every row of A passes over it.
constexpr int64_t kPairKc = 64;

// The sink of a pair-packed tile: C (fp32, accumulated into after the first K block), or on the
// last K block, when Cb is set, bf16 rows of Cb (C's partial sums added first, as fp32).
struct PairsOut {
  float* C;
  int64_t ldc;
  uint16_t* Cb;
  int64_t ldb;
  bool accumulate, to_bf16;
};

// The sink of the tile at row m0, column n0 of a call's output (C and / or Cb as the call got
// them), in a K block that is the call's first / last.
inline PairsOut pairs_out(float* C, int64_t ldc, uint16_t* Cb, int64_t ldb, int64_t m0, int64_t n0,
                          bool first, bool last) {
  return {C == nullptr ? nullptr : C + m0 * ldc + n0,
          ldc,
          Cb == nullptr ? nullptr : Cb + m0 * ldb + n0,
          ldb,
          !first,
          Cb != nullptr && last};
}

// The start of a call of the pair-tiled routes (K in blocks of kc pairs): when only bf16 rows
// are asked for (Cb) and K spans more than one block, C becomes a per-thread scratch block of
// M x N fp32 partial sums; A is packed per K pair into *ap, ma lanes (the rows past M zero, so
// that a tile never reads past the block).  Returns A's bf16 terms.
int pairs_prologue(int64_t M, int64_t N, int64_t K, int64_t kc, int64_t ma, const Operand& A,
                   const uint16_t* Cb, float*& C, int64_t& ldc, uint32_t*& ap) {
  const int64_t P = (K + 1) / 2;
  thread_local ScratchVector<float> c_part;
  if (Cb != nullptr && C == nullptr && P > kc) {
    if (static_cast<int64_t>(c_part.size()) < M * N) c_part.resize(M * N);
    C = c_part.data();
    ldc = N;
  }
  thread_local ScratchVector<uint32_t> a_buf;
  const int64_t a_need = A.bf16_terms() * P * ma;
  if (static_cast<int64_t>(a_buf.size()) < a_need) a_buf.resize(a_need);
  ap = a_buf.data();
  return pack_tokens_avx512(M, K, A, ma, ap);
}

// bf16 of lanes [0, n) of v, rounded to nearest even, to p.  vcvtneps2bf16 where the build has
// it (denormal values round to zero); SIMDe has no such intrinsic, so the emulated build rounds
// as f32_to_bf16_rne.
MOE_AVX512BF16 inline __m256i bf16x16(__m512 v) {
#if defined(MOE_KERNELS_SIMDE)
  alignas(32) uint16_t t[16];
  store_bf16x16(round_bf16(v), t);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
#else
  const __m256bh b = _mm512_cvtneps_pbh(v);
  __m256i r;
  std::memcpy(&r, &b, 32);
  return r;
#endif
}
MOE_AVX512BF16 inline void store_bf16_n(uint16_t* p, __m512 v, int64_t n) {
  const __m256i b = bf16x16(v);
  if (n >= 16) return _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), b);
  alignas(32) uint16_t t[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), b);
  if (n > 0) std::memcpy(p, t, n * 2);
}

// One K pair of a pair tile: acc[r][z] += (A's pair of row r, term by term) . bv[z], the pair's
// dword broadcast once per row and term.  a: A's packed dwords of this pair (term t's at
// a + t * a_term_ld).
template <int NR, int TZ, int TERMS>
MOE_AVX512BF16 __attribute__((always_inline)) inline void pairs_step(__m512 (&acc)[NR][TZ],
                                                                     const uint32_t* a,
                                                                     int64_t a_term_ld,
                                                                     const __m512bh (&bv)[TZ]) {
#pragma GCC unroll 3
  for (int t = 0; t < TERMS; ++t) {
#pragma GCC unroll 32
    for (int r = 0; r < NR; ++r) {
      const __m512bh av = as_bh(_mm512_set1_epi32(static_cast<int>(a[t * a_term_ld + r])));
#pragma GCC unroll 4
      for (int z = 0; z < TZ; ++z) acc[r][z] = _mm512_dpbf16_ps(acc[r][z], av, bv[z]);
    }
  }
}

template <int TZ, int NR, int TERMS>
MOE_AVX512BF16 void pdot_tile(int64_t np, const uint32_t* ap, int64_t lda, int64_t a_term_ld,
                              const uint32_t* bp, int mv, int nv, const PairsOut& o) {
  constexpr int64_t wb = TZ * 16;
  __m512 acc[NR][TZ];
  zero_tile(acc);
  for (int64_t p = 0; p < np; ++p) {
    __m512bh bv[TZ];
#pragma GCC unroll 4
    for (int z = 0; z < TZ; ++z) bv[z] = as_bh(_mm512_loadu_si512(bp + p * wb + z * 16));
    pairs_step<NR, TZ, TERMS>(acc, ap + p * lda, a_term_ld, bv);
  }
#pragma GCC unroll 32
  for (int r = 0; r < NR; ++r) {
    if (r >= mv) break;
#pragma GCC unroll 4
    for (int z = 0; z < TZ; ++z) {
      const int64_t n = nv - 16 * z;  // the tile's columns past nv are not C's
      __m512 v = acc[r][z];
      if (o.accumulate) v = _mm512_add_ps(v, load_ps_n(o.C + r * o.ldc + z * 16, n));
      if (o.to_bf16) {
        store_bf16_n(o.Cb + r * o.ldb + z * 16, v, n);
      } else {
        store_ps_n(o.C + r * o.ldc + z * 16, v, n);
      }
    }
  }
}

template <int TZ>
void pdot_tile_terms(int terms, int64_t np, const uint32_t* ap, int64_t lda, int64_t a_term_ld,
                     const uint32_t* bp, int mv, int nv, const PairsOut& o) {
  constexpr int NR = tile_rows(TZ);
  switch (terms) {
    case 1: return pdot_tile<TZ, NR, 1>(np, ap, lda, a_term_ld, bp, mv, nv, o);
    case 2: return pdot_tile<TZ, NR, 2>(np, ap, lda, a_term_ld, bp, mv, nv, o);
    default: return pdot_tile<TZ, NR, 3>(np, ap, lda, a_term_ld, bp, mv, nv, o);
  }
}

// ---- bf16 B stored along N, up to kNdMaxRows rows: K pairs formed in registers -------------
//
// B(n, k) with B.s0 == 1: B's stored rows are its K index, N-contiguous (the backward's data
// gradients read w_down and w_gate_up so).  The pair-packed route below first interleaves every
// K pair of stored rows into a packed block: a pass over the weight which, at tens of rows per
// expert, costs about half as much as the products.  Here the tile loads 32 columns of the two
// stored rows of a K pair and interleaves them with two unpacks into the dword pairs vdpbf16ps
// takes, for up to kNdRows rows of A (packed per K pair, as the pair-packed route packs them).
// The unpacks leave the 32 columns in the lane order [0-3, 8-11, 16-19, 24-27] (lo) and
// [4-7, 12-15, 20-23, 28-31] (hi); two permutes per row restore it when C is stored.  K runs in
// blocks of kNdKc pairs across all of N, C's fp32 sums stored and reloaded between blocks
// (exact).  The first row tile of each 32 columns also prefetches the next 32 columns of its
// stored rows and, when the stored rows lie one after the other, a share of the next K block in
// address order: at a 4 KiB row stride, a line per row and column block would cost a DRAM page
// per line (bench/NOTES.md v33).
constexpr int64_t kNdKc = 64;
// Rows up to which it is taken: past them the pair-packed route's packing, spread over more rows,
// costs less than re-reading B's stored rows for every row tile (bench/NOTES.md v33).
constexpr int64_t kNdMaxRows = 64;
constexpr int kNdRows = 12;  // rows per tile at most: 24 accumulators

// 32 bf16 of a stored row, the ones past n read as zero.
MOE_AVX512 inline __m512i load_bf16x32_n(const uint16_t* p, int64_t n) {
  if (n >= 32) return _mm512_loadu_si512(p);
  alignas(64) uint16_t t[32] = {};
  if (n > 0) std::memcpy(t, p, n * 2);
  return _mm512_load_si512(t);
}

// NR rows of C x 32 columns (nv of them C's; FULL: nv == 32) over np K pairs of B's stored rows
// from b (row stride ldb elements); odd: the last pair has one stored row (odd K).  pf: prefetch
// the next 32 columns of the pairs' rows; pn: prefetch two lines from pn on per pair (null: none).
template <int NR, int TERMS, bool FULL>
MOE_AVX512BF16 void ndot_tile(int64_t np, bool odd, bool pf, const char* pn, const uint32_t* ap,
                              int64_t lda, int64_t a_term_ld, const uint16_t* b, int64_t ldb,
                              int mv, int nv, const PairsOut& o) {
  __m512 acc[NR][2];
  zero_tile(acc);
  for (int64_t p = 0; p < np; ++p) {
    const uint16_t* r0 = b + 2 * p * ldb;
    if (pf) {
      _mm_prefetch(reinterpret_cast<const char*>(r0 + 32), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(r0 + ldb + 32), _MM_HINT_T0);
    }
    if (pn != nullptr) {
      _mm_prefetch(pn + 128 * p, _MM_HINT_T0);
      _mm_prefetch(pn + 128 * p + 64, _MM_HINT_T0);
    }
    const __m512i x0 = FULL ? _mm512_loadu_si512(r0) : load_bf16x32_n(r0, nv);
    const __m512i x1 = odd && p + 1 == np ? _mm512_setzero_si512()
                       : FULL             ? _mm512_loadu_si512(r0 + ldb)
                                          : load_bf16x32_n(r0 + ldb, nv);
    const __m512bh bv[2] = {as_bh(_mm512_unpacklo_epi16(x0, x1)),
                            as_bh(_mm512_unpackhi_epi16(x0, x1))};
    pairs_step<NR, 2, TERMS>(acc, ap + p * lda, a_term_ld, bv);
  }
  // lane i of C's columns 0-15 / 16-31: lane i0[i] / i1[i] of (lo, hi) (0-15 lo, 16-31 hi)
  const __m512i i0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i i1 =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
#pragma GCC unroll 32
  for (int r = 0; r < NR; ++r) {
    if (r >= mv) break;
    const __m512 c[2] = {_mm512_permutex2var_ps(acc[r][0], i0, acc[r][1]),
                         _mm512_permutex2var_ps(acc[r][0], i1, acc[r][1])};
#pragma GCC unroll 2
    for (int z = 0; z < 2; ++z) {
      const int64_t n = FULL ? 16 : nv - 16 * z;  // the tile's columns past nv are not C's
      if (n <= 0) break;
      __m512 v = c[z];
      if (o.accumulate) v = _mm512_add_ps(v, load_ps_n(o.C + r * o.ldc + z * 16, n));
      if (o.to_bf16) {
        store_bf16_n(o.Cb + r * o.ldb + z * 16, v, n);
      } else {
        store_ps_n(o.C + r * o.ldc + z * 16, v, n);
      }
    }
  }
}

template <int NR, bool FULL>
void ndot_tile_terms(int terms, int64_t np, bool odd, bool pf, const char* pn, const uint32_t* ap,
                     int64_t lda, int64_t a_term_ld, const uint16_t* b, int64_t ldb, int mv, int nv,
                     const PairsOut& o) {
  switch (terms) {
    case 1: return ndot_tile<NR, 1, FULL>(np, odd, pf, pn, ap, lda, a_term_ld, b, ldb, mv, nv, o);
    case 2: return ndot_tile<NR, 2, FULL>(np, odd, pf, pn, ap, lda, a_term_ld, b, ldb, mv, nv, o);
    default: return ndot_tile<NR, 3, FULL>(np, odd, pf, pn, ap, lda, a_term_ld, b, ldb, mv, nv, o);
  }
}

template <int NR>
void ndot_tile_any(int terms, int64_t np, bool odd, bool pf, const char* pn, const uint32_t* ap,
                   int64_t lda, int64_t a_term_ld, const uint16_t* b, int64_t ldb, int mv, int nv,
                   const PairsOut& o) {
  if (nv == 32)
    return ndot_tile_terms<NR, true>(terms, np, odd, pf, pn, ap, lda, a_term_ld, b, ldb, mv, nv, o);
  ndot_tile_terms<NR, false>(terms, np, odd, pf, pn, ap, lda, a_term_ld, b, ldb, mv, nv, o);
}

// gemm_nt_pairs' route for bf16 B with B.s0 == 1 (cols_adjacent) and M <= kNdMaxRows; its
// arguments are gemm_nt_pairs'.
void gemm_nt_ndot(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B, float* C,
                  int64_t ldc, uint16_t* Cb, int64_t ldb) {
  const int64_t P = (K + 1) / 2;
  // row tiles of kNdRows, the last one of 4, 8 or 12 rows: A's rows padded to a multiple of it
  const int64_t ma = (M + kNdRows - 1) / kNdRows * kNdRows;
  uint32_t* ap = nullptr;
  const int terms = pairs_prologue(M, N, K, kNdKc, ma, A, Cb, C, ldc, ap);
  const auto* bs = static_cast<const uint16_t*>(B.p);
  // stored rows one after the other: the next K block is one range of memory, 2 np lines of it
  // per 32 columns (the lines of 2 np stored rows)
  const bool rows_contiguous = B.s1 == N && N % 32 == 0;
  for (int64_t p0 = 0; p0 < P; p0 += kNdKc) {
    const int64_t np = std::min(kNdKc, P - p0);
    const bool odd = K % 2 != 0 && p0 + np == P;
    const int64_t nk0 = 2 * (p0 + np);
    const int64_t next_lines = rows_contiguous ? std::min(2 * kNdKc, K - nk0) * N / 32 : 0;
    const char* next = reinterpret_cast<const char*>(bs + nk0 * B.s1);
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      const int nv = static_cast<int>(std::min<int64_t>(32, N - n0));
      const uint16_t* b = bs + 2 * p0 * B.s1 + n0;
      const int64_t l0 = n0 / 32 * 2 * np;
      const char* pnext = l0 < next_lines ? next + l0 * 64 : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += kNdRows) {
        const int mv = static_cast<int>(std::min<int64_t>(kNdRows, M - m0));
        const bool pf = m0 == 0 && n0 + 32 < N;
        const char* pn = m0 == 0 ? pnext : nullptr;
        const uint32_t* a = ap + p0 * ma + m0;
        const PairsOut o = pairs_out(C, ldc, Cb, ldb, m0, n0, p0 == 0, p0 + kNdKc >= P);
        if (mv <= 4) {
          ndot_tile_any<4>(terms, np, odd, pf, pn, a, ma, P * ma, b, B.s1, mv, nv, o);
        } else if (mv <= 8) {
          ndot_tile_any<8>(terms, np, odd, pf, pn, a, ma, P * ma, b, B.s1, mv, nv, o);
        } else {
          ndot_tile_any<kNdRows>(terms, np, odd, pf, pn, a, ma, P * ma, b, B.s1, mv, nv, o);
        }
      }
    }
  }
}

// gemm_nt's route for bf16 products past the dot path that the transposed product does not
// take: B bf16 in any layout, or fp32 with max_terms == 1; A bf16 or fp32 (its bf16 terms).
// Cb set: C rounded to bf16 into Cb (leading dimension ldb) instead, C then the fp32 partial sums
// of all K blocks but the last (null: a scratch block of M x N).
bool gemm_nt_pairs(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B, float* C,
                   int64_t ldc, uint16_t* Cb = nullptr, int64_t ldb = 0) {
  if (detected_isa() != Isa::kAmx || A.dt == DType::kF16) return false;
  if (B.dt != DType::kBF16 && !(B.dt == DType::kF32 && B.max_terms == 1)) return false;
  if (M <= kNdMaxRows && B.dt == DType::kBF16 && cols_adjacent(B)) {
    gemm_nt_ndot(M, N, K, A, B, C, ldc, Cb, ldb);
    return true;
  }
  const int64_t P = (K + 1) / 2;
  // A's rows padded to a multiple of every tile height (24, 12, 8, 6)
  const int64_t ma = (M + 23) / 24 * 24;
  uint32_t* ap = nullptr;
  const int terms = pairs_prologue(M, N, K, kPairKc, ma, A, Cb, C, ldc, ap);
  thread_local ScratchVector<uint32_t> b_buf;
  // column blocks of at most kTw, near-equal and rounded up to 16 (no thin remainder)
  const int64_t nblk = (N + kTw - 1) / kTw;
  const int64_t bs = ((N + nblk - 1) / nblk + 15) / 16 * 16;
  const int64_t nb_last = N - (nblk - 1) * bs, wb_last = (nb_last + 15) / 16 * 16;
  // blocks a cache line more than their size apart: 16 KiB apart, the packing's stores to every
  // block would fall in the same L1 sets
  const int64_t blk_ld = kPairKc * bs + 16;
  if (static_cast<int64_t>(b_buf.size()) < blk_ld * nblk) b_buf.resize(blk_ld * nblk);
  uint32_t* bp = b_buf.data();
  // K blocks of kPairKc pairs: B's block of every column packed at once (one pass over its rows),
  // then every tile of C over it, accumulating into C after the first block
  for (int64_t p0 = 0; p0 < P; p0 += kPairKc) {
    const int64_t np = std::min(kPairKc, P - p0), kb = std::min(2 * np, K - 2 * p0);
    const Operand Bk = B.shifted(0, 2 * p0);
    if (cols_adjacent(Bk)) {
      pack_cols_blocked(N, kb, Bk, bs, wb_last, blk_ld, np, bp);
    } else {
      for (int64_t blk = 0; blk < nblk; ++blk)
        pack_tokens_avx512(std::min(bs, N - blk * bs), kb, Bk.shifted(blk * bs, 0),
                           blk + 1 < nblk ? bs : wb_last, bp + blk * blk_ld);
    }
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t n0 = blk * bs;
      const int nv = static_cast<int>(std::min(bs, N - n0));
      const int tz = (nv + 15) / 16;
      const int nr = tile_rows(tz);
      const uint32_t* b = bp + blk * blk_ld;
      for (int64_t m0 = 0; m0 < M; m0 += nr) {
        const int mv = static_cast<int>(std::min<int64_t>(nr, M - m0));
        const uint32_t* a = ap + p0 * ma + m0;
        const PairsOut o = pairs_out(C, ldc, Cb, ldb, m0, n0, p0 == 0, p0 + kPairKc >= P);
        switch (tz) {
          case 1: pdot_tile_terms<1>(terms, np, a, ma, P * ma, b, mv, nv, o); break;
          case 2: pdot_tile_terms<2>(terms, np, a, ma, P * ma, b, mv, nv, o); break;
          case 3: pdot_tile_terms<3>(terms, np, a, ma, P * ma, b, mv, nv, o); break;
          default: pdot_tile_terms<4>(terms, np, a, ma, P * ma, b, mv, nv, o); break;
        }
      }
    }
  }
  return true;
}

// The AVX-512-BF16 routes past the dot path: the transposed product where the weights can be
// read in place, the pair-packed product for the other bf16 products.
bool gemm_nt_bf16_wide(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B,
                       float* C, int64_t ldc, bool stream_c) {
  return gemm_nt_tdot(M, N, K, A, B, C, ldc, stream_c) || gemm_nt_pairs(M, N, K, A, B, C, ldc);
}

// The pair-packed product rounded to bf16 in its epilogue (gemm_nt_bf16's route).
bool gemm_nt_pairs_bf16(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B,
                        uint16_t* C, int64_t ldc) {
  return gemm_nt_pairs(M, N, K, A, B, nullptr, 0, C, ldc);
}

// ---- Few rows against bf16 weights stored along N (the data gradients of small batches) ------
//
// B(n, k) with B.s0 == 1: B's stored rows are its K index, N-contiguous (a [K, N] weight read as
// W^T, as the backward's data gradients read w_down and w_gate_up).  C[m, :] = sum_k a[m, k] *
// B(:, k) is then a sum of stored rows: each is read once, 64 bytes (32 columns) at a time, widened
// in registers and added, scaled by a[m, k], into up to kAxRows rows of accumulators (fp32 FMAs,
// k in order).  Nothing is packed, which the pair-packed route must do first (two interleaved
// row streams written and read back: about half the read rate of the dot path, bench/NOTES.md
// v22).  Two FMAs per row and 32 weights: past kAxRows rows the vdpbf16ps routes (one
// instruction per row and 32 weight pairs) are faster (v25).
constexpr int kAxRows = 8;
constexpr int64_t kAxKb = 16;      // stored rows per block: their next lines are read together
constexpr int64_t kAxAhead = 256;  // elements ahead in each stored row that are prefetched

// C's rows m < MM, columns [0, nv) (nv <= 32; FULL: nv == 32), plus the products of stored rows
// k < kb (ACC: C holds the sums of the earlier rows, else they start at zero).
template <int MM, bool FULL>
MOE_AVX512 void axpy_tile(int64_t kb, bool accumulate, const float* a, int64_t lda,
                          const uint16_t* b, int64_t ldb, int64_t nv, float* C, int64_t ldc) {
  __m512 acc[MM][2];
#pragma GCC unroll 8
  for (int m = 0; m < MM; ++m) {
    if (accumulate) {
      acc[m][0] = load_ps_n(C + m * ldc, FULL ? 16 : nv);
      acc[m][1] = load_ps_n(C + m * ldc + 16, FULL ? 16 : nv - 16);
    } else {
      acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < kb; ++k) {
    const uint16_t* w = b + k * ldb;
    _mm_prefetch(reinterpret_cast<const char*>(w + kAxAhead), _MM_HINT_T0);
    __m512i lo, hi;
    if constexpr (FULL) {
      lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
      hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16)));
    } else {
      lo = load_bf16_bits_n(w, nv);
      hi = load_bf16_bits_n(w + 16, nv - 16);
    }
    const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16));
    const __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16));
#pragma GCC unroll 8
    for (int m = 0; m < MM; ++m) {
      const __m512 am = _mm512_set1_ps(a[m * lda + k]);
      acc[m][0] = _mm512_fmadd_ps(am, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(am, w1, acc[m][1]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MM; ++m) {
    store_ps_n(C + m * ldc, acc[m][0], FULL ? 16 : nv);
    store_ps_n(C + m * ldc + 16, acc[m][1], FULL ? 16 : nv - 16);
  }
}

template <bool FULL>
MOE_AVX512 void axpy_rows(int mm, int64_t kb, bool accumulate, const float* a, int64_t lda,
                          const uint16_t* b, int64_t ldb, int64_t nv, float* C, int64_t ldc) {
  switch (mm) {
    case 1: return axpy_tile<1, FULL>(kb, accumulate, a, lda, b, ldb, nv, C, ldc);
    case 2: return axpy_tile<2, FULL>(kb, accumulate, a, lda, b, ldb, nv, C, ldc);
    case 3: return axpy_tile<3, FULL>(kb, accumulate, a, lda, b, ldb, nv, C, ldc);
    case 4: return axpy_tile<4, FULL>(kb, accumulate, a, lda, b, ldb, nv, C, ldc);
    case 5: return axpy_tile<5, FULL>(kb, accumulate, a, lda, b, ldb, nv, C, ldc);
    case 6: return axpy_tile<6, FULL>(kb, accumulate, a, lda, b, ldb, nv, C, ldc);
    case 7: return axpy_tile<7, FULL>(kb, accumulate, a, lda, b, ldb, nv, C, ldc);
    default: return axpy_tile<8, FULL>(kb, accumulate, a, lda, b, ldb, nv, C, ldc);
  }
}

// KernelSet::dot_n: C[M, N] = a[M, K] * B(n, k)^T for M <= kAxRows (dot_n_max_m) and B bf16
// with B.s0 == 1 and no gather.  K in blocks of kAxKb stored rows, each block's rows read across
// all of N (kAxKb sequential streams, one 64-byte line of each per column block), C accumulated in
// place between blocks (exact: fp32 stored and reloaded).
MOE_AVX512 void dot_n_avx512(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda,
                             const Operand& B, float* C, int64_t ldc) {
  const auto* b = static_cast<const uint16_t*>(B.p);
  const int mm = static_cast<int>(M);
  for (int64_t k0 = 0; k0 < K; k0 += kAxKb) {
    const int64_t kb = std::min(kAxKb, K - k0);
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      const int64_t nv = std::min<int64_t>(32, N - n0);
      const uint16_t* bk = b + k0 * B.s1 + n0;
      if (nv == 32)
        axpy_rows<true>(mm, kb, k0 > 0, a + k0, lda, bk, B.s1, nv, C + n0, ldc);
      else
        axpy_rows<false>(mm, kb, k0 > 0, a + k0, lda, bk, B.s1, nv, C + n0, ldc);
    }
  }
}

// Rows per call up to which bf16 weights take the vdpbf16ps kernel when the rows need more than
// one bf16 term.  It splits the fp32 rows into bf16 terms on every call (gemm_nt's decode tasks
// each call it), and fp32 rows that keep fp32 accuracy need three terms, three instructions per
// row and 32 weights: past two rows that costs more than the AVX2 kernel's widening FMAs
// (bench/NOTES.md v16).  Rows of one term (bf16 x, or an activation rounded to bf16) take it at
// every row count of the dot path: one instruction per row and 32 weights.
constexpr int64_t kDpMaxRows = 2;

// The dot path (up to 16 rows, as AVX2's): the AVX2 kernels' register tiles (four weight rows x
// two token rows, bf16 widened in registers, sequential streams and prefetch), except for bf16
// weights with at most kDpMaxRows rows on CPUs with AVX-512-BF16.  A plain AVX-512 loop, one row at
// a time under one weight row, measured slower than the AVX2 tiles at every row count, and rows
// sent to the packed path convert and pack every weight block per call (bench/NOTES.md v16).
MOE_AVX512 void dot_avx512(int64_t M, int64_t N, int64_t K, float* a, int64_t lda, const Operand& B,
                           float* C, int64_t ldc, int a_terms) {
  // "amx" = the CPU has AVX-512-BF16 (cpu_info.cpp)
  if (B.dt == DType::kBF16 && (M <= kDpMaxRows || a_terms == 1) && detected_isa() == Isa::kAmx)
    return dot_bf16_dp(M, N, K, a, lda, B, C, ldc, a_terms);
  avx2_kernels().dot(M, N, K, a, lda, B, C, ldc, a_terms);
}

}  // namespace

const KernelSet& avx512_kernels() {
  // The packed path (more rows than the dot path, weights that are not bf16 or not K-contiguous)
  // is the AVX2 kernels': a wider AVX-512 fp32 tile measured slower on both CPUs this level has
  // been timed on (bench/NOTES.md v19).  A rows are converted by the AVX2 loader.
  const KernelSet& a2 = avx2_kernels();
  static const KernelSet ks{.mr = a2.mr,
                            .nr = a2.nr,
                            .kc = a2.kc,
                            .mc = a2.mc,
                            .nc = a2.nc,
                            .dot_max_m = 16,
                            .micro = a2.micro,
                            .pack_b = a2.pack_b,
                            .load_a = a2.load_a,
                            .dot = &dot_avx512,
                            .dot_n = &dot_n_avx512,
                            .dot_n_max_m = kAxRows,
                            .wide = &gemm_nt_bf16_wide,
                            .wide_bf16 = &gemm_nt_pairs_bf16,
                            .pack_tokens = &pack_tokens_avx512,
                            .store_transposed = &store_transposed_avx512};
  return ks;
}

}  // namespace moe_kernels::cpu::gemm_detail
