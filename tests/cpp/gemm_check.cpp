// Checks the CPU GEMM engine (moe_kernels::cpu::gemm_nt, csrc/cpu/gemm.cpp) on one ISA's kernels
// against a float64 loop, over random shapes, dtypes and operand layouts (row gathers, transposed
// and generic strides, mixed fp32 x bf16/fp16 operands):
//
//     gemm_check <scalar|avx2|avx512|amx> [cases]
//
// tests/test_cpu_isa_emulated.py builds it with MOE_KERNELS_SIMDE defined, which compiles the
// AVX-512 kernels against SIMDe, so every kernel set runs on any x86-64 machine.  Exit status 0
// when every element of every case is within the fp32 accumulation bound of the float64 result,
// every output element was written and nothing outside the output was touched.
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/gemm.h"

namespace moe_kernels::cpu {
namespace {
Isa g_isa = Isa::kScalar;
}
// The engine asks which ISA to use; this program decides (no CPU detection: the AVX-512 kernels
// may be emulated).
Isa detected_isa() { return g_isa; }
std::string detected_isa_name() { return "test"; }
}  // namespace moe_kernels::cpu

namespace {

using moe_kernels::cpu::DType;
using moe_kernels::cpu::Operand;

// Logical [rows, cols] matrix stored with strides (s0, s1) in a buffer of dtype dt, optionally
// through a row gather into a larger stored matrix.
struct Mat {
  DType dt;
  int64_t rows, cols, s0, s1;
  std::vector<uint8_t> buf;
  std::vector<int64_t> gather;  // empty: no gather
  std::vector<double> val;      // logical values (exactly the stored ones), row-major

  double at(int64_t i, int64_t j) const { return val[i * cols + j]; }
  Operand operand() const {
    Operand o;
    o.p = buf.data();
    o.dt = dt;
    o.s0 = s0;
    o.s1 = s1;
    o.gather = gather.empty() ? nullptr : gather.data();
    return o;
  }
};

int64_t esize(DType d) { return d == DType::kF32 ? 4 : 2; }

// Stores v (rounded to dt) at element index idx; returns the stored value.
double store(std::vector<uint8_t>& buf, DType dt, int64_t idx, float v) {
  if (dt == DType::kF32) {
    std::memcpy(buf.data() + idx * 4, &v, 4);
    return v;
  }
  if (dt == DType::kBF16) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    const uint16_t b = static_cast<uint16_t>(u >> 16);  // truncation: any bf16 value will do
    std::memcpy(buf.data() + idx * 2, &b, 2);
    const uint32_t back = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &back, 4);
    return f;
  }
  const c10::Half h(v);
  const uint16_t bits = h.x;
  std::memcpy(buf.data() + idx * 2, &bits, 2);
  return static_cast<float>(h);
}

// layout 0: row-major (s1 = 1, padded rows); 1: column-major; 2: generic strides; 3: row-major
// through a row gather into a stored matrix with more rows.
Mat make(std::mt19937_64& rng, DType dt, int64_t rows, int64_t cols, int layout) {
  Mat m;
  m.dt = dt;
  m.rows = rows;
  m.cols = cols;
  std::uniform_int_distribution<int64_t> pad(0, 9);
  int64_t stored_rows = rows;
  if (layout == 3) {
    stored_rows = rows + 1 + pad(rng) * 3;
    std::uniform_int_distribution<int64_t> pick(0, stored_rows - 1);
    for (int64_t i = 0; i < rows; ++i) m.gather.push_back(pick(rng));  // repeats allowed
  }
  switch (layout) {
    case 1:
      m.s0 = 1;
      m.s1 = stored_rows + pad(rng);
      break;
    case 2:
      m.s0 = 2 * cols + 3;
      m.s1 = 2;
      break;
    default:
      m.s0 = cols + pad(rng);
      m.s1 = 1;
      break;
  }
  const int64_t extent = (stored_rows - 1) * m.s0 + (cols - 1) * m.s1 + 1;
  m.buf.assign(extent * esize(dt), 0);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<double> stored(stored_rows * cols);
  for (int64_t i = 0; i < stored_rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      stored[i * cols + j] = store(m.buf, dt, i * m.s0 + j * m.s1, nd(rng));
  m.val.resize(rows * cols);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = m.gather.empty() ? i : m.gather[i];
    for (int64_t j = 0; j < cols; ++j) m.val[i * cols + j] = stored[r * cols + j];
  }
  return m;
}

const char* name(DType d) { return d == DType::kF32 ? "f32" : d == DType::kBF16 ? "bf16" : "f16"; }

// bf16 bits of a finite fp32 value, rounded to nearest even.
uint16_t bf16_rne(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace

int main(int argc, char** argv) {
  using moe_kernels::cpu::Isa;
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s <scalar|avx2|avx512|amx> [cases]\n", argv[0]);
    return 2;
  }
  const std::string isa = argv[1];
  if (isa == "scalar")
    moe_kernels::cpu::g_isa = Isa::kScalar;
  else if (isa == "avx2")
    moe_kernels::cpu::g_isa = Isa::kAvx2;
  else if (isa == "avx512")
    moe_kernels::cpu::g_isa = Isa::kAvx512;
  else if (isa == "amx")
    moe_kernels::cpu::g_isa = Isa::kAmx;  // AVX-512 + the AVX-512-BF16 dot
  else {
    std::fprintf(stderr, "unknown ISA '%s'\n", isa.c_str());
    return 2;
  }
  const int cases = argc > 2 ? std::atoi(argv[2]) : 300;
  std::mt19937_64 rng(20261127);
  // Row counts around every kernel's boundaries (dot path up to 16 rows, tiles of 6 and 8 rows,
  // the transposed product's one-block limit of 96 and its half groups of 8 lanes: 45, 85, 150),
  // columns around 4 / 16 / 32, K around 8 / 16 and past the 256 K block.
  const int64_t Ms[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17, 33, 45, 70, 85, 96, 100, 150};
  const int64_t Ns[] = {1, 3, 4, 5, 8, 17, 31, 32, 33, 70};
  const int64_t Ks[] = {1, 5, 8, 16, 17, 24, 33, 100, 257, 300};
  const DType dts[] = {DType::kF32, DType::kBF16, DType::kF16};
  int failures = 0, bf16_taken = 0;
  for (int c = 0; c < cases && failures < 5; ++c) {
    // half the cases with 1-4 rows: every ISA's dot (decode) path serves those
    const int64_t M = rng() % 2 ? Ms[rng() % 4] : Ms[rng() % std::size(Ms)];
    const int64_t N = Ns[rng() % std::size(Ns)], K = Ks[rng() % std::size(Ks)];
    const DType bt = dts[rng() % 3];
    const DType at = rng() % 3 == 0 ? DType::kF32 : bt;  // fp32 activations x 16-bit weights too
    // B mostly K-contiguous (weights as stored by nn.Linear): the dot and the packing fast paths
    const int blay = static_cast<int>(rng() % 6) < 3 ? 0 : static_cast<int>(rng() % 4);
    const int alay = static_cast<int>(rng() % 4);
    const Mat A = make(rng, at, M, K, alay), B = make(rng, bt, N, K, blay);
    // fp32 A may be split into fewer bf16 terms against bf16 weights (Operand::max_terms): each
    // term count adds its own relative error on A, at most 2^-8 for one term (bf16 keeps 8
    // significant bits), 2^-16 for two
    const int terms = 1 + static_cast<int>(rng() % 3);
    Operand Aop = A.operand();
    Aop.max_terms = terms;
    // so may an fp32 B (the backward's activations and gradients against each other)
    const int bterms = 1 + static_cast<int>(rng() % 3);
    Operand Bop = B.operand();
    Bop.max_terms = bterms;
    const double split_err = (at == DType::kF32 && terms < 3 ? std::ldexp(1.0, -8 * terms) : 0) +
                             (bt == DType::kF32 && bterms < 3 ? std::ldexp(1.0, -8 * bterms) : 0);
    const int64_t ldc = N + static_cast<int64_t>(rng() % 5);
    const float kOutside = 12345.f;
    std::vector<float> C(M * ldc, kOutside);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = std::nanf("");
    moe_kernels::cpu::gemm_nt(M, N, K, Aop, Bop, C.data(), ldc);
    for (int64_t m = 0; m < M && failures < 5; ++m) {
      for (int64_t n = 0; n < ldc; ++n) {
        const float got = C[m * ldc + n];
        if (n >= N) {
          if (got != kOutside) {
            std::printf("case %d: C[%ld, %ld] outside the output was written\n", c, (long)m,
                        (long)n);
            ++failures;
          }
          continue;
        }
        double want = 0, mag = 0;
        for (int64_t k = 0; k < K; ++k) {
          want += A.at(m, k) * B.at(n, k);
          mag += std::fabs(A.at(m, k) * B.at(n, k));
        }
        // fp32 accumulation of K products in any order: |error| <= ~K * 2^-24 * sum |a b|
        const double tol = ((K + 8) * 1.2e-7 + split_err) * mag + 1e-30;
        if (!(std::fabs(got - want) <= tol)) {
          std::printf(
              "case %d (M %ld N %ld K %ld, A %s layout %d max_terms %d, B %s layout %d max_terms "
              "%d): C[%ld, %ld] = %.9g, want %.9g (tol %.3g)\n",
              c, (long)M, (long)N, (long)K, name(at), alay, terms, name(bt), blay, bterms, (long)m,
              (long)n, got, want, tol);
          if (++failures >= 5) break;
        }
      }
    }
    // gemm_nt_bf16: where it takes the call, C rounded to bf16 (the same sums as gemm_nt's),
    // every element written and nothing outside; where it does not, nothing written
    const uint16_t kPoison = 0xabcd;
    std::vector<uint16_t> Cb(M * ldc, kPoison);
    const bool took = moe_kernels::cpu::gemm_nt_bf16(M, N, K, Aop, Bop, Cb.data(), ldc);
    bf16_taken += took;
    for (int64_t m = 0; m < M && failures < 5; ++m) {
      for (int64_t n = 0; n < ldc; ++n) {
        const uint16_t want = took && n < N ? bf16_rne(C[m * ldc + n]) : kPoison;
        if (Cb[m * ldc + n] != want) {
          std::printf(
              "case %d (M %ld N %ld K %ld, B layout %d): gemm_nt_bf16 %s C[%ld, %ld] = "
              "0x%04x, want 0x%04x\n",
              c, (long)M, (long)N, (long)K, blay, took ? "took the call," : "declined,", (long)m,
              (long)n, Cb[m * ldc + n], want);
          if (++failures >= 5) break;
        }
      }
    }
  }
  // the AVX-512-BF16 level rounds into bf16 in the epilogue of the calls whose B is not
  // K-contiguous (gemm_nt_bf16); the others never take it
  if (failures == 0 && (isa == "amx") != (bf16_taken > 0)) {
    std::printf("%s: gemm_nt_bf16 took %d calls\n", isa.c_str(), bf16_taken);
    ++failures;
  }
  // gemm_store_transposed (the brgemm route's store): an exact copy of every value into C's
  // rows, or its sum with what C held (add: integers, so exact too), nothing outside them
  // touched; row and token counts around the 16 x 16 blocks.  Mode 2 streams (non-temporal
  // stores) into 64-byte aligned rows: the same values.
  for (int mode = 0; mode < 3; ++mode) {
    const int add = mode == 1;
    for (int64_t rows : {1, 5, 16, 17, 32}) {
      for (int64_t mb : {1, 7, 16, 20, 32}) {
        const int64_t ldt = 32, ldc = mode == 2 ? (rows + 15) / 16 * 16 + 16 : rows + 3;
        std::vector<float> c(rows * ldt), C_buf(mb * ldc + 16, 12345.f);
        // C 64-byte aligned (the streamed stores need it; the other modes do not care)
        float* C = C_buf.data() + (64 - reinterpret_cast<uintptr_t>(C_buf.data()) % 64) % 64 / 4;
        for (auto& v : c) v = static_cast<float>(rng() % 100000) - 50000.f;
        moe_kernels::cpu::gemm_store_transposed(c.data(), ldt, rows, mb, C, ldc, add != 0,
                                                mode == 2);
        for (int64_t j = 0; j < mb; ++j) {
          for (int64_t i = 0; i < ldc; ++i) {
            const float want = i < rows ? c[i * ldt + j] + (add ? 12345.f : 0.f) : 12345.f;
            if (C[j * ldc + i] != want && failures < 5) {
              std::printf(
                  "store_transposed (mode %d, rows %ld, tokens %ld): C[%ld, %ld] = %g, want %g\n",
                  mode, (long)rows, (long)mb, (long)j, (long)i, C[j * ldc + i], want);
              ++failures;
            }
          }
        }
      }
    }
  }
  if (failures) {
    std::printf("%s: FAILED\n", isa.c_str());
    return 1;
  }
  std::printf("%s: %d cases ok\n", isa.c_str(), cases);
  return 0;
}
