#pragma once
// Host-side torch helpers shared by the CPU (moe_kernels._C) and CUDA (moe_kernels._C_cuda)
// extensions: the debug switch's initial value and the output allocation it poisons.  Each
// extension keeps its own flag (they are separate libraries); moe_kernels._debug switches both.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

namespace moe_kernels {

// MOE_KERNELS_DEBUG at load: set and not "0".
inline bool debug_from_env() {
  const char* s = std::getenv("MOE_KERNELS_DEBUG");
  return s != nullptr && *s != '\0' && std::string(s) != "0";
}

// An output every element of which the kernels write.  In debug mode it starts filled with NaN
// (floats), INT_MIN (int32 / int64) or a value that fits narrower types, so that an element a
// kernel fails to write shows up in the tests.
// The debug mode's fill of an output (see output_tensor).
inline void poison(at::Tensor& t) {
  const at::ScalarType s = t.scalar_type();
  if (at::isFloatingType(s)) {
    t.fill_(std::numeric_limits<float>::quiet_NaN());
  } else if (s == at::kInt || s == at::kLong) {
    t.fill_(std::numeric_limits<int32_t>::min());
  } else {
    t.fill_(s == at::kBool ? 1 : 0x5a);
  }
}

inline at::Tensor output_tensor(at::IntArrayRef sizes, const at::TensorOptions& opts, bool debug) {
  at::Tensor t = at::empty(sizes, opts);
  if (debug) poison(t);
  return t;
}

}  // namespace moe_kernels
