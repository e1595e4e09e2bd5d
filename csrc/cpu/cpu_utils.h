#pragma once
// Shared helpers of the CPU kernels: output allocation (NaN-poisoned in debug mode), argument
// checks, scalar conversions and dynamic task scheduling over torch's thread pool.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>

namespace moe_kernels::cpu {

// Debug mode: outputs start NaN-filled (ints: INT_MIN) so a missed write shows up in tests.  The
// initial value comes from MOE_KERNELS_DEBUG (read once, at load); set_debug_mode switches it at
// run time (moe_kernels._C.set_debug_mode, called by moe_kernels._debug.set_debug_mode).
bool debug_mode();
void set_debug_mode(bool on);

// Test-only fault injection, to show that the poisoned-output tests can fail: the named kernel
// leaves part of its output unwritten.  kNone in normal use; reading it is one relaxed load.
enum class TestFault : int {
  kNone = 0,
  kPermuteLastRow = 1,   // "permute": permute leaves its last output row unwritten
  kMoeFfnLastToken = 2,  // "moe_ffn": moe_ffn leaves its last token row unwritten
};
TestFault test_fault();
// name: "" (off), "permute" or "moe_ffn"; anything else raises ValueError.
void set_test_fault(const std::string& name);

// Output tensor of the given shape; every element must be written by the kernel.  Contiguous;
// large ones come from the block cache below.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts);
// Scratch tensor of a kernel (not poisoned in debug mode), from the block cache when large.
at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& opts);

// The block cache of large CPU tensors (cpu_utils.cpp): its cached (freed, kept) bytes and
// blocks, its limit, and a call that unmaps every cached block.
struct BlockCacheInfo {
  int64_t cached_bytes, cached_blocks, limit_bytes, min_bytes;
};
BlockCacheInfo block_cache_info();
void block_cache_empty();
// Output tensor that starts as zeros (kernels that only write some elements).
at::Tensor new_zeros(at::IntArrayRef sizes, const at::TensorOptions& opts);

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "moe_kernels (cpu): ", name, " must be a CPU tensor, got ",
              t.device());
}
inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, "moe_kernels (cpu): ", name, " must have ", dim, " dimensions, got ",
              t.dim(), " (shape ", t.sizes(), ")");
}
inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), "moe_kernels (cpu): ", name,
              " must be float32, bfloat16 or float16, got ", t.scalar_type(),
              " (float64 runs on the reference backend)");
}
// t must have x's dtype (the public API's contract; moe_ffn's Python function relies on the op
// to check it).
inline void check_dtype_of_x(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "moe_kernels (cpu): ", name,
              " must have x's dtype ", x.scalar_type(), ", got ", t.scalar_type());
}
// A scalar argument that must be finite (alpha, limit, routed_scaling_factor): ValueError if not.
inline void check_finite(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v), "moe_kernels (cpu): ", name, " must be finite, got ", v);
}
// Routing weights: any float dtype the public API accepts (fp32, bf16, fp16, fp64); the kernels
// read them as fp32.
inline void check_weights_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()) || t.scalar_type() == at::kDouble,
              "moe_kernels (cpu): ", name, " must be float32, bfloat16, float16 or float64, got ",
              t.scalar_type());
}
inline void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
              "moe_kernels (cpu): ", name, " must be int32 or int64, got ", t.scalar_type());
}

template <typename T>
inline float to_f32(T v) {
  return static_cast<float>(v);
}
template <typename T>
inline T from_f32(float v) {
  return static_cast<T>(v);
}

// Reads an int32/int64 index tensor element as int64 (the tensor must be contiguous).
struct IndexView {
  const void* p = nullptr;
  bool i64 = false;
  IndexView() = default;
  explicit IndexView(const at::Tensor& t) : p(t.data_ptr()), i64(t.scalar_type() == at::kLong) {}
  int64_t operator[](int64_t i) const {
    return i64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
  }
};

// Runs task(i, thread_slot) for i in [0, n) on torch's intra-op pool; tasks are handed out
// dynamically (an atomic counter), so uneven task costs (skewed routing) stay balanced.
// thread_slot is in [0, num_threads) and identifies per-thread scratch.
template <typename F>
void parallel_tasks(int64_t n, const F& task) {
  if (n <= 0) return;
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n);
  if (nt <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) task(i, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t slot = b; slot < e; ++slot) {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) task(i, slot);
    }
  });
}

}  // namespace moe_kernels::cpu
