// The Winograd transforms sixteen tiles at a time (csrc/src/winograd_avx512.cpp), for AVX-512 CPUs;
// winograd.cpp calls them on planes [first, last) (image-major: plane = n * C + c, or n * O + o) in
// place of its portable loops, with the same bytes.
#pragma once

#include <cstddef>

#include "amct/winograd.h"

namespace amct {

void winograd_input_avx512(const float* x, float* v, const WinogradGeometry& g, std::size_t first, std::size_t last);

void winograd_output_avx512(const float* mm, float* y, const WinogradGeometry& g, const float* a, const float* b,
                            bool relu, std::size_t first, std::size_t last);

}  // namespace amct
