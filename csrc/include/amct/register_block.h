// One register block of a convolution computed without columns (direct_conv.cpp, pointwise_conv.cpp):
// kRows output channels x V vectors of pixels in vector accumulators,
//
//   s[r][i] = sum_t w[t][r] * row(t)[i] + 0     one fused multiply-add per t in order, from zero, stored
//                                               + 0 as a GEMM's alpha * acc + beta * 0 (-0 becomes +0)
//   y[r][i] = max(s * scale[r] + bias[r], 0)    each step if given, one float32 rounding each (NumPy's
//                                               maximum: NaN kept, -0 to +0)
//
// Two instruction sets, the same bytes (each sum is the same chain of fused multiply-adds whatever the
// vector width): run512, 16 pixels per vector, all kRows channels at once (24 of the 32 registers with
// V = 3); run256 (AVX2 + FMA), 8 pixels per vector, the kRows channels in two passes of kRows / 2
// (12 accumulators, 3 input vectors and a broadcast fill the 16 registers with V = 3).
//
// Always inlined into the callers' own (noinline) block functions: there the loops unroll and the
// accumulators stay in registers; a block of fewer than kRows channels goes through a stack buffer
// (indexed by the run-time count, the accumulators would otherwise live in memory throughout).
#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstring>

#include "amct/avx2_lanes.h"

namespace amct {
namespace register_block {

constexpr int kRows = 8;
constexpr int kVectors = 3;  // most vectors of pixels per block (V <= kVectors)

struct Epilogue {
  const float* scale = nullptr;  // (kRows,) from the block's first channel, or null
  const float* bias = nullptr;   // the same
  bool relu = false;
};

// ---------------------------------------------------------------------------------------------- AVX-512

// The first `count` lanes (1..16) of a vector.
__attribute__((target("avx512f"), always_inline)) inline __mmask16 lanes16(int count) {
  return static_cast<__mmask16>(count >= 16 ? 0xFFFF : (1u << count) - 1);
}

__attribute__((target("avx512f"), always_inline)) inline void store512(float* at, __mmask16 m, __m512 sum,
                                                                        const Epilogue& ep, int r) {
  sum = _mm512_add_ps(sum, _mm512_setzero_ps());
  if (ep.scale) sum = _mm512_mul_ps(sum, _mm512_set1_ps(ep.scale[r]));
  if (ep.bias) sum = _mm512_add_ps(sum, _mm512_set1_ps(ep.bias[r]));
  if (ep.relu) sum = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(sum, _mm512_setzero_ps(), _CMP_NLE_UQ), sum);  // > 0 or NaN
  _mm512_mask_storeu_ps(at, m, sum);
}

// row(t): the inputs of tap t for the block's `count` outputs (1 .. 16*V floats from there); wb (k, kRows):
// the block's weights; y: its first output, `stride` floats from one channel to the next; `outs` of its
// kRows channels stored.
template <int V, class Row>
__attribute__((target("avx512f"), always_inline)) inline void run512(Row row, const float* wb, int k, int count,
                                                                      float* y, std::size_t stride, int outs,
                                                                      const Epilogue& ep) {
  const __mmask16 last = lanes16(count - 16 * (V - 1));
  __m512 acc[kRows][V];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int t = 0; t < k; ++t) {
    const float* x = row(t);
    __m512 xv[V];
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) xv[v] = v == V - 1 ? _mm512_maskz_loadu_ps(last, x + 16 * v) : _mm512_loadu_ps(x + 16 * v);
    const float* wt = wb + static_cast<std::size_t>(t) * kRows;
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512 wv = _mm512_set1_ps(wt[r]);
#pragma GCC unroll 3
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(wv, xv[v], acc[r][v]);
    }
  }
  if (outs == kRows) {  // stored from the registers
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 3
      for (int v = 0; v < V; ++v) store512(y + r * stride + 16 * v, v == V - 1 ? last : 0xFFFF, acc[r][v], ep, r);
    }
    return;
  }
  alignas(64) float sums[kRows][V * 16];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) _mm512_store_ps(sums[r] + 16 * v, acc[r][v]);
  }
  for (int r = 0; r < outs; ++r) {
    for (int v = 0; v < V; ++v) store512(y + r * stride + 16 * v, v == V - 1 ? last : 0xFFFF, _mm512_load_ps(sums[r] + 16 * v), ep, r);
  }
}

// ------------------------------------------------------------------------------------------ AVX2 + FMA

// The epilogue on one vector of sums of channel r, its first `count` lanes stored at `at`.
__attribute__((target("avx2,fma"), always_inline)) inline void store256(float* at, int count, __m256 sum,
                                                                         const Epilogue& ep, int r) {
  const __m256 zero = _mm256_setzero_ps();
  sum = _mm256_add_ps(sum, zero);
  if (ep.scale) sum = _mm256_mul_ps(sum, _mm256_set1_ps(ep.scale[r]));
  if (ep.bias) sum = _mm256_add_ps(sum, _mm256_set1_ps(ep.bias[r]));
  if (ep.relu) sum = _mm256_and_ps(sum, _mm256_cmp_ps(sum, zero, _CMP_NLE_UQ));  // > 0 or NaN, else +0
  if (count >= 8) {  // (avx2_lanes::store_first's own code, kept here: inlined from there, measured 12 % slower)
    _mm256_storeu_ps(at, sum);
    return;
  }
  alignas(32) float part[8];
  _mm256_store_ps(part, sum);
  std::memcpy(at, part, static_cast<std::size_t>(count) * sizeof(float));
}

// run512's block with vectors of 8 pixels (`count`: 1 .. 8*V): the kRows channels in two passes of
// kRows / 2 over each chunk of kChunk taps, the accumulators kept on the stack between chunks (a float
// stored and loaded is unchanged, so each sum is still one chain of fused multiply-adds): the second
// pass reads the chunk's inputs from L1 (whole, a block's inputs over a long K would come from L2 twice).
constexpr int kChunk = 64;

template <int V, class Row>
__attribute__((target("avx2,fma"), always_inline)) inline void run256(Row row, const float* wb, int k, int count,
                                                                       float* y, std::size_t stride, int outs,
                                                                       const Epilogue& ep) {
  constexpr int kHalf = kRows / 2;
  const int tail = count - 8 * (V - 1);  // lanes of the last vector, 1..8
  const __m256i last = avx2_lanes::first(tail);  // (made once: in the tap loop it cost 6 % of UltraFace)
  const int passes = outs > kHalf ? 2 : 1;
  alignas(32) float sums[kRows][V * 8];
  for (int t0 = 0; t0 < k; t0 += kChunk) {
    const int t1 = k - t0 < kChunk ? k : t0 + kChunk;
    for (int pass = 0; pass < passes; ++pass) {
      const int r0 = pass * kHalf;
      __m256 acc[kHalf][V];
#pragma GCC unroll 4
      for (int r = 0; r < kHalf; ++r) {
#pragma GCC unroll 3
        for (int v = 0; v < V; ++v) acc[r][v] = t0 == 0 ? _mm256_setzero_ps() : _mm256_load_ps(sums[r0 + r] + 8 * v);
      }
      for (int t = t0; t < t1; ++t) {
        const float* x = row(t);
        __m256 xv[V];
#pragma GCC unroll 3
        for (int v = 0; v < V; ++v) xv[v] = v == V - 1 && tail < 8 ? _mm256_maskload_ps(x + 8 * v, last) : _mm256_loadu_ps(x + 8 * v);
        const float* wt = wb + static_cast<std::size_t>(t) * kRows + r0;
#pragma GCC unroll 4
        for (int r = 0; r < kHalf; ++r) {
          const __m256 wv = _mm256_broadcast_ss(wt + r);
#pragma GCC unroll 3
          for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(wv, xv[v], acc[r][v]);
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < kHalf; ++r) {
#pragma GCC unroll 3
        for (int v = 0; v < V; ++v) _mm256_store_ps(sums[r0 + r] + 8 * v, acc[r][v]);
      }
    }
  }
  for (int r = 0; r < outs; ++r) {
    for (int v = 0; v < V; ++v) store256(y + r * stride + 8 * v, v == V - 1 ? tail : 8, _mm256_load_ps(sums[r] + 8 * v), ep, r);
  }
}

}  // namespace register_block
}  // namespace amct
