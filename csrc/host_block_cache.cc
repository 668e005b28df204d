// empty_output (declared in binding.h): the ops' CPU outputs come from a cache of freed blocks.
// Paddle's CPU allocator hands large blocks to glibc, which maps them afresh and page-faults
// every page on each call: a stage-1 merge took 2.65 ms through Paddle, 0.87 ms with glibc told
// to keep freed memory (docs/benchmarks.md). Blocks are cached by exact (page-rounded) size, since
// a model calls each op with the same shapes on every forward.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "binding.h"

namespace dpn_fast {
namespace {

constexpr size_t kPage = 4096;
// Smaller ones come from Paddle's allocator: malloc serves them from its free lists, without
// fresh pages.
constexpr size_t kMinCachedBytes = 128 * 1024;

// At most this many freed bytes are kept (DPN_FAST_HOST_CACHE_MB, default 1024); a block freed
// beyond that goes back to the system.
size_t retain_limit() {
  const char* env = std::getenv("DPN_FAST_HOST_CACHE_MB");
  return (env ? std::strtoull(env, nullptr, 10) : 1024) << 20;
}

class HostBlockCache {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* block = it->second.back();
        it->second.pop_back();
        retained_ -= bytes;
        return block;
      }
    }
    void* block = std::aligned_alloc(kPage, bytes);
    PD_CHECK(block != nullptr, "dpn_fast: out of host memory allocating ", bytes, " bytes");
    return block;
  }

  size_t retained() {
    std::lock_guard<std::mutex> lock(mutex_);
    return retained_;
  }

  size_t limit() const { return limit_; }

  void give(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (retained_ + bytes <= limit_) {
        free_[bytes].push_back(block);
        retained_ += bytes;
        return;
      }
    }
    std::free(block);
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t retained_ = 0;
  const size_t limit_ = retain_limit();
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
HostBlockCache& cache() {
  static auto* instance = new HostBlockCache();
  return *instance;
}

paddle::Tensor allocate(const std::vector<int64_t>& shape, paddle::DataType dtype,
                        const phi::Place& place, size_t bytes) {
  if (place.GetType() != phi::AllocationType::CPU || bytes < kMinCachedBytes) {
    return paddle::empty(shape, dtype, place);
  }
  const size_t rounded = (bytes + kPage - 1) / kPage * kPage;
  void* block = cache().take(rounded);
  return paddle::from_blob(block, shape, dtype, phi::DataLayout::NCHW, place,
                           [rounded](void* p) { cache().give(p, rounded); });
}

// DPN_FAST_POISON_OUTPUTS=1 (the tests): float32 CPU outputs start as NaN, so an element a
// kernel fails to write shows up, whichever allocator the block came from.
bool poison_outputs() {
  static const bool poison = [] {
    const char* env = std::getenv("DPN_FAST_POISON_OUTPUTS");
    return env && std::strcmp(env, "1") == 0;
  }();
  return poison;
}

}  // namespace

paddle::Tensor empty_output(const std::vector<int64_t>& shape, paddle::DataType dtype,
                            const phi::Place& place) {
  size_t numel = 1;
  for (int64_t d : shape) numel *= static_cast<size_t>(d);
  paddle::Tensor out = allocate(shape, dtype, place, numel * phi::SizeOf(dtype));
  if (poison_outputs() && place.GetType() == phi::AllocationType::CPU &&
      dtype == paddle::DataType::FLOAT32) {
    float* data = out.data<float>();
    std::fill(data, data + numel, std::numeric_limits<float>::quiet_NaN());
  }
  return out;
}

}  // namespace dpn_fast

// For tests and memory measurements (ctypes): bytes of freed blocks the cache holds now, and its
// cap (DPN_FAST_HOST_CACHE_MB).
extern "C" size_t dpn_fast_host_cache_retained_bytes() { return dpn_fast::cache().retained(); }
extern "C" size_t dpn_fast_host_cache_limit_bytes() { return dpn_fast::cache().limit(); }
