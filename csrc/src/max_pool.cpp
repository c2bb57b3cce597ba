#include "amct/max_pool.h"

#include <algorithm>
#include <cfloat>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

#include "amct/parallel.h"

namespace amct {
namespace {

void check(const Conv2dGeometry& g, const char* who) {
  if (g.n < 0 || g.c < 0 || g.h <= 0 || g.w <= 0 || g.kh <= 0 || g.kw <= 0 || g.sh <= 0 || g.sw <= 0 || g.ph < 0 ||
      g.pw < 0 || g.ho <= 0 || g.wo <= 0) {
    throw std::invalid_argument(std::string(who) + ": invalid geometry");
  }
}

}  // namespace

void max_pool2d_argmax(const float* x, float* y, std::int32_t* mask, const Conv2dGeometry& g, int threads) {
  check(g, "max_pool2d_argmax");
  const std::size_t in_plane = static_cast<std::size_t>(g.h) * g.w;
  const std::size_t out_plane = static_cast<std::size_t>(g.ho) * g.wo;
  parallel_for(static_cast<std::size_t>(g.n) * g.c, threads, [&](std::size_t first, std::size_t last) {
    for (std::size_t q = first; q < last; ++q) {
      const float* xp = x + q * in_plane;
      float* yp = y + q * out_plane;
      std::int32_t* mp = mask + q * out_plane;
      for (int oy = 0; oy < g.ho; ++oy) {
        const int hs = std::max(oy * g.sh - g.ph, 0);
        const int he = std::min(oy * g.sh - g.ph + g.kh, g.h);
        for (int ox = 0; ox < g.wo; ++ox) {
          const int ws = std::max(ox * g.sw - g.pw, 0);
          const int we = std::min(ox * g.sw - g.pw + g.kw, g.w);
          float best = -FLT_MAX;
          std::int32_t idx = -1;
          for (int r = hs; r < he; ++r) {
            const float* row = xp + static_cast<std::size_t>(r) * g.w;
            for (int s = ws; s < we; ++s) {
              if (row[s] > best) {
                best = row[s];
                idx = r * g.w + s;
              }
            }
          }
          yp[oy * g.wo + ox] = best;
          mp[oy * g.wo + ox] = idx;
        }
      }
    }
  });
}

void max_pool2d_backward(const float* dy, const std::int32_t* mask, float* dx, const Conv2dGeometry& g,
                         int threads) {
  check(g, "max_pool2d_backward");
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
