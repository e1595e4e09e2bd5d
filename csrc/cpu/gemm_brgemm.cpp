// gemm_nt through oneDNN's batch-reduce GEMM (at::native::cpublas::brgemm): the route of bf16
// weights with more rows than the dot path takes, on CPUs where oneDNN runs it on AMX tiles.
//
// C[M, N] = A[M, K] * B[N, K]^T with B bf16.  A is converted once per call to bf16 rows
// [M_pad, K_pad] (fp32 rows as three bf16 terms, see below).  For every block of kNb weight rows
// and kKc of K, the block is laid out as brgemm's B operand [kc, kNb] (transposed from the
// weights' [N, K] rows, then VNNI-packed by cpublas::pack where oneDNN has a packed kernel) and
// multiplied with every kMb-row block of A, accumulating over K in an fp32 [M_pad, kNb] tile.
// brgemm only ever sees (kMb, kNb, kKc or the K tail) shapes, so oneDNN generates (and torch
// caches per thread) a handful of kernels per process.
//
// When it is used (MOE_KERNELS_CPU_BRGEMM, read once per process): "auto" (default) when the ISA
// level is amx and cpublas::could_pack(bf16) (oneDNN's ukernel with AMX) and the packed kernel
// passes a self-check; "1" always -- on a CPU without a packed kernel with B in the plain layout,
// which torch runs through its reference brgemm: slow, but the same blocking, conversion, padding
// and accumulation code, so the tests exercise it on any CPU; "0" never.  The prefill speed of
// this route is unmeasured: no CPU with AMX was available to this project's benchmarks.
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/gemm_impl.h"

namespace moe_kernels::cpu {
namespace {

constexpr int64_t kMb = 32;    // A rows per brgemm call
constexpr int64_t kNb = 64;    // weight rows (output columns) per B block
constexpr int64_t kKc = 1024;  // K per B block: [1024, 64] bf16 = 128 KiB stays in L2

enum class Route { kOff, kPlain, kVnni };

using bf16 = c10::BFloat16;

// The packed route is checked once, on the first call, against exact integer products (through
// pack, a first call and an accumulating one) before it is trusted: it runs only on CPUs with
// AMX, where these sources cannot be tested by their CI.
bool vnni_self_check() {
  constexpr int64_t M = kMb, N = kNb, K = 64;
  std::vector<bf16> a(M * K), b(K * N), bv(K * N);
  for (int64_t i = 0; i < M * K; ++i) a[i] = bf16(static_cast<float>(i * 7 % 5) - 2.f);
  for (int64_t i = 0; i < K * N; ++i) b[i] = bf16(static_cast<float>(i * 3 % 7) - 3.f);
  std::vector<float> c(M * N, -1.f);
  at::native::cpublas::pack(K, N, N, N, at::kBFloat16, at::kBFloat16, b.data(), bv.data());
  at::native::cpublas::brgemm(M, N, K, K, N, N, false, a.data(), bv.data(), c.data(), true);
  at::native::cpublas::brgemm(M, N, K, K, N, N, true, a.data(), bv.data(), c.data(), true);
  at::native::cpublas::brgemm_release(true);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      float want = 0.f;
      for (int64_t k = 0; k < K; ++k)
        want += static_cast<float>(a[m * K + k]) * static_cast<float>(b[k * N + n]);
      if (c[m * N + n] != 2.f * want) return false;
    }
  }
  return true;
}

Route route() {
  static const Route r = [] {
    const char* s = std::getenv("MOE_KERNELS_CPU_BRGEMM");
    const std::string v = s ? s : "";
    const bool packs = at::native::cpublas::could_pack(at::kBFloat16);
    Route want;
    if (v.empty() || v == "auto") {
      want = detected_isa() == Isa::kAmx && packs ? Route::kVnni : Route::kOff;
    } else if (v == "1") {
      want = packs ? Route::kVnni : Route::kPlain;
    } else if (v == "0") {
      want = Route::kOff;
    } else {
      throw std::invalid_argument("MOE_KERNELS_CPU_BRGEMM: expected auto, 0 or 1, got '" + v + "'");
    }
    bool passed = true;
    if (want == Route::kVnni) {
      try {
        passed = vnni_self_check();
      } catch (const std::exception&) {  // the route is optional: a failure turns it off
        passed = false;
      }
    }
    if (!passed) {
      TORCH_WARN("moe_kernels (cpu): oneDNN's packed bf16 brgemm failed its self-check on this ",
                 "CPU; the bf16 GEMMs use moe_kernels' own kernels instead");
      want = Route::kOff;
    }
    return want;
  }();
  return r;
}

inline bf16 elem_bf16(const char* row, DType dt, int64_t off) {
  if (dt == DType::kBF16) return reinterpret_cast<const bf16*>(row)[off];
  return bf16(gemm_detail::load_elem(row, dt, off));
}

template <typename T>
T* grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

bool gemm_nt_brgemm(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B, float* C,
                    int64_t ldc) {
  const Route r = route();
  if (r == Route::kOff || B.dt != DType::kBF16) return false;
  using gemm_detail::row_ptr;
  const bool vnni = r == Route::kVnni;
  const int64_t k_pad = (K + 1) / 2 * 2;  // VNNI pairs along K: an even K, zero-padded
  const int64_t m_pad = (M + kMb - 1) / kMb * kMb;
  thread_local std::vector<bf16> a_buf, b_plain, b_vnni;
  thread_local std::vector<float> c_buf;
  // A: every row converted once, zero rows and columns in the padding.  A bf16 A is one term; an
  // fp32 (or fp16) A is split into three bf16 terms whose sum is its value (hi, mid, lo: 3 x 8
  // mantissa bits), multiplied with B one after the other into the same fp32 accumulator, so fp32
  // activations and gradients keep fp32 accuracy (the AVX-512-BF16 dot kernel does the same).
  const int terms = A.dt == DType::kBF16 ? 1 : 3;
  const int64_t a_term = m_pad * k_pad;
  bf16* a = grow(a_buf, terms * a_term);
  for (int64_t m = 0; m < m_pad; ++m) {
    for (int t = 0; t < terms; ++t) {
      bf16* row = a + t * a_term + m * k_pad;
      std::fill(row, row + k_pad, bf16(0.f));
    }
    if (m >= M) continue;
    const char* src = row_ptr(A, m);
    bf16* dst = a + m * k_pad;
    if (terms == 1) {
      for (int64_t k = 0; k < K; ++k) dst[k] = elem_bf16(src, A.dt, k * A.s1);
      continue;
    }
    for (int64_t k = 0; k < K; ++k) {
      float v = gemm_detail::load_elem(src, A.dt, k * A.s1);
      for (int t = 0; t < terms; ++t) {
        const bf16 part(v);
        dst[t * a_term + k] = part;
        v -= static_cast<float>(part);
      }
    }
  }
  float* c = grow(c_buf, m_pad * kNb);
  bf16* bp = grow(b_plain, kKc * kNb);
  bf16* bv = vnni ? grow(b_vnni, kKc * kNb) : bp;
  for (int64_t n0 = 0; n0 < N; n0 += kNb) {
    const int64_t nb = std::min(kNb, N - n0);
    for (int64_t k0 = 0; k0 < k_pad; k0 += kKc) {
      const int64_t kc = std::min(kKc, k_pad - k0);
      // B block [kc, kNb]: column j is weight row n0 + j over k0 .. k0 + kc (zeros past N, K)
      for (int64_t j = 0; j < kNb; ++j) {
        if (j >= nb) {
          for (int64_t k = 0; k < kc; ++k) bp[k * kNb + j] = bf16(0.f);
          continue;
        }
        const char* src = row_ptr(B, n0 + j);
        for (int64_t k = 0; k < kc; ++k) {
          const int64_t kk = k0 + k;
          bp[k * kNb + j] = kk < K ? elem_bf16(src, DType::kBF16, kk * B.s1) : bf16(0.f);
        }
      }
      if (vnni) {
        at::native::cpublas::pack(kc, kNb, kNb, kNb, at::kBFloat16, at::kBFloat16, bp, bv);
      }
      for (int64_t m0 = 0; m0 < m_pad; m0 += kMb) {
        for (int t = 0; t < terms; ++t) {
          at::native::cpublas::brgemm(kMb, kNb, kc, k_pad, kNb, kNb, /*add_C=*/k0 > 0 || t > 0,
                                      a + t * a_term + m0 * k_pad + k0, bv, c + m0 * kNb, vnni);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) std::memcpy(C + m * ldc + n0, c + m * kNb, nb * sizeof(float));
  }
  at::native::cpublas::brgemm_release(vnni);
  return true;
}

const bool registered = (set_packed_route(&gemm_nt_brgemm), true);

}  // namespace

std::string brgemm_route_name() {
  switch (route()) {
    case Route::kVnni: return "vnni";
    case Route::kPlain: return "plain";
    default: return "off";
  }
}

}  // namespace moe_kernels::cpu
