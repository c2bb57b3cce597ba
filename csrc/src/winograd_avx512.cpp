// The Winograd transforms of winograd.cpp sixteen tiles at a time (AVX-512F).
//
// The portable loops transform one tile at a time, reading its alpha input columns with a stride of
// m floats, a pattern the compiler does not vectorize. Here lane l of every vector is tile tx0 + l of
// one tile row: the input row's floats are split by column phase with permutes (phase j holds
// columns j, j + m, j + 2m, ...: the j-th column of sixteen consecutive tiles), and the output
// tiles' columns are interleaved back the same way. Each value goes through the same float32
// operations in the same order as in the portable loops (no contraction: -ffp-contract=off), so the
// bytes are theirs; tests/runtime/test_winograd.py compares the two paths.
#include "amct/winograd_simd.h"

#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "amct/parallel.h"
#include "amct/winograd_tile.h"

namespace amct {
namespace {

#define AMCT_AVX512 __attribute__((target("avx512f")))

constexpr int kLanes = 16;
// Maps of fewer tiles a row than this gather their lanes across rows and images (see input_gathered).
constexpr int kGatherTilesRow = 12;

AMCT_AVX512 inline __mmask16 first_lanes(int count) {
  return count >= kLanes ? static_cast<__mmask16>(0xFFFF)
                         : count <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << count) - 1);
}

AMCT_AVX512 inline __m512i indices(int start, int step) {
  alignas(64) int idx[kLanes];
  for (int l = 0; l < kLanes; ++l) idx[l] = start + step * l;
  return _mm512_load_si512(idx);
}

// d[j] lane l = row[l*M + j], j < alpha, for the sixteen tiles whose columns start at row[0]
// (row must have 16*M + 16 readable floats).
template <int M>
AMCT_AVX512 inline void tile_columns(const float* row, __m512* d) {
  const __m512i next = indices(1, 1);  // lanes 1..15 of a, then lane 0 of b
  if constexpr (M == 2) {
    const __m512 l0 = _mm512_loadu_ps(row), l1 = _mm512_loadu_ps(row + 16), l2 = _mm512_loadu_ps(row + 32);
    d[0] = _mm512_permutex2var_ps(l0, indices(0, 2), l1);
    d[1] = _mm512_permutex2var_ps(l0, indices(1, 2), l1);
    d[2] = _mm512_permutex2var_ps(d[0], next, l2);                                  // row[2l + 2]
    d[3] = _mm512_permutex2var_ps(d[1], next, _mm512_permutexvar_ps(next, l2));     // row[2l + 3]
  } else {
    const __m512 l0 = _mm512_loadu_ps(row), l1 = _mm512_loadu_ps(row + 16), l2 = _mm512_loadu_ps(row + 32);
    const __m512 l3 = _mm512_loadu_ps(row + 48), l4 = _mm512_loadu_ps(row + 64);
    for (int j = 0; j < 4; ++j) {  // lanes 0..7 from l0:l1, 8..15 from l2:l3
      const __m512i idx = indices(j, 4);
      d[j] = _mm512_shuffle_f32x4(_mm512_permutex2var_ps(l0, idx, l1), _mm512_permutex2var_ps(l2, idx, l3),
                                  _MM_SHUFFLE(1, 0, 1, 0));
    }
    d[4] = _mm512_permutex2var_ps(d[0], next, l4);                                  // row[4l + 4]
    d[5] = _mm512_permutex2var_ps(d[1], next, _mm512_permutexvar_ps(next, l4));     // row[4l + 5]
  }
}

template <int M>
AMCT_AVX512 void input_planes(const float* x, float* v, const WinogradGeometry& g, std::size_t first, std::size_t last) {
  const std::size_t slab = static_cast<std::size_t>(g.c) * g.n * g.th * g.tw;
  winograd_tile::input_row_blocks<M, kLanes>(x, g, first, last, v, [&](const float* rows, std::size_t wp, float* dst,
                                                                       int count) AMCT_AVX512 {
    winograd_tile::input_tiles<M, __m512>([&](int i, __m512* d) AMCT_AVX512 { tile_columns<M>(rows + i * wp, d); },
                                      [&](int at, const __m512& value) AMCT_AVX512 { _mm512_mask_storeu_ps(dst + at * slab, first_lanes(count), value); });
  });
}

// The output transform's epilogue on one vector of channel oc: * a[oc], + b[oc], NumPy's maximum(v, 0)
// (each if given), as the portable loop.
AMCT_AVX512 inline __m512 epilogue(__m512 v, const float* a, const float* b, bool relu, std::size_t oc) {
  if (a) v = _mm512_mul_ps(v, _mm512_set1_ps(a[oc]));
  if (b) v = _mm512_add_ps(v, _mm512_set1_ps(b[oc]));
  if (relu) v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NLE_UQ), v);  // > 0 or NaN
  return v;
}

// The output row's floats from the M tile columns t[k] (lane l = tile tx0 + l): t[0][0], t[1][0], ...,
// t[M-1][0], t[0][1], ...; `valid` of them stored.
template <int M>
AMCT_AVX512 inline void store_interleaved(const __m512* t, float* out, int valid) {
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  if constexpr (M == 2) {
    _mm512_mask_storeu_ps(out, first_lanes(valid), _mm512_permutex2var_ps(t[0], lo, t[1]));
    _mm512_mask_storeu_ps(out + 16, first_lanes(valid - 16), _mm512_permutex2var_ps(t[0], hi, t[1]));
  } else {
    const __m512d pairs[4] = {  // (t0, t1) and (t2, t3) pairs of tiles 0..7 and 8..15, as 64-bit lanes
        _mm512_castps_pd(_mm512_permutex2var_ps(t[0], lo, t[1])), _mm512_castps_pd(_mm512_permutex2var_ps(t[2], lo, t[3])),
        _mm512_castps_pd(_mm512_permutex2var_ps(t[0], hi, t[1])), _mm512_castps_pd(_mm512_permutex2var_ps(t[2], hi, t[3]))};
    const __m512i first4 = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
    const __m512i last4 = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
    for (int half = 0; half < 2; ++half) {
      const __m512d a = pairs[2 * half], b = pairs[2 * half + 1];
      const int at = 32 * half;
      _mm512_mask_storeu_ps(out + at, first_lanes(valid - at), _mm512_castpd_ps(_mm512_permutex2var_pd(a, first4, b)));
      _mm512_mask_storeu_ps(out + at + 16, first_lanes(valid - at - 16),
                            _mm512_castpd_ps(_mm512_permutex2var_pd(a, last4, b)));
    }
  }
}

template <int M>
AMCT_AVX512 void output_planes(const float* mm, float* y, const WinogradGeometry& g, const float* a, const float* b,
                               bool relu, std::size_t first, std::size_t last) {
  const std::size_t slab = static_cast<std::size_t>(g.o) * g.n * g.th * g.tw;
  winograd_tile::output_row_blocks<M, kLanes>(mm, y, g, first, last, [&](const float* src, std::size_t oc, float* out,
                                                                         int rows, int count, int valid) AMCT_AVX512 {
    __m512 t[M][M];  // t[kr][k]: output row kr, column k of each tile
    winograd_tile::output_tiles<M, __m512>([&](int at, __m512& v) AMCT_AVX512 { v = _mm512_maskz_loadu_ps(first_lanes(count), src + at * slab); }, t);
    for (int kr = 0; kr < rows; ++kr) {
      for (int k = 0; k < M; ++k) t[kr][k] = epilogue(t[kr][k], a, b, relu, oc);
      store_interleaved<M>(t[kr], out + static_cast<std::size_t>(kr) * g.wo, valid);
    }
  });
}

// ---- narrow maps: the lanes are sixteen consecutive columns of V / M (tiles of one or more images) -------
//
// With fewer than kLanes tiles a row, a vector of one tile row would be mostly empty (open_nsfw's 14x14 and
// 7x7 maps have 7 and 4 tiles a row at m = 2). Here lane l of group q is tile q*16 + l of the batch
// (image-major, then row-major, as V's columns); its inputs are gathered and its outputs scattered by
// offsets computed once per call, the padding and the tiles past the batch masked off. The arithmetic per
// lane is the one above, so the bytes are the same.

// Per group q and tap (i, j) of the alpha x alpha window (or output (kr, k) of the m x m tile): the offset
// of that value in image-major (N, ch, H, W) data, channel 0, and which lanes fall inside the map.
struct Taps {
  int taps = 0;
  std::vector<std::int32_t> offset;  // (groups, taps, kLanes)
  std::vector<__mmask16> inside;     // (groups, taps)
};

Taps lane_taps(const WinogradGeometry& g, int span, int rows, int cols, int channels, int shift) {
  Taps t;
  const std::size_t tiles = static_cast<std::size_t>(g.th) * g.tw, total = tiles * g.n;
  const std::size_t groups = (total + kLanes - 1) / kLanes;
  t.taps = span * span;
  t.offset.assign(groups * t.taps * kLanes, 0);
  t.inside.assign(groups * t.taps, 0);
  for (std::size_t col = 0; col < total; ++col) {
    const std::size_t img = col / tiles, q = col / kLanes;
    const int ty = static_cast<int>(col % tiles) / g.tw, tx = static_cast<int>(col % tiles) % g.tw;
    const int lane = static_cast<int>(col % kLanes);
    for (int i = 0; i < span; ++i) {
      for (int j = 0; j < span; ++j) {
        const int r = ty * g.m + i - shift * g.ph, c = tx * g.m + j - shift * g.pw;
        if (r < 0 || r >= rows || c < 0 || c >= cols) continue;
        const std::size_t tap = q * t.taps + i * span + j;
        t.offset[tap * kLanes + lane] =
            static_cast<std::int32_t>((img * channels * rows + r) * static_cast<std::size_t>(cols) + c);
        t.inside[tap] = static_cast<__mmask16>(t.inside[tap] | (1u << lane));
      }
    }
  }
  return t;
}

template <int M>
AMCT_AVX512 void input_gathered(const float* x, float* v, const WinogradGeometry& g, const Taps& taps,
                                std::size_t first, std::size_t last) {
  constexpr int A = M + 2;
  const std::size_t total = static_cast<std::size_t>(g.n) * g.th * g.tw;
  const std::size_t slab = static_cast<std::size_t>(g.c) * total;
  const std::size_t groups = (total + kLanes - 1) / kLanes;
  for (std::size_t ch = first; ch < last; ++ch) {
    const float* xc = x + ch * static_cast<std::size_t>(g.h) * g.w;
    for (std::size_t q = 0; q < groups; ++q) {
      const std::int32_t* off = taps.offset.data() + q * A * A * kLanes;
      const __mmask16* in = taps.inside.data() + q * A * A;
      const __mmask16 keep = first_lanes(static_cast<int>(std::min<std::size_t>(kLanes, total - q * kLanes)));
      float* dst = v + ch * total + q * kLanes;
      winograd_tile::input_tiles<M, __m512>(
          [&](int i, __m512* d) AMCT_AVX512 {
            for (int j = 0; j < A; ++j) {
              const __m512i idx = _mm512_loadu_si512(off + (i * A + j) * kLanes);
              d[j] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in[i * A + j], idx, xc, 4);
            }
          },
          [&](int at, const __m512& value) AMCT_AVX512 { _mm512_mask_storeu_ps(dst + at * slab, keep, value); });
    }
  }
}

template <int M>
AMCT_AVX512 void output_scattered(const float* mm, float* y, const WinogradGeometry& g, const Taps& taps,
                                  const float* a, const float* b, bool relu, std::size_t first, std::size_t last) {
  const std::size_t total = static_cast<std::size_t>(g.n) * g.th * g.tw;
  const std::size_t slab = static_cast<std::size_t>(g.o) * total;
  const std::size_t groups = (total + kLanes - 1) / kLanes;
  for (std::size_t oc = first; oc < last; ++oc) {
    float* yc = y + oc * static_cast<std::size_t>(g.ho) * g.wo;
    for (std::size_t q = 0; q < groups; ++q) {
      const __mmask16 keep = first_lanes(static_cast<int>(std::min<std::size_t>(kLanes, total - q * kLanes)));
      const float* src = mm + oc * total + q * kLanes;
      __m512 t[M][M];
      winograd_tile::output_tiles<M, __m512>(
          [&](int at, __m512& v) AMCT_AVX512 { v = _mm512_maskz_loadu_ps(keep, src + at * slab); }, t);
      const std::int32_t* off = taps.offset.data() + q * M * M * kLanes;
      const __mmask16* in = taps.inside.data() + q * M * M;
      for (int tap = 0; tap < M * M; ++tap) {
        const __m512 val = epilogue(t[tap / M][tap % M], a, b, relu, oc);
        _mm512_mask_i32scatter_ps(yc, in[tap], _mm512_loadu_si512(off + tap * kLanes), val, 4);
      }
    }
  }
}

}  // namespace

bool winograd_gathers(const WinogradGeometry& g) {
  // narrow rows, and offsets that fit in int32 (the larger of the input and output data)
  const std::size_t values = static_cast<std::size_t>(g.n) * std::max(g.c * static_cast<std::size_t>(g.h) * g.w,
                                                                      g.o * static_cast<std::size_t>(g.ho) * g.wo);
  return g.tw < kGatherTilesRow && values < (std::size_t{1} << 31);
}

void winograd_input_avx512(const float* x, float* v, const WinogradGeometry& g, int threads) {
  if (winograd_gathers(g)) {
    const Taps taps = lane_taps(g, g.m + 2, g.h, g.w, g.c, 1);
    parallel_for(static_cast<std::size_t>(g.c), threads, [&](std::size_t first, std::size_t last) {
      if (g.m == 2) input_gathered<2>(x, v, g, taps, first, last);
      else input_gathered<4>(x, v, g, taps, first, last);
    });
    return;
  }
  parallel_for(static_cast<std::size_t>(g.n) * g.c, threads, [&](std::size_t first, std::size_t last) {
    if (g.m == 2) input_planes<2>(x, v, g, first, last);
    else input_planes<4>(x, v, g, first, last);
  });
}

void winograd_output_avx512(const float* mm, float* y, const WinogradGeometry& g, const float* a, const float* b,
                            bool relu, int threads) {
  if (winograd_gathers(g)) {
    const Taps taps = lane_taps(g, g.m, g.ho, g.wo, g.o, 0);
    parallel_for(static_cast<std::size_t>(g.o), threads, [&](std::size_t first, std::size_t last) {
      if (g.m == 2) output_scattered<2>(mm, y, g, taps, a, b, relu, first, last);
      else output_scattered<4>(mm, y, g, taps, a, b, relu, first, last);
    });
    return;
  }
  parallel_for(static_cast<std::size_t>(g.n) * g.o, threads, [&](std::size_t first, std::size_t last) {
    if (g.m == 2) output_planes<2>(mm, y, g, a, b, relu, first, last);
    else output_planes<4>(mm, y, g, a, b, relu, first, last);
  });
}

}  // namespace amct
