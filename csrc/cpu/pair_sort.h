#pragma once
// The stable counting sort of the T*k (token, slot) pairs by expert, shared by route
// (routing.cpp: the RoutingPlan) and moe_ffn (moe_ffn.cpp: its expert-sorted rows).
//
// Expert e's segment holds its pairs in ascending pair order; segments follow in expert order,
// each padded to a multiple of block_size when block_size > 0 (common/routing.h).  Pairs whose id
// is outside [0, E) are dropped.  O(T*k + E), memory bound and tiny next to the expert GEMMs.
#include <cstdint>
#include <vector>

#include "common/routing.h"
#include "cpu/cpu_utils.h"

namespace moe_kernels::cpu {

struct PairCounts {
  std::vector<int64_t> count;  // [E] kept pairs of each expert
  std::vector<int64_t> start;  // [E] first row of each expert's segment
  int64_t rows = 0;            // rows of all segments (padded)
};

// Pass 1: pairs per expert and the segment starts.  ids: TK flat expert ids.
inline PairCounts count_pairs(const IndexView& ids, int64_t TK, int64_t E, int64_t block_size) {
  PairCounts c;
  c.count.assign(E, 0);
  for (int64_t i = 0; i < TK; ++i) {
    const int64_t e = ids[i];
    if (valid_expert(e, E)) ++c.count[e];
  }
  c.start.resize(E);
  int64_t end = 0;
  for (int64_t e = 0; e < E; ++e) {
    c.start[e] = end;
    end += segment_rows(c.count[e], block_size);
  }
  c.rows = end;
  return c;
}

// Pass 2: place(i, row) for every pair i in ascending order, with its row in the sorted layout,
// or row = -1 for a dropped pair.
template <class Place>
void place_pairs(const IndexView& ids, int64_t TK, int64_t E, const PairCounts& c, Place&& place) {
  std::vector<int64_t> next(c.start);
  for (int64_t i = 0; i < TK; ++i) {
    const int64_t e = ids[i];
    place(i, valid_expert(e, E) ? next[e]++ : int64_t{-1});
  }
}

}  // namespace moe_kernels::cpu
