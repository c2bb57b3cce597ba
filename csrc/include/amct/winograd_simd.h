// The Winograd transforms sixteen tiles at a time (csrc/src/winograd_avx512.cpp), for AVX-512 CPUs;
// winograd.cpp calls them in place of its portable loops, with the same bytes. `threads` split the
// planes (or, on maps of few tiles a row, the channels).
#pragma once

#include <cstddef>

#include "amct/winograd.h"

namespace amct {

void winograd_input_avx512(const float* x, float* v, const WinogradGeometry& g, int threads);

void winograd_output_avx512(const float* mm, float* y, const WinogradGeometry& g, const float* a, const float* b,
                            bool relu, int threads);

// ... eight tiles of a tile row at a time (csrc/src/winograd_avx2.cpp), for AVX2 CPUs.
void winograd_input_avx2(const float* x, float* v, const WinogradGeometry& g, int threads);

void winograd_output_avx2(const float* mm, float* y, const WinogradGeometry& g, const float* a, const float* b,
                          bool relu, int threads);

}  // namespace amct
