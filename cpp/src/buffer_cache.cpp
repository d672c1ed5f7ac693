#include "sparsebp/buffer_cache.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

namespace sparsebp {
namespace buffer_cache {
namespace {

struct Block {
  void* p;
  size_t capacity;
};

struct State {
  std::mutex mu;
  std::vector<Block> free_blocks;  // most recently released last
  size_t cached = 0;
  size_t limit = size_t{256} << 20;
  uint64_t hits = 0, misses = 0;
};

// Never destroyed: a capsule may release a block while the interpreter shuts down.
State& state() {
  static State* s = new State();
  return *s;
}

constexpr size_t kHuge = size_t{2} << 20;

// Frees cached blocks, oldest first, until at most `keep` bytes stay. Called with the lock held.
void trim(State& s, size_t keep) {
  size_t i = 0;
  while (s.cached > keep && i < s.free_blocks.size()) {
    s.cached -= s.free_blocks[i].capacity;
    std::free(s.free_blocks[i].p);
    ++i;
  }
  s.free_blocks.erase(s.free_blocks.begin(), s.free_blocks.begin() + static_cast<std::ptrdiff_t>(i));
}

}  // namespace

void* acquire(size_t bytes, size_t* capacity) {
  State& s = state();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    // The smallest cached block that fits without wasting more than half of itself.
    size_t best = s.free_blocks.size();
    for (size_t i = 0; i < s.free_blocks.size(); ++i) {
      const size_t c = s.free_blocks[i].capacity;
      if (c >= bytes && c / 2 <= bytes && (best == s.free_blocks.size() || c < s.free_blocks[best].capacity))
        best = i;
    }
    if (best < s.free_blocks.size()) {
      const Block b = s.free_blocks[best];
      s.free_blocks.erase(s.free_blocks.begin() + static_cast<std::ptrdiff_t>(best));
      s.cached -= b.capacity;
      ++s.hits;
      *capacity = b.capacity;
      return b.p;
    }
    ++s.misses;
  }
  const size_t align = bytes >= kHuge ? kHuge : 64;
  const size_t cap = std::max<size_t>(align, (bytes + align - 1) / align * align);
  void* p = std::aligned_alloc(align, cap);
  if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  if (align == kHuge) madvise(p, cap, MADV_HUGEPAGE);  // as NumPy does for its large arrays
#endif
  *capacity = cap;
  return p;
}

void release(void* p, size_t capacity) noexcept {
  if (!p) return;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (capacity > s.limit) {
    std::free(p);
    return;
  }
  try {
    s.free_blocks.push_back({p, capacity});
  } catch (...) {
    std::free(p);
    return;
  }
  s.cached += capacity;
  trim(s, s.limit);  // the oldest blocks go first
}

size_t limit() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.limit;
}

void set_limit(size_t bytes) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.limit = bytes;
  trim(s, bytes);
}

void clear() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  trim(s, 0);
}

Stats stats() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return {s.cached, s.free_blocks.size(), s.hits, s.misses};
}

}  // namespace buffer_cache
}  // namespace sparsebp
