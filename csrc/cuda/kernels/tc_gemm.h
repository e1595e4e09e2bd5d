#pragma once
// Our own arithmetic around the CUTLASS grouped GEMM (csrc/cuda/cutlass/): the device-side builder
// of its per-group arguments, read from `offs` on the device (no host synchronisation, so a launch
// can be captured in a CUDA graph), and the zero fill of empty experts' weight gradients.  Written
// against simt.h like every other kernel body, so the CPU tests execute them.
//
//   TcBuildGroups     one thread per group g (= expert) writes shapes[g] = (m, n, k), the operand
//                     pointers and the leading dimensions that CUTLASS reads.
//   TcZeroFill        what CUTLASS does not write is zero: rows past the last segment (forward,
//                     dA), the weight gradient of an expert with no rows (CUTLASS gets an empty
//                     problem for it).
//
// The segments are read as the exact path reads them (segment_bounds: offs clamped into a
// non-decreasing sequence within [0, R]), so no value of offs sends CUTLASS out of bounds.
#include <cstdint>

#include "cuda/kernels/grouped_gemm.h"
#include "cuda/simt.h"

namespace moe_kernels::cuda {

// The CUTLASS instantiations (csrc/cuda/cutlass/<name>.cu): X(name, sm, dtype, layout, tile, out)
// with dtype 0 = fp32 on tf32 tensor cores, 1 = bf16, 2 = fp16 (FloatType's values); layout 0 = nn
// (A and B row-major), 1 = nt (B column-major), 2 = tn (A column-major); tile 0 = the prefill
// tile (128 rows), 1 = the decode tile (64 rows; forward and dA of bf16 / fp16 only: the weight
// gradient's M is the hidden size, never small; sm_90a only); out 0 = D in the operands' type,
// 1 = fp32 D from bf16 / fp16 operands (moe_ffn's fp32 intermediates: h before the activation,
// whose clamps a rounding would move, and the expert outputs the routing-weight gradient reads;
// the nt layout of Hugging Face's weight storage only).  This list is the set the dispatcher can
// select; the gate (moe_kernels/tools/cuda_gate.py) checks each one in the binary.
#define MOE_TC_KERNELS(X)                \
  X(sm80_bf16_nn, 80, 1, 0, 0, 0)        \
  X(sm80_bf16_nt, 80, 1, 1, 0, 0)        \
  X(sm80_bf16_tn, 80, 1, 2, 0, 0)        \
  X(sm80_f16_nn, 80, 2, 0, 0, 0)         \
  X(sm80_f16_nt, 80, 2, 1, 0, 0)         \
  X(sm80_f16_tn, 80, 2, 2, 0, 0)         \
  X(sm80_tf32_nn, 80, 0, 0, 0, 0)        \
  X(sm80_tf32_nt, 80, 0, 1, 0, 0)        \
  X(sm80_tf32_tn, 80, 0, 2, 0, 0)        \
  X(sm80_bf16_nt_f32out, 80, 1, 1, 0, 1) \
  X(sm80_f16_nt_f32out, 80, 2, 1, 0, 1)  \
  X(sm90_bf16_nn, 90, 1, 0, 0, 0)        \
  X(sm90_bf16_nt, 90, 1, 1, 0, 0)        \
  X(sm90_bf16_tn, 90, 1, 2, 0, 0)        \
  X(sm90_f16_nn, 90, 2, 0, 0, 0)         \
  X(sm90_f16_nt, 90, 2, 1, 0, 0)         \
  X(sm90_f16_tn, 90, 2, 2, 0, 0)         \
  X(sm90_bf16_nn_d, 90, 1, 0, 1, 0)      \
  X(sm90_bf16_nt_d, 90, 1, 1, 1, 0)      \
  X(sm90_f16_nn_d, 90, 2, 0, 1, 0)       \
  X(sm90_f16_nt_d, 90, 2, 1, 1, 0)       \
  X(sm90_bf16_nt_f32out, 90, 1, 1, 0, 1) \
  X(sm90_f16_nt_f32out, 90, 2, 1, 0, 1)

struct TcKernelInfo {
  const char* name;
  int sm, dtype, layout, tile, out_f32;
};
#define MOE_TC_INFO(name, sm, dtype, layout, tile, out) {#name, sm, dtype, layout, tile, out},
inline constexpr TcKernelInfo kTcKernels[] = {MOE_TC_KERNELS(MOE_TC_INFO)};
#undef MOE_TC_INFO
constexpr int tc_kernel_count() {
  return static_cast<int>(sizeof(kTcKernels) / sizeof(kTcKernels[0]));
}

// The instantiation for a device of compute capability cc (major * 10 + minor), an operand type
// (0 fp32/tf32, 1 bf16, 2 fp16), a layout, the tile wanted (1: decode, where it exists) and the
// output type (out_f32: fp32 D from 16-bit operands; never substituted), or -1 (then the exact
// SIMT path runs).  sm_90a code runs on compute capability 9.0 only; sm_80 code on 8.x and 9.0
// (tf32 on Hopper too).
inline int tc_select(int cc, int dtype, int layout, int tile = 0, int out_f32 = 0) {
  int sm = 0;
  if (cc == 90 && dtype != 0)
    sm = 90;
  else if (cc >= 80 && cc <= 90)
    sm = 80;
  int found = -1;
  for (int i = 0; i < tc_kernel_count(); ++i) {
    const TcKernelInfo& k = kTcKernels[i];
    if (k.sm != sm || k.dtype != dtype || k.layout != layout || k.out_f32 != out_f32) continue;
    if (k.tile == tile) return i;
    if (k.tile == 0) found = i;
  }
  return found;
}

// The decode tile serves launches of at most this many rows per expert on average.
constexpr int64_t kTcDecodeRowsPerExpert = 64;

enum class TcMode : int {
  // group e: D rows [begin, end) = A rows [begin, end) * B_e -- the forward and dA.
  //   A row-major (row stride lda), B_e = b + e * b_se (leading dimension ldb), D row-major (ldd);
  //   problem (end - begin, N, K).
  kRows = 0,
  // group e: D_e = A_e * B_e, with the segment's rows as the reduction axis -- the weight gradient.
  //   A_e(i, r) = a[(begin + r) * lda + i] (column-major), B_e(r, n) = b[(begin + r) * ldb + n]
  //   (row-major), D_e = d + e * d_se (row-major, ldd); problem (M, N, end - begin), or empty
  //   (0, 0, 0) when the segment is.
  kRaggedK = 1,
};

struct TcGroupsParams {
  TcMode mode = TcMode::kRows;
  const int32_t* offs = nullptr;  // [E]
  int64_t E = 0, R = 0;           // groups, rows of the segmented operands
  int64_t elt = 2;                // element bytes of A and B
  int64_t elt_d = 2;              // element bytes of D
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0, b_se = 0;
  void* d = nullptr;
  int64_t ldd = 0, d_se = 0;
  int64_t M = 0, N = 0, K = 0;  // kRows: N, K; kRaggedK: M, N
  // outputs, E entries each (device memory)
  int32_t* shapes = nullptr;  // [E][3]
  const void** ptr_a = nullptr;
  const void** ptr_b = nullptr;
  void** ptr_d = nullptr;
  int64_t* out_lda = nullptr;
  int64_t* out_ldb = nullptr;
  int64_t* out_ldd = nullptr;
};

struct TcBuildGroups {
  static constexpr int kThreads = 128;
  TcGroupsParams p;

  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    const char* a = static_cast<const char*>(p.a);
    const char* b = static_cast<const char*>(p.b);
    char* d = static_cast<char*>(p.d);
    for (int64_t e = c.bid() * kThreads + c.tid(); e < p.E; e += c.nbid() * kThreads) {
      int64_t begin, end;
      segment_bounds(p.offs, e, p.R, &begin, &end);
      const int64_t rows = end - begin;
      int32_t* s = p.shapes + 3 * e;
      if (p.mode == TcMode::kRows) {
        s[0] = static_cast<int32_t>(rows);
        s[1] = static_cast<int32_t>(p.N);
        s[2] = static_cast<int32_t>(p.K);
        p.ptr_a[e] = a + begin * p.lda * p.elt;
        p.ptr_b[e] = b + e * p.b_se * p.elt;
        p.ptr_d[e] = d + begin * p.ldd * p.elt_d;
      } else {
        s[0] = rows > 0 ? static_cast<int32_t>(p.M) : 0;
        s[1] = rows > 0 ? static_cast<int32_t>(p.N) : 0;
        s[2] = static_cast<int32_t>(rows);
        p.ptr_a[e] = a + begin * p.lda * p.elt;
        p.ptr_b[e] = b + begin * p.ldb * p.elt;
        p.ptr_d[e] = d + e * p.d_se * p.elt_d;
      }
      p.out_lda[e] = p.lda;
      p.out_ldb[e] = p.ldb;
      p.out_ldd[e] = p.ldd;
    }
  }
};

// What CUTLASS leaves unwritten is zero: kRows, the rows of D at and past the end of the last
// segment; kRaggedK, D_e (M x N) of every expert with an empty segment.  The tensor-core path only
// runs with 16-byte aligned D rows (base, leading dimension and row length), so the fill stores 16
// bytes at a time; blocks take rows in turn (kRaggedK: expert e's M rows are rows e*M.. of a grid
// over E*M rows).
struct TcZeroFill {
  static constexpr int kThreads = 256;
  TcGroupsParams p;

  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    char* d = static_cast<char*>(p.d);
    const int64_t units = p.N * p.elt_d / 16;  // 16-byte units per row
    if (p.mode == TcMode::kRows) {
      int64_t begin = 0, end = 0;
      if (p.E > 0) segment_bounds(p.offs, p.E - 1, p.R, &begin, &end);
      for (int64_t r = end + c.bid(); r < p.R; r += c.nbid()) {
        char* row = d + r * p.ldd * p.elt_d;
        for (int64_t i = c.tid(); i < units; i += kThreads) store16(row + 16 * i, Vec16{});
      }
      return;
    }
    for (int64_t g = c.bid(); g < p.E * p.M; g += c.nbid()) {
      const int64_t e = g / p.M, r = g % p.M;
      int64_t begin, end;
      segment_bounds(p.offs, e, p.R, &begin, &end);
      if (end > begin) continue;  // uniform over the block
      char* row = d + (e * p.d_se + r * p.ldd) * p.elt_d;
      for (int64_t i = c.tid(); i < units; i += kThreads) store16(row + 16 * i, Vec16{});
    }
  }
};

// Workspace of one launch: the per-group arrays (each 256-byte aligned), then CUTLASS's own.
constexpr size_t kTcAlign = 256;
constexpr size_t tc_align(size_t n) { return (n + kTcAlign - 1) / kTcAlign * kTcAlign; }
inline size_t tc_group_arrays_bytes(int64_t groups) {
  const size_t g = static_cast<size_t>(groups);
  return tc_align(g * 3 * sizeof(int32_t)) + 6 * tc_align(g * sizeof(int64_t));
}
// Points p's output arrays into `workspace` (256-byte aligned); returns what follows them.
inline char* tc_carve_group_arrays(TcGroupsParams& p, void* workspace) {
  char* w = static_cast<char*>(workspace);
  const size_t g = static_cast<size_t>(p.E), slot = tc_align(g * sizeof(int64_t));
  p.shapes = reinterpret_cast<int32_t*>(w);
  w += tc_align(g * 3 * sizeof(int32_t));
  p.ptr_a = reinterpret_cast<const void**>(w);
  p.ptr_b = reinterpret_cast<const void**>(w + slot);
  p.ptr_d = reinterpret_cast<void**>(w + 2 * slot);
  p.out_lda = reinterpret_cast<int64_t*>(w + 3 * slot);
  p.out_ldb = reinterpret_cast<int64_t*>(w + 4 * slot);
  p.out_ldd = reinterpret_cast<int64_t*>(w + 5 * slot);
  return w + 6 * slot;
}

template <class Exec>
void run_tc_groups(Exec& ex, const TcGroupsParams& p) {
  if (p.E == 0) return;
  ex.launch(TcBuildGroups{p},
            std::min<int64_t>((p.E + TcBuildGroups::kThreads - 1) / TcBuildGroups::kThreads,
                              ex.max_blocks()),
            0);
  if (p.N <= 0) return;
  if (p.mode == TcMode::kRows && p.R > 0)
    ex.launch(TcZeroFill{p}, std::min<int64_t>(p.R, 1024), 0);
  else if (p.mode == TcMode::kRaggedK && p.M > 0)
    ex.launch(TcZeroFill{p}, std::min<int64_t>(p.E * p.M, ex.max_blocks()), 0);
}

}  // namespace moe_kernels::cuda
