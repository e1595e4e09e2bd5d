#pragma once
// Top-k selection of one row and expert-group scoring, shared by the CPU and CUDA gating kernels.
//
// Order: the order of a stable descending sort (torch.sort(descending=True, stable=True)): NaN
// first (any NaN ranks above +inf), then larger values, ties -- and NaN against NaN -- to the lower
// index (+0.0 and -0.0 tie).  That is a strict total order over (value, index) pairs, so k <= n
// picks always find k distinct indices in [0, n) whatever the values.  The i-th pick is the best
// element that comes strictly after the (i-1)-th pick in that order, so no "already taken"
// scratch is needed (O(n * k), fine for router widths up to a few hundred experts).
#include <cstdint>

#include "common/host_device.h"

namespace moe_kernels {

// True when (va, ia) precedes (vb, ib): NaN first, then larger value; ties to the lower index.
MOE_HOST_DEVICE MOE_FORCEINLINE bool topk_before(float va, int ia, float vb, int ib) {
  const bool na = va != va, nb = vb != vb;  // NaN tests that need no <cmath> on device
  if (na || nb) return na && (!nb || ia < ib);
  return va > vb || (va == vb && ia < ib);
}

// Index of the best element of v[0, n) (with eligible(i) true) that comes strictly after
// (prev_v, prev_i); pass prev_i = -1 for the first pick.  Returns -1 when none is left.
template <typename Eligible>
MOE_HOST_DEVICE MOE_FORCEINLINE int topk_next(const float* v, int n, float prev_v, int prev_i,
                                              Eligible eligible) {
  int best = -1;
  float best_v = 0.0f;
  for (int i = 0; i < n; ++i) {
    if (!eligible(i)) continue;
    const float x = v[i];
    if (prev_i >= 0 && !topk_before(prev_v, prev_i, x, i)) continue;
    if (best < 0 || topk_before(x, i, best_v, best)) {
      best = i;
      best_v = x;
    }
  }
  return best;
}

// Writes the k best eligible indices of v[0, n) into out[0, k) in order; -1 past the eligible
// count (never when every index is eligible and k <= n).
template <typename Eligible>
MOE_HOST_DEVICE MOE_FORCEINLINE void topk_row(const float* v, int n, int k, Eligible eligible,
                                              int32_t* out) {
  int prev = -1;
  float prev_v = 0.0f;
  for (int s = 0; s < k; ++s) {
    const int i = prev == -2 ? -1 : topk_next(v, n, prev_v, prev, eligible);
    out[s] = i;
    if (i < 0) {
      prev = -2;
      continue;
    }
    prev = i;
    prev_v = v[i];
  }
}

// Score of one contiguous expert group: the sum of its two first values in the order above (its
// only value when the group has one expert), as `topk(2).values.sum()` computes it: NaN when
// either is NaN (a NaN group then ranks first among the groups).
MOE_HOST_DEVICE MOE_FORCEINLINE float group_score(const float* v, int group_size) {
  if (group_size == 1) return v[0];
  int i0 = 0;
  for (int i = 1; i < group_size; ++i)
    if (topk_before(v[i], i, v[i0], i0)) i0 = i;
  int i1 = -1;
  for (int i = 0; i < group_size; ++i) {
    if (i == i0) continue;
    if (i1 < 0 || topk_before(v[i], i, v[i1], i1)) i1 = i;
  }
  return v[i0] + v[i1];
}

}  // namespace moe_kernels
