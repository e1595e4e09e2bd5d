#pragma once
// The CPU GEMM engine behind grouped_gemm and moe_ffn (forward and backward).
//
// One primitive: C[m, n] = sum_k A(m, k) * B(n, k) for m < M, n < N, fp32 accumulation, C fp32
// row-major with leading dimension ldc (overwritten).  Both operands are strided views of fp32,
// bf16 or fp16 memory with an optional row gather:
//     A(m, k) = A.p[(A.gather ? A.gather[m] : m) * A.s0 + k * A.s1]
//     B(n, k) = B.p[(B.gather ? B.gather[n] : n) * B.s0 + k * B.s1]
// so tokens are gathered straight into GEMM tiles, the gate/up rows of w_gate_up are picked by a
// gather, and every transposed layout (nn.Linear [N, K], [K, N], transposed views) is just strides.
//
// Paths (runtime ISA dispatch, MOE_KERNELS_CPU_ISA): a "dot" kernel for few rows with K-contiguous
// B (decode: weights stream from DRAM once, converted to fp32 in registers), and a packed
// register-blocked micro-kernel otherwise (B converted once per (row block, K block) into an fp32
// panel that stays in L1/L2; A rows gathered and converted into an fp32 block in L2).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include "cpu/cpu_info.h"

namespace moe_kernels::cpu {

// Scratch memory of the kernels, 64-byte aligned: a zmm load or an AMX tile row of a buffer with
// 16-byte alignment (std::vector's) straddles two cache lines, which costs the AMX tiles more than
// half their rate.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    const std::size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes == 0 ? 64 : bytes);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const {
    return true;
  }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const {
    return false;
  }
};
template <typename T>
using ScratchVector = std::vector<T, CacheLineAllocator<T>>;

enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline int64_t dtype_size(DType t) { return t == DType::kF32 ? 4 : 2; }

struct Operand {
  const void* p = nullptr;
  DType dt = DType::kF32;
  int64_t s0 = 0, s1 = 1;
  const int64_t* gather = nullptr;
  // fp32 values multiplied with bf16 weights on the AVX-512-BF16 kernels are split into at most
  // this many bf16 terms (their sum is the value): 3 keeps fp32 accuracy; 2 gives 16 significant
  // bits (relative error <= 2^-17); 1 rounds the values to bf16.
  int max_terms = 3;

  // The bf16 terms this operand's values take at most: 1 for bf16 values, else max_terms (1-3).
  int bf16_terms() const { return dt == DType::kBF16 ? 1 : std::clamp(max_terms, 1, 3); }

  // The same operand starting at logical row i0 and column j0.
  Operand shifted(int64_t i0, int64_t j0) const {
    Operand o = *this;
    if (gather) {
      o.gather = gather + i0;
      i0 = 0;
    }
    o.p = static_cast<const char*>(p) + (i0 * s0 + j0 * s1) * dtype_size(dt);
    return o;
  }
};

// C[M, N] (fp32, leading dim ldc) = A[M, K] * B[N, K]^T.  Serial: call it from inside a task.
// stream_c: C is an output that is not read again soon (larger than the caches, read by a later
// pass): the brgemm route (one K chunk) and the AVX-512-BF16 transposed product then store it with
// non-temporal stores, past the caches, instead of reading every line in first and evicting their
// own operands with them; the other paths ignore it.
void gemm_nt(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B, float* C,
             int64_t ldc, bool stream_c = false);

// gemm_nt's product rounded to bf16 (round to nearest even) straight into C[M, N] (leading
// dimension ldc), for the calls whose B is not K-contiguous (B.s1 != 1: the weight gradients' and
// data gradients' operands) where the ISA has a route that rounds in its epilogue; returns false
// without writing C otherwise (the caller then takes gemm_nt and converts).  Serial.
bool gemm_nt_bf16(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B, uint16_t* C,
                  int64_t ldc);

// dst[m * ld + k] = A(m, k) as fp32 for m < M, k < K: the row loader of gemm_nt's A operand (row
// gather, any strides and dtype).  Serial.
void gemm_load_rows(int64_t M, int64_t K, const Operand& A, float* dst, int64_t ld);

// A second engine for the calls the packed path would take (more rows than the dot path): it
// returns false when it does not take the call.  gemm_brgemm.cpp registers oneDNN's brgemm for
// bf16 weights; builds of the engine without ATen (the emulated kernel check) register none.
using GemmRoute = bool (*)(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B,
                           float* C, int64_t ldc, bool stream_c);
void set_packed_route(GemmRoute route);

// A GEMM whose B rows come in pairs (the gate and up rows of w_gate_up), handed to a consumer a
// block at a time instead of being stored: B has 2N rows, row n and row N + n a pair.  Each call
// gets the transposed products of rows n0 .. n0 + rows of both halves for the A rows m0 .. m0 +
// mb: first[i * ldt + j] = sum_k A(m0 + j, k) * B(n0 + i, k) and second[i * ldt + j] the same
// with B(N + n0 + i, k), for i < rows and j < mb.  The blocks partition [0, M) x [0, N), each
// handed over once, from the calling thread; first and second are scratch the sink may overwrite
// (columns j >= mb of them hold no products).
struct PairSink {
  virtual void operator()(float* first, float* second, int64_t ldt, int64_t rows, int64_t mb,
                          int64_t m0, int64_t n0) const = 0;

 protected:
  ~PairSink() = default;
};

// The paired GEMM through the brgemm route, where gemm_nt(M, 2N, K, A, B, ...) would take that
// route and it runs in one K chunk; returns false without calling the sink otherwise (the caller
// then takes gemm_nt).  Serial.
bool gemm_nt_paired(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B,
                    const PairSink& sink);
using PairRoute = bool (*)(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B,
                           const PairSink& sink);
void set_paired_route(PairRoute route);

// Which brgemm route gemm_nt takes for bf16 weights in this process (MOE_KERNELS_CPU_BRGEMM):
// "vnni" (oneDNN's packed kernel, AMX), "plain" (forced without one) or "off".
std::string brgemm_route_name();

// Whether the packed brgemm route runs its runs of 32 weight rows (K a multiple of 32) on the
// package's own AMX kernel instead of oneDNN's brgemm calls: the route is "vnni", the kernel
// passed its self-check, and MOE_KERNELS_CPU_AMX_KERNEL is not 0.
bool brgemm_amx_kernel();

// With MOE_KERNELS_CPU_PROFILE=1: the brgemm route's time since the last take, summed over
// threads -- packing the token blocks, oneDNN's brgemm calls, and storing their transposed
// results into C -- and its brgemm calls (all zero when the profile is off or the route unused).
struct BrgemmProfile {
  int64_t pack_ns = 0, brgemm_ns = 0, store_ns = 0, calls = 0;
  int64_t sink_ns = 0;    // gemm_nt_paired's consumer of the results, in place of a store
  int64_t paired_ns = 0;  // the part of brgemm_ns in gemm_nt_paired
};
BrgemmProfile brgemm_profile_take();

// Token rows A(m, k), m < mb <= wb, k < K, packed as bf16 terms in the VNNI layout of a [K, wb]
// operand, one slab of ceil(K / 2) * wb dwords per term (gemm_impl.h, pack_tokens_generic, says
// exactly); returns the number of terms (slabs) written.  The brgemm route's token operand.
int gemm_pack_tokens(int64_t mb, int64_t K, const Operand& A, int64_t wb, uint32_t* xp);

// The transposed results of a C^T = B . A^T block back into C's rows: C[j * ldc + i] =
// c[i * ldt + j] for i < rows (B's rows, C's columns) and j < mb (tokens); add: C[j * ldc + i] +=
// c[i * ldt + j] (a later K chunk's partial sums).  stream (not with add): C's row segments of 16
// values that start 64-byte aligned may be written with non-temporal stores, which the caller
// orders with an sfence before C is read elsewhere.  The brgemm route's store.
void gemm_store_transposed(const float* c, int64_t ldt, int64_t rows, int64_t mb, float* C,
                           int64_t ldc, bool add = false, bool stream = false);

// The ISA gemm_nt uses in this process (after MOE_KERNELS_CPU_ISA).
Isa gemm_isa();

// gemm_nt streams a K-contiguous B straight from memory, once per call, when M is at most this
// (the dot path of decode-sized row counts); above it, B is packed block by block.
int64_t gemm_dot_max_rows();

}  // namespace moe_kernels::cpu
