#include "amct/conv_cols.h"
#include "amct/cpu.h"

#include <algorithm>
#include <cmath>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "amct/parallel.h"

namespace amct {
namespace {

// NumPy's maximum(v, 0): v where v > 0 or v is NaN, else +0 (so -0 gives +0).
inline float numpy_relu(float v) { return (v > 0.0f || v != v) ? v : 0.0f; }

}  // namespace

namespace {

// MAX pooling of planes [first, last): separable, the max over each input row's clipped column windows
// (taps outer, so the loops over the outputs vectorize), then over the clipped rows. Both passes keep
// the running max unless a value is strictly greater (NaN never wins), taps in row-major order, so the
// result is Caffe's loop's (first of equal values included).
template <int Dummy>
__attribute__((always_inline)) inline void max_planes(const float* x, float* y, const Conv2dGeometry& g,
                                                      std::size_t first, std::size_t last) {
  const std::size_t in_plane = static_cast<std::size_t>(g.h) * g.w;
  const std::size_t out_plane = static_cast<std::size_t>(g.ho) * g.wo;
  std::vector<float> rows(static_cast<std::size_t>(g.h) * g.wo);
  for (std::size_t pl = first; pl < last; ++pl) {
    const float* xp = x + pl * in_plane;
    for (int r = 0; r < g.h; ++r) {
      const float* src = xp + static_cast<std::size_t>(r) * g.w;
      float* dst = rows.data() + static_cast<std::size_t>(r) * g.wo;
      std::fill(dst, dst + g.wo, -FLT_MAX);
      for (int j = 0; j < g.kw; ++j) {
        int lo, hi;
        valid_outputs(j - g.pw, g.sw, g.w, g.wo, &lo, &hi);
        const float* s = src + (lo * g.sw - g.pw + j);
        float* d = dst + lo;
        const int n = hi - lo;
        if (g.sw == 1) {
          for (int k = 0; k < n; ++k) d[k] = s[k] > d[k] ? s[k] : d[k];
        } else if (g.sw == 2) {
          for (int k = 0; k < n; ++k) d[k] = s[2 * k] > d[k] ? s[2 * k] : d[k];
        } else {
          for (int k = 0; k < n; ++k) d[k] = s[k * g.sw] > d[k] ? s[k * g.sw] : d[k];
        }
      }
    }
    float* yp = y + pl * out_plane;
    for (int oy = 0; oy < g.ho; ++oy) {
      const int hs = oy * g.sh - g.ph;
      const int he = std::min(hs + g.kh, g.h);
      float* out = yp + static_cast<std::size_t>(oy) * g.wo;
      std::fill(out, out + g.wo, -FLT_MAX);
      for (int r = std::max(hs, 0); r < he; ++r) {
        const float* src = rows.data() + static_cast<std::size_t>(r) * g.wo;
        for (int ox = 0; ox < g.wo; ++ox) out[ox] = src[ox] > out[ox] ? src[ox] : out[ox];
      }
    }
  }
}

__attribute__((target("avx2"))) void max_planes_avx2(const float* x, float* y, const Conv2dGeometry& g,
                                                     std::size_t first, std::size_t last) {
  max_planes<0>(x, y, g, first, last);
}

void max_planes_generic(const float* x, float* y, const Conv2dGeometry& g, std::size_t first, std::size_t last) {
  max_planes<1>(x, y, g, first, last);
}

}  // namespace

void max_pool2d(const float* x, float* y, const Conv2dGeometry& g, int threads) {
  check_geometry(g, "max_pool2d");
  auto run = max_planes_generic;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (cpu_has_avx2()) run = max_planes_avx2;
#endif
  parallel_for(static_cast<std::size_t>(g.n) * g.c, threads,
               [&](std::size_t first, std::size_t last) { run(x, y, g, first, last); });
}

namespace {

// The outputs [lo, hi) whose window reads column ox*sw + off of the input (0 <= it < w).
inline void tap_outputs(int off, int sw, int w, int wo, int* lo, int* hi) {
  *lo = off >= 0 ? 0 : (-off + sw - 1) / sw;
  *hi = w - 1 - off < 0 ? 0 : std::min(wo, (w - 1 - off) / sw + 1);
  if (*hi < *lo) *hi = *lo;
}

// Each output row: for every tap (r, j) of the windows, in Caffe's row-major order, the outputs whose window
// holds that cell inside the image add it, side by side (a cell outside the image is skipped, as Caffe's
// clipped loops skip it), so every sum keeps Caffe's order from +0.
template <int Isa>  // only to give each target its own copy (see ave_planes_avx2)
__attribute__((always_inline)) inline void ave_planes(const float* x, float* y, const Conv2dGeometry& g,
                                                      std::size_t first, std::size_t last) {
  std::vector<float> acc_buffer(static_cast<std::size_t>(g.wo));
  float* __restrict__ acc = acc_buffer.data();
  std::vector<int> lo(static_cast<std::size_t>(g.kw)), hi(static_cast<std::size_t>(g.kw));
  for (int j = 0; j < g.kw; ++j) tap_outputs(j - g.pw, g.sw, g.w, g.wo, &lo[j], &hi[j]);
  for (std::size_t plane = first; plane < last; ++plane) {
    const float* xp = x + plane * static_cast<std::size_t>(g.h) * g.w;
    float* yp = y + plane * static_cast<std::size_t>(g.ho) * g.wo;
    for (int oy = 0; oy < g.ho; ++oy) {
      const int hs0 = oy * g.sh - g.ph, he0 = std::min(hs0 + g.kh, g.h + g.ph);
      const int hs = std::max(hs0, 0), he = std::min(he0, g.h);
      std::fill(acc, acc + g.wo, 0.0f);
      for (int r = hs; r < he; ++r) {
        const float* __restrict__ row = xp + static_cast<std::size_t>(r) * g.w;
        for (int j = 0; j < g.kw; ++j) {
          const std::ptrdiff_t off = j - g.pw;  // input column of output ox: ox * sw + off (>= 0 from lo[j] on)
          const int o0 = lo[j], o1 = hi[j];
          if (g.sw == 1) {
            for (int ox = o0; ox < o1; ++ox) acc[ox] += row[ox + off];
          } else {
            for (int ox = o0; ox < o1; ++ox) acc[ox] += row[static_cast<std::ptrdiff_t>(ox) * g.sw + off];
          }
        }
      }
      float* out = yp + static_cast<std::size_t>(oy) * g.wo;
      for (int ox = 0; ox < g.wo; ++ox) {
        const int ws0 = ox * g.sw - g.pw, we0 = std::min(ws0 + g.kw, g.w + g.pw);
        out[ox] = acc[ox] / static_cast<float>((he0 - hs0) * (we0 - ws0));
      }
    }
  }
}

__attribute__((target("avx2"))) void ave_planes_avx2(const float* x, float* y, const Conv2dGeometry& g,
                                                     std::size_t first, std::size_t last) {
  ave_planes<0>(x, y, g, first, last);
}

void ave_planes_generic(const float* x, float* y, const Conv2dGeometry& g, std::size_t first, std::size_t last) {
  ave_planes<1>(x, y, g, first, last);
}

// Global pooling (one window = the whole plane): sixteen planes' running sums side by side.
void ave_global(const float* x, float* y, std::size_t hw, std::size_t first, std::size_t last, float size) {
  constexpr std::size_t kPlanes = 16;
  std::size_t plane = first;
  for (; plane + kPlanes <= last; plane += kPlanes) {
    float acc[kPlanes] = {};
    const float* xp = x + plane * hw;
    for (std::size_t i = 0; i < hw; ++i) {
      for (std::size_t p = 0; p < kPlanes; ++p) acc[p] += xp[p * hw + i];
    }
    for (std::size_t p = 0; p < kPlanes; ++p) y[plane + p] = acc[p] / size;
  }
  for (; plane < last; ++plane) {
    float s = 0.0f;
    const float* xp = x + plane * hw;
    for (std::size_t i = 0; i < hw; ++i) s += xp[i];
    y[plane] = s / size;
  }
}

}  // namespace

void ave_pool2d(const float* x, float* y, const Conv2dGeometry& g, int threads) {
  check_geometry(g, "ave_pool2d");
  const std::size_t planes = static_cast<std::size_t>(g.n) * g.c;
  if (g.kh == g.h && g.kw == g.w && g.ph == 0 && g.pw == 0 && g.ho == 1 && g.wo == 1) {
    const std::size_t hw = static_cast<std::size_t>(g.h) * g.w;
    parallel_for(planes, threads, [&](std::size_t first, std::size_t last) {
      ave_global(x, y, hw, first, last, static_cast<float>(g.h * g.w));
    });
    return;
  }
  auto run = ave_planes_generic;  // plain adds: the same bytes on every instruction set
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (cpu_has_avx2()) run = ave_planes_avx2;
#endif
  parallel_for(planes, threads, [&](std::size_t first, std::size_t last) { run(x, y, g, first, last); });
}

void channel_affine(float* y, std::size_t n, std::size_t c, std::size_t p, const float* a, const float* b, bool relu,
                    int threads) {
  parallel_for(n * c, threads, [&](std::size_t first, std::size_t last) {
    for (std::size_t pl = first; pl < last; ++pl) {
      float* v = y + pl * p;
      const std::size_t ch = pl % c;
      if (a) {
        const float s = a[ch];
        for (std::size_t i = 0; i < p; ++i) v[i] *= s;
      }
      if (b) {
        const float t = b[ch];
        for (std::size_t i = 0; i < p; ++i) v[i] += t;
      }
      if (relu) {
        for (std::size_t i = 0; i < p; ++i) v[i] = numpy_relu(v[i]);
      }
    }
  });
}

namespace {
void relu_run(const float* x, float* y, std::size_t len) {
  for (std::size_t i = 0; i < len; ++i) y[i] = numpy_relu(x[i]);
}
}  // namespace

void relu(const float* x, float* y, std::size_t n, int threads) {
  constexpr std::size_t kChunk = 1 << 14;  // values per work item
  parallel_for((n + kChunk - 1) / kChunk, threads, [&](std::size_t first, std::size_t last) {
    relu_run(x + first * kChunk, y + first * kChunk, std::min(n, last * kChunk) - first * kChunk);
  });
}

// y = u > 0 ? u : u * s over one run. The product everywhere, then a bitwise select: GCC keeps the
// conditional form a branch on the data's sign (it may not hoist a float multiply that could trap),
// 10-20x slower on mixed signs. (A separate function with the length by value: inside the caller's
// lambda, which captures it by reference, GCC cannot count the iterations and does not vectorize.)
namespace {
void prelu_run(const float* u, float* v, std::size_t len, float s) {
  for (std::size_t i = 0; i < len; ++i) {
    const float m = u[i] * s;
    std::uint32_t ub, mb;
    std::memcpy(&ub, u + i, sizeof ub);
    std::memcpy(&mb, &m, sizeof mb);
    const std::uint32_t keep = 0u - static_cast<std::uint32_t>(u[i] > 0.0f);
    const std::uint32_t r = (ub & keep) | (mb & ~keep);
    std::memcpy(v + i, &r, sizeof r);
  }
}
}  // namespace

void prelu(const float* x, const float* a, float* y, std::size_t n, std::size_t c, std::size_t p, bool shared,
           int threads) {
  parallel_for(n * c, threads, [&](std::size_t first, std::size_t last) {
    for (std::size_t pl = first; pl < last; ++pl) prelu_run(x + pl * p, y + pl * p, p, a[shared ? 0 : pl % c]);
  });
}

void affine_add_relu(float* y, const float* other, float* s, std::size_t n, std::size_t c, std::size_t p,
                     const float* a, const float* b, int threads) {
  parallel_for(n * c, threads, [&](std::size_t first, std::size_t last) {
    for (std::size_t pl = first; pl < last; ++pl) {
      float* v = y + pl * p;
      const float* o = other + pl * p;
      float* out = s + pl * p;
      const float sa = a[pl % c], sb = b[pl % c];
      for (std::size_t i = 0; i < p; ++i) {
        const float t = v[i] * sa;
        v[i] = t + sb;
        out[i] = numpy_relu(v[i] + o[i]);
      }
    }
  });
}

// y = a > b ? a : b, as a bitwise select (GCC vectorizes the select, not the conditional form on floats).
namespace {
void greater_select_run(const float* a, const float* b, float* y, std::size_t len) {
  for (std::size_t i = 0; i < len; ++i) {
    std::uint32_t ab, bb;
    std::memcpy(&ab, a + i, sizeof ab);
    std::memcpy(&bb, b + i, sizeof bb);
    const std::uint32_t keep = 0u - static_cast<std::uint32_t>(a[i] > b[i]);
    const std::uint32_t r = (ab & keep) | (bb & ~keep);
    std::memcpy(y + i, &r, sizeof r);
  }
}
}  // namespace

void greater_select(const float* a, const float* b, float* y, std::size_t n, int threads) {
  constexpr std::size_t kBlock = 1 << 14;  // items of the split: blocks of values
  parallel_for((n + kBlock - 1) / kBlock, threads, [&](std::size_t first, std::size_t last) {
    const std::size_t begin = first * kBlock;
    greater_select_run(a + begin, b + begin, y + begin, std::min(n, last * kBlock) - begin);
  });
}

// y = fma(a, x, y): OpenBLAS's saxpy kernels fuse the multiply-add. std::fma is exact wherever it runs (the FMA
// instruction in the clone, libm's fmaf in the portable loop), so both give the same bytes.
namespace {
template <int Dummy>
__attribute__((always_inline)) inline void axpy_run(float a, const float* x, float* y, std::size_t len) {
  for (std::size_t i = 0; i < len; ++i) y[i] = std::fma(a, x[i], y[i]);
}
__attribute__((target("avx2,fma"))) void axpy_fma(float a, const float* x, float* y, std::size_t len) {
  axpy_run<0>(a, x, y, len);
}
void axpy_portable(float a, const float* x, float* y, std::size_t len) { axpy_run<1>(a, x, y, len); }
}  // namespace

void fused_axpy(float a, const float* x, float* y, std::size_t n, int threads) {
  auto run = cpu_has_avx2() ? axpy_fma : axpy_portable;
  constexpr std::size_t kBlock = 1 << 14;
  parallel_for((n + kBlock - 1) / kBlock, threads, [&](std::size_t first, std::size_t last) {
    const std::size_t begin = first * kBlock;
    run(a, x + begin, y + begin, std::min(n, last * kBlock) - begin);
  });
}

void add_relu(const float* a, const float* b, float* y, std::size_t n, int threads) {
  constexpr std::size_t kBlock = 1 << 14;  // items of the split: blocks of values
  parallel_for((n + kBlock - 1) / kBlock, threads, [&](std::size_t first, std::size_t last) {
    const std::size_t end = std::min(n, last * kBlock);
    for (std::size_t i = first * kBlock; i < end; ++i) y[i] = numpy_relu(a[i] + b[i]);
  });
}

}  // namespace amct
