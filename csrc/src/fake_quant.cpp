#include "amct/fake_quant.h"

#include <algorithm>
#include <cmath>

namespace amct {

void fake_quant(const float* in, float* out, std::size_t n, float scale, int offset,
                int num_bits, bool with_offset) {
  // Signed range [-2^(b-1), 2^(b-1)-1]; with an offset the integer grid is shifted so
  // that `offset` represents zero.
  const float qmin = static_cast<float>(-(1 << (num_bits - 1)));
  const float qmax = static_cast<float>((1 << (num_bits - 1)) - 1);
  const float off = with_offset ? static_cast<float>(offset) : 0.0f;
  for (std::size_t i = 0; i < n; ++i) {
    float q = std::nearbyint(in[i] / scale) + off;
    q = std::min(std::max(q, qmin), qmax);
    out[i] = (q - off) * scale;
  }
}

}  // namespace amct
