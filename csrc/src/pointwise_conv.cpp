#include "amct/pointwise_conv.h"

#include <immintrin.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "amct/cpu.h"
#include "amct/parallel.h"
#include "amct/register_block.h"

namespace amct {
namespace {

constexpr int kRows = register_block::kRows;  // output channels per register block
constexpr std::size_t kSpan = 192;             // pixels per work item (measured: 48 to 768, best at 192-384)

// One register block (amct/register_block.h): channels [o0, o0 + rows) of the output, pixels
// [p0, p0 + count) of image img; wb (k, kRows) the block's weights, xs = x + (img*K)*P + p0.
template <int V>
__attribute__((target("avx512f"), noinline)) void block512(const float* xs, const float* wb, float* y,
                                                           std::size_t img, int k, std::size_t p, std::size_t p0,
                                                           int o0, int rows, int o, int count,
                                                           const register_block::Epilogue& ep) {
  register_block::run512<V>([&](int t) { return xs + static_cast<std::size_t>(t) * p; }, wb, k, count,
                            y + (img * o + o0) * p + p0, p, rows, ep);
}

template <int V>
__attribute__((target("avx2,fma"), noinline)) void block256(const float* xs, const float* wb, float* y,
                                                            std::size_t img, int k, std::size_t p, std::size_t p0,
                                                            int o0, int rows, int o, int count,
                                                            const register_block::Epilogue& ep) {
  register_block::run256<V>([&](int t) { return xs + static_cast<std::size_t>(t) * p; }, wb, k, count,
                            y + (img * o + o0) * p + p0, p, rows, ep);
}

// Pixels [p0, p1) of image img, all output channels: per block of kRows channels, the register
// blocks left to right (the block's weights stay in cache, each output row is written in one run),
// kVectors vectors of 16 (AVX-512) or 8 (AVX2) pixels each.
// next: the input of the span this thread does next (its first pixel of channel 0), next_len its pixels;
// null for none.
template <bool Avx512>
void span(const float* x, const float* wpack, float* y, std::size_t img, int k, std::size_t p, std::size_t p0,
          std::size_t p1, int o, const PointwiseEpilogue& ep, const float* next, std::size_t next_len) {
  constexpr int kLanes = Avx512 ? 16 : 8;
  constexpr std::size_t kPixels = register_block::kVectors * kLanes;
  const float* xs = x + img * k * p;
  const int blocks = (o + kRows - 1) / kRows;
  const std::size_t lines = next ? (next_len + 15) / 16 : 0;
  for (int o0 = 0, ob = 0; o0 < o; o0 += kRows, ++ob) {
    // The next span's input rows, a share per block of channels, requested into L2: each of the K rows of a
    // span is its own 768-byte run, too many streams for the hardware prefetchers when the input comes
    // from memory (open_nsfw's 56x56 layer of K = 128, 32 channels, in the net: 3.4-4.0 -> 3.1-3.5 ms).
    if (next) {
      const int r0 = static_cast<int>(static_cast<long>(k) * ob / blocks);
      const int r1 = static_cast<int>(static_cast<long>(k) * (ob + 1) / blocks);
      for (int r = r0; r < r1; ++r) {
        for (std::size_t l = 0; l < lines; ++l) {
          _mm_prefetch(reinterpret_cast<const char*>(next + static_cast<std::size_t>(r) * p + 16 * l), _MM_HINT_T1);
        }
      }
    }
    const float* wb = wpack + static_cast<std::size_t>(o0) * k;
    const int rows = std::min(kRows, o - o0);
    register_block::Epilogue bep;
    bep.scale = ep.scale ? ep.scale + o0 : nullptr;
    bep.bias = ep.bias ? ep.bias + o0 : nullptr;
    bep.relu = ep.relu;
    for (std::size_t q = p0; q < p1; q += kPixels) {
      const int n = static_cast<int>(std::min<std::size_t>(p1 - q, kPixels));
      if constexpr (Avx512) {
        if (n > 32) block512<3>(xs + q, wb, y, img, k, p, q, o0, rows, o, n, bep);
        else if (n > 16) block512<2>(xs + q, wb, y, img, k, p, q, o0, rows, o, n, bep);
        else block512<1>(xs + q, wb, y, img, k, p, q, o0, rows, o, n, bep);
      } else {
        if (n > 16) block256<3>(xs + q, wb, y, img, k, p, q, o0, rows, o, n, bep);
        else if (n > 8) block256<2>(xs + q, wb, y, img, k, p, q, o0, rows, o, n, bep);
        else block256<1>(xs + q, wb, y, img, k, p, q, o0, rows, o, n, bep);
      }
    }
  }
}

}  // namespace

bool pointwise_conv_available() { return cpu_has_avx2(); }

void pointwise_conv(const float* x, const float* w, float* y, int n, int k, std::size_t p, int o,
                    const PointwiseEpilogue& ep, int threads) {
  if (!pointwise_conv_available()) throw std::invalid_argument("pointwise_conv needs an AVX2 CPU");
  if (n < 0 || k <= 0 || o <= 0 || p == 0) {
    throw std::invalid_argument("pointwise_conv: invalid arguments");
  }
  // weights by blocks of kRows output channels: wpack[(o0 + t*kRows + r)] = w[o0 + r, t], zero past O
  const int blocks = (o + kRows - 1) / kRows;
  std::vector<float> wpack(static_cast<std::size_t>(blocks) * kRows * k, 0.0f);
  for (int oc = 0; oc < o; ++oc) {
    const std::size_t base = static_cast<std::size_t>(oc / kRows) * kRows * k + oc % kRows;
    for (int t = 0; t < k; ++t) wpack[base + static_cast<std::size_t>(t) * kRows] = w[static_cast<std::size_t>(oc) * k + t];
  }
  const std::size_t spans = (p + kSpan - 1) / kSpan;
  const bool avx512 = cpu_has_avx512f();
  const float* wp = wpack.data();
  parallel_for(static_cast<std::size_t>(n) * spans, threads, [&](std::size_t first, std::size_t last) {
    for (std::size_t item = first; item < last; ++item) {
      const std::size_t img = item / spans, p0 = (item % spans) * kSpan;
      const float* next = nullptr;
      std::size_t next_len = 0;
      if (item + 1 < last) {
        const std::size_t nimg = (item + 1) / spans, np0 = ((item + 1) % spans) * kSpan;
        next = x + nimg * k * p + np0;
        next_len = std::min(p, np0 + kSpan) - np0;
      }
      if (avx512) span<true>(x, wp, y, img, k, p, p0, std::min(p, p0 + kSpan), o, ep, next, next_len);
      else span<false>(x, wp, y, img, k, p, p0, std::min(p, p0 + kSpan), o, ep, next, next_len);
    }
  });
}

}  // namespace amct
