#include "amct/winograd.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "amct/cpu.h"
#include "amct/parallel.h"
#include "amct/winograd_simd.h"
#include "amct/winograd_tile.h"

namespace amct {
namespace {

void check(const WinogradGeometry& g) {
  if (g.n < 0 || g.c <= 0 || g.h <= 0 || g.w <= 0 || g.o <= 0 || g.ho <= 0 || g.wo <= 0 || g.ph < 0 || g.pw < 0 ||
      (g.m != 2 && g.m != 4) || g.th != (g.ho + g.m - 1) / g.m || g.tw != (g.wo + g.m - 1) / g.m ||
      g.ho != g.h + 2 * g.ph - 2 || g.wo != g.w + 2 * g.pw - 2) {
    throw std::invalid_argument("winograd: invalid geometry");
  }
}

// The portable loops (CPUs without AVX2): a tile row at a time, each tile's values gathered through the
// shared tile arithmetic of amct/winograd_tile.h with a float for a vector; the reference the vector paths
// are tested against. (Each pass writes its results contiguously along the tile row: one tile at a time,
// the 36 scattered stores per tile made these loops 3-9x slower.)
template <int M>
void input_planes(const float* x, float* v, const WinogradGeometry& g, std::size_t first, std::size_t last) {
  constexpr int A = M + 2;
  const int hp = g.th * M + 2, wp = g.tw * M + 2;
  const std::size_t tiles = static_cast<std::size_t>(g.th) * g.tw;
  const std::size_t cols = static_cast<std::size_t>(g.n) * tiles;      // columns of each V[xi, nu]
  const std::size_t slab = static_cast<std::size_t>(g.c) * cols;       // floats of each V[xi, nu]
  std::vector<float> pad(static_cast<std::size_t>(hp) * wp, 0.0f);
  std::vector<float> u(static_cast<std::size_t>(A) * A * g.tw);        // u[i][nu][tx]: rows transformed
  for (std::size_t pl = first; pl < last; ++pl) {
    const std::size_t img = pl / g.c, ch = pl % g.c;
    const float* xp = x + pl * static_cast<std::size_t>(g.h) * g.w;
    const int rows = std::min(g.h, hp - g.ph), width = std::min(g.w, wp - g.pw);
    for (int r = 0; r < rows; ++r) {  // borders stay zero: the interior is the same region every plane
      std::copy(xp + static_cast<std::size_t>(r) * g.w, xp + static_cast<std::size_t>(r) * g.w + width,
                pad.data() + static_cast<std::size_t>(r + g.ph) * wp + g.pw);
    }
    for (int ty = 0; ty < g.th; ++ty) {
      for (int i = 0; i < A; ++i) {
        const float* row = pad.data() + static_cast<std::size_t>(ty * M + i) * wp;
        for (int tx = 0; tx < g.tw; ++tx) {
          float o[A];
          winograd_tile::bt<M>(row + tx * M, o);
          for (int nu = 0; nu < A; ++nu) u[static_cast<std::size_t>(i * A + nu) * g.tw + tx] = o[nu];
        }
      }
      float* dst = v + ch * cols + img * tiles + static_cast<std::size_t>(ty) * g.tw;
      for (int nu = 0; nu < A; ++nu) {
        for (int tx = 0; tx < g.tw; ++tx) {
          float d[A], o[A];
          for (int i = 0; i < A; ++i) d[i] = u[static_cast<std::size_t>(i * A + nu) * g.tw + tx];
          winograd_tile::bt<M>(d, o);
          for (int xi = 0; xi < A; ++xi) dst[(xi * A + nu) * slab + tx] = o[xi];
        }
      }
    }
  }
}

template <int M>
void output_planes(const float* mm, float* y, const WinogradGeometry& g, const float* a, const float* b, bool relu,
                   std::size_t first, std::size_t last) {
  constexpr int A = M + 2;
  const std::size_t tiles = static_cast<std::size_t>(g.th) * g.tw;
  const std::size_t cols = static_cast<std::size_t>(g.n) * tiles;
  const std::size_t slab = static_cast<std::size_t>(g.o) * cols;
  std::vector<float> s(static_cast<std::size_t>(A) * M * g.tw);   // s[xi][k][tx]: columns transformed
  std::vector<float> t(static_cast<std::size_t>(M) * M * g.tw);   // t[k'][k][tx]: the output tiles
  for (std::size_t pl = first; pl < last; ++pl) {
    const std::size_t img = pl / g.o, oc = pl % g.o;
    const float sa = a ? a[oc] : 1.0f, sb = b ? b[oc] : 0.0f;
    float* yp = y + pl * static_cast<std::size_t>(g.ho) * g.wo;
    for (int ty = 0; ty < g.th; ++ty) {
      const float* src = mm + oc * cols + img * tiles + static_cast<std::size_t>(ty) * g.tw;
      for (int xi = 0; xi < A; ++xi) {
        for (int tx = 0; tx < g.tw; ++tx) {
          float m[A], o[M];
          for (int nu = 0; nu < A; ++nu) m[nu] = src[(xi * A + nu) * slab + tx];
          winograd_tile::at<M>(m, o);
          for (int k = 0; k < M; ++k) s[static_cast<std::size_t>(xi * M + k) * g.tw + tx] = o[k];
        }
      }
      for (int k = 0; k < M; ++k) {
        for (int tx = 0; tx < g.tw; ++tx) {
          float col[A], o[M];
          for (int xi = 0; xi < A; ++xi) col[xi] = s[static_cast<std::size_t>(xi * M + k) * g.tw + tx];
          winograd_tile::at<M>(col, o);
          for (int kr = 0; kr < M; ++kr) t[static_cast<std::size_t>(kr * M + k) * g.tw + tx] = o[kr];
        }
      }
      const int rows = std::min(M, g.ho - ty * M);
      for (int kr = 0; kr < rows; ++kr) {
        float* out = yp + static_cast<std::size_t>(ty * M + kr) * g.wo;
        const float* tr = t.data() + static_cast<std::size_t>(kr) * M * g.tw;
        for (int tx = 0; tx < g.tw; ++tx) {
          const int cmax = std::min(M, g.wo - tx * M);
          for (int k = 0; k < cmax; ++k) {
            float val = tr[k * g.tw + tx];
            if (a) val *= sa;
            if (b) val += sb;
            if (relu) val = (val > 0.0f || val != val) ? val : 0.0f;  // NumPy's maximum(val, 0)
            out[tx * M + k] = val;
          }
        }
      }
    }
  }
}

}  // namespace

int winograd_simd_level() { return simd_level(); }

void winograd_input(const float* x, float* v, const WinogradGeometry& g, int threads) {
  check(g);
  const int level = winograd_simd_level();
  if (level >= 2) return winograd_input_avx512(x, v, g, threads);
  if (level == 1) return winograd_input_avx2(x, v, g, threads);
  parallel_for(static_cast<std::size_t>(g.n) * g.c, threads, [&](std::size_t first, std::size_t last) {
    if (g.m == 2) input_planes<2>(x, v, g, first, last);
    else input_planes<4>(x, v, g, first, last);
  });
}

void winograd_output(const float* mm, float* y, const WinogradGeometry& g, const float* a, const float* b, bool relu,
                     int threads) {
  check(g);
  const int level = winograd_simd_level();
  if (level >= 2) return winograd_output_avx512(mm, y, g, a, b, relu, threads);
  if (level == 1) return winograd_output_avx2(mm, y, g, a, b, relu, threads);
  parallel_for(static_cast<std::size_t>(g.n) * g.o, threads, [&](std::size_t first, std::size_t last) {
    if (g.m == 2) output_planes<2>(mm, y, g, a, b, relu, first, last);
    else output_planes<4>(mm, y, g, a, b, relu, first, last);
  });
}

}  // namespace amct
