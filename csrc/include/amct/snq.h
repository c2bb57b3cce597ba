// SNQ: INT4 non-uniform weight quantization by 1-D k-means per channel
// (algorithm and determinism rules: amct_caffe/quant/snq.py).
#pragma once

#include <cstddef>
#include <cstdint>

namespace amct {

constexpr int kSnqCentres = 16;

enum class SnqInit { kUniform = 0, kGaussian = 1, kD2Sampling = 2 };

struct SnqConfig {
  SnqInit init = SnqInit::kUniform;
  int max_iteration = 1000;     // [500, 2000]
  double min_distance = 1e-10;  // [1e-10, 1e-3]
  std::uint64_t seed = 0;
};

void check_snq_config(const SnqConfig& config);

// w viewed as [channels, k]; writes centres [channels, 16] (ascending), codes [channels, k] in
// [0, 15], and the Lloyd iteration count per channel (may be null).
void snq(const float* w, std::size_t channels, std::size_t k, const SnqConfig& config,
         float* centres, std::uint8_t* codes, int* iterations);

}  // namespace amct
