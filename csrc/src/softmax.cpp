#include "amct/softmax.h"

#include <algorithm>
#include <vector>

#include "amct/libm_float.h"
#include "amct/parallel.h"

namespace amct {
namespace {

// NumPy's maximum: NaN wins (once m is NaN, no comparison replaces it).
inline float max_nan(float m, float v) { return (v > m || v != v) ? v : m; }

// x - max over the channels of one (channels, inner) slab into y; `m` holds `inner` floats of scratch.
void shift_by_max(const float* x, float* y, std::size_t channels, std::size_t inner, float* m) {
  for (std::size_t i = 0; i < inner; ++i) m[i] = x[i];
  for (std::size_t c = 1; c < channels; ++c) {
    const float* xc = x + c * inner;
    for (std::size_t i = 0; i < inner; ++i) m[i] = max_nan(m[i], xc[i]);
  }
  for (std::size_t c = 0; c < channels; ++c) {
    const float* xc = x + c * inner;
    float* yc = y + c * inner;
    for (std::size_t i = 0; i < inner; ++i) yc[i] = xc[i] - m[i];
  }
}

// e / (sum over the channels of e, in channel order) in place; `s` holds `inner` floats of scratch.
void normalize(float* y, std::size_t channels, std::size_t inner, float* s) {
  for (std::size_t i = 0; i < inner; ++i) s[i] = y[i];
  for (std::size_t c = 1; c < channels; ++c) {
    const float* yc = y + c * inner;
    for (std::size_t i = 0; i < inner; ++i) s[i] += yc[i];
  }
  for (std::size_t c = 0; c < channels; ++c) {
    float* yc = y + c * inner;
    for (std::size_t i = 0; i < inner; ++i) yc[i] /= s[i];
  }
}

}  // namespace


void softmax_channels(const float* x, float* y, std::size_t outer, std::size_t channels, std::size_t inner,
                      int threads) {
  const std::size_t per = channels * inner;
  if (per == 0) return;
  // Slabs go in blocks of about 4096 values: one expf call per block (the vector loop wants long runs, a
  // softmax over 2 channels has slabs of 2), while the block stays in cache between the three passes.
  const std::size_t block = std::max<std::size_t>(1, 4096 / per);
  const int workers = outer * per >= (1u << 16) ? threads : 1;
  parallel_for((outer + block - 1) / block, workers, [&](std::size_t first, std::size_t last) {
    std::vector<float> scratch(2 * inner);
    for (std::size_t b = first; b < last; ++b) {
      const std::size_t o0 = b * block, o1 = std::min(outer, o0 + block);
      for (std::size_t o = o0; o < o1; ++o) shift_by_max(x + o * per, y + o * per, channels, inner, scratch.data());
      expf_span(y + o0 * per, y + o0 * per, (o1 - o0) * per);
      for (std::size_t o = o0; o < o1; ++o) normalize(y + o * per, channels, inner, scratch.data() + inner);
    }
  });
}

}  // namespace amct
