// IFMR activation calibration (math and tie rule: amct_caffe/quant/ifmr.py).
#pragma once

#include <cstddef>
#include <vector>

namespace amct {

struct FloatSpan {
  const float* data;
  std::size_t size;
};

struct IfmrConfig {
  int num_bits = 8;           // [8, 16]
  bool with_offset = true;    // asymmetric (offset) or symmetric search
  double max_percentile = 0.999999;  // (0.5, 1]
  double min_percentile = 0.999999;  // (0.5, 1]
};

struct IfmrResult {
  int best_index = 0;
  float scale = 1.0f;
  int offset = 0;
  float clip_max = 0.0f;
  float clip_min = 0.0f;
  std::vector<double> losses;  // mean squared error per candidate
};

// Candidate ratios start + i*step, i < floor((end-start)/step + 1e-6) + 1 (end point included).
std::vector<double> ifmr_ratios(double start, double end, double step);

// k-th largest value over all chunks (1 <= k <= total size); partial selection, no full sort.
float kth_largest(const std::vector<FloatSpan>& chunks, std::size_t k);

// One search over the concatenation of `chunks`. Throws std::invalid_argument on empty or
// non-finite data ("IfmrQuantWith[out]Offset scale is illegal ...") and on bad settings.
// Single-threaded; one pass over the data evaluates every candidate.
// `zeros`: how many values equal to zero the data holds besides `chunks` (an observer may drop them:
// a zero quantizes to zero under every candidate, so it adds nothing to a loss, and it counts only
// in N and in the percentiles, which are clamped to include zero anyway). `threads` workers split the
// candidates; the result does not depend on their number.
IfmrResult ifmr_search(const std::vector<FloatSpan>& chunks, const IfmrConfig& config,
                       const std::vector<double>& ratios, std::size_t zeros = 0, int threads = 1);

// Vector code path in use: 0 portable, 1 AVX2, 2 AVX-512. Every path gives the same per-value
// errors; amct/cpu.h's set_simd_limit caps the level (tests compare the paths).
int ifmr_simd_level();

// Settings check shared with the C API (throws std::invalid_argument).
void check_ifmr_config(const IfmrConfig& config, std::size_t n_ratios);

}  // namespace amct
