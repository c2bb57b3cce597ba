#include "amct/pointwise_conv.h"

#include <immintrin.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "amct/cpu.h"
#include "amct/parallel.h"

namespace amct {
namespace {

#define AMCT_AVX512 __attribute__((target("avx512f")))

constexpr int kRows = 8;    // output channels per register block
constexpr int kVecs = 3;    // 16-float vectors of pixels per register block
constexpr int kPixels = 16 * kVecs;
constexpr std::size_t kSpan = 4 * kPixels;
  // pixels per work item (measured: 48 to 768, best at 192-384)

// One register block: rows [o0, o0 + rows) of the output, pixels [p0, p0 + V*16) of image img (the
// last vector's lanes limited by `last`); wb (k, kRows) the block's weights, xs = x + (img*K)*P + p0.
// The accumulators must stay in registers: everything is in this one function, its loops unrolled.
template <int V>
AMCT_AVX512 __attribute__((noinline)) void block(const float* xs, const float* wb, float* y, std::size_t img, int k,
                                                 std::size_t p, std::size_t p0, int o0, int rows, int o,
                                                 __mmask16 last, const PointwiseEpilogue& ep) {
  __m512 acc[kRows][V];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int t = 0; t < k; ++t) {
    const float* row = xs + static_cast<std::size_t>(t) * p;
    __m512 xv[V];
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) {
      xv[v] = v == V - 1 ? _mm512_maskz_loadu_ps(last, row + 16 * v) : _mm512_loadu_ps(row + 16 * v);
    }
    const float* wt = wb + static_cast<std::size_t>(t) * kRows;
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512 wv = _mm512_set1_ps(wt[r]);
#pragma GCC unroll 3
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(wv, xv[v], acc[r][v]);
    }
  }
  const auto store = [](float* at, __mmask16 m, __m512 sum, float sv, float bv, const PointwiseEpilogue& ep)
      __attribute__((target("avx512f"))) {
    sum = _mm512_add_ps(sum, _mm512_setzero_ps());  // as a GEMM stores alpha * acc + 0: -0 becomes +0
    if (ep.scale) sum = _mm512_mul_ps(sum, _mm512_set1_ps(sv));
    if (ep.bias) sum = _mm512_add_ps(sum, _mm512_set1_ps(bv));
    if (ep.relu) sum = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(sum, _mm512_setzero_ps(), _CMP_NLE_UQ), sum);  // > 0 or NaN
    _mm512_mask_storeu_ps(at, m, sum);
  };
  const float* sc = ep.scale ? ep.scale + o0 : nullptr;
  const float* bi = ep.bias ? ep.bias + o0 : nullptr;
  float* yb = y + (img * o + o0) * p + p0;
  if (rows == kRows) {  // stored from the registers
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 3
      for (int v = 0; v < V; ++v) {
        store(yb + r * p + 16 * v, v == V - 1 ? last : 0xFFFF, acc[r][v], sc ? sc[r] : 1.0f, bi ? bi[r] : 0.0f, ep);
      }
    }
    return;
  }
  // (indexed by the run-time row count, the accumulators would live in memory throughout: a stack buffer)
  alignas(64) float sums[kRows][V * 16];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) _mm512_store_ps(sums[r] + 16 * v, acc[r][v]);
  }
  for (int r = 0; r < rows; ++r) {
    for (int v = 0; v < V; ++v) {
      store(yb + r * p + 16 * v, v == V - 1 ? last : 0xFFFF, _mm512_load_ps(sums[r] + 16 * v), sc ? sc[r] : 1.0f,
            bi ? bi[r] : 0.0f, ep);
    }
  }
}

// Pixels [p0, p1) of image img, all output channels: per block of kRows channels, the register
// blocks left to right (the block's weights stay in cache, each output row is written in one run).
// next: the input of the span this thread does next (its first pixel of channel 0), next_len its pixels;
// null for none.
void span(const float* x, const float* wpack, float* y, std::size_t img, int k, std::size_t p, std::size_t p0,
          std::size_t p1, int o, const PointwiseEpilogue& ep, const float* next, std::size_t next_len) {
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
    for (std::size_t q = p0; q < p1; q += kPixels) {
      const std::size_t left = std::min<std::size_t>(p1 - q, kPixels);
      const std::size_t tail = left - 16 * ((left - 1) / 16);  // pixels of the last vector, 1..16
      const auto last = static_cast<__mmask16>(tail >= 16 ? 0xFFFF : (1u << tail) - 1);
      if (left > 32) block<3>(xs + q, wb, y, img, k, p, q, o0, rows, o, last, ep);
      else if (left > 16) block<2>(xs + q, wb, y, img, k, p, q, o0, rows, o, last, ep);
      else block<1>(xs + q, wb, y, img, k, p, q, o0, rows, o, last, ep);
    }
  }
}

}  // namespace

bool pointwise_conv_available() { return cpu_has_avx512f(); }

void pointwise_conv(const float* x, const float* w, float* y, int n, int k, std::size_t p, int o,
                    const PointwiseEpilogue& ep, int threads) {
  if (!pointwise_conv_available()) throw std::invalid_argument("pointwise_conv needs an AVX-512 CPU");
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
      span(x, wp, y, img, k, p, p0, std::min(p, p0 + kSpan), o, ep, next, next_len);
    }
  });
}

}  // namespace amct
