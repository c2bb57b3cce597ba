// One register block of a convolution computed without columns (direct_conv.cpp, pointwise_conv.cpp):
// kRows output channels x V vectors of 16 outputs in AVX-512 accumulators,
//
//   s[r][i] = sum_t w[t][r] * row(t)[i] + 0     one fused multiply-add per t in order, from zero, stored
//                                               + 0 as a GEMM's alpha * acc + beta * 0 (-0 becomes +0)
//   y[r][i] = max(s * scale[r] + bias[r], 0)    each step if given, one float32 rounding each (NumPy's
//                                               maximum: NaN kept, -0 to +0)
//
// Always inlined into the callers' own (noinline) block functions: there the loops unroll and the
// accumulators stay in registers; a block of fewer than kRows channels goes through a stack buffer
// (indexed by the run-time count, the accumulators would otherwise live in memory throughout).
#pragma once

#include <immintrin.h>

#include <cstddef>

namespace amct {
namespace register_block {

constexpr int kRows = 8;

struct Epilogue {
  const float* scale = nullptr;  // (kRows,) from the block's first channel, or null
  const float* bias = nullptr;   // the same
  bool relu = false;
};

__attribute__((target("avx512f"), always_inline)) inline void store(float* at, __mmask16 m, __m512 sum,
                                                                     const Epilogue& ep, int r) {
  sum = _mm512_add_ps(sum, _mm512_setzero_ps());
  if (ep.scale) sum = _mm512_mul_ps(sum, _mm512_set1_ps(ep.scale[r]));
  if (ep.bias) sum = _mm512_add_ps(sum, _mm512_set1_ps(ep.bias[r]));
  if (ep.relu) sum = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(sum, _mm512_setzero_ps(), _CMP_NLE_UQ), sum);  // > 0 or NaN
  _mm512_mask_storeu_ps(at, m, sum);
}

// row(t): the inputs of tap t for the block's outputs (16*V floats from there, the last vector's lanes
// limited by `last`); wb (k, kRows): the block's weights; y: its first output, `stride` floats from one
// channel to the next; `outs` of its kRows channels stored.
template <int V, class Row>
__attribute__((target("avx512f"), always_inline)) inline void run(Row row, const float* wb, int k, __mmask16 last,
                                                                   float* y, std::size_t stride, int outs,
                                                                   const Epilogue& ep) {
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
      for (int v = 0; v < V; ++v) store(y + r * stride + 16 * v, v == V - 1 ? last : 0xFFFF, acc[r][v], ep, r);
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
    for (int v = 0; v < V; ++v) store(y + r * stride + 16 * v, v == V - 1 ? last : 0xFFFF, _mm512_load_ps(sums[r] + 16 * v), ep, r);
  }
}

}  // namespace register_block
}  // namespace amct
