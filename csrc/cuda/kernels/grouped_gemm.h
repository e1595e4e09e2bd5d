#pragma once
// Bodies of the CUDA grouped GEMM kernels of the exact path (any strides, any sizes, full fp32
// FMA), written against simt.h so the CPU tests run them.  Operand and output types are template
// parameters: the public op uses one type for all three, moe_ffn keeps its intermediates in fp32.
// A tiled SIMT GEMM: 256 threads per block compute a 64 x 64 output tile, 4 x 4 per thread, over K
// in steps of 16 staged in shared memory; fp32 accumulation in K order (deterministic, no atomics).
//
//   SegmentGemm        out[r, n] = sum_k A(r, k) * B_e(k, n) for the rows r of expert e's
//                      segment [offs[e-1], offs[e]) -- the forward (B_e = b[e] or b[e]^T) and dA
//                      (A = grad_out, B_e transposed).  The row tiles of all segments are
//                      numbered in expert order; a grid of ceil(R / 64) + E row tiles covers any
//                      offs (each segment adds at most one partial tile), and a block finds its
//                      expert by walking offs.
//   SegmentGemmRaggedK G_e(k, n) = sum over the rows m of segment e of A(m, k) * D(m, n) -- the
//                      weight gradient, one output per expert, exactly zero for an empty segment.
//   ZeroRows           rows of out past the last segment are zero.
//
// Segments are read defensively: offs is clamped into a non-decreasing sequence within [0, R],
// so no value of offs makes a kernel read or write out of bounds (the public API checks offs).
#include <algorithm>
#include <cstdint>

#include "common/float_convert.h"
#include "cuda/simt.h"

namespace moe_kernels::cuda {

constexpr int kGemmBM = 64, kGemmBN = 64, kGemmBK = 16;

// [begin, end) of segment e of R rows, offs clamped as above.
MOE_HOST_DEVICE MOE_FORCEINLINE void segment_bounds(const int32_t* offs, int64_t e, int64_t R,
                                                    int64_t* begin, int64_t* end) {
  int64_t prev = 0;
  for (int64_t i = 0; i < e; ++i) prev = std::min<int64_t>(std::max<int64_t>(offs[i], prev), R);
  *begin = prev;
  *end = std::min<int64_t>(std::max<int64_t>(offs[e], prev), R);
}

struct SegmentGemmParams {
  const void* a = nullptr;  // A(r, k) = a[r * a_sr + k * a_sk]
  int64_t a_sr = 0, a_sk = 0;
  const void* b = nullptr;  // B_e(k, n) = b[e * b_se + k * b_sk + n * b_sn]
  int64_t b_se = 0, b_sk = 0, b_sn = 0;
  void* out = nullptr;            // [R, N] contiguous
  const int32_t* offs = nullptr;  // [E]
  int64_t E = 0, R = 0, N = 0, K = 0;
};

// Expert and first row of row tile `tile` (in expert order), or false past the last tile.
MOE_HOST_DEVICE MOE_FORCEINLINE bool find_row_tile(const int32_t* offs, int64_t E, int64_t R,
                                                   int64_t tile, int64_t* expert, int64_t* row0,
                                                   int64_t* row_end) {
  int64_t prev = 0, seen = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t end = std::min<int64_t>(std::max<int64_t>(offs[e], prev), R);
    const int64_t tiles = (end - prev + kGemmBM - 1) / kGemmBM;
    if (tile < seen + tiles) {
      *expert = e;
      *row0 = prev + (tile - seen) * kGemmBM;
      *row_end = end;
      return true;
    }
    seen += tiles;
    prev = end;
  }
  return false;
}

// The 64 x 64 tile product shared by both kernels: acc += As * Bs over one K step, where As is
// [BM][BK] and Bs is [BK][BN] in shared memory; thread (ty, tx) owns rows ty*4.. and cols tx*4..
MOE_HOST_DEVICE MOE_FORCEINLINE void tile_fma(const float* As, const float* Bs, int ty, int tx,
                                              float (&acc)[4][4]) {
#pragma unroll
  for (int kk = 0; kk < kGemmBK; ++kk) {
    float av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) av[i] = As[(ty * 4 + i) * kGemmBK + kk];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = Bs[kk * kGemmBN + tx * 4 + j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
  }
}

constexpr size_t kGemmSmemBytes = sizeof(float) * (kGemmBM * kGemmBK + kGemmBK * kGemmBN);

template <class TA, class TB, class TO>
struct SegmentGemm {
  static constexpr int kThreads = 256;
  SegmentGemmParams p;

  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    float* As = c.template shared<float>();
    float* Bs = As + kGemmBM * kGemmBK;
    const TA* a = static_cast<const TA*>(p.a);
    const TB* b = static_cast<const TB*>(p.b);
    TO* out = static_cast<TO*>(p.out);
    const int tid = c.tid(), ty = tid / 16, tx = tid % 16;
    const int64_t tiles_n = (p.N + kGemmBN - 1) / kGemmBN;
    const int64_t tiles = ((p.R + kGemmBM - 1) / kGemmBM + p.E) * tiles_n;
    for (int64_t t = c.bid(); t < tiles; t += c.nbid()) {
      int64_t e, row0, row_end;
      // uniform over the block: every thread finds the same tile
      if (!find_row_tile(p.offs, p.E, p.R, t / tiles_n, &e, &row0, &row_end)) continue;
      const int64_t n0 = (t % tiles_n) * kGemmBN;
      const TB* be = b + e * p.b_se;
      float acc[4][4] = {};
      for (int64_t k0 = 0; k0 < p.K; k0 += kGemmBK) {
        for (int idx = tid; idx < kGemmBM * kGemmBK; idx += kThreads) {
          const int r = idx / kGemmBK, kk = idx % kGemmBK;
          const int64_t m = row0 + r, k = k0 + kk;
          As[idx] = m < row_end && k < p.K ? to_f32(a[m * p.a_sr + k * p.a_sk]) : 0.f;
        }
        for (int idx = tid; idx < kGemmBK * kGemmBN; idx += kThreads) {
          const int kk = idx / kGemmBN, nn = idx % kGemmBN;
          const int64_t k = k0 + kk, n = n0 + nn;
          Bs[idx] = k < p.K && n < p.N ? to_f32(be[k * p.b_sk + n * p.b_sn]) : 0.f;
        }
        c.sync();
        tile_fma(As, Bs, ty, tx, acc);
        c.sync();
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = row0 + ty * 4 + i;
        if (m >= row_end) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t n = n0 + tx * 4 + j;
          if (n < p.N) out[m * p.N + n] = from_f32<TO>(acc[i][j]);
        }
      }
    }
  }
};

struct RaggedKParams {
  const void* a = nullptr;  // A(m, k) = a[m * a_sm + k * a_sk]
  int64_t a_sm = 0, a_sk = 0;
  const void* d = nullptr;  // D(m, n) = d[m * d_sm + n * d_sn]
  int64_t d_sm = 0, d_sn = 0;
  void* out = nullptr;  // G_e(k, n) = out[e * o_se + k * o_sk + n * o_sn]
  int64_t o_se = 0, o_sk = 0, o_sn = 0;
  const int32_t* offs = nullptr;  // [E]
  int64_t E = 0, R = 0, K = 0, N = 0;
};

template <class TA, class TD, class TO>
struct SegmentGemmRaggedK {
  static constexpr int kThreads = 256;
  RaggedKParams p;

  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    float* As = c.template shared<float>();  // [BM (k)][BK (m)]
    float* Bs = As + kGemmBM * kGemmBK;      // [BK (m)][BN (n)]
    const TA* a = static_cast<const TA*>(p.a);
    const TD* d = static_cast<const TD*>(p.d);
    TO* out = static_cast<TO*>(p.out);
    const int tid = c.tid(), ty = tid / 16, tx = tid % 16;
    const int64_t tiles_k = (p.K + kGemmBM - 1) / kGemmBM, tiles_n = (p.N + kGemmBN - 1) / kGemmBN;
    const int64_t tiles = p.E * tiles_k * tiles_n;
    for (int64_t t = c.bid(); t < tiles; t += c.nbid()) {
      const int64_t e = t / (tiles_k * tiles_n);
      const int64_t k0 = (t / tiles_n % tiles_k) * kGemmBM, n0 = t % tiles_n * kGemmBN;
      int64_t begin, end;
      segment_bounds(p.offs, e, p.R, &begin, &end);
      float acc[4][4] = {};
      for (int64_t m0 = begin; m0 < end; m0 += kGemmBK) {
        for (int idx = tid; idx < kGemmBM * kGemmBK; idx += kThreads) {
          const int kk = idx / kGemmBK, mm = idx % kGemmBK;
          const int64_t k = k0 + kk, m = m0 + mm;
          As[idx] = k < p.K && m < end ? to_f32(a[m * p.a_sm + k * p.a_sk]) : 0.f;
        }
        for (int idx = tid; idx < kGemmBK * kGemmBN; idx += kThreads) {
          const int mm = idx / kGemmBN, nn = idx % kGemmBN;
          const int64_t m = m0 + mm, n = n0 + nn;
          Bs[idx] = m < end && n < p.N ? to_f32(d[m * p.d_sm + n * p.d_sn]) : 0.f;
        }
        c.sync();
        tile_fma(As, Bs, ty, tx, acc);
        c.sync();
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t k = k0 + ty * 4 + i;
        if (k >= p.K) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t n = n0 + tx * 4 + j;
          if (n < p.N) out[e * p.o_se + k * p.o_sk + n * p.o_sn] = from_f32<TO>(acc[i][j]);
        }
      }
    }
  }
};

struct ZeroRowsParams {
  void* out = nullptr;  // [R, row_bytes] contiguous rows
  int64_t R = 0, row_bytes = 0;
  const int32_t* offs = nullptr;
  int64_t E = 0;
};

// out rows at and past the end of the last segment are zero (bytes).
struct ZeroRows {
  static constexpr int kThreads = 256;
  ZeroRowsParams p;
  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    int64_t begin = 0, end = 0;
    if (p.E > 0) segment_bounds(p.offs, p.E - 1, p.R, &begin, &end);
    unsigned char* o = static_cast<unsigned char*>(p.out);
    const int64_t total = (p.R - end) * p.row_bytes, base = end * p.row_bytes;
    for (int64_t i = c.bid() * kThreads + c.tid(); i < total; i += c.nbid() * kThreads)
      o[base + i] = 0;
  }
};

template <class TA, class TB, class TO, class Exec>
void run_segment_gemm(Exec& ex, const SegmentGemmParams& p) {
  if (p.R == 0 || p.N == 0) return;
  const int64_t tiles = ((p.R + kGemmBM - 1) / kGemmBM + p.E) * ((p.N + kGemmBN - 1) / kGemmBN);
  ex.launch(SegmentGemm<TA, TB, TO>{p}, std::min<int64_t>(tiles, ex.max_blocks()), kGemmSmemBytes);
  ZeroRowsParams z{p.out, p.R, p.N * static_cast<int64_t>(sizeof(TO)), p.offs, p.E};
  ex.launch(ZeroRows{z}, std::min<int64_t>((p.R * z.row_bytes + 255) / 256, ex.max_blocks()), 0);
}

template <class TA, class TD, class TO, class Exec>
void run_ragged_k(Exec& ex, const RaggedKParams& p) {
  if (p.E == 0 || p.K == 0 || p.N == 0) return;
  const int64_t tiles = p.E * ((p.K + kGemmBM - 1) / kGemmBM) * ((p.N + kGemmBN - 1) / kGemmBN);
  ex.launch(SegmentGemmRaggedK<TA, TD, TO>{p}, std::min<int64_t>(tiles, ex.max_blocks()),
            kGemmSmemBytes);
}

}  // namespace moe_kernels::cuda
