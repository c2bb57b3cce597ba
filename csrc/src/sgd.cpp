#include "amct/sgd.h"

#include <algorithm>

#include "amct/parallel.h"

namespace amct {

void sgd_update(float* w, float* g, float* h, std::size_t n, float decay, float momentum, float rate, int threads) {
  // Below this many values a second thread costs more than it saves.
  constexpr std::size_t kPerThread = std::size_t{1} << 16;
  const int workers = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(std::max(threads, 1)),
                                                             n / kPerThread + 1));
  parallel_for(n, workers, [&](std::size_t first, std::size_t last) {
    if (decay != 0.0f) {
      for (std::size_t i = first; i < last; ++i) g[i] = g[i] + decay * w[i];
    }
    for (std::size_t i = first; i < last; ++i) {
      const float hv = momentum * h[i] + rate * g[i];
      h[i] = hv;
      g[i] = hv;
      w[i] = w[i] - hv;
    }
  });
}

}  // namespace amct
