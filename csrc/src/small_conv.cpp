#include "amct/small_conv.h"

#include <cstring>

#include "amct/conv_backward.h"
#include "amct/conv_cols.h"

namespace amct {

void small_conv2d(const float* x, const float* w, float* y, const SmallConvShape& s, Sgemm gemm, float* cols,
                  float* apad, float* bpad, float* cpad, const float* bias, SmallConvAct act, const float* slope,
                  bool shared) {
  const Conv2dGeometry& g = s.g;
  const int k = g.c * g.kh * g.kw, p = g.ho * g.wo, o = s.o;
  const float* b_all = x;
  if (s.im2col) {
    im2col_2d(x, cols, g, false, 1);
    b_all = cols;
  }
  const float* a = w;
  if (s.rows != o) {  // W's rows above the zero ones (copied each call: the weights may change)
    std::memcpy(apad, w, sizeof(float) * static_cast<std::size_t>(o) * k);
    a = apad;
  }
  for (int n = 0; n < g.n; ++n) {
    const float* b = b_all + static_cast<std::size_t>(n) * k * p;
    float* yn = y + static_cast<std::size_t>(n) * o * p;
    int ldb = p;
    if (s.cols != p) {
      for (int r = 0; r < k; ++r) std::memcpy(bpad + static_cast<std::size_t>(r) * s.cols, b + static_cast<std::size_t>(r) * p,
                                              sizeof(float) * p);
      b = bpad;
      ldb = s.cols;
    }
    if (s.rows == o && s.cols == p) {
      gemm(o, p, k, a, k, b, ldb, yn, p);
    } else {
      gemm(s.rows, s.cols, k, a, k, b, ldb, cpad, s.cols);
      for (int r = 0; r < o; ++r) std::memcpy(yn + static_cast<std::size_t>(r) * p, cpad + static_cast<std::size_t>(r) * s.cols,
                                              sizeof(float) * p);
    }
  }
  const std::size_t n = static_cast<std::size_t>(g.n);
  if (bias || act == SmallConvAct::kRelu) channel_affine(y, n, o, p, nullptr, bias, act == SmallConvAct::kRelu, 1);
  if (act == SmallConvAct::kPrelu) prelu(y, slope, y, n, o, p, shared, 1);
}

}  // namespace amct
