// The geometry of a 2-D sliding window (convolution, pooling, im2col) and the two questions every
// kernel over it asks: is it well-formed, and which outputs does one tap read inside the input.
#pragma once

#include <algorithm>
#include <stdexcept>
#include <string>

namespace amct {

struct Conv2dGeometry {
  int n, c, h, w;       // input (N, C, H, W)
  int kh, kw;           // kernel
  int sh, sw, ph, pw, dh, dw;
  int ho, wo;           // output (N, C, Ho, Wo)
};

// Throws std::invalid_argument naming `what` unless every extent is positive (N and C may be 0:
// no planes to compute) and the pads are not negative.
inline void check_geometry(const Conv2dGeometry& g, const char* what) {
  if (g.n < 0 || g.c < 0 || g.h <= 0 || g.w <= 0 || g.kh <= 0 || g.kw <= 0 || g.sh <= 0 || g.sw <= 0 || g.ph < 0 ||
      g.pw < 0 || g.dh <= 0 || g.dw <= 0 || g.ho <= 0 || g.wo <= 0) {
    throw std::invalid_argument(std::string(what) + ": invalid geometry");
  }
}

// The outputs [lo, hi) along one axis whose tap at offset `tap` (i * d - p) reads a cell of
// [0, size): o * s + tap in [0, size). An empty range has lo == hi.
inline void valid_outputs(int tap, int s, int size, int n_out, int* lo, int* hi) {
  const int first = tap >= 0 ? 0 : (-tap + s - 1) / s;
  const int last = size - 1 - tap < 0 ? -1 : (size - 1 - tap) / s;  // the last o with o*s + tap < size
  *lo = std::min(first, n_out);
  *hi = std::max(*lo, std::min(last + 1, n_out));
}

}  // namespace amct
