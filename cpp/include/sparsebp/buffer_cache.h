// A cache of large output buffers (kMinBytes and up), reused across calls.
//
// Why: glibc maps every allocation above 32 MB afresh (mmap) and returns it to the kernel on
// free, so each call that returns a large array (per-example meProp's weight gradient of a 4096^2
// layer: 64 MB) pays for the kernel zeroing every page on first touch: ~9 against ~4 ms to fill
// 64 MB on a Zen 3 core. A training step asks for the same sizes step after step; a freed buffer
// kept here is taken by the next request of a size it fits, already mapped.
//
// Bounded: at most limit() bytes are kept free (default 256 MiB; SPARSEBP_BUFFER_CACHE_MB at
// import, or set_limit); 0 keeps none. Buffers in use are not counted, and are never reused while
// something holds them. Thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sparsebp {
namespace buffer_cache {

// A block of at least `bytes` bytes (64-byte aligned; 2 MB aligned with huge pages advised when
// 2 MB or more); its capacity is written to *capacity. Throws std::bad_alloc when none can be had.
void* acquire(size_t bytes, size_t* capacity);
// Gives a block back: kept for reuse while the cache stays within its limit, freed otherwise.
void release(void* p, size_t capacity) noexcept;

size_t limit();
void set_limit(size_t bytes);  // frees cached blocks beyond the new limit
void clear();                  // frees every cached block

struct Stats {
  size_t cached_bytes, cached_blocks;
  uint64_t hits, misses;
};
Stats stats();

// Requests below this many bytes are not worth caching (the C library recycles them itself).
constexpr size_t kMinBytes = size_t{32} << 20;

}  // namespace buffer_cache
}  // namespace sparsebp
