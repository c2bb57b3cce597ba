// What the kernels may execute on the running CPU (x86 with GCC or Clang; nothing elsewhere): its vector
// instruction sets, asked once per process, capped by a limit. Kernels use these to pick a vector clone of
// a loop or a vector kernel; clones of a loop give the portable loop's bytes, and every kernel says what
// its vector paths compute.
//
// The limit comes from AMCT_SIMD, read once ("avx512": no cap, "avx2": no AVX-512 kernels, "portable":
// no vector kernels; anything else: no cap), and from set_simd_limit (tests compare the paths, benchmarks
// measure what a CPU without AVX-512 runs).
#pragma once

namespace amct {

// 2: AVX-512 Foundation; 1: AVX2 and FMA; 0: neither (or capped there).
int simd_level();
// Caps simd_level() at `level` (2 lifts the cap); returns the previous cap.
int set_simd_limit(int level);

bool cpu_has_avx2();      // AVX2 and FMA (every CPU with AVX2 has FMA3), not capped below 1
bool cpu_has_avx512f();   // AVX-512 Foundation, not capped below 2

}  // namespace amct
