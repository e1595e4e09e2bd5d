// Portable GEMM kernels (MOE_KERNELS_CPU_ISA=scalar and CPUs without AVX2): plain C++ loops.
#include "cpu/gemm_impl.h"

namespace moe_kernels::cpu::gemm_detail {
namespace {

constexpr int kMr = 4, kNr = 16;

void micro_scalar(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                  bool accumulate, int rows) {
  float acc[kMr][kNr] = {};
  for (int64_t k = 0; k < kc; ++k) {
    for (int i = 0; i < rows; ++i) {
      const float av = a[i * lda + k];
      for (int j = 0; j < kNr; ++j) acc[i][j] += av * b[k * kNr + j];
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < kNr; ++j)
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
}

void pack_b_scalar(int64_t N, int64_t kc, const Operand& B, float* dst) {
  pack_b_generic(N, kc, B, dst, kNr);
}

void dot_scalar(int64_t M, int64_t N, int64_t K, float* a, int64_t lda, const Operand& B, float* C,
                int64_t ldc, int /*a_terms: fp32 products throughout*/) {
  for (int64_t n = 0; n < N; ++n) {
    const char* bp = row_ptr(B, n);
    for (int64_t m = 0; m < M; ++m) C[m * ldc + n] = dot_tail(0.f, a + m * lda, bp, B.dt, 0, K);
  }
}

}  // namespace

const KernelSet& scalar_kernels() {
  static const KernelSet ks{
      kMr, kNr, 256, 96, 128, 4, &micro_scalar, &pack_b_scalar, &load_a_generic, &dot_scalar};
  return ks;
}

}  // namespace moe_kernels::cpu::gemm_detail
