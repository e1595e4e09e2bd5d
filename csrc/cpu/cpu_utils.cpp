#include "cpu/cpu_utils.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <unordered_map>

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

namespace {

// Large tensors of the CPU ops (weight gradients, big activations and scratch) are allocated from
// a cache of the blocks such tensors freed.  glibc maps every block of more than 32 MiB afresh
// and unmaps it when freed (whether it serves blocks of some MiB from pages already mapped depends
// on its heap's history), so each call would pay the first touch of all of its pages again --
// a page fault and a zeroed page per 4 KiB, which in a backward pass of decode size costs more
// than the GEMMs that fill the weight gradients (bench/NOTES.md, v24).  A block freed here is kept,
// whole pages as mmap gave them, and handed to the next request of the same size (the next training
// step's gradient); the oldest cached blocks are unmapped when the cache would pass its limit.
//
// MOE_KERNELS_CPU_CACHE_MB (read once): the limit of the cached bytes, 2048 MiB by default; 0
// turns the cache off.  Tensors of fewer than kMinBytes come from torch's allocator as before.
constexpr int64_t kMinBytes = int64_t{4} << 20;

class BlockCache final : public c10::Allocator {
 public:
  // Never destroyed: tensors from it may be freed during interpreter exit, after static
  // destructors have run.
  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();
    return *cache;
  }

  bool enabled() const { return limit_ > 0; }

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = round_to_pages(n);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // the most recently freed block of this size (its pages are the likeliest to be resident)
      for (auto it = cached_.rbegin(); it != cached_.rend(); ++it) {
        if (it->bytes == bytes) {
          p = it->p;
          cached_bytes_ -= static_cast<int64_t>(bytes);
          cached_.erase(std::next(it).base());
          break;
        }
      }
    }
    if (p == nullptr) {
      p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK_WITH(OutOfMemoryError, p != MAP_FAILED,
                       "moe_kernels (cpu): out of memory: ", "could not map ", bytes, " bytes (",
                       std::strerror(errno), ")");
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_[p] = bytes;
    }
    return {p, p, &BlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &BlockCache::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count > 0) std::memcpy(dest, src, count);
  }

  BlockCacheInfo info() {
    std::lock_guard<std::mutex> lock(mu_);
    return {cached_bytes_, static_cast<int64_t>(cached_.size()), limit_, kMinBytes};
  }

  void empty() {
    std::deque<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(cached_);
      cached_bytes_ = 0;
    }
    for (const Block& b : drop) munmap(b.p, b.bytes);
  }

 private:
  struct Block {
    void* p;
    size_t bytes;
  };

  BlockCache() {
    const char* s = std::getenv("MOE_KERNELS_CPU_CACHE_MB");
    const int64_t mb = s != nullptr && *s != '\0' ? std::atoll(s) : 2048;
    limit_ = std::max<int64_t>(mb, 0) << 20;
  }

  static size_t round_to_pages(size_t n) {
    static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return (std::max<size_t>(n, 1) + page - 1) / page * page;
  }

  static void release(void* p) { get().put(p); }

  void put(void* p) {
    std::deque<Block> drop;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(p);
      if (it == live_.end()) return;  // not ours: cannot happen (this deleter frees our blocks)
      bytes = it->second;
      live_.erase(it);
      cached_.push_back({p, bytes});
      cached_bytes_ += static_cast<int64_t>(bytes);
      while (cached_bytes_ > limit_ && !cached_.empty()) {
        drop.push_back(cached_.front());
        cached_bytes_ -= static_cast<int64_t>(cached_.front().bytes);
        cached_.pop_front();
      }
    }
    for (const Block& b : drop) munmap(b.p, b.bytes);  // outside the lock
  }

  std::mutex mu_;
  std::unordered_map<void*, size_t> live_;
  std::deque<Block> cached_;  // oldest first
  int64_t cached_bytes_ = 0;
  int64_t limit_ = 0;
};

// An uninitialised contiguous tensor: from the block cache when it is large and the cache is on.
at::Tensor empty_tensor(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  BlockCache& cache = BlockCache::get();
  int64_t numel = 1;
  for (const int64_t d : sizes) numel *= d;
  const int64_t nbytes = numel * static_cast<int64_t>(opts.dtype().itemsize());
  if (!cache.enabled() || nbytes < kMinBytes || !opts.device().is_cpu())
    return at::empty(sizes, opts);
  return at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   opts.dtype().toScalarType(), at::MemoryFormat::Contiguous);
}

}  // namespace

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = empty_tensor(sizes, opts);
  if (debug_mode()) poison(t);
  return t;
}

at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return empty_tensor(sizes, opts);
}

BlockCacheInfo block_cache_info() { return BlockCache::get().info(); }

void block_cache_empty() { BlockCache::get().empty(); }

at::Tensor new_zeros(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return at::zeros(sizes, opts);
}

}  // namespace moe_kernels::cpu
