#include "cpu/cpu_utils.h"

#include <cstdlib>
#include <limits>

#include "common/torch_output.h"

namespace moe_kernels::cpu {

namespace {

// Read by every output allocation: relaxed loads (a switch takes effect for later calls).
std::atomic<bool> g_debug{moe_kernels::debug_from_env()};
std::atomic<int> g_test_fault{0};

}  // namespace

bool debug_mode() { return g_debug.load(std::memory_order_relaxed); }

void set_debug_mode(bool on) { g_debug.store(on, std::memory_order_relaxed); }

TestFault test_fault() {
  return static_cast<TestFault>(g_test_fault.load(std::memory_order_relaxed));
}

void set_test_fault(const std::string& name) {
  TestFault f = TestFault::kNone;
  if (name == "permute") {
    f = TestFault::kPermuteLastRow;
  } else if (name == "moe_ffn") {
    f = TestFault::kMoeFfnLastToken;
  } else {
    TORCH_CHECK_VALUE(name.empty(), "moe_kernels (cpu): unknown test fault '", name,
                      "' (expected '', 'permute' or 'moe_ffn')");
  }
  g_test_fault.store(static_cast<int>(f), std::memory_order_relaxed);
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return output_tensor(sizes, opts, debug_mode());
}

at::Tensor new_zeros(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return at::zeros(sizes, opts);
}

}  // namespace moe_kernels::cpu
