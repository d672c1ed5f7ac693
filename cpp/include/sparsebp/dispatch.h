// Which kernel table runs: chosen once at import (the best one this CPU supports, or the one named
// by the environment variable SPARSEBP_ISA), switchable by tests.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace sparsebp {
namespace kernels {
struct KernelTable;
}

// The table every op uses. Never null.
const kernels::KernelTable& active_table();
std::string active_isa();
// Tables compiled into this build, in preference order: "avx512", "avx2", "scalar", "avx512-emulated".
std::vector<std::string> compiled_isas();
// Compiled tables this CPU (and OS) can run, same order.
std::vector<std::string> available_isas();
// Makes `name` the active table. Throws ValueError listing the valid choices if `name` is unknown,
// not compiled in, or not runnable on this CPU.
void set_isa(const std::string& name);
// Reads SPARSEBP_ISA (if set and non-empty) and selects it; else selects the first available table
// that is not emulated. Called once at import.
void init_isa_from_environment();
// CPU features relevant to dispatch, as (name, present) pairs.
std::vector<std::pair<std::string, bool>> cpu_features();
// Bytes of level-2 cache per core as the C library reports it (glibc: sysconf), 0 when unknown.
int64_t l2_cache_bytes();
// Bytes of the last-level cache that CPU 0 shares with its neighbours (one instance: a Zen core
// complex's L3, not the socket's), from Linux's /sys/devices/system/cpu/cpu0/cache; 0 when
// unknown. Read once. (glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) reports the whole socket's L3 on
// AMD EPYC under KVM: 256 MB on a Zen 3 whose core complexes have 32 MB each.)
int64_t llc_share_bytes();

}  // namespace sparsebp
