// The Winograd transforms of winograd.cpp eight tiles at a time (AVX2), for CPUs without AVX-512.
//
// As in winograd_avx512.cpp: lane l of every vector is tile tx0 + l of one tile row, the input row's
// floats split by column phase (an 8 x m transpose of the row's m-float groups) and the output tiles'
// columns interleaved back the same way; each value goes through the portable loops' float32
// operations in the same order (-ffp-contract=off), so the bytes are theirs (tests/runtime/test_winograd.py
// compares the paths).
#include "amct/winograd_simd.h"

#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <vector>

#include "amct/avx2_lanes.h"
#include "amct/parallel.h"
#include "amct/winograd_tile.h"

namespace amct {
namespace {

#define AMCT_AVX2 __attribute__((target("avx2")))

constexpr int kLanes = avx2_lanes::kLanes;

using avx2_lanes::load_first;
using avx2_lanes::store_first;

// lanes 1..7 of a, then `last`: the tiles' next column
AMCT_AVX2 inline __m256 shift_in(__m256 a, float last) {
  const __m256 s = _mm256_permutevar8x32_ps(a, _mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 7));
  return _mm256_blend_ps(s, _mm256_set1_ps(last), 0x80);
}

// d[j] lane l = row[l*M + j], j < alpha, for the eight tiles whose columns start at row[0]
// (row must have 8*M + 8 readable floats).
template <int M>
AMCT_AVX2 inline void tile_columns(const float* row, __m256* d) {
  if constexpr (M == 2) {
    d[0] = avx2_lanes::stride2<false>(row);
    d[1] = avx2_lanes::stride2<true>(row);
    d[2] = shift_in(d[0], row[16]);
    d[3] = shift_in(d[1], row[17]);
  } else {
    // an 8 x 4 transpose: l0 = tiles 0 and 1, ..., l3 = tiles 6 and 7 (four floats each)
    const __m256 l0 = _mm256_loadu_ps(row), l1 = _mm256_loadu_ps(row + 8);
    const __m256 l2 = _mm256_loadu_ps(row + 16), l3 = _mm256_loadu_ps(row + 24);
    const __m256 t0 = _mm256_unpacklo_ps(l0, l1), t1 = _mm256_unpackhi_ps(l0, l1);
    const __m256 t2 = _mm256_unpacklo_ps(l2, l3), t3 = _mm256_unpackhi_ps(l2, l3);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // tiles (0 2 4 6 | 1 3 5 7) -> 0..7
    d[0] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), order);
    d[1] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)), order);
    d[2] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), order);
    d[3] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)), order);
    d[4] = shift_in(d[0], row[32]);
    d[5] = shift_in(d[1], row[33]);
  }
}

template <int M>
AMCT_AVX2 void input_planes(const float* x, float* v, const WinogradGeometry& g, std::size_t first, std::size_t last) {
  const std::size_t slab = static_cast<std::size_t>(g.c) * g.n * g.th * g.tw;
  winograd_tile::input_row_blocks<M, kLanes>(x, g, first, last, v, [&](const float* rows, std::size_t wp, float* dst,
                                                                       int count) AMCT_AVX2 {
    winograd_tile::input_tiles<M, __m256>([&](int i, __m256* d) AMCT_AVX2 { tile_columns<M>(rows + i * wp, d); },
                                      [&](int at, const __m256& value) AMCT_AVX2 { store_first(dst + at * slab, count, value); });
  });
}

// The output transform's epilogue on one vector of channel oc: * a[oc], + b[oc], NumPy's maximum(v, 0)
// (each if given), as the portable loop.
AMCT_AVX2 inline __m256 epilogue(__m256 v, const float* a, const float* b, bool relu, std::size_t oc) {
  if (a) v = _mm256_mul_ps(v, _mm256_set1_ps(a[oc]));
  if (b) v = _mm256_add_ps(v, _mm256_set1_ps(b[oc]));
  if (relu) v = _mm256_and_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NLE_UQ), v);  // > 0 or NaN, else +0
  return v;
}

// The output row's floats from the M tile columns t[k] (lane l = tile tx0 + l): t[0][0], t[1][0], ...,
// t[M-1][0], t[0][1], ...; `valid` of them stored.
template <int M>
AMCT_AVX2 inline void store_interleaved(const __m256* t, float* out, int valid) {
  __m256 chunk[M];
  if constexpr (M == 2) {
    const __m256 lo = _mm256_unpacklo_ps(t[0], t[1]), hi = _mm256_unpackhi_ps(t[0], t[1]);
    chunk[0] = _mm256_permute2f128_ps(lo, hi, 0x20);  // tiles 0..3
    chunk[1] = _mm256_permute2f128_ps(lo, hi, 0x31);  // tiles 4..7
  } else {  // the inverse of tile_columns' transpose
    const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  // tiles 0..7 -> (0 2 4 6 | 1 3 5 7)
    __m256 u[4];
    for (int k = 0; k < 4; ++k) u[k] = _mm256_permutevar8x32_ps(t[k], order);
    const __m256 s0 = _mm256_unpacklo_ps(u[0], u[1]), s1 = _mm256_unpackhi_ps(u[0], u[1]);
    const __m256 s2 = _mm256_unpacklo_ps(u[2], u[3]), s3 = _mm256_unpackhi_ps(u[2], u[3]);
    chunk[0] = _mm256_shuffle_ps(s0, s2, _MM_SHUFFLE(1, 0, 1, 0));  // tiles 0, 1
    chunk[1] = _mm256_shuffle_ps(s0, s2, _MM_SHUFFLE(3, 2, 3, 2));  // tiles 2, 3
    chunk[2] = _mm256_shuffle_ps(s1, s3, _MM_SHUFFLE(1, 0, 1, 0));  // tiles 4, 5
    chunk[3] = _mm256_shuffle_ps(s1, s3, _MM_SHUFFLE(3, 2, 3, 2));  // tiles 6, 7
  }
  for (int c = 0; c < M; ++c) store_first(out + 8 * c, valid - 8 * c, chunk[c]);
}

template <int M>
AMCT_AVX2 void output_planes(const float* mm, float* y, const WinogradGeometry& g, const float* a, const float* b,
                               bool relu, std::size_t first, std::size_t last) {
  const std::size_t slab = static_cast<std::size_t>(g.o) * g.n * g.th * g.tw;
  winograd_tile::output_row_blocks<M, kLanes>(mm, y, g, first, last, [&](const float* src, std::size_t oc, float* out,
                                                                         int rows, int count, int valid) AMCT_AVX2 {
    __m256 t[M][M];  // t[kr][k]: output row kr, column k of each tile
    winograd_tile::output_tiles<M, __m256>([&](int at, __m256& v) AMCT_AVX2 { v = load_first(src + at * slab, count); }, t);
    for (int kr = 0; kr < rows; ++kr) {
      for (int k = 0; k < M; ++k) t[kr][k] = epilogue(t[kr][k], a, b, relu, oc);
      store_interleaved<M>(t[kr], out + static_cast<std::size_t>(kr) * g.wo, valid);
    }
  });
}

}  // namespace

void winograd_input_avx2(const float* x, float* v, const WinogradGeometry& g, int threads) {
  parallel_for(static_cast<std::size_t>(g.n) * g.c, threads, [&](std::size_t first, std::size_t last) {
    if (g.m == 2) input_planes<2>(x, v, g, first, last);
    else input_planes<4>(x, v, g, first, last);
  });
}

void winograd_output_avx2(const float* mm, float* y, const WinogradGeometry& g, const float* a, const float* b,
                          bool relu, int threads) {
  parallel_for(static_cast<std::size_t>(g.n) * g.o, threads, [&](std::size_t first, std::size_t last) {
    if (g.m == 2) output_planes<2>(mm, y, g, a, b, relu, first, last);
    else output_planes<4>(mm, y, g, a, b, relu, first, last);
  });
}

}  // namespace amct
