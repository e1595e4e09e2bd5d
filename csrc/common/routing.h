#pragma once
// Offset arithmetic of the expert-sorted layout (RoutingPlan), shared by CPU and CUDA kernels.
//
// Unpadded (block_size == 0): num_rows = T*k, expert e owns rows [offs[e-1], offs[e]), offs[-1]=0.
// Padded: each expert segment is rounded up to a multiple of block_size and
//   num_rows = round_up(T*k + E*(block_size - 1), block_size)
// is an upper bound of the padded total that depends only on shapes.  route_num_rows mirrors
// moe_kernels.plan.num_rows, the one Python copy (the op's fake kernel, the reference and the
// Triton launcher size their outputs with it); opcheck compares the fake's shapes with the
// kernels' outputs.
#include <cstdint>

#include "common/host_device.h"

namespace moe_kernels {

MOE_HOST_DEVICE MOE_FORCEINLINE int64_t round_up(int64_t x, int64_t m) {
  return m <= 0 ? x : (x + m - 1) / m * m;
}

MOE_HOST_DEVICE MOE_FORCEINLINE int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

MOE_HOST_DEVICE MOE_FORCEINLINE int64_t route_num_rows(int64_t T, int64_t k, int64_t E,
                                                       int64_t block_size) {
  return block_size <= 0 ? T * k : round_up(T * k + E * (block_size - 1), block_size);
}

// Rows one expert's segment occupies in the (optionally padded) layout.
MOE_HOST_DEVICE MOE_FORCEINLINE int64_t segment_rows(int64_t count, int64_t block_size) {
  return block_size <= 0 ? count : round_up(count, block_size);
}

// Whether an id names a local expert; anything else means "not routed here" and is dropped.
MOE_HOST_DEVICE MOE_FORCEINLINE bool valid_expert(int64_t id, int64_t E) {
  return id >= 0 && id < E;
}

// The expert whose segment holds `row`: the first e with offs[e] > row (offs: the segments' end
// rows, non-decreasing), or E when the row is past the last segment (padding of the layout).
MOE_HOST_DEVICE MOE_FORCEINLINE int64_t expert_of_row(const int32_t* offs, int64_t E, int64_t row) {
  int64_t lo = 0, hi = E;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offs[mid] > row)
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo;
}

}  // namespace moe_kernels
