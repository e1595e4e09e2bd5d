// GEMM driver: blocking, scratch and ISA dispatch (the kernels live in gemm_<isa>.cpp).
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "cpu/gemm_impl.h"

namespace moe_kernels::cpu {
namespace gemm_detail {

float half_bits_to_f32(uint16_t h) {
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

void pack_b_generic(int64_t N, int64_t kc, const Operand& B, float* dst, int nr) {
  for (int64_t n0 = 0; n0 < N; n0 += nr) {
    float* panel = dst + (n0 / nr) * kc * nr;
    for (int64_t j = 0; j < nr; ++j) {
      const int64_t n = n0 + j;
      if (n >= N) {
        for (int64_t k = 0; k < kc; ++k) panel[k * nr + j] = 0.f;
        continue;
      }
      const char* rp = row_ptr(B, n);
      for (int64_t k = 0; k < kc; ++k) panel[k * nr + j] = load_elem(rp, B.dt, k * B.s1);
    }
  }
}

void load_a_generic(int64_t M, int64_t kc, const Operand& A, float* dst, int64_t lda) {
  for (int64_t m = 0; m < M; ++m) {
    const char* rp = row_ptr(A, m);
    for (int64_t k = 0; k < kc; ++k) dst[m * lda + k] = load_elem(rp, A.dt, k * A.s1);
  }
}

int pack_tokens_generic(int64_t mb, int64_t K, const Operand& A, int64_t wb, uint32_t* xp) {
  const int64_t P = (K + 1) / 2;
  const int max_terms = A.bf16_terms();
  auto* x16 = reinterpret_cast<uint16_t*>(xp);
  std::fill(xp, xp + max_terms * P * wb, 0u);
  int terms = 1;
  for (int64_t m = 0; m < mb; ++m) {
    const char* rp = row_ptr(A, m);
    for (int64_t k = 0; k < K; ++k) {
      const Bf16Terms s = split_bf16_terms(load_elem(rp, A.dt, k * A.s1));
      terms = std::max(terms, s.needed);
      for (int t = 0; t < max_terms; ++t) x16[((t * P + k / 2) * wb + m) * 2 + (k & 1)] = s.t[t];
    }
  }
  return std::min(terms, max_terms);
}

void store_transposed_generic(const float* c, int64_t ldt, int64_t rows, int64_t mb, float* C,
                              int64_t ldc, bool add) {  // plain stores (gemm.h: stream is a hint)
  for (int64_t j = 0; j < mb; ++j) {
    float* d = C + j * ldc;
    for (int64_t i = 0; i < rows; ++i) d[i] = add ? d[i] + c[i * ldt + j] : c[i * ldt + j];
  }
}

}  // namespace gemm_detail

using namespace gemm_detail;

namespace {

const KernelSet& kernels() {
  static const KernelSet* ks = [] {
    switch (detected_isa()) {
      case Isa::kAmx:
      case Isa::kAvx512: return &avx512_kernels();
      case Isa::kAvx2: return &avx2_kernels();
      default: return &scalar_kernels();
    }
  }();
  return *ks;
}

// Per-thread scratch, grown on demand and kept for the thread's lifetime (torch's pool threads
// persist), so steady-state calls allocate nothing.
float* scratch(ScratchVector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

GemmRoute& packed_route() {
  static GemmRoute r = nullptr;
  return r;
}

PairRoute& paired_route() {
  static PairRoute r = nullptr;
  return r;
}

}  // namespace

void set_packed_route(GemmRoute route) { packed_route() = route; }

void set_paired_route(PairRoute route) { paired_route() = route; }

bool gemm_nt_paired(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B,
                    const PairSink& sink) {
  // the calls gemm_nt(M, 2N, K, ...) hands to its packed route
  if (M <= gemm_dot_max_rows() || N <= 0 || K <= 0 || B.s1 != 1) return false;
  const PairRoute route = paired_route();
  return route != nullptr && route(M, N, K, A, B, sink);
}

int64_t gemm_dot_max_rows() {
  static const int64_t m = [] {
    const char* s = std::getenv("MOE_KERNELS_CPU_DOT_MAX_M");  // tuning knob
    return s && *s ? std::atoll(s) : kernels().dot_max_m;
  }();
  return m;
}

Isa gemm_isa() {
  const Isa i = detected_isa();
  return i == Isa::kAmx ? Isa::kAvx512 : i;
}

int gemm_pack_tokens(int64_t mb, int64_t K, const Operand& A, int64_t wb, uint32_t* xp) {
  const KernelSet& ks = kernels();
  return ks.pack_tokens ? ks.pack_tokens(mb, K, A, wb, xp) : pack_tokens_generic(mb, K, A, wb, xp);
}

void gemm_store_transposed(const float* c, int64_t ldt, int64_t rows, int64_t mb, float* C,
                           int64_t ldc, bool add, bool stream) {
  const KernelSet& ks = kernels();
  if (ks.store_transposed != nullptr) {
    ks.store_transposed(c, ldt, rows, mb, C, ldc, add, stream);
  } else {
    store_transposed_generic(c, ldt, rows, mb, C, ldc, add);
  }
}

void gemm_load_rows(int64_t M, int64_t K, const Operand& A, float* dst, int64_t ld) {
  if (M > 0 && K > 0) kernels().load_a(M, K, A, dst, ld);
}

// Whether gemm_nt takes KernelSet::dot_n for these operands.
bool takes_dot_n(const KernelSet& ks, int64_t M, const Operand& B) {
  return ks.dot_n != nullptr && M <= ks.dot_n_max_m && B.dt == DType::kBF16 && B.s0 == 1 &&
         B.s1 != 1 && B.gather == nullptr;
}

bool gemm_nt_bf16(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B, uint16_t* C,
                  int64_t ldc) {
  // B.s1 != 1: the dot path and the brgemm route, which read a K-contiguous B, would not take
  // the call either, so gemm_nt would hand it to the same wide route (unless dot_n takes it:
  // then gemm_nt's sums, converted by the caller, are the ones to return)
  if (M <= 0 || N <= 0 || K <= 0 || B.s1 == 1) return false;
  const KernelSet& ks = kernels();
  if (takes_dot_n(ks, M, B)) return false;
  return ks.wide_bf16 != nullptr && ks.wide_bf16(M, N, K, A, B, C, ldc);
}

void gemm_nt(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B, float* C,
             int64_t ldc, bool stream_c) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.f);
    return;
  }
  const KernelSet& ks = kernels();
  thread_local ScratchVector<float> a_buf, b_buf, c_tmp;
  if (M <= gemm_dot_max_rows() && B.s1 == 1) {
    // Few rows: convert A once, stream B straight from memory.
    const int64_t lda = K;
    float* a = scratch(a_buf, M * lda);
    ks.load_a(M, K, A, a, lda);
    ks.dot(M, N, K, a, lda, B, C, ldc, A.bf16_terms());
    return;
  }
  if (takes_dot_n(ks, M, B)) {
    // Few rows against a weight stored along N: its stored rows streamed once, nothing packed.
    float* a = scratch(a_buf, M * K);
    ks.load_a(M, K, A, a, K);
    ks.dot_n(M, N, K, a, K, B, C, ldc);
    return;
  }
  if (const GemmRoute route = packed_route(); route && route(M, N, K, A, B, C, ldc, stream_c))
    return;
  if (ks.wide && ks.wide(M, N, K, A, B, C, ldc, stream_c)) return;
  const int mr = ks.mr, nr = ks.nr;
  const int64_t lda = ks.kc + 16;  // padding keeps the mr row streams off the same cache sets
  float* tmp = scratch(c_tmp, static_cast<int64_t>(mr) * nr);
  // Loop order n (nc) -> k (kc) -> m (mc): each B element is converted and packed exactly once
  // per call (B is the weight streamed from DRAM), the A rows once per nc column block.
  const int64_t mc = std::min<int64_t>(ks.mc, (M + mr - 1) / mr * mr);
  float* a = scratch(a_buf, mc * lda);
  for (int64_t n0 = 0; n0 < N; n0 += ks.nc) {
    const int64_t nb = std::min(ks.nc, N - n0);
    const int64_t nb_pad = (nb + nr - 1) / nr * nr;
    for (int64_t k0 = 0; k0 < K; k0 += ks.kc) {
      const int64_t kc = std::min(ks.kc, K - k0);
      const bool acc = k0 > 0;
      float* b = scratch(b_buf, nb_pad * kc);
      ks.pack_b(nb, kc, B.shifted(n0, k0), b);
      for (int64_t m0 = 0; m0 < M; m0 += mc) {
        const int64_t mb = std::min(mc, M - m0);
        const int64_t mb_pad = (mb + mr - 1) / mr * mr;
        ks.load_a(mb, kc, A.shifted(m0, k0), a, lda);
        for (int64_t m = mb; m < mb_pad; ++m) std::fill(a + m * lda, a + m * lda + kc, 0.f);
        for (int64_t jp = 0; jp < nb_pad; jp += nr) {
          const float* bp = b + jp * kc;
          const int64_t nv = std::min<int64_t>(nr, nb - jp);
          for (int64_t ip = 0; ip < mb_pad; ip += mr) {
            const int64_t mv = std::min<int64_t>(mr, mb - ip);
            float* c = C + (m0 + ip) * ldc + n0 + jp;
            if (nv == nr) {
              ks.micro(kc, a + ip * lda, lda, bp, c, ldc, acc, static_cast<int>(mv));
            } else {
              ks.micro(kc, a + ip * lda, lda, bp, tmp, nr, false, static_cast<int>(mv));
              for (int64_t i = 0; i < mv; ++i)
                for (int64_t j = 0; j < nv; ++j)
                  c[i * ldc + j] = acc ? c[i * ldc + j] + tmp[i * nr + j] : tmp[i * nr + j];
            }
          }
        }
      }
    }
  }
}

}  // namespace moe_kernels::cpu
