#include "cpu/cpu_utils.h"

#include <cstdlib>
#include <limits>

namespace moe_kernels::cpu {

bool debug_mode() {
  static const bool on = [] {
    const char* s = std::getenv("MOE_KERNELS_DEBUG");
    return s != nullptr && *s != '\0' && std::string(s) != "0";
  }();
  return on;
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  if (!debug_mode()) return at::empty(sizes, opts);
  if (at::isFloatingType(opts.dtype().toScalarType()))
    return at::full(sizes, std::numeric_limits<float>::quiet_NaN(), opts);
  return at::full(sizes, std::numeric_limits<int32_t>::min(), opts);
}

at::Tensor new_zeros(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return at::zeros(sizes, opts);
}

}  // namespace moe_kernels::cpu
