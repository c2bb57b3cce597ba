#include "amct/depthwise.h"
#include "amct/avx2_lanes.h"
#include "amct/cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <thread>
#include <vector>

namespace amct {
namespace {

// One output row of a 3x3 dilation-1 depthwise plane with a column stride of 1, 16 outputs per AVX-512
// register (the last ones under a mask): each output's nine taps accumulate in the register, in Caffe's
// tap order, from fma(w0, x, 0), the bias added after the ninth: the row passes' multiply-adds in the
// same order, so the same bytes, without loading and storing the accumulator row once per tap
// (16 x 120 x 160: 0.28 -> 0.17 ms; 32 x 60 x 80: 0.155 -> 0.07; 128 x 15 x 20: 0.087 -> 0.029).
// r0, r1, r2: the padded input rows of the output row. (Reading the plane in place instead of its
// padded copy, with zeroing masked loads at the borders, measured no faster.)
__attribute__((target("avx512f"))) void row3x3_avx512(const float* r0, const float* r1, const float* r2,
                                                      const float* wc, float* out, int wo, const float* bias) {
  const __m512 w0 = _mm512_set1_ps(wc[0]), w1 = _mm512_set1_ps(wc[1]), w2 = _mm512_set1_ps(wc[2]);
  const __m512 w3 = _mm512_set1_ps(wc[3]), w4 = _mm512_set1_ps(wc[4]), w5 = _mm512_set1_ps(wc[5]);
  const __m512 w6 = _mm512_set1_ps(wc[6]), w7 = _mm512_set1_ps(wc[7]), w8 = _mm512_set1_ps(wc[8]);
  const __m512 zero = _mm512_setzero_ps();
  const __m512 b = _mm512_set1_ps(bias ? *bias : 0.0f);
  for (int ox = 0; ox < wo; ox += 16) {
    const int left = wo - ox;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
    __m512 a = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, r0 + ox), zero);
    a = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m, r0 + ox + 1), a);
    a = _mm512_fmadd_ps(w2, _mm512_maskz_loadu_ps(m, r0 + ox + 2), a);
    a = _mm512_fmadd_ps(w3, _mm512_maskz_loadu_ps(m, r1 + ox), a);
    a = _mm512_fmadd_ps(w4, _mm512_maskz_loadu_ps(m, r1 + ox + 1), a);
    a = _mm512_fmadd_ps(w5, _mm512_maskz_loadu_ps(m, r1 + ox + 2), a);
    a = _mm512_fmadd_ps(w6, _mm512_maskz_loadu_ps(m, r2 + ox), a);
    a = _mm512_fmadd_ps(w7, _mm512_maskz_loadu_ps(m, r2 + ox + 1), a);
    a = _mm512_fmadd_ps(w8, _mm512_maskz_loadu_ps(m, r2 + ox + 2), a);
    if (bias) a = _mm512_add_ps(a, b);
    _mm512_mask_storeu_ps(out + ox, m, a);
  }
}

// The same for a column stride of 2: lane l of a block needs padded columns 2(ox + l) + j, which two
// loads of 16 and a two-source permute gather (the even columns for tap 0, the odd ones for tap 1, and
// the even ones from column 2 on for tap 2); the nine multiply-adds per output in the scalar loop's
// order, so its bytes. The loads may run up to 34 floats past a row's last output: the padded buffer
// has that slack, and lanes past the row are not stored. (16 x 120 x 160 -> 60 x 80: 0.15 -> 0.085 ms;
// 32 channels 0.33 -> 0.19; 128 x 30 x 40 0.074 -> 0.053.)
__attribute__((target("avx512f"))) void row3x3s2_avx512(const float* r0, const float* r1, const float* r2,
                                                        const float* wc, float* out, int wo, const float* bias) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512 zero = _mm512_setzero_ps();
  const __m512 b = _mm512_set1_ps(bias ? *bias : 0.0f);
  const float* rows[3] = {r0, r1, r2};
  __m512 wv[9];
  for (int t = 0; t < 9; ++t) wv[t] = _mm512_set1_ps(wc[t]);
  for (int ox = 0; ox < wo; ox += 16) {
    const int left = wo - ox;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
    __m512 a = zero;
    for (int i = 0; i < 3; ++i) {
      const float* r = rows[i] + 2 * ox;
      const __m512 lo = _mm512_loadu_ps(r), hi = _mm512_loadu_ps(r + 16);
      const __m512 lo2 = _mm512_loadu_ps(r + 2), hi2 = _mm512_loadu_ps(r + 18);
      a = _mm512_fmadd_ps(wv[3 * i], _mm512_permutex2var_ps(lo, even, hi), a);
      a = _mm512_fmadd_ps(wv[3 * i + 1], _mm512_permutex2var_ps(lo, odd, hi), a);
      a = _mm512_fmadd_ps(wv[3 * i + 2], _mm512_permutex2var_ps(lo2, even, hi2), a);
    }
    if (bias) a = _mm512_add_ps(a, b);
    _mm512_mask_storeu_ps(out + ox, m, a);
  }
}

// row3x3_avx512 and row3x3s2_avx512 with AVX2 registers of 8 outputs (the same multiply-adds, so the same
// bytes); a row's last partial vector is stored through the stack (amct/avx2_lanes.h). The
// loads may run past a row's last output as the AVX-512 rows' do, within the padded buffer's slack.
template <int Stride>
__attribute__((target("avx2,fma"))) void row3x3_avx2(const float* r0, const float* r1, const float* r2,
                                                     const float* wc, float* out, int wo, const float* bias) {
  const float* rows[3] = {r0, r1, r2};
  __m256 wv[9];
  for (int t = 0; t < 9; ++t) wv[t] = _mm256_set1_ps(wc[t]);
  const __m256 b = _mm256_set1_ps(bias ? *bias : 0.0f);
  for (int ox = 0; ox < wo; ox += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int i = 0; i < 3; ++i) {
      const float* r = rows[i] + Stride * ox;
      if constexpr (Stride == 1) {
        a = _mm256_fmadd_ps(wv[3 * i], _mm256_loadu_ps(r), a);
        a = _mm256_fmadd_ps(wv[3 * i + 1], _mm256_loadu_ps(r + 1), a);
        a = _mm256_fmadd_ps(wv[3 * i + 2], _mm256_loadu_ps(r + 2), a);
      } else {
        a = _mm256_fmadd_ps(wv[3 * i], avx2_lanes::stride2<false>(r), a);
        a = _mm256_fmadd_ps(wv[3 * i + 1], avx2_lanes::stride2<true>(r), a);
        a = _mm256_fmadd_ps(wv[3 * i + 2], avx2_lanes::stride2<false>(r + 2), a);
      }
    }
    if (bias) a = _mm256_add_ps(a, b);
    avx2_lanes::store_first(out + ox, wo - ox, a);
  }
}

// The planes [first, last) of the batch. Each plane is copied once into a zero-padded buffer so the
// tap loops need no bounds checks: one output row at a time, each tap one multiply-add over the row
// (contiguous for stride 1, which the compiler vectorizes), taps in Caffe's order per element.
template <int Mode>  // 0: AVX2 + FMA, 1: portable, 2: AVX-512 (the clones differ only in instructions)
__attribute__((always_inline)) inline void planes(const float* x, const float* w, float* y, const Conv2dGeometry& g,
                                                  const float* bias, std::size_t first, std::size_t last) {
  const int hp = std::max(g.h + 2 * g.ph, (g.ho - 1) * g.sh + g.dh * (g.kh - 1) + 1);
  const int wp = std::max(g.w + 2 * g.pw, (g.wo - 1) * g.sw + g.dw * (g.kw - 1) + 1);
  std::vector<float> pad(static_cast<std::size_t>(hp) * wp + 64, 0.0f);  // (slack: row3x3s2_avx512)
  const std::size_t in_plane = static_cast<std::size_t>(g.h) * g.w;
  const std::size_t out_plane = static_cast<std::size_t>(g.ho) * g.wo;
  for (std::size_t p = first; p < last; ++p) {
    const float* xp = x + p * in_plane;
    const float* wc = w + (p % g.c) * static_cast<std::size_t>(g.kh) * g.kw;
    float* yp = y + p * out_plane;
    for (int r = 0; r < g.h; ++r) {  // the borders stay zero from the allocation
      std::copy(xp + static_cast<std::size_t>(r) * g.w, xp + static_cast<std::size_t>(r + 1) * g.w,
                pad.data() + static_cast<std::size_t>(r + g.ph) * wp + g.pw);
    }
    if constexpr (Mode != 1) {
      if (g.kh == 3 && g.kw == 3 && g.dh == 1 && g.dw == 1 && (g.sw == 1 || g.sw == 2)) {
        const auto row = Mode == 2 ? (g.sw == 1 ? row3x3_avx512 : row3x3s2_avx512)
                                   : (g.sw == 1 ? row3x3_avx2<1> : row3x3_avx2<2>);
        const float* b = bias ? bias + p % g.c : nullptr;
        for (int oy = 0; oy < g.ho; ++oy) {
          const float* r0 = pad.data() + static_cast<std::size_t>(oy * g.sh) * wp;
          row(r0, r0 + wp, r0 + 2 * static_cast<std::size_t>(wp), wc, yp + static_cast<std::size_t>(oy) * g.wo, g.wo,
              b);
        }
        continue;
      }
    }
    if (g.kh == 3 && g.kw == 3 && g.dh == 1 && g.dw == 1 && g.sw > 1) {
      // 3x3 with a stride (no vector rows, or a stride above 2): the nine taps of one output in
      // registers, the same multiply-adds in the same order (0.155 against 0.20 ms for 16 x 120 x 160
      // at stride 2 before the AVX-512 rows)
      const float b = bias ? bias[p % g.c] : 0.0f;
      const float w0 = wc[0], w1 = wc[1], w2 = wc[2], w3 = wc[3], w4 = wc[4], w5 = wc[5], w6 = wc[6], w7 = wc[7],
                  w8 = wc[8];
      const int s = g.sw;
      for (int oy = 0; oy < g.ho; ++oy) {
        const float* r0 = pad.data() + static_cast<std::size_t>(oy * g.sh) * wp;
        const float* r1 = r0 + wp;
        const float* r2 = r1 + wp;
        float* out = yp + static_cast<std::size_t>(oy) * g.wo;
        for (int ox = 0; ox < g.wo; ++ox) {
          const int c = ox * s;
          float a = std::fma(w0, r0[c], 0.0f);
          a = std::fma(w1, r0[c + 1], a);
          a = std::fma(w2, r0[c + 2], a);
          a = std::fma(w3, r1[c], a);
          a = std::fma(w4, r1[c + 1], a);
          a = std::fma(w5, r1[c + 2], a);
          a = std::fma(w6, r2[c], a);
          a = std::fma(w7, r2[c + 1], a);
          a = std::fma(w8, r2[c + 2], a);
          out[ox] = bias ? a + b : a;
        }
      }
      continue;
    }
    for (int oy = 0; oy < g.ho; ++oy) {
      float* acc = yp + static_cast<std::size_t>(oy) * g.wo;
      std::fill(acc, acc + g.wo, 0.0f);
      for (int i = 0; i < g.kh; ++i) {
        for (int j = 0; j < g.kw; ++j) {
          const float wv = wc[i * g.kw + j];
          const float* src = pad.data() + static_cast<std::size_t>(oy * g.sh + i * g.dh) * wp + j * g.dw;
          if (g.sw == 1) {
            for (int ox = 0; ox < g.wo; ++ox) acc[ox] = std::fma(wv, src[ox], acc[ox]);
          } else {
            for (int ox = 0; ox < g.wo; ++ox) acc[ox] = std::fma(wv, src[static_cast<std::size_t>(ox) * g.sw], acc[ox]);
          }
        }
      }
      if (bias) {
        const float b = bias[p % g.c];
        for (int ox = 0; ox < g.wo; ++ox) acc[ox] += b;
      }
    }
  }
}

__attribute__((target("avx2,fma"))) void planes_fma(const float* x, const float* w, float* y,
                                                    const Conv2dGeometry& g, const float* bias, std::size_t first,
                                                    std::size_t last) {
  planes<0>(x, w, y, g, bias, first, last);
}

__attribute__((target("avx512f,avx2,fma"))) void planes_avx512(const float* x, const float* w, float* y,
                                                                const Conv2dGeometry& g, const float* bias,
                                                                std::size_t first, std::size_t last) {
  planes<2>(x, w, y, g, bias, first, last);
}

void planes_generic(const float* x, const float* w, float* y, const Conv2dGeometry& g, const float* bias,
                    std::size_t first, std::size_t last) {
  planes<1>(x, w, y, g, bias, first, last);
}

}  // namespace

bool depthwise_has_fma() { return cpu_has_avx2(); }

void depthwise_conv2d(const float* x, const float* w, float* y, const Conv2dGeometry& g, int threads,
                      const float* bias) {
  check_geometry(g, "depthwise_conv2d");
  if ((g.ho - 1) * g.sh + g.dh * (g.kh - 1) + 1 > g.h + 2 * g.ph + g.sh ||
      (g.wo - 1) * g.sw + g.dw * (g.kw - 1) + 1 > g.w + 2 * g.pw + g.sw) {
    throw std::invalid_argument("depthwise_conv2d: output size does not fit the input");
  }
  const std::size_t total = static_cast<std::size_t>(g.n) * g.c;
  auto run = cpu_has_avx512f() ? planes_avx512 : depthwise_has_fma() ? planes_fma : planes_generic;
  const std::size_t workers = std::min<std::size_t>(std::max(threads, 1), total);
  if (workers <= 1) {
    run(x, w, y, g, bias, 0, total);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (std::size_t t = 1; t < workers; ++t) {
    pool.emplace_back(run, x, w, y, std::cref(g), bias, total * t / workers, total * (t + 1) / workers);
  }
  run(x, w, y, g, bias, 0, total / workers);
  for (auto& th : pool) th.join();
}

}  // namespace amct
