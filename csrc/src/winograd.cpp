#include "amct/winograd.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <vector>

#include "amct/cpu.h"
#include "amct/parallel.h"
#include "amct/winograd_simd.h"

namespace amct {
namespace {

std::atomic<int> simd_limit{2};

// d[0..alpha) (stride sd) -> o[0..alpha) (stride so): B^T d.
inline void bt4(const float* d, std::size_t sd, float* o, std::size_t so) {  // F(2x2, 3x3)
  const float d0 = d[0], d1 = d[sd], d2 = d[2 * sd], d3 = d[3 * sd];
  o[0] = d0 - d2;
  o[so] = d1 + d2;
  o[2 * so] = d2 - d1;
  o[3 * so] = d1 - d3;
}

inline void bt6(const float* d, std::size_t sd, float* o, std::size_t so) {  // F(4x4, 3x3)
  const float d0 = d[0], d1 = d[sd], d2 = d[2 * sd], d3 = d[3 * sd], d4 = d[4 * sd], d5 = d[5 * sd];
  const float p = d4 - 4.0f * d2, q = d3 - 4.0f * d1, r = d4 - d2, s = 2.0f * (d3 - d1);
  o[0] = (4.0f * d0 - 5.0f * d2) + d4;
  o[so] = p + q;
  o[2 * so] = p - q;
  o[3 * so] = r + s;
  o[4 * so] = r - s;
  o[5 * so] = (4.0f * d1 - 5.0f * d3) + d5;
}

// v[0..alpha) (stride sv) -> y[0..m) (stride sy): A^T v.
inline void at4(const float* v, std::size_t sv, float* y, std::size_t sy) {
  const float m1 = v[sv], m2 = v[2 * sv];
  y[0] = (v[0] + m1) + m2;
  y[sy] = (m1 - m2) - v[3 * sv];
}

inline void at6(const float* v, std::size_t sv, float* y, std::size_t sy) {
  const float m1 = v[sv], m2 = v[2 * sv], m3 = v[3 * sv], m4 = v[4 * sv];
  const float a = m1 + m2, b = m1 - m2, c = m3 + m4, d = m3 - m4;
  y[0] = (v[0] + a) + c;
  y[sy] = b + 2.0f * d;
  y[2 * sy] = a + 4.0f * c;
  y[3 * sy] = (b + 8.0f * d) + v[5 * sv];
}

void check(const WinogradGeometry& g) {
  if (g.n < 0 || g.c <= 0 || g.h <= 0 || g.w <= 0 || g.o <= 0 || g.ho <= 0 || g.wo <= 0 || g.ph < 0 || g.pw < 0 ||
      (g.m != 2 && g.m != 4) || g.th != (g.ho + g.m - 1) / g.m || g.tw != (g.wo + g.m - 1) / g.m ||
      g.ho != g.h + 2 * g.ph - 2 || g.wo != g.w + 2 * g.pw - 2) {
    throw std::invalid_argument("winograd: invalid geometry");
  }
}

template <int M>
void input_planes(const float* x, float* v, const WinogradGeometry& g, std::size_t first, std::size_t last) {
  constexpr int A = M + 2;
  auto bt = M == 2 ? bt4 : bt6;
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
        for (int tx = 0; tx < g.tw; ++tx) bt(row + tx * M, 1, u.data() + (i * A) * g.tw + tx, g.tw);
      }
      float* dst = v + ch * cols + img * tiles + static_cast<std::size_t>(ty) * g.tw;
      for (int nu = 0; nu < A; ++nu) {
        for (int tx = 0; tx < g.tw; ++tx) {
          bt(u.data() + nu * g.tw + tx, static_cast<std::size_t>(A) * g.tw, dst + nu * slab + tx, A * slab);
        }
      }
    }
  }
}

template <int M>
void output_planes(const float* mm, float* y, const WinogradGeometry& g, const float* a, const float* b, bool relu,
                   std::size_t first, std::size_t last) {
  constexpr int A = M + 2;
  auto at = M == 2 ? at4 : at6;
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
        for (int tx = 0; tx < g.tw; ++tx) at(src + xi * A * slab + tx, slab, s.data() + xi * M * g.tw + tx, g.tw);
      }
      for (int k = 0; k < M; ++k) {
        for (int tx = 0; tx < g.tw; ++tx) {
          at(s.data() + k * g.tw + tx, static_cast<std::size_t>(M) * g.tw, t.data() + k * g.tw + tx,
             static_cast<std::size_t>(M) * g.tw);
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

int winograd_simd_level() { return std::min(cpu_has_avx512f() ? 2 : cpu_has_avx2() ? 1 : 0, simd_limit.load()); }

void set_winograd_simd_limit(int level) { simd_limit.store(level); }

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
