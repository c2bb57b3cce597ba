// What the running CPU can execute, asked once per process (x86 with GCC or Clang; false elsewhere).
// Kernels use these to pick a vector clone of a loop; every clone gives the portable loop's bytes.
#pragma once

namespace amct {

bool cpu_has_avx2();      // AVX2
bool cpu_has_avx2_fma();  // AVX2 and FMA
bool cpu_has_avx512f();   // AVX-512 Foundation

}  // namespace amct
