#include "amct/snq.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "amct/common.h"

namespace amct {
namespace {

// Standard normal quantiles at (j + 0.5) / 16, the "gaussian" starting centres.
constexpr double kGaussQuantiles[kSnqCentres] = {
    -1.862731867421651,  -1.3180108973035367, -1.009990169249582,  -0.7764217611479276,
    -0.579132162255556,  -0.40225006532172525, -0.2372021093287877, -0.0784124127331122,
    0.0784124127331122,  0.2372021093287877,  0.40225006532172525, 0.579132162255556,
    0.7764217611479276,  1.009990169249582,   1.3180108973035367,  1.862731867421651};

constexpr std::uint64_t kGolden = 0x9E3779B97F4A7C15ull;

struct SplitMix64 {  // tiny portable generator, reproduced bit for bit by the reference
  std::uint64_t state;
  std::uint64_t next() {
    std::uint64_t z = (state += kGolden);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
};

void init_centres(const std::vector<float>& xs, const std::vector<double>& prefix, const SnqConfig& cfg,
                  std::size_t channel, double* c) {
  const std::size_t k = xs.size();
  if (cfg.init == SnqInit::kUniform) {
    const double lo = xs.front(), step = (static_cast<double>(xs.back()) - lo) / (kSnqCentres - 1);
    for (int j = 0; j < kSnqCentres; ++j) c[j] = lo + j * step;
  } else if (cfg.init == SnqInit::kGaussian) {
    const double mu = prefix[k] / static_cast<double>(k);
    double ss = 0.0;
    for (float v : xs) ss += (v - mu) * (v - mu);
    const double sigma = std::sqrt(ss / static_cast<double>(k));
    for (int j = 0; j < kSnqCentres; ++j) c[j] = mu + sigma * kGaussQuantiles[j];
  } else {  // k-means++: each next centre drawn with probability proportional to D(x)^2
    SplitMix64 rng{cfg.seed + (channel + 1) * kGolden};
    c[0] = xs[std::min(static_cast<std::size_t>(rng.uniform() * static_cast<double>(k)), k - 1)];
    std::vector<double> d2(k, INFINITY);
    for (int j = 1; j < kSnqCentres; ++j) {
      double total = 0.0;
      std::vector<double> cum(k);
      for (std::size_t i = 0; i < k; ++i) {
        const double e = xs[i] - c[j - 1];
        d2[i] = std::min(d2[i], e * e);
        total += d2[i];
        cum[i] = total;
      }
      const double u = rng.uniform();
      if (total == 0.0) {  // fewer distinct values than centres: repeat the last one
        c[j] = c[j - 1];
        continue;
      }
      const double target = u * total;
      std::size_t idx = static_cast<std::size_t>(std::upper_bound(cum.begin(), cum.end(), target) - cum.begin());
      c[j] = xs[std::min(idx, k - 1)];
    }
    std::sort(c, c + kSnqCentres);
  }
}

void midpoints(const double* c, double* mid) {
  for (int j = 0; j + 1 < kSnqCentres; ++j) mid[j] = (c[j] + c[j + 1]) * 0.5;
}

}  // namespace

void check_snq_config(const SnqConfig& config) {
  if (config.max_iteration < 500 || config.max_iteration > 2000) {
    fail("SNQ max_iteration must be in [500, 2000], got " + std::to_string(config.max_iteration));
  }
  if (!(config.min_distance >= 1e-10 && config.min_distance <= 1e-3)) {
    fail("SNQ min_distance must be in [1e-10, 1e-3], got " + std::to_string(config.min_distance));
  }
  const int init = static_cast<int>(config.init);
  if (init < 0 || init > 2) fail("SNQ init_algo must be uniform, gaussian or d2sampling");
}

void snq(const float* w, std::size_t channels, std::size_t k, const SnqConfig& config,
         float* centres, std::uint8_t* codes, int* iterations) {
  check_snq_config(config);
  if (k == 0) fail("SNQ: empty weight");
  std::vector<float> xs(k);
  std::vector<double> prefix(k + 1);
  for (std::size_t ch = 0; ch < channels; ++ch) {
    const float* row = w + ch * k;
    for (std::size_t i = 0; i < k; ++i) {
      if (!std::isfinite(row[i])) fail("SNQ: weight contains inf or NaN");
    }
    xs.assign(row, row + k);
    std::sort(xs.begin(), xs.end());
    prefix[0] = 0.0;
    for (std::size_t i = 0; i < k; ++i) prefix[i + 1] = prefix[i] + xs[i];

    double c[kSnqCentres], mid[kSnqCentres - 1];
    init_centres(xs, prefix, config, ch, c);
    int it = 0;
    while (it < config.max_iteration) {
      ++it;
      midpoints(c, mid);
      std::size_t lo = 0;
      double shift = 0.0;
      for (int j = 0; j < kSnqCentres; ++j) {  // cluster j = sorted values in (mid[j-1], mid[j]]
        const std::size_t hi = j + 1 < kSnqCentres
            ? static_cast<std::size_t>(std::upper_bound(xs.begin(), xs.end(), mid[j],
                  [](double m, float v) { return m < static_cast<double>(v); }) - xs.begin())
            : k;
        if (hi > lo) {
          const double mean = (prefix[hi] - prefix[lo]) / static_cast<double>(hi - lo);
          shift = std::max(shift, std::fabs(mean - c[j]));
          c[j] = mean;
        }
        lo = hi;
      }
      if (shift < config.min_distance) break;
    }
    midpoints(c, mid);
    for (int j = 0; j < kSnqCentres; ++j) centres[ch * kSnqCentres + j] = static_cast<float>(c[j]);
    for (std::size_t i = 0; i < k; ++i) {  // code = number of midpoints strictly below the value
      const double v = row[i];
      codes[ch * k + i] = static_cast<std::uint8_t>(std::lower_bound(mid, mid + kSnqCentres - 1, v) - mid);
    }
    if (iterations) iterations[ch] = it;
  }
}

}  // namespace amct
