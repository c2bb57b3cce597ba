// The accuracy report's statistics of an FP32 blob `a` and its quantized counterpart `b`, both
// float32 (rows, cols) (a row per sample), in one pass over them:
//   dot[r] = sum_j a[r,j] * b[r,j],  aa[r] = sum_j a[r,j]^2,  bb[r] = sum_j b[r,j]^2,
//   dd[r]  = sum_j (a[r,j] - b[r,j])^2,  max_abs = max over all of |a - b| (NaN if any difference is NaN),
// every product and difference formed in double from the float32 values (as NumPy's float64 path).
// Each row is summed in fixed chunks of kBlobStatsChunk values, eight partial sums per chunk combined
// in order, then the chunks in order: the same bytes with any thread count. `threads` workers split
// the chunks.
#pragma once

#include <cstddef>

namespace amct {

constexpr std::size_t kBlobStatsChunk = 1 << 14;

struct RowSums {
  double* dot;
  double* aa;
  double* bb;
  double* dd;
};

// Returns max |a - b| (0 for no values).
double blob_stats(const float* a, const float* b, std::size_t rows, std::size_t cols, const RowSums& out,
                  int threads);

}  // namespace amct
