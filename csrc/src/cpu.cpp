#include "amct/cpu.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

namespace amct {
namespace {

int hardware_level() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const int level = __builtin_cpu_supports("avx512f")                                    ? 2
                           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1
                                                                                               : 0;
  return level;
#else
  return 0;
#endif
}

int limit_from_environment() {
  const char* value = std::getenv("AMCT_SIMD");
  if (value == nullptr) return 2;
  if (std::strcmp(value, "avx2") == 0) return 1;
  if (std::strcmp(value, "portable") == 0) return 0;
  return 2;  // "avx512", empty or unknown (amct_caffe/runtime/threads.py warns about unknown values)
}

std::atomic<int>& limit() {
  static std::atomic<int> cap{limit_from_environment()};
  return cap;
}

}  // namespace

int simd_level() { return std::min(hardware_level(), limit().load(std::memory_order_relaxed)); }

int set_simd_limit(int level) { return limit().exchange(std::clamp(level, 0, 2), std::memory_order_relaxed); }

bool cpu_has_avx2() { return simd_level() >= 1; }

bool cpu_has_avx512f() { return simd_level() >= 2; }

}  // namespace amct
