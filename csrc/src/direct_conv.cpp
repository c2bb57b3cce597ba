#include "amct/direct_conv.h"
#include "amct/cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <vector>

#include "amct/parallel.h"
#include "amct/register_block.h"

namespace amct {
namespace {

constexpr int kOut = register_block::kRows;  // output channels per register block

// The input of one image, zero-padded and split by column phase (phase r holds padded columns
// r, r + sw, ...): tap (c, i, j) of output (oy, ox) is element
// ox + (j*dw) / sw of row oy*sh + i*dh of phase (j*dw) % sw of channel c, a contiguous run in ox
// (the last block of a row is read with masked loads).
// Without padding, with stride 1 and every window inside the input, x itself is that (one phase,
// rows of W), read with masked loads at the end of each row.
struct Phases {
  int hp, wq;
  const float* base = nullptr;
  const float* row(const Conv2dGeometry& g, int c, int phase, int r) const {
    return base + ((static_cast<std::size_t>(c) * g.sw + phase) * hp + r) * wq;
  }
};

Phases split(const float* x, const Conv2dGeometry& g) {
  Phases p;
  p.hp = std::max(g.h + 2 * g.ph, (g.ho - 1) * g.sh + g.dh * (g.kh - 1) + 1);
  const int wp = std::max(g.w + 2 * g.pw, (g.wo - 1) * g.sw + g.dw * (g.kw - 1) + 1);
  if (g.sw == 1 && g.ph == 0 && g.pw == 0 && p.hp == g.h && wp == g.w) {
    p.wq = g.w;
    p.base = x;
    return p;
  }
  p.wq = (wp + g.sw - 1) / g.sw;
  // reused across calls (fresh memory costs a page fault per 4 KB): zeroed, then the interior copied
  static thread_local std::vector<float> buffer;
  const std::size_t size = static_cast<std::size_t>(g.c) * g.sw * p.hp * p.wq;
  if (buffer.size() < size) buffer.resize(size);
  std::fill(buffer.begin(), buffer.begin() + static_cast<std::ptrdiff_t>(size), 0.0f);
  p.base = buffer.data();
  for (int c = 0; c < g.c; ++c) {
    for (int r = 0; r < g.h; ++r) {
      const float* src = x + (static_cast<std::size_t>(c) * g.h + r) * g.w;
      for (int ph = 0; ph < g.sw; ++ph) {  // padded column ph + q*sw is input column ph + q*sw - pw
        float* dst = buffer.data() + ((static_cast<std::size_t>(c) * g.sw + ph) * p.hp + r + g.ph) * p.wq;
        int col = ph - g.pw, q = 0;
        while (col < 0) col += g.sw, ++q;
        for (; col < g.w; col += g.sw, ++q) dst[q] = src[col];
      }
    }
  }
  return p;
}

// What a folded chain does to each stored sum (conv_cols.h's channel_affine): * scale[o] (if scale),
// + bias[o] (if bias), NumPy's maximum(v, 0) (if relu), one float32 rounding each; here for all O channels.
using Epilogue = register_block::Epilogue;

// The epilogue over output row oy of image img, just written (in cache). Kept out of `rows`: live in
// its loops, the epilogue's values changed their register allocation and made them up to 2x slower.
__attribute__((target("avx512f"), noinline)) void map_row(float* y, const Conv2dGeometry& g, int o, std::size_t img,
                                                          std::size_t oy, const Epilogue& ep) {
  const __m512 zero = _mm512_setzero_ps();
  for (int oc = 0; oc < o; ++oc) {
    float* row = y + ((img * o + oc) * g.ho + oy) * g.wo;
    const __m512 sv = _mm512_set1_ps(ep.scale ? ep.scale[oc] : 1.0f);
    const __m512 bv = _mm512_set1_ps(ep.bias ? ep.bias[oc] : 0.0f);
    for (int ox = 0; ox < g.wo; ox += 16) {
      const int n = std::min(16, g.wo - ox);
      const __mmask16 m = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
      __m512 v = _mm512_maskz_loadu_ps(m, row + ox);
      if (ep.scale) v = _mm512_mul_ps(v, sv);
      if (ep.bias) v = _mm512_add_ps(v, bv);
      if (ep.relu) v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, zero, _CMP_NLE_UQ), v);  // v > 0 or NaN, else +0
      _mm512_mask_storeu_ps(row + ox, m, v);
    }
  }
}

// One register block (amct/register_block.h): outputs ox .. ox + count of kOut channels (outs of them
// stored, plane stride `plane`, the first at y), taps src[t] + ox, the epilogue applied as it stores.
template <int V>
__attribute__((target("avx512f"), noinline)) void block512(const float* const* src, int ox, const float* wb, int k,
                                                           int count, float* y, std::size_t plane, int outs,
                                                           const register_block::Epilogue& ep) {
  register_block::run512<V>([&](int t) { return src[t] + ox; }, wb, k, count, y, plane, outs, ep);
}

template <int V>
__attribute__((target("avx2,fma"), noinline)) void block256(const float* const* src, int ox, const float* wb, int k,
                                                            int count, float* y, std::size_t plane, int outs,
                                                            const register_block::Epilogue& ep) {
  register_block::run256<V>([&](int t) { return src[t] + ox; }, wb, k, count, y, plane, outs, ep);
}

// Output rows [first, last) of image img, register blocks of kVectors vectors of pixels (16 floats each
// with AVX-512, 8 with AVX2). With AVX-512 a scale or a ReLU is applied to each finished row (map_row,
// the bias in the stores); with AVX2 the whole epilogue is in the stores.
template <bool Avx512>
void rows(const Phases& p, const float* wpad, float* y, const Conv2dGeometry& g, int o, std::size_t img,
          std::size_t first, std::size_t last, const Epilogue& ep) {
  constexpr int kLanes = Avx512 ? 16 : 8;
  constexpr int kPix = register_block::kVectors * kLanes;
  const bool mapped = Avx512 && (ep.scale != nullptr || ep.relu);
  const int taps = g.kh * g.kw, k = g.c * taps;
  const int oblocks = (o + kOut - 1) / kOut;
  const std::size_t plane = static_cast<std::size_t>(g.ho) * g.wo;
  std::vector<const float*> src(static_cast<std::size_t>(k));
  for (std::size_t oy = first; oy < last; ++oy) {
    for (int c = 0; c < g.c; ++c) {
      for (int i = 0; i < g.kh; ++i) {
        for (int j = 0; j < g.kw; ++j) {
          const int col = j * g.dw;
          src[static_cast<std::size_t>(c * taps + i * g.kw + j)] =
              p.row(g, c, col % g.sw, static_cast<int>(oy) * g.sh + i * g.dh) + col / g.sw;
        }
      }
    }
    for (int ox = 0; ox < g.wo; ox += kPix) {
      const int n = std::min(kPix, g.wo - ox);
      const std::size_t row0 = (img * o * g.ho + oy) * g.wo + ox;  // output (img, 0, oy, ox)
      for (int ob = 0; ob < oblocks; ++ob) {
        const float* wb = wpad + static_cast<std::size_t>(ob) * k * kOut;  // (k, kOut) for this block
        const int outs = std::min(kOut, o - ob * kOut);
        float* yb = y + row0 + static_cast<std::size_t>(ob) * kOut * plane;
        Epilogue bep;  // this block's channels' share, unless map_row applies it
        if (!mapped) {
          bep.scale = ep.scale ? ep.scale + ob * kOut : nullptr;
          bep.bias = ep.bias ? ep.bias + ob * kOut : nullptr;
          bep.relu = ep.relu;
        }
        if constexpr (Avx512) {
          if (n > 32) block512<3>(src.data(), ox, wb, k, n, yb, plane, outs, bep);
          else if (n > 16) block512<2>(src.data(), ox, wb, k, n, yb, plane, outs, bep);
          else block512<1>(src.data(), ox, wb, k, n, yb, plane, outs, bep);
        } else {
          if (n > 16) block256<3>(src.data(), ox, wb, k, n, yb, plane, outs, bep);
          else if (n > 8) block256<2>(src.data(), ox, wb, k, n, yb, plane, outs, bep);
          else block256<1>(src.data(), ox, wb, k, n, yb, plane, outs, bep);
        }
      }
    }
    if (mapped) map_row(y, g, o, img, oy, ep);
  }
}

}  // namespace

bool direct_conv_available() { return cpu_has_avx2(); }

void direct_conv2d(const float* x, const float* w, float* y, const Conv2dGeometry& g, int o, int threads,
                   const float* bias) {
  direct_conv2d(x, w, y, g, o, threads, nullptr, bias, false);
}

void direct_conv2d(const float* x, const float* w, float* y, const Conv2dGeometry& g, int o, int threads,
                   const float* scale, const float* bias, bool relu) {
  if (!direct_conv_available()) throw std::invalid_argument("direct_conv2d needs an AVX2 CPU");
  if (g.n < 0 || g.c <= 0 || g.h <= 0 || g.w <= 0 || g.kh <= 0 || g.kw <= 0 || g.sh <= 0 || g.sw <= 0 ||
      g.ph < 0 || g.pw < 0 || g.dh <= 0 || g.dw <= 0 || g.ho <= 0 || g.wo <= 0 || o <= 0 ||
      g.c * g.kh * g.kw > kDirectMaxK) {
    throw std::invalid_argument("direct_conv2d: invalid geometry");
  }
  const int k = g.c * g.kh * g.kw;
  const int oblocks = (o + kOut - 1) / kOut;
  static thread_local std::vector<float> wpad;  // (block, k, kOut), zero past O
  wpad.assign(static_cast<std::size_t>(oblocks) * k * kOut, 0.0f);
  for (int oc = 0; oc < o; ++oc) {
    for (int t = 0; t < k; ++t) {
      wpad[(static_cast<std::size_t>(oc / kOut) * k + t) * kOut + oc % kOut] = w[static_cast<std::size_t>(oc) * k + t];
    }
  }
  Epilogue ep;
  ep.scale = scale;
  ep.bias = bias;
  ep.relu = relu;
  const bool avx512 = cpu_has_avx512f();
  const float* wp = wpad.data();  // (a thread_local is each thread's own: the workers get the pointer)
  for (int img = 0; img < g.n; ++img) {
    const Phases p = split(x + static_cast<std::size_t>(img) * g.c * g.h * g.w, g);
    parallel_for(static_cast<std::size_t>(g.ho), threads, [&](std::size_t first, std::size_t last) {
      if (avx512) rows<true>(p, wp, y, g, o, static_cast<std::size_t>(img), first, last, ep);
      else rows<false>(p, wp, y, g, o, static_cast<std::size_t>(img), first, last, ep);
    });
  }
}

}  // namespace amct
