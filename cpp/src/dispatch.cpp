// CPU detection (cpuid + xgetbv) and the choice of kernel table. Compiled at baseline.
#include "sparsebp/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <string>

#include "kernels/kernel_table.h"
#include "sparsebp/errors.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <cpuid.h>
#include <unistd.h>
#define SPARSEBP_X86 1
#endif

namespace sparsebp {
namespace {

struct CpuFeatures {
  bool avx2_fma = false;  // AVX2 + FMA, with the OS saving YMM state
  bool avx512 = false;    // AVX-512 F/VL/BW/DQ, with the OS saving ZMM and mask state
  bool avx512f = false, avx512vl = false, avx512bw = false, avx512dq = false;
  bool avx = false, avx2 = false, fma = false, os_ymm = false, os_zmm = false;
};

CpuFeatures detect() {
  CpuFeatures f;
#if defined(SPARSEBP_X86)
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d) || a < 1) return f;
  const unsigned max_leaf = a;
  __cpuid(1, a, b, c, d);
  const bool osxsave = (c >> 27) & 1;
  f.fma = (c >> 12) & 1;
  f.avx = (c >> 28) & 1;
  if (osxsave) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    f.os_ymm = (lo & 0x6u) == 0x6u;      // SSE and AVX state enabled by the OS
    f.os_zmm = (lo & 0xE6u) == 0xE6u;    // ... and opmask, ZMM_Hi256, Hi16_ZMM
  }
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    f.avx2 = (b >> 5) & 1;
    f.avx512f = (b >> 16) & 1;
    f.avx512dq = (b >> 17) & 1;
    f.avx512bw = (b >> 30) & 1;
    f.avx512vl = (b >> 31) & 1;
  }
  f.avx2_fma = f.avx && f.avx2 && f.fma && f.os_ymm;
  f.avx512 = f.avx2_fma && f.os_zmm && f.avx512f && f.avx512vl && f.avx512bw && f.avx512dq;
#endif
  // SPARSEBP_DISABLE_CPU_FEATURES=avx512[,avx2]: behave as if the CPU lacked them (like NumPy's
  // NPY_DISABLE_CPU_FEATURES): for testing the fallbacks, or to rule a table out.
  if (const char* off = std::getenv("SPARSEBP_DISABLE_CPU_FEATURES")) {
    const std::string s = std::string(",") + off + ",";
    if (s.find(",avx2,") != std::string::npos) f.avx2_fma = false;
    if (s.find(",avx512,") != std::string::npos || !f.avx2_fma) f.avx512 = false;
  }
  return f;
}

const CpuFeatures& features() {
  static const CpuFeatures f = detect();
  return f;
}

struct Entry {
  const char* name;
  const kernels::KernelTable* (*getter)();
  bool runnable;
  bool emulated;
};

std::vector<Entry> entries() {
  std::vector<Entry> e;
#if defined(SPARSEBP_HAVE_AVX512)
  e.push_back({"avx512", &kernels::get_avx512_table, features().avx512, false});
#endif
#if defined(SPARSEBP_HAVE_AVX2)
  e.push_back({"avx2", &kernels::get_avx2_table, features().avx2_fma, false});
#endif
  e.push_back({"scalar", &kernels::get_scalar_table, true, false});
#if defined(SPARSEBP_HAVE_AVX512_EMULATED)
  e.push_back({"avx512-emulated", &kernels::get_avx512_emulated_table, true, true});
#endif
  return e;
}

std::atomic<const kernels::KernelTable*> g_active{nullptr};

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

}  // namespace

const kernels::KernelTable& active_table() {
  const kernels::KernelTable* t = g_active.load(std::memory_order_acquire);
  if (!t) {
    init_isa_from_environment();
    t = g_active.load(std::memory_order_acquire);
  }
  return *t;
}

std::string active_isa() { return active_table().name; }

std::vector<std::string> compiled_isas() {
  std::vector<std::string> v;
  for (const auto& e : entries()) v.push_back(e.name);
  return v;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> v;
  for (const auto& e : entries())
    if (e.runnable) v.push_back(e.name);
  return v;
}

void set_isa(const std::string& name) {
  for (const auto& e : entries()) {
    if (name == e.name) {
      SPARSEBP_CHECK_VALUE(e.runnable, "ISA '", name, "' is compiled in but this CPU cannot run it; choose one of: ",
                           join(available_isas()));
      g_active.store(e.getter(), std::memory_order_release);
      return;
    }
  }
  throw ValueError(str_cat("unknown or not compiled ISA '", name, "'; choose one of: ", join(available_isas())));
}

void init_isa_from_environment() {
  const char* env = std::getenv("SPARSEBP_ISA");
  if (env && *env) {
    try {
      set_isa(env);
    } catch (const ValueError& err) {
      throw ValueError(str_cat("SPARSEBP_ISA=", env, ": ", err.what()));
    }
    return;
  }
  for (const auto& e : entries()) {
    if (e.runnable && !e.emulated) {
      g_active.store(e.getter(), std::memory_order_release);
      return;
    }
  }
}

std::vector<std::pair<std::string, bool>> cpu_features() {
  const CpuFeatures& f = features();
  return {{"avx", f.avx},           {"avx2", f.avx2},         {"fma", f.fma},
          {"os_ymm", f.os_ymm},     {"avx512f", f.avx512f},   {"avx512vl", f.avx512vl},
          {"avx512bw", f.avx512bw}, {"avx512dq", f.avx512dq}, {"os_zmm", f.os_zmm}};
}

int64_t l2_cache_bytes() {
#ifdef _SC_LEVEL2_CACHE_SIZE
  const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
  return v > 0 ? static_cast<int64_t>(v) : 0;
#else
  return 0;
#endif
}

namespace {
// "32768K", "8M", "512": bytes, or 0 when it does not parse.
int64_t parse_cache_size(const std::string& text) {
  std::size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(text, &used);
  } catch (...) {
    return 0;
  }
  if (v <= 0) return 0;
  const char unit = used < text.size() ? text[used] : '\0';
  const int shift = unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0;
  return static_cast<int64_t>(v) << shift;
}

int64_t read_llc_share_bytes() {
  int best_level = 0;
  int64_t bytes = 0;
  for (int i = 0; i < 16; ++i) {  // index0 .. : L1d, L1i, L2, L3 (the highest unified level wins)
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level_f(dir + "level"), type_f(dir + "type"), size_f(dir + "size");
    int level = 0;
    std::string type, size;
    if (!(level_f >> level) || !(type_f >> type) || !(size_f >> size)) continue;
    if (type != "Unified" && type != "Data") continue;
    if (level > best_level) {
      best_level = level;
      bytes = parse_cache_size(size);
    }
  }
  return best_level >= 2 ? bytes : 0;
}
}  // namespace

int64_t llc_share_bytes() {
  static const int64_t bytes = read_llc_share_bytes();
  return bytes;
}

}  // namespace sparsebp
