#pragma once
// Bodies of the CUDA route kernels (the RoutingPlan: counts, offs, row_of_slot, slot_of_row,
// block_expert), written against simt.h so the CPU tests run them.
//
// A stable counting sort of the T*k (token, slot) pairs by expert, with no atomics and no host
// synchronisation (every size follows from T, k, E and block_size):
//   1. RouteRank      chunks of 256 pairs: a pair's rank among the earlier pairs of its chunk with
//                     the same expert; the last such pair writes its chunk's count into the
//                     expert-major matrix cnt[e * nchunks + chunk] (zeroed before).
//   2. exclusive sum  of cnt (CUB on the device): base[e * nchunks + c] counts every pair of a
//                     lower expert, and every pair of expert e in an earlier chunk.
//   3. RouteOffsets   counts[e], the padded segment starts and ends (offs) -- one block.
//   4. RouteScatter   row of pair i = start[e] + base[e, chunk] - base[e, 0] + rank[i];
//                     slot_of_row was filled with -1 before, so padding rows read -1.
//   5. RouteBlockExpert  the expert of each block_size-row block (a binary search of offs).
// Ids outside [0, E) are dropped (row -1).  Pair and row indices are 64-bit in the arithmetic.
#include <algorithm>
#include <cstdint>

#include "common/routing.h"
#include "cuda/simt.h"

namespace moe_kernels::cuda {

constexpr int kRouteChunk = 256;

struct RouteParams {
  const int32_t* ids = nullptr;  // [TK] expert ids (any value; outside [0, E) dropped)
  int64_t TK = 0, E = 0, block_size = 0, nchunks = 0, num_rows = 0, num_blocks = 0;
  int32_t* cnt = nullptr;           // [E * nchunks] workspace (zeroed by run_route)
  int32_t* base = nullptr;          // [E * nchunks] workspace (exclusive sum of cnt)
  int32_t* rank = nullptr;          // [TK] workspace
  int32_t* start = nullptr;         // [E] workspace: first row of each expert's segment
  int32_t* counts = nullptr;        // [E] out
  int32_t* offs = nullptr;          // [E] out: end row of each segment
  int32_t* row_of_slot = nullptr;   // [TK] out
  int32_t* slot_of_row = nullptr;   // [num_rows] out
  int32_t* block_expert = nullptr;  // [num_blocks] out
};

// Workspace int32 elements of route: cnt, base, rank, start.
MOE_HOST_DEVICE MOE_FORCEINLINE int64_t route_workspace_ints(int64_t TK, int64_t E) {
  const int64_t nchunks = ceil_div(TK, kRouteChunk);
  return 2 * E * nchunks + TK + E;
}

struct RouteRank {
  static constexpr int kThreads = kRouteChunk;
  RouteParams p;
  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    int32_t* sids = c.template shared<int32_t>();
    const int tid = c.tid();
    for (int64_t chunk = c.bid(); chunk < p.nchunks; chunk += c.nbid()) {
      const int64_t i = chunk * kRouteChunk + tid;
      const int64_t id = i < p.TK ? p.ids[i] : -1;
      const int32_t e = valid_expert(id, p.E) ? static_cast<int32_t>(id) : -1;
      sids[tid] = e;
      c.sync();
      if (e >= 0) {
        int32_t r = 0;
        bool last = true;
        for (int j = 0; j < kRouteChunk; ++j) {
          if (sids[j] != e) continue;
          r += j < tid;
          last = last && j <= tid;
        }
        p.rank[i] = r;
        if (last) p.cnt[e * p.nchunks + chunk] = r + 1;
      }
      c.sync();  // sids is rewritten by the next chunk
    }
  }
};

struct RouteOffsets {
  static constexpr int kThreads = 256;
  RouteParams p;
  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    if (c.bid() != 0) return;
    const int64_t n = p.E * p.nchunks;
    for (int64_t e = c.tid(); e < p.E; e += c.ntid()) {
      int32_t count = 0;
      if (p.nchunks > 0) {
        const int64_t first = e * p.nchunks, next = first + p.nchunks;
        const int32_t end = next < n ? p.base[next] : p.base[n - 1] + p.cnt[n - 1];
        count = end - p.base[first];
      }
      p.counts[e] = count;
    }
    c.sync();  // counts (global) written by this block are visible to its threads after a barrier
    if (c.tid() == 0) {
      int64_t end = 0;
      for (int64_t e = 0; e < p.E; ++e) {
        p.start[e] = static_cast<int32_t>(end);
        end += segment_rows(p.counts[e], p.block_size);
        p.offs[e] = static_cast<int32_t>(end);
      }
    }
  }
};

struct RouteScatter {
  static constexpr int kThreads = 256;
  RouteParams p;
  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    const int64_t stride = c.nbid() * kThreads;
    for (int64_t i = c.bid() * kThreads + c.tid(); i < p.TK; i += stride) {
      const int64_t id = p.ids[i];
      if (!valid_expert(id, p.E)) {
        p.row_of_slot[i] = -1;
        continue;
      }
      const int64_t col = id * p.nchunks;
      const int64_t row = p.start[id] + (p.base[col + i / kRouteChunk] - p.base[col]) +
                          static_cast<int64_t>(p.rank[i]);
      p.row_of_slot[i] = static_cast<int32_t>(row);
      p.slot_of_row[row] = static_cast<int32_t>(i);
    }
  }
};

struct RouteBlockExpert {
  static constexpr int kThreads = 256;
  RouteParams p;
  template <class Ctx>
  MOE_HOST_DEVICE void operator()(Ctx& c) const {
    const int64_t stride = c.nbid() * kThreads;
    for (int64_t b = c.bid() * kThreads + c.tid(); b < p.num_blocks; b += stride) {
      const int64_t e = expert_of_row(p.offs, p.E, b * p.block_size);
      p.block_expert[b] = e < p.E ? static_cast<int32_t>(e) : -1;
    }
  }
};

// The whole route on an executor (device: CUDA launches and CUB; host: the emulator).
template <class Exec>
void run_route(Exec& ex, RouteParams p) {
  p.nchunks = ceil_div(p.TK, kRouteChunk);
  const int64_t n = p.E * p.nchunks;
  if (n > 0) {
    ex.fill_bytes(p.cnt, 0, sizeof(int32_t) * n);
    ex.launch(RouteRank{p}, std::min<int64_t>(p.nchunks, ex.max_blocks()),
              sizeof(int32_t) * kRouteChunk);
    ex.exclusive_sum(p.cnt, p.base, n);
  }
  ex.launch(RouteOffsets{p}, 1, 0);
  if (p.num_rows > 0) ex.fill_bytes(p.slot_of_row, 0xff, sizeof(int32_t) * p.num_rows);
  if (p.TK > 0)
    ex.launch(RouteScatter{p}, std::min<int64_t>(ceil_div(p.TK, 256), ex.max_blocks()), 0);
  if (p.num_blocks > 0)
    ex.launch(RouteBlockExpert{p}, std::min<int64_t>(ceil_div(p.num_blocks, 256), ex.max_blocks()),
              0);
}

}  // namespace moe_kernels::cuda
