#pragma once
// Internal interface between the GEMM driver (gemm.cpp) and the per-ISA kernels
// (gemm_scalar.cpp, gemm_avx2.cpp, gemm_avx512.cpp).
#include <cmath>
#include <cstring>

#include "cpu/gemm.h"

namespace moe_kernels::cpu::gemm_detail {

struct KernelSet {
  int mr, nr;         // register tile of the packed micro-kernel
  int64_t kc;         // K block: an fp32 B micro-panel kc x nr stays in L1
  int64_t mc;         // rows of the fp32 A block kept in L2
  int64_t nc;         // columns of the packed B block kept in L2
  int64_t dot_max_m;  // the dot path serves M <= dot_max_m when B is K-contiguous
  // c[rows x nr] (+)= a[rows, lda] * b[kc][nr] for rows <= mr (only those rows of c are touched).
  void (*micro)(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                bool accumulate, int rows);
  // dst[ceil(N / nr)][kc][nr] = B(n, k) for n < N, k < kc; zeros for n >= N.
  void (*pack_b)(int64_t N, int64_t kc, const Operand& B, float* dst);
  // dst[m * lda + k] = A(m, k) as fp32, m < M, k < kc.
  void (*load_a)(int64_t M, int64_t kc, const Operand& A, float* dst, int64_t lda);
  // C[M, N] = a[M rows, lda] * B(n, k)^T with B.s1 == 1 (fp32 a).  a is the caller's scratch
  // copy of the rows: a kernel may reorder it in place (the AVX2 bf16 kernel does).  a_terms: the
  // bf16 terms the rows need at most against bf16 weights (1: they are bf16 values, or their
  // product only needs bf16 accuracy; see Operand::max_terms).
  void (*dot)(int64_t M, int64_t N, int64_t K, float* a, int64_t lda, const Operand& B, float* C,
              int64_t ldc, int a_terms);
  // Optional: the dot path's counterpart for bf16 B stored along N (B.s0 == 1, no gather, the
  // data gradients' weights), M <= dot_n_max_m: C[M, N] = a[M rows, lda] * B(n, k)^T (fp32 a).
  void (*dot_n)(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const Operand& B,
                float* C, int64_t ldc) = nullptr;
  int64_t dot_n_max_m = 0;
  // Optional: the whole of gemm_nt for calls past the dot path that this kernel set serves
  // better than the packed micro-kernel; returns false when it does not take the call.
  GemmRoute wide = nullptr;
  // Optional: gemm_nt_bf16 (gemm.h), C rounded to bf16 in the epilogue; false: not taken.
  bool (*wide_bf16)(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B,
                    uint16_t* C, int64_t ldc) = nullptr;
  // pack_tokens_generic's contract, vectorised; null: the generic one.
  int (*pack_tokens)(int64_t mb, int64_t K, const Operand& A, int64_t wb, uint32_t* xp) = nullptr;
  // store_transposed_generic's contract, vectorised; null: the generic one.
  void (*store_transposed)(const float* c, int64_t ldt, int64_t rows, int64_t mb, float* C,
                           int64_t ldc, bool add, bool stream) = nullptr;
};

const KernelSet& scalar_kernels();
const KernelSet& avx2_kernels();
const KernelSet& avx512_kernels();

// Scalar element access (any dtype).
inline float bf16_bits_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float half_bits_to_f32(uint16_t h);

// fp32 -> bf16 bits, round to nearest even (NaN kept quiet).
inline uint16_t f32_to_bf16_rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// x as three bf16 terms whose sum is x (hi = bf16(x), mid = bf16(x - hi), lo = bf16(x - hi - mid):
// 3 x 8 significant bits cover fp32's 24) and how many of them are needed (1-3).  An infinite hi
// stands alone (its remainder would be inf - inf).
struct Bf16Terms {
  uint16_t t[3];
  int needed;
};
inline Bf16Terms split_bf16_terms(float x) {
  Bf16Terms s;
  s.t[0] = f32_to_bf16_rne(x);
  const float hi = bf16_bits_to_f32(s.t[0]);
  const float r1 = std::isinf(hi) ? 0.f : x - hi;
  s.t[1] = f32_to_bf16_rne(r1);
  s.t[2] = f32_to_bf16_rne(r1 - bf16_bits_to_f32(s.t[1]));
  s.needed = (s.t[2] & 0x7fffu) ? 3 : (s.t[1] & 0x7fffu) ? 2 : 1;
  return s;
}

// Token rows packed for a product with bf16 weights read in place (the AVX-512-BF16 route of
// gemm_nt and the brgemm route): for m < mb <= wb rows of A and P = ceil(K / 2) pairs of K, the
// dword xp[(t * P + p) * wb + m] holds bf16 term t of A(m, 2p) (low half) and A(m, 2p + 1) (high
// half) -- per term, the VNNI layout [K / 2][wb][2] of a [K, wb] operand; zeros for m >= mb and
// for k = K when K is odd.  Returns the number of terms used: 1 for bf16 A, else what the values
// need, at most A.max_terms.  Slabs past that count are left unwritten.
int pack_tokens_generic(int64_t mb, int64_t K, const Operand& A, int64_t wb, uint32_t* xp);
// C[j, i] = c[i * ldt + j] (add: C[j, i] += c[i * ldt + j]) for i < rows, j < mb.
void store_transposed_generic(const float* c, int64_t ldt, int64_t rows, int64_t mb, float* C,
                              int64_t ldc, bool add);

inline float load_elem(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kF32: return static_cast<const float*>(p)[i];
    case DType::kBF16: return bf16_bits_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return half_bits_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

inline const char* row_ptr(const Operand& op, int64_t i) {
  const int64_t r = op.gather ? op.gather[i] : i;
  return static_cast<const char*>(op.p) + r * op.s0 * dtype_size(op.dt);
}

// s + a[k0] * w[k0] + ... + a[k1 - 1] * w[k1 - 1], added in that order (w of dtype dt): the K
// tail a vector loop leaves, or a whole scalar dot product.
inline float dot_tail(float s, const float* a, const char* w, DType dt, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) s += a[k] * load_elem(w, dt, k);
  return s;
}

// Whether a dot kernel reads B's rows one at a time, as one sequential stream with the next row
// prefetched as a row starts, rather than four rows as interleaved streams: 1 token row against
// rows of up to 2048 elements, 2 token rows up to 1024 (the down projection of fine-grained
// experts, I = 768-1024, and with one row also their gate/up rows), where one stream measured
// faster (bench/NOTES.md v9-v10 for the AVX2 kernels, v36 for vdpbf16ps).
inline bool dot_rows_sequential(int64_t M, int64_t K) {
  return (M == 1 && K <= 2048) || (M == 2 && K <= 1024);
}

// The dot kernels' walk over B's rows: group4(n, bp, pf) for each group of four rows n..n+3 (bp:
// their row pointers; pf: the next group's, to prefetch while this one is read), then
// single(n) for each remaining row.
template <class Group4, class Single>
inline void for_row_groups(int64_t N, const Operand& B, Group4&& group4, Single&& single) {
  const char* bp[4];
  const char* pf[4];
  int64_t n = 0;
  for (; n + 4 <= N; n += 4) {
    for (int j = 0; j < 4; ++j) {
      bp[j] = row_ptr(B, n + j);
      pf[j] = row_ptr(B, n + 4 + j < N ? n + 4 + j : N - 1);
    }
    group4(n, static_cast<const char* const*>(bp), static_cast<const char* const*>(pf));
  }
  for (; n < N; ++n) single(n);
}

// Generic (any strides) versions shared by every ISA for the layouts they do not specialise.
void pack_b_generic(int64_t N, int64_t kc, const Operand& B, float* dst, int nr);
void load_a_generic(int64_t M, int64_t kc, const Operand& A, float* dst, int64_t lda);

}  // namespace moe_kernels::cpu::gemm_detail
