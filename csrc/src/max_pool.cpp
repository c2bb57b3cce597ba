#include "amct/max_pool.h"
#include "amct/cpu.h"

#include <algorithm>
#include <cfloat>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

#include "amct/parallel.h"

namespace amct {
namespace {

// One output: Caffe's scan of the window rows [hs, he) and columns [ws, we) (clipped to the input),
// the strict-greater update written as selects (no branch to mispredict on data whose maxima fall
// anywhere): ties keep the first cell, NaN never wins.
inline void argmax_window(const float* xp, int w, int hs, int he, int ws, int we, float* y, std::int32_t* m) {
  float best = -FLT_MAX;
  std::int32_t idx = -1;
  for (int r = hs; r < he; ++r) {
    const float* row = xp + static_cast<std::size_t>(r) * w;
    for (int c = ws; c < we; ++c) {
      const float v = row[c];
      const bool better = v > best;
      best = better ? v : best;
      idx = better ? r * w + c : idx;
    }
  }
  *y = best;
  *m = idx;
}

// The outputs [ox0, ox1) of an unclipped row (the window of kh = KH rows starting at row r0), with a
// KH x KW window at column stride SW known at compile time: the same scan, unrolled, so the loop
// over the outputs vectorizes.
template <int KH, int KW, int SW>
__attribute__((always_inline)) inline void argmax_row(const float* xp, int w, int r0, int c0, int ox0, int ox1,
                                                      float* y, std::int32_t* m) {
  for (int ox = ox0; ox < ox1; ++ox) {
    const int c = c0 + ox * SW;
    float best = -FLT_MAX;
    std::int32_t idx = -1;
    for (int i = 0; i < KH; ++i) {
      for (int j = 0; j < KW; ++j) {
        const float v = xp[static_cast<std::size_t>(r0 + i) * w + c + j];
        const bool better = v > best;
        best = better ? v : best;
        idx = better ? (r0 + i) * w + c + j : idx;
      }
    }
    y[ox] = best;
    m[ox] = idx;
  }
}

template <int Dummy>
__attribute__((always_inline)) inline void argmax_planes(const float* x, float* y, std::int32_t* mask,
                                                         const Conv2dGeometry& g, std::size_t first,
                                                         std::size_t last) {
  const std::size_t in_plane = static_cast<std::size_t>(g.h) * g.w;
  const std::size_t out_plane = static_cast<std::size_t>(g.ho) * g.wo;
  // the outputs whose window lies wholly inside the columns: ox*sw - pw >= 0 and ox*sw - pw + kw <= w
  const int in0 = std::min(g.wo, (g.pw + g.sw - 1) / g.sw);
  const int in1 = std::max(in0, std::min(g.wo, g.w - g.kw + g.pw >= 0 ? (g.w - g.kw + g.pw) / g.sw + 1 : 0));
  const bool k22 = g.kh == 2 && g.kw == 2 && g.sw == 2, k33 = g.kh == 3 && g.kw == 3 && g.sw == 2;
  for (std::size_t q = first; q < last; ++q) {
    const float* xp = x + q * in_plane;
    float* yp = y + q * out_plane;
    std::int32_t* mp = mask + q * out_plane;
    for (int oy = 0; oy < g.ho; ++oy) {
      const int hs = std::max(oy * g.sh - g.ph, 0);
      const int he = std::min(oy * g.sh - g.ph + g.kh, g.h);
      float* yr = yp + static_cast<std::size_t>(oy) * g.wo;
      std::int32_t* mr = mp + static_cast<std::size_t>(oy) * g.wo;
      const bool full_rows = he - hs == g.kh;
      const int a = full_rows && (k22 || k33) ? in0 : g.wo, b = full_rows && (k22 || k33) ? in1 : g.wo;
      for (int ox = 0; ox < a; ++ox) {
        argmax_window(xp, g.w, hs, he, std::max(ox * g.sw - g.pw, 0), std::min(ox * g.sw - g.pw + g.kw, g.w),
                      yr + ox, mr + ox);
      }
      if (a < b) {
        if (k22) {
          argmax_row<2, 2, 2>(xp, g.w, hs, -g.pw, a, b, yr, mr);
        } else {
          argmax_row<3, 3, 2>(xp, g.w, hs, -g.pw, a, b, yr, mr);
        }
      }
      for (int ox = std::max(a, b); ox < g.wo; ++ox) {
        argmax_window(xp, g.w, hs, he, std::max(ox * g.sw - g.pw, 0), std::min(ox * g.sw - g.pw + g.kw, g.w),
                      yr + ox, mr + ox);
      }
    }
  }
}

__attribute__((target("avx2"))) void argmax_avx2(const float* x, float* y, std::int32_t* mask, const Conv2dGeometry& g,
                                                 std::size_t first, std::size_t last) {
  argmax_planes<0>(x, y, mask, g, first, last);
}

void argmax_generic(const float* x, float* y, std::int32_t* mask, const Conv2dGeometry& g, std::size_t first,
                    std::size_t last) {
  argmax_planes<1>(x, y, mask, g, first, last);
}

}  // namespace

void max_pool2d_argmax(const float* x, float* y, std::int32_t* mask, const Conv2dGeometry& g, int threads) {
  check_geometry(g, "max_pool2d_argmax");
  auto run = cpu_has_avx2() ? argmax_avx2 : argmax_generic;
  parallel_for(static_cast<std::size_t>(g.n) * g.c, threads,
               [&](std::size_t first, std::size_t last) { run(x, y, mask, g, first, last); });
}

void max_pool2d_backward(const float* dy, const std::int32_t* mask, float* dx, const Conv2dGeometry& g,
                         int threads) {
  check_geometry(g, "max_pool2d_backward");
  const std::size_t in_plane = static_cast<std::size_t>(g.h) * g.w;
  const std::size_t out_plane = static_cast<std::size_t>(g.ho) * g.wo;
  const std::size_t planes = static_cast<std::size_t>(g.n) * g.c;
  const std::int32_t limit = static_cast<std::int32_t>(in_plane);
  for (std::size_t i = 0; i < planes * out_plane; ++i) {
    if (mask[i] >= limit) throw std::invalid_argument("max_pool2d_backward: a mask index lies past its plane");
  }
  std::vector<char> empty(planes, 0);  // planes with a window that picked nothing
  parallel_for(planes, threads, [&](std::size_t first, std::size_t last) {
    for (std::size_t q = first; q < last; ++q) {
      float* dp = dx + q * in_plane;
      const float* gp = dy + q * out_plane;
      const std::int32_t* mp = mask + q * out_plane;
      std::fill(dp, dp + in_plane, 0.0f);
      for (std::size_t i = 0; i < out_plane; ++i) {
        if (mp[i] >= 0) {
          dp[mp[i]] += gp[i];
        } else {
          empty[q] = 1;
        }
      }
    }
  });
  // Caffe's writes at plane index -1, after the previous plane's own (which the loop above finished)
  for (std::size_t q = 1; q < planes; ++q) {
    if (!empty[q]) continue;
    for (std::size_t i = 0; i < out_plane; ++i) {
      if (mask[q * out_plane + i] < 0) dx[q * in_plane - 1] += dy[q * out_plane + i];
    }
  }
}

}  // namespace amct
