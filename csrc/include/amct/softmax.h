// Caffe's Softmax over the middle axis of x viewed as (outer, channels, inner), with glibc's expf.
//
//   m = max_c x[o, c, i]                (NaN if any value is NaN, as NumPy's max)
//   e[o, c, i] = expf(x[o, c, i] - m)    (glibc_expf: Caffe's std::exp(float))
//   s = ((e[o, 0, i] + e[o, 1, i]) + e[o, 2, i]) + ...   in channel order
//   y[o, c, i] = e[o, c, i] / s
//
// The sum in channel order is NumPy's for the executor's Softmax (runtime/layers/softmax.py) when it
// adds whole slices (inner > 1) or fewer than 8 values (inner == 1: from 8 on NumPy sums pairwise);
// the Python side (sequential_sum) decides which. Caffe sums with a gemv, whose order is its BLAS's; with two
// channels every order gives one result.
#pragma once

#include <cstddef>

namespace amct {

// y may be x. `threads` workers split the outer index from 2^16 elements on (same bytes for any count).
void softmax_channels(const float* x, float* y, std::size_t outer, std::size_t channels, std::size_t inner,
                      int threads);

}  // namespace amct
