#include "amct/lrn.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "amct/cpu.h"
#include "amct/parallel.h"

namespace amct {

namespace {

// scale[i] = fma(a, head[i], scale[i]) then fma(-a, tail[i], .) (tail may be null): std::fma is exact
// wherever it runs, the FMA instruction in the clone below, libm's fmaf in the portable one.
template <int Dummy>
__attribute__((always_inline)) inline void running_step(float* s, const float* prev, const float* head,
                                                       const float* tail, float a, std::size_t len) {
  for (std::size_t i = 0; i < len; ++i) {
    float v = prev[i];
    v = std::fma(a, head[i], v);
    if (tail != nullptr) v = std::fma(-a, tail[i], v);
    s[i] = v;
  }
}

__attribute__((target("avx2,fma"))) void running_step_fma(float* s, const float* prev, const float* head,
                                                          const float* tail, float a, std::size_t len) {
  running_step<0>(s, prev, head, tail, a, len);
}

void running_step_portable(float* s, const float* prev, const float* head, const float* tail, float a,
                           std::size_t len) {
  running_step<1>(s, prev, head, tail, a, len);
}

}  // namespace

void lrn_across(const float* x, float* y, float* scale, std::size_t n, std::size_t c, std::size_t hw, int size,
                float alpha_over_size, float beta, float k, int threads) {
  auto step = cpu_has_avx2() ? running_step_fma : running_step_portable;
  const std::size_t pre = static_cast<std::size_t>(size - 1) / 2;
  const std::size_t padded = c + static_cast<std::size_t>(size) - 1;
  const float a = alpha_over_size;
  const float exponent = -beta;
  parallel_for(n, threads, [&](std::size_t first, std::size_t last) {
    std::vector<float> sq(padded * hw, 0.0f);
    for (std::size_t img = first; img < last; ++img) {
      const float* xi = x + img * c * hw;
      float* si = scale + img * c * hw;
      float* yi = y + img * c * hw;
      for (std::size_t i = 0; i < c * hw; ++i) sq[pre * hw + i] = xi[i] * xi[i];
      std::fill(si, si + hw, k);
      for (int t = 0; t < size; ++t) step(si, si, sq.data() + static_cast<std::size_t>(t) * hw, nullptr, a, hw);
      for (std::size_t ch = 1; ch < c; ++ch) {
        step(si + ch * hw, si + (ch - 1) * hw, sq.data() + (ch + static_cast<std::size_t>(size) - 1) * hw,
             sq.data() + (ch - 1) * hw, a, hw);
      }
      for (std::size_t i = 0; i < c * hw; ++i) yi[i] = std::pow(si[i], exponent) * xi[i];
    }
  });
}

}  // namespace amct
