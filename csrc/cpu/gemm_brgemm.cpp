// gemm_nt through AMX tiles: oneDNN's batch-reduce GEMM (at::native::cpublas::brgemm) and the
// package's own AMX kernel, the route of bf16 weights with more rows than the dot path takes.
//
// C[M, N] = A[M, K] * B[N, K]^T with B bf16 and K-contiguous (nn.Linear's weights), computed as
// C^T = B . A^T so that the weights are the A operand where they lie: a run of up to kRows weight
// rows at one stride is [rows, K] with lda = that stride, read as it is (an A operand is never
// packed).  Only the token rows are re-laid out, kTok at a time, as the B operand [K, kTok]
// (gemm_pack_tokens: bf16 terms in the VNNI layout; fp32 rows as up to three terms, multiplied one
// after the other into the same fp32 accumulator), once per block of tokens and call, a pass of
// blocks at a time (pass_tokens).  So no weight is converted, transposed or packed per call.
// Runs of kRows rows with K a multiple of 32 go to amx_run (one call per run for all the pass's
// blocks, the next run's rows prefetched); the others to brgemm, one call per (run, block), which
// sees (rows <= kRows, kTok, K) shapes only: a handful of generated kernels per process.
// gemm_nt_paired's calls (GEMM 1: gate and up runs in pairs) hand each block's results to a sink
// (the activation) instead of storing them.
//
// When it is used (MOE_KERNELS_CPU_BRGEMM, read once per process): "auto" (default) when the ISA
// level is amx and cpublas::could_pack(bf16) (oneDNN's ukernel with AMX) and the packed kernel
// passes a self-check; "1" always -- with the ISA level capped below amx (MOE_KERNELS_CPU_ISA),
// or on a CPU without a packed kernel, with B in the plain layout, which torch runs through its
// reference brgemm: slow, but the same blocking, packing and accumulation code, so the tests
// exercise it on any CPU; "0" never.  Odd K is left to the other paths (a VNNI pair would read
// past a weight row).  The own kernel (packed route only) passes its own self-check first;
// MOE_KERNELS_CPU_AMX_KERNEL=0 leaves every call to brgemm.
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/gemm_impl.h"

namespace moe_kernels::cpu {
namespace {

constexpr int64_t kRows = 32;  // weight rows (output columns) per brgemm call: brgemm's M
constexpr int64_t kTok = 32;   // tokens per block: brgemm's N

enum class Route { kOff, kPlain, kVnni };

using bf16 = c10::BFloat16;

// The packed route is checked once, on the first call, against exact integer products (the
// token packing, a first call and an accumulating one) before it is trusted: it runs only on CPUs
// with AMX, where these sources cannot be tested by their CI.
bool vnni_self_check() {
  constexpr int64_t R = kRows, K = 64;
  std::vector<bf16> w(R * K), x(kTok * K);
  for (int64_t i = 0; i < R * K; ++i) w[i] = bf16(static_cast<float>(i * 7 % 5) - 2.f);
  for (int64_t i = 0; i < kTok * K; ++i) x[i] = bf16(static_cast<float>(i * 3 % 7) - 3.f);
  Operand X;
  X.p = x.data();
  X.dt = DType::kBF16;
  X.s0 = K;
  ScratchVector<uint32_t> xp(3 * (K / 2) * kTok);
  if (gemm_pack_tokens(kTok, K, X, kTok, xp.data()) != 1) return false;
  const auto* xv = reinterpret_cast<const bf16*>(xp.data());
  // both block widths the route calls: kTok tokens, and kTok / 2 (a pass's short last block)
  for (const int64_t nt : {kTok, kTok / 2}) {
    ScratchVector<float> c(R * kTok, -1.f);
    at::native::cpublas::brgemm(R, nt, K, K, kTok, kTok, false, w.data(), xv, c.data(), true);
    at::native::cpublas::brgemm(R, nt, K, K, kTok, kTok, true, w.data(), xv, c.data(), true);
    at::native::cpublas::brgemm_release(true);
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t j = 0; j < nt; ++j) {
        float want = 0.f;
        for (int64_t k = 0; k < K; ++k)
          want += static_cast<float>(w[r * K + k]) * static_cast<float>(x[j * K + k]);
        if (c[r * kTok + j] != 2.f * want) return false;
      }
    }
  }
  return true;
}

Route route() {
  static const Route r = [] {
    const char* s = std::getenv("MOE_KERNELS_CPU_BRGEMM");
    const std::string v = s ? s : "";
    // the packed (AMX) kernel only at the amx level: MOE_KERNELS_CPU_ISA caps this route too
    const bool packs =
        detected_isa() == Isa::kAmx && at::native::cpublas::could_pack(at::kBFloat16);
    Route want;
    if (v.empty() || v == "auto") {
      want = packs ? Route::kVnni : Route::kOff;
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

// MOE_KERNELS_CPU_PROFILE=1 (read once): the route times its parts (brgemm_profile_take), so that
// the AMX CPUs it runs on show where its time goes without a profiler.
bool profiling() {
  static const bool on = [] {
    const char* s = std::getenv("MOE_KERNELS_CPU_PROFILE");
    return s != nullptr && *s != '\0' && *s != '0';
  }();
  return on;
}
std::atomic<int64_t> prof_pack{0}, prof_brgemm{0}, prof_store{0}, prof_sink{0}, prof_paired{0},
    prof_calls{0};

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

template <typename T>
T* grow(ScratchVector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// How many weight rows from n0 (at most kRows) form one brgemm A operand, and its lda: rows at a
// constant stride of at least K elements (a row gather -- w_gate_up's gate and up rows -- is
// consecutive runs); a single row otherwise.
int64_t weight_run(const Operand& B, int64_t n0, int64_t N, int64_t K, int64_t* lda) {
  using gemm_detail::row_ptr;
  const char* r0 = row_ptr(B, n0);
  *lda = K;
  if (n0 + 1 >= N) return 1;
  const std::ptrdiff_t step = row_ptr(B, n0 + 1) - r0;
  if (step < 2 * K || step % 2 != 0) return 1;
  int64_t len = 2;
  while (len < kRows && n0 + len < N && row_ptr(B, n0 + len) == r0 + len * step) ++len;
  *lda = step / 2;
  return len;
}

// Tokens per pass of gemm_nt_brgemm (a multiple of kTok): the pass's token blocks are packed
// first, then every weight run passes over all of them, so a run (kRows x K bf16, at most ~1 MiB)
// is read from memory once per pass and from L2 for the pass's other blocks, where a pass of one
// block would read the weights from memory once per kTok tokens: 2 x kTok FLOPs per weight byte,
// less than AMX's rate needs from DRAM.  The pass's packing takes at most kPassBytes (the L2 of
// AMX CPUs is 2 MiB a core), except that a call's M tokens up to 1.5x that are one pass (a second
// pass of a block or two would read every weight run from memory again for them);
// MOE_KERNELS_CPU_BRGEMM_PASS_TOKENS (a tuning knob, read once) overrides it.
constexpr int64_t kPassBytes = int64_t{1} << 20;

int64_t pass_tokens(int64_t M, int64_t K, int max_terms) {
  static const int64_t knob = [] {
    const char* s = std::getenv("MOE_KERNELS_CPU_BRGEMM_PASS_TOKENS");
    return s && *s ? std::max<int64_t>(std::atoll(s), 0) : int64_t{0};
  }();
  if (knob > 0) return (knob + kTok - 1) / kTok * kTok;
  const int64_t block_bytes = max_terms * ((K + 1) / 2) * kTok * int64_t{4};
  const int64_t pass = std::max<int64_t>(1, kPassBytes / block_bytes) * kTok;
  const int64_t m_up = (M + kTok - 1) / kTok * kTok;
  return m_up <= pass + pass / 2 ? m_up : pass;
}

// K per chunk of gemm_nt_brgemm: all of K, unless the call's tokens (at most kChunkRows of them)
// would not fit one pass at full K (Mixtral's w_down, K 14336: 3.5 MiB for 128 tokens); then
// chunks whose packed tokens do, so that every weight run is read from memory once per call and
// the tokens from L2, the chunks' partial sums added into C.  Otherwise a pass of one or two
// blocks would read each weight run from memory once per 32-64 tokens, and the long runs (896 KiB)
// and blocks would not both stay in L2.
constexpr int64_t kChunkRows = 256;

int64_t k_chunk(int64_t M, int64_t K, int max_terms) {
  const int64_t rows = std::min((M + kTok - 1) / kTok * kTok, kChunkRows);
  const int64_t per_k = max_terms * rows * int64_t{2};  // bytes of packed tokens per K
  if (per_k * K <= kPassBytes) return K;
  return std::min(K, std::max<int64_t>(kPassBytes / per_k / 64 * 64, 256));
}

// Whether the route runs its own AMX kernel (amx_run) where it can: the packed route, the
// kernel's self-check passed, and MOE_KERNELS_CPU_AMX_KERNEL is not 0 (read once).
bool own_kernel();

// A pass's token blocks packed as brgemm's B operands (for K columns k0 .. k0 + kl), and the
// products of weight runs with them: the packing and the brgemm calls both routes share.
struct TokenPass {
  bool vnni;
  int max_terms;
  int64_t kc, nblk, slab;  // K per chunk, blocks per pass, dwords of one term of one block
  uint32_t* xp;
  bf16* plain;
  const bf16** bt;                 // [nblk][3]: each block's term operands
  int* terms;                      // [nblk]
  mutable bool own_tiles = false;  // the tile configuration is amx_run's
  // own_kernel(), asked before any TokenPass of the call exists: its self-check's TokenPass
  // grows the same thread-local buffers
  bool own_ok = false;

  TokenPass(bool vnni_, int max_terms_, int64_t kc_, int64_t pass, bool own_ok_ = false)
      : vnni(vnni_),
        max_terms(max_terms_),
        kc(kc_),
        nblk(pass / kTok),
        slab(kc_ / 2 * kTok),
        own_ok(vnni_ && own_ok_) {
    thread_local ScratchVector<uint32_t> x_buf;
    thread_local ScratchVector<bf16> plain_buf;
    thread_local ScratchVector<const bf16*> b_ptrs;
    thread_local ScratchVector<int> b_terms;
    xp = grow(x_buf, nblk * max_terms * slab);
    bt = grow(b_ptrs, nblk * 3);
    terms = grow(b_terms, nblk);
    plain = vnni ? nullptr : grow(plain_buf, nblk * 3 * kc * kTok);
  }

  // Packs the nb blocks of A's rows p0 .. (kTok each, the last one short) at columns k0 .. k0 + kl.
  void pack(int64_t nb, int64_t p0, int64_t M, int64_t k0, int64_t kl, const Operand& A) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t m0 = p0 + b * kTok;
      uint32_t* xb = xp + b * max_terms * slab;
      terms[b] = gemm_pack_tokens(std::min(kTok, M - m0), kl, A.shifted(m0, k0), kTok, xb);
      for (int t = 0; t < terms[b]; ++t) {
        // gemm_pack_tokens puts a block's terms kl / 2 * kTok dwords apart (a short last chunk)
        const auto* v = reinterpret_cast<const uint16_t*>(xb + t * (kl / 2) * kTok);
        if (vnni) {
          bt[b * 3 + t] = reinterpret_cast<const bf16*>(v);
          continue;
        }
        // plain [kl, kTok] for torch's reference brgemm: element (k, j) of the VNNI pairs
        bf16* pl = plain + (b * 3 + t) * kc * kTok;
        for (int64_t k = 0; k < kl; ++k)
          for (int64_t j = 0; j < kTok; ++j)
            std::memcpy(&pl[k * kTok + j], &v[((k / 2) * kTok + j) * 2 + (k & 1)], 2);
        bt[b * 3 + t] = pl;
      }
    }
  }

  // Accumulators for amx_run: n sets of nblk blocks of kRows x kTok fp32.
  float* acc(int n = 1) {
    thread_local ScratchVector<float> acc_buf;
    return grow(acc_buf, n * nblk * kRows * kTok);
  }

  // Whether run() takes a run of len rows over kl columns (else product(), block by block).
  bool own(int64_t len, int64_t kl) const { return own_ok && len == kRows && kl % 32 == 0; }

  // amx_run over the first nb blocks (see there).
  void run(const bf16* w, int64_t lda, int64_t kl, int64_t nb, const bf16* next, int64_t next_lda,
           float* acc) const;

  // c[i * kTok + j] = sum_k w[i * lda + k] * token (mb tokens of block b, j < mb) for i < len.
  void product(int64_t b, int64_t mb, int64_t len, int64_t kl, int64_t lda, const bf16* w,
               float* c) const {
    // a block's token count rounded up to a tile's 16 columns (an AMX tile op costs the same for
    // 1 to 16 of them): a pass's last block with up to 16 tokens does half the work
    const int64_t nt = mb <= kTok / 2 ? kTok / 2 : kTok;
    if (own_tiles) {  // torch reconfigures the tiles only after a release
      at::native::cpublas::brgemm_release(vnni);
      own_tiles = false;
    }
    for (int term = 0; term < terms[b]; ++term)
      at::native::cpublas::brgemm(len, nt, kl, lda, kTok, kTok, /*add_C=*/term > 0, w,
                                  bt[b * 3 + term], c, vnni);
  }
};

// The route's own AMX kernel for the common case -- a run of kRows weight rows and K a multiple
// of 32 -- in place of one brgemm call per (run, block): one call per run computes the products
// of all the pass's blocks, K in chunks of kChunk with the blocks inner, so that a chunk of the
// run's rows (32 x kChunk bf16, 16 KiB) is read from memory by the first block and from L1 by the
// others, and while the other blocks compute, the next chunk's lines (or the next run's first
// chunk) are prefetched into L2, spread over their K steps.  A brgemm call instead waits for its
// run's rows at the first block and leaves memory idle during the others (bench/NOTES.md, v37).
// The accumulators live in acc (one 32 x 32 fp32 block per token block, in C^T's layout
// c[i * kTok + j]) between chunks.
#define MOE_AMX __attribute__((target("amx-tile,amx-bf16,avx512f")))

constexpr int64_t kChunk = 256;

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: the 2 x 2 accumulators (weight rows 0-15 / 16-31 x tokens 0-15 / 16-31); 4-5: the
// weight rows' tiles; 6-7: the tokens' (16 K pairs x 16 tokens each).
MOE_AMX void amx_configure() {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

// The products of the kRows weight rows at w (row stride lda elements, K columns) with the nb
// blocks of tp into acc[b * kRows * kTok ...]; next: the rows whose first chunk to prefetch at the
// last chunk (the next run's, null for none), next_lda their stride.
MOE_AMX void amx_run(const bf16* w, int64_t lda, int64_t K, const TokenPass& tp, int64_t nb,
                     const bf16* next, int64_t next_lda, float* acc) {
  amx_configure();
  const int64_t ldw = lda * 2;        // bytes between weight rows
  constexpr int64_t kLdx = kTok * 4;  // bytes between the K pairs of a packed token block
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t kl = std::min(kChunk, K - k0);
    const char* pf;
    int64_t pf_ld, pf_bytes;  // the chunk to prefetch: rows at pf_ld bytes, pf_bytes of each
    if (k0 + kChunk < K) {
      pf = reinterpret_cast<const char*>(w + k0 + kChunk);
      pf_ld = ldw;
      pf_bytes = 2 * std::min(kChunk, K - k0 - kChunk);
    } else {
      pf = reinterpret_cast<const char*>(next);
      pf_ld = next_lda * 2;
      pf_bytes = 2 * std::min(kChunk, K);
    }
    for (int64_t b = 0; b < nb; ++b) {
      float* c = acc + b * kRows * kTok;
      if (k0 == 0) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      } else {
        _tile_loadd(0, c, kTok * 4);
        _tile_loadd(1, c + 16, kTok * 4);
        _tile_loadd(2, c + 16 * kTok, kTok * 4);
        _tile_loadd(3, c + 16 * kTok + 16, kTok * 4);
      }
      // this block's share of the prefetch: rows r0 .. r1 (the blocks after the first, whose
      // weight tiles come from L1; the only block when there is one)
      const int64_t shares = nb > 1 ? nb - 1 : 1, share = nb > 1 ? b - 1 : 0;
      const int64_t r0 = share < 0 || pf == nullptr ? 0 : share * kRows / shares;
      const int64_t r1 = share < 0 || pf == nullptr ? 0 : (share + 1) * kRows / shares;
      for (int term = 0; term < tp.terms[b]; ++term) {
        const bf16* x = tp.bt[b * 3 + term] + k0 * kTok;  // pair k0 / 2, kTok pairs of bf16
        for (int64_t k = 0; k < kl; k += 32) {
          _tile_loadd(4, w + k0 + k, ldw);
          _tile_loadd(5, w + 16 * lda + k0 + k, ldw);
          _tile_loadd(6, x + k * kTok, kLdx);
          _tile_loadd(7, x + k * kTok + 32, kLdx);
          if (term == 0 && 2 * k < pf_bytes) {
            for (int64_t r = r0; r < r1; ++r) _mm_prefetch(pf + r * pf_ld + 2 * k, _MM_HINT_T1);
          }
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, c, kTok * 4);
      _tile_stored(1, c + 16, kTok * 4);
      _tile_stored(2, c + 16 * kTok, kTok * 4);
      _tile_stored(3, c + 16 * kTok + 16, kTok * 4);
    }
  }
}

void TokenPass::run(const bf16* w, int64_t lda, int64_t kl, int64_t nb, const bf16* next,
                    int64_t next_lda, float* acc) const {
  amx_run(w, lda, kl, *this, nb, next, next_lda, acc);
  own_tiles = true;
}

// amx_run against exact integer products: rows at a stride longer than K, K in two chunks (the
// second short), a full and a short token block, fp32 tokens as three bf16 terms.
bool amx_self_check() {
  constexpr int64_t K = kChunk + 64, lda = K + 32, M = kTok + 8;
  std::vector<bf16> w(kRows * lda);
  std::vector<float> x(M * K);
  for (int64_t i = 0; i < kRows * lda; ++i) w[i] = bf16(static_cast<float>(i * 7 % 5) - 2.f);
  for (int64_t i = 0; i < M * K; ++i)  // three bf16 terms: 8 + 2^-9 + 2^-18 steps
    x[i] = static_cast<float>(i * 3 % 7) - 3.f + (i % 3) * 0x1p-9f + (i % 2) * 0x1p-18f;
  Operand X;
  X.p = x.data();
  X.dt = DType::kF32;
  X.s0 = K;
  TokenPass tp(true, X.bf16_terms(), K, 2 * kTok);
  tp.pack(2, 0, M, 0, K, X);
  float* acc = tp.acc();
  amx_run(w.data(), lda, K, tp, 2, w.data(), lda, acc);
  at::native::cpublas::brgemm_release(true);
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t i = 0; i < kRows; ++i) {
      for (int64_t j = 0; j < std::min(kTok, M - b * kTok); ++j) {
        double want = 0.;
        for (int64_t k = 0; k < K; ++k)
          want +=
              static_cast<double>(static_cast<float>(w[i * lda + k])) * x[(b * kTok + j) * K + k];
        const double got = acc[(b * kRows + i) * kTok + j];
        if (std::abs(got - want) > 1e-6 * (1. + std::abs(want))) return false;
      }
    }
  }
  return true;
}

bool own_kernel() {
  static const bool on = [] {
    const char* s = std::getenv("MOE_KERNELS_CPU_AMX_KERNEL");
    if (route() != Route::kVnni || (s != nullptr && std::string(s) == "0")) return false;
    // the process's permission to use the AMX tile state (Linux; oneDNN asks for it too)
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0)
      return false;
    bool ok = false;
    try {
      ok = amx_self_check();
    } catch (const std::exception&) {
      ok = false;
    }
    if (!ok)
      TORCH_WARN("moe_kernels (cpu): the AMX kernel failed its self-check on this CPU; the ",
                 "brgemm route calls oneDNN's brgemm instead");
    return ok;
  }();
  return on;
}

bool gemm_nt_brgemm(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B, float* C,
                    int64_t ldc, bool stream_c) {
  const Route r = route();
  if (r == Route::kOff || B.dt != DType::kBF16 || B.s1 != 1 || K % 2 != 0) return false;
  const bool vnni = r == Route::kVnni;
  const int max_terms = A.bf16_terms();
  const int64_t kc = k_chunk(M, K, max_terms);  // even: K is, and a chunk is a multiple of 64
  // streamed stores only where C is written once (one chunk): later chunks read C back
  const bool stream = stream_c && kc == K;
  const int64_t pass = std::min(pass_tokens(M, kc, max_terms), (M + kTok - 1) / kTok * kTok);
  TokenPass tp(vnni, max_terms, kc, pass, vnni && own_kernel());
  thread_local ScratchVector<float> c_buf;
  float* c = grow(c_buf, kRows * kTok);
  float* acc = tp.acc();
  const bool prof = profiling();
  int64_t t_pack = 0, t_brgemm = 0, t_store = 0, calls = 0, t = prof ? now_ns() : 0;
  for (int64_t p0 = 0; p0 < M; p0 += pass) {
    const int64_t nb = std::min(tp.nblk, (M - p0 + kTok - 1) / kTok);  // blocks in this pass
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t kl = std::min(kc, K - k0);
      tp.pack(nb, p0, M, k0, kl, A);
      if (prof) {
        const int64_t t1 = now_ns();
        t_pack += t1 - t;
        t = t1;
      }
      for (int64_t n0 = 0; n0 < N;) {
        int64_t lda = K;
        const int64_t len = weight_run(B, n0, N, K, &lda);
        const auto* w = reinterpret_cast<const bf16*>(gemm_detail::row_ptr(B, n0)) + k0;
        const bool own = tp.own(len, kl);
        if (own) {
          int64_t next_lda = K;
          const bf16* next = nullptr;
          if (n0 + len < N) {
            weight_run(B, n0 + len, N, K, &next_lda);
            next = reinterpret_cast<const bf16*>(gemm_detail::row_ptr(B, n0 + len)) + k0;
          }
          tp.run(w, lda, kl, nb, next, next_lda, acc);
          if (prof) {
            const int64_t t1 = now_ns();
            t_brgemm += t1 - t;
            ++calls;
            t = t1;
          }
        }
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t m0 = p0 + b * kTok, mb = std::min(kTok, M - m0);
          float* cb = own ? acc + b * kRows * kTok : c;
          if (!own) {
            tp.product(b, mb, len, kl, lda, w, c);
            if (prof) {
              const int64_t t1 = now_ns();
              t_brgemm += t1 - t;
              calls += tp.terms[b];
              t = t1;
            }
          }
          gemm_store_transposed(cb, kTok, len, mb, C + m0 * ldc + n0, ldc, /*add=*/k0 > 0, stream);
          if (prof) {
            const int64_t t1 = now_ns();
            t_store += t1 - t;
            t = t1;
          }
        }
        n0 += len;
      }
    }
  }
  at::native::cpublas::brgemm_release(vnni);
  if (stream) _mm_sfence();  // the non-temporal stores before C is read by another thread
  if (prof) {
    prof_pack += t_pack;
    prof_brgemm += t_brgemm;
    prof_store += t_store;
    prof_calls += calls;
  }
  return true;
}

// gemm_nt_paired on this route: each pair of runs (rows n0 .. of both halves of B) meets each
// block of the pass, and the two results go to the sink while they are in L1, instead of through
// a [M, 2N] result in memory.  One K chunk only (the sink gets finished sums).
bool gemm_nt_brgemm_paired(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B,
                           const PairSink& sink) {
  const Route r = route();
  if (r == Route::kOff || B.dt != DType::kBF16 || B.s1 != 1 || K % 2 != 0) return false;
  const int max_terms = A.bf16_terms();
  if (k_chunk(M, K, max_terms) != K) return false;
  const bool vnni = r == Route::kVnni;
  const int64_t pass = std::min(pass_tokens(M, K, max_terms), (M + kTok - 1) / kTok * kTok);
  TokenPass tp(vnni, max_terms, K, pass, vnni && own_kernel());
  thread_local ScratchVector<float> c_buf;
  float* c1 = grow(c_buf, 2 * kRows * kTok);
  float* c2 = c1 + kRows * kTok;
  float* acc1 = tp.acc(2);
  float* acc2 = acc1 + tp.nblk * kRows * kTok;
  const bool prof = profiling();
  int64_t t_pack = 0, t_brgemm = 0, t_store = 0, calls = 0, t = prof ? now_ns() : 0;
  for (int64_t p0 = 0; p0 < M; p0 += pass) {
    const int64_t nb = std::min(tp.nblk, (M - p0 + kTok - 1) / kTok);
    tp.pack(nb, p0, M, 0, K, A);
    if (prof) {
      const int64_t t1 = now_ns();
      t_pack += t1 - t;
      t = t1;
    }
    for (int64_t n0 = 0; n0 < N;) {
      // a run of the first half ending at N, and the second half's from row N + n0
      int64_t lda1 = K, lda2 = K;
      const int64_t len =
          std::min(weight_run(B, n0, N, K, &lda1), weight_run(B, N + n0, 2 * N, K, &lda2));
      const auto* w1 = reinterpret_cast<const bf16*>(gemm_detail::row_ptr(B, n0));
      const auto* w2 = reinterpret_cast<const bf16*>(gemm_detail::row_ptr(B, N + n0));
      const bool own = tp.own(len, K);
      if (own) {
        // the second half's run is the first's next; the next pair's first run the second's
        int64_t next_lda = K;
        const bf16* next = nullptr;
        if (n0 + len < N) {
          weight_run(B, n0 + len, N, K, &next_lda);
          next = reinterpret_cast<const bf16*>(gemm_detail::row_ptr(B, n0 + len));
        }
        tp.run(w1, lda1, K, nb, w2, lda2, acc1);
        tp.run(w2, lda2, K, nb, next, next_lda, acc2);
        if (prof) {
          const int64_t t1 = now_ns();
          t_brgemm += t1 - t;
          calls += 2;
          t = t1;
        }
      }
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t m0 = p0 + b * kTok, mb = std::min(kTok, M - m0);
        float* r1 = own ? acc1 + b * kRows * kTok : c1;
        float* r2 = own ? acc2 + b * kRows * kTok : c2;
        if (!own) {
          tp.product(b, mb, len, K, lda1, w1, c1);
          tp.product(b, mb, len, K, lda2, w2, c2);
          if (prof) {
            const int64_t t1 = now_ns();
            t_brgemm += t1 - t;
            calls += 2 * tp.terms[b];
            t = t1;
          }
        }
        sink(r1, r2, kTok, len, mb, m0, n0);
        if (prof) {
          const int64_t t1 = now_ns();
          t_store += t1 - t;
          t = t1;
        }
      }
      n0 += len;
    }
  }
  at::native::cpublas::brgemm_release(vnni);
  if (prof) {
    prof_pack += t_pack;
    prof_brgemm += t_brgemm;
    prof_paired += t_brgemm;
    prof_sink += t_store;
    prof_calls += calls;
  }
  return true;
}

const bool registered =
    (set_packed_route(&gemm_nt_brgemm), set_paired_route(&gemm_nt_brgemm_paired), true);

}  // namespace

BrgemmProfile brgemm_profile_take() {
  BrgemmProfile p;
  p.pack_ns = prof_pack.exchange(0);
  p.brgemm_ns = prof_brgemm.exchange(0);
  p.store_ns = prof_store.exchange(0);
  p.sink_ns = prof_sink.exchange(0);
  p.paired_ns = prof_paired.exchange(0);
  p.calls = prof_calls.exchange(0);
  return p;
}

bool brgemm_amx_kernel() { return own_kernel(); }

std::string brgemm_route_name() {
  switch (route()) {
    case Route::kVnni: return "vnni";
    case Route::kPlain: return "plain";
    default: return "off";
  }
}

}  // namespace moe_kernels::cpu
