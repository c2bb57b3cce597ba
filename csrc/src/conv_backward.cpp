#include "amct/conv_backward.h"

#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <string>

#include "amct/parallel.h"

namespace amct {
namespace {

// Where row r of image n starts in the columns, and the step between the rows of one image.
struct ColsLayout {
  std::size_t row_step, image_step;
  ColsLayout(const Conv2dGeometry& g, bool batch_last) {
    const std::size_t p = static_cast<std::size_t>(g.ho) * g.wo;
    const std::size_t k = static_cast<std::size_t>(g.c) * g.kh * g.kw;
    row_step = batch_last ? static_cast<std::size_t>(g.n) * p : p;
    image_step = batch_last ? p : k * p;
  }
  std::size_t at(std::size_t n, std::size_t r) const { return n * image_step + r * row_step; }
};

}  // namespace

void im2col_2d(const float* x, float* cols, const Conv2dGeometry& g, bool batch_last, int threads) {
  check_geometry(g, "im2col_2d");
  const ColsLayout L(g, batch_last);
  const std::size_t plane = static_cast<std::size_t>(g.h) * g.w;
  parallel_for(static_cast<std::size_t>(g.n) * g.c, threads, [&](std::size_t first, std::size_t last) {
    for (std::size_t q = first; q < last; ++q) {
      const std::size_t n = q / g.c, c = q % g.c;
      const float* xp = x + q * plane;
      for (int i = 0; i < g.kh; ++i) {
        int ylo, yhi;
        valid_outputs(i * g.dh - g.ph, g.sh, g.h, g.ho, &ylo, &yhi);
        for (int j = 0; j < g.kw; ++j) {
          int xlo, xhi;
          valid_outputs(j * g.dw - g.pw, g.sw, g.w, g.wo, &xlo, &xhi);
          float* dst = cols + L.at(n, (c * g.kh + i) * g.kw + j);
          std::fill(dst, dst + static_cast<std::size_t>(ylo) * g.wo, 0.0f);
          for (int oy = ylo; oy < yhi; ++oy) {
            float* row = dst + static_cast<std::size_t>(oy) * g.wo;
            const float* src = xp + static_cast<std::size_t>(oy * g.sh + i * g.dh - g.ph) * g.w;
            const std::ptrdiff_t off = j * g.dw - g.pw;  // + ox*sw is in [0, W) for ox in [xlo, xhi)
            std::fill(row, row + xlo, 0.0f);
            if (g.sw == 1) {
              std::copy(src + (xlo + off), src + (xhi + off), row + xlo);
            } else {
              for (int ox = xlo; ox < xhi; ++ox) row[ox] = src[static_cast<std::ptrdiff_t>(ox) * g.sw + off];
            }
            std::fill(row + xhi, row + g.wo, 0.0f);
          }
          std::fill(dst + static_cast<std::size_t>(yhi) * g.wo, dst + static_cast<std::size_t>(g.ho) * g.wo, 0.0f);
        }
      }
    }
  });
}

void col2im_2d(const float* cols, float* x, const Conv2dGeometry& g, bool batch_last, int threads) {
  check_geometry(g, "col2im_2d");
  const ColsLayout L(g, batch_last);
  const std::size_t plane = static_cast<std::size_t>(g.h) * g.w;
  parallel_for(static_cast<std::size_t>(g.n) * g.c, threads, [&](std::size_t first, std::size_t last) {
    for (std::size_t q = first; q < last; ++q) {
      const std::size_t n = q / g.c, c = q % g.c;
      float* xp = x + q * plane;
      std::fill(xp, xp + plane, 0.0f);
      for (int i = 0; i < g.kh; ++i) {
        int ylo, yhi;
        valid_outputs(i * g.dh - g.ph, g.sh, g.h, g.ho, &ylo, &yhi);
        for (int j = 0; j < g.kw; ++j) {
          int xlo, xhi;
          valid_outputs(j * g.dw - g.pw, g.sw, g.w, g.wo, &xlo, &xhi);
          const float* src = cols + L.at(n, (c * g.kh + i) * g.kw + j);
          for (int oy = ylo; oy < yhi; ++oy) {
            const float* row = src + static_cast<std::size_t>(oy) * g.wo;
            float* dst = xp + static_cast<std::size_t>(oy * g.sh + i * g.dh - g.ph) * g.w;
            const std::ptrdiff_t off = j * g.dw - g.pw;
            if (g.sw == 1) {
              float* d = dst + (xlo + off);
              const float* r = row + xlo;
              for (int k = 0; k < xhi - xlo; ++k) d[k] += r[k];
            } else {
              for (int ox = xlo; ox < xhi; ++ox) dst[static_cast<std::ptrdiff_t>(ox) * g.sw + off] += row[ox];
            }
          }
        }
      }
    }
  });
}

}  // namespace amct
