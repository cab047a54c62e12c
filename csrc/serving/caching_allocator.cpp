// A caching CPU allocator for the serving runtime's step loop, installed only while it runs.
//
// Why: each step of LLM.generate allocates the same activations again ([N, D], [N, ffn], logits...;
// hundreds of KiB to MBs each). torch's default CPU allocator hands them to malloc, which serves blocks
// of that size with fresh mmaps (or trims the heap top when they are freed), so every step writes into
// pages the kernel has to fault in and zero: ~57k minor faults per run of the serving benchmark (b 256,
// 64 new tokens, 1-2 threads; ~0.1 s of system time). Freed blocks are kept here instead and handed out
// again, so a steady-state step touches no new pages.
//
// Scope: `enable` installs it as the process's CPU allocator (counted, so nested/concurrent runtimes
// share one installation) and `disable` puts the previous allocator back and frees what is cached.
// Requests under kMinBytes (tensor metadata, index lists) go to the previous allocator: malloc serves
// those from its heap without faults.
//
// Swapping torch's allocator is safe across the boundary because blocks are plain posix_memalign
// pointers (what the default allocator makes and frees with free()), and the sizes live in a registry
// rather than a header: ideep pairs raw_allocate/raw_deallocate through whichever allocator is current,
// so this allocator's deleter can be handed a block the previous one made (not in the registry: passed
// to the previous deleter), and the previous deleter a block this one made (freed like its own). The
// registry is cleared on disable, so a block of ours freed later goes the same way.
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "serving_ops.h"

namespace puyu {
namespace {

constexpr size_t kMinBytes = 64 << 10;  // smaller requests pass through
constexpr size_t kGranule = 4096;       // sizes rounded up to whole pages, so near-equal shapes share blocks

struct State {
  std::mutex mutex;
  std::unordered_map<void*, size_t> size_of;  // every block made since enable (live or cached) -> its size
  std::multimap<size_t, void*> free_blocks;   // cached: size -> block, best fit by lower_bound
  size_t cached_bytes = 0, limit_bytes = 0;
  int64_t users = 0;
  c10::Allocator* previous = nullptr;
  c10::DeleterFnPtr previous_deleter = nullptr;
  int64_t hits = 0, misses = 0;
};

State& state() {
  static State s;
  return s;
}

// The deleter of the blocks this allocator made (and of raw_deallocate while it is installed): a block
// in the registry goes back to the cache while caching is on and within the limit; anything else is freed
// the way the previous allocator frees.
void release(void* data) {
  if (data == nullptr) return;
  State& s = state();
  c10::DeleterFnPtr other = nullptr;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    auto it = s.size_of.find(data);
    if (it == s.size_of.end()) {
      other = s.previous_deleter;
    } else if (s.cached_bytes + it->second <= s.limit_bytes) {
      s.free_blocks.emplace(it->second, data);
      s.cached_bytes += it->second;
      return;
    } else {
      s.size_of.erase(it);
    }
  }
  if (other != nullptr) {
    other(data);
  } else {
    c10::free_cpu(data);
  }
}

struct CachingCPUAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    State& s = state();
    if (n < kMinBytes) return s.previous->allocate(n);
    const size_t size = (n + kGranule - 1) / kGranule * kGranule;
    {
      std::lock_guard<std::mutex> lock(s.mutex);
      auto it = s.free_blocks.lower_bound(size);
      if (it != s.free_blocks.end() && it->first <= size + size / 4) {  // at most 25% larger than asked for
        void* data = it->second;
        s.cached_bytes -= it->first;
        s.free_blocks.erase(it);
        ++s.hits;
        return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
      }
      ++s.misses;
    }
    void* data = nullptr;
    TORCH_CHECK(posix_memalign(&data, 64, size) == 0, "caching CPU allocator: out of memory allocating ", size,
                " bytes");
    {
      std::lock_guard<std::mutex> lock(s.mutex);
      s.size_of.emplace(data, size);
    }
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

CachingCPUAllocator& instance() {
  static CachingCPUAllocator a;
  return a;
}

}  // namespace

bool caching_allocator_enable(int64_t limit_bytes) {
  TORCH_CHECK(limit_bytes > 0, "caching CPU allocator: limit_bytes must be positive, got ", limit_bytes);
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.users == 0) {
    c10::Allocator* current = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&instance(), /*priority=*/0);
    if (c10::GetCPUAllocator() != &instance()) return false;  // another allocator holds a higher priority
    s.previous = current;
    s.previous_deleter = current->raw_deleter();
    s.hits = s.misses = 0;
  }
  s.limit_bytes = std::max(s.users > 0 ? s.limit_bytes : 0, static_cast<size_t>(limit_bytes));  // the largest asked for
  ++s.users;
  return true;
}

std::tuple<int64_t, int64_t> caching_allocator_disable() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  TORCH_CHECK(s.users > 0, "caching CPU allocator: disable without enable");
  if (--s.users == 0) {
    c10::SetCPUAllocator(s.previous, /*priority=*/0);
    for (auto& [size, data] : s.free_blocks) std::free(data);
    s.free_blocks.clear();
    s.size_of.clear();  // live blocks of ours are plain malloc blocks from here on
    s.cached_bytes = s.limit_bytes = 0;
  }
  return {s.hits, s.misses};
}

}  // namespace puyu
