// The Winograd transforms' arithmetic on vectors of tiles (one tile per lane), for any GCC vector type
// (__m256, __m512): B^T d B and A^T M A term for term as the portable bt4 / bt6 / at4 / at6 of
// winograd.cpp, the same float32 operations in the same order (the core is built with
// -ffp-contract=off), so the same bytes (but for NaN payloads where two different NaNs meet: the
// compiler may order an addition's operands either way, and x86 keeps the first operand's NaN). Written with the vector operators and always inlined, so that
// each caller compiles them for its own vector width (csrc/src/winograd_avx2.cpp, winograd_avx512.cpp; the
// portable loops of winograd.cpp use bt and at with a float for a vector);
// the loads and stores, which differ per instruction set, are the callers' functors.
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#include "amct/winograd.h"

namespace amct {
namespace winograd_tile {

#define AMCT_TILE_INLINE __attribute__((always_inline)) inline

// o = B^T d over alpha = M + 2 vectors.
template <int M, class V>
AMCT_TILE_INLINE void bt(const V* d, V* o) {
  if constexpr (M == 2) {
    o[0] = d[0] - d[2];
    o[1] = d[1] + d[2];
    o[2] = d[2] - d[1];
    o[3] = d[1] - d[3];
  } else {
    const V p = d[4] - 4.0f * d[2], q = d[3] - 4.0f * d[1], r = d[4] - d[2], s = 2.0f * (d[3] - d[1]);
    o[0] = (4.0f * d[0] - 5.0f * d[2]) + d[4];
    o[1] = p + q;
    o[2] = p - q;
    o[3] = r + s;
    o[4] = r - s;
    o[5] = (4.0f * d[1] - 5.0f * d[3]) + d[5];
  }
}

// y = A^T v over alpha vectors (M results).
template <int M, class V>
AMCT_TILE_INLINE void at(const V* v, V* y) {
  if constexpr (M == 2) {
    y[0] = (v[0] + v[1]) + v[2];
    y[1] = (v[1] - v[2]) - v[3];
  } else {
    const V a = v[1] + v[2], b = v[1] - v[2], c = v[3] + v[4], d = v[3] - v[4];
    y[0] = (v[0] + a) + c;
    y[1] = b + 2.0f * d;
    y[2] = a + 4.0f * c;
    y[3] = (b + 8.0f * d) + v[5];
  }
}

// B^T d B of a vector of tiles: columns(i, d) fills d[0..alpha) with column j of input row i of each
// tile; store(xi * alpha + nu, value) receives the transformed tiles (by reference), position by position.
template <int M, class V, class Columns, class Store>
AMCT_TILE_INLINE void input_tiles(Columns columns, Store store) {
  constexpr int A = M + 2;
  V u[A][A];  // u[i][nu]: row i of the tiles, transformed
  for (int i = 0; i < A; ++i) {
    V d[A];
    columns(i, d);
    bt<M>(d, u[i]);
  }
  for (int nu = 0; nu < A; ++nu) {
    V col[A], o[A];
    for (int i = 0; i < A; ++i) col[i] = u[i][nu];
    bt<M>(col, o);
    for (int xi = 0; xi < A; ++xi) store(xi * A + nu, static_cast<const V&>(o[xi]));
  }
}

// A^T m A of a vector of tiles: load(xi * alpha + nu, v) sets v to the products at that position; t[kr][k]
// receives output row kr, column k of each tile. (The functors take and fill references: a vector
// returned by value from them would cross an ABI boundary where this template is not compiled for it.)
template <int M, class V, class Load>
AMCT_TILE_INLINE void output_tiles(Load load, V (&t)[M][M]) {
  constexpr int A = M + 2;
  V s[A][M];  // s[xi][k]: the columns transformed
  for (int xi = 0; xi < A; ++xi) {
    V row[A];
    for (int nu = 0; nu < A; ++nu) load(xi * A + nu, row[nu]);
    at<M>(row, s[xi]);
  }
  for (int k = 0; k < M; ++k) {
    V col[A], out[M];
    for (int xi = 0; xi < A; ++xi) col[xi] = s[xi][k];
    at<M>(col, out);
    for (int kr = 0; kr < M; ++kr) t[kr][k] = out[kr];
  }
}

// The input transform's walk over planes [first, last) (plane = image * C + channel) by blocks of `Lanes`
// tiles of one tile row: each plane is copied into a zero-padded buffer of rows of wp floats (every
// block's loads, Lanes * M + Lanes floats from its first column, stay inside), then
// block(rows, wp, dst, count) for each block: rows = its first input row's first column, dst = V's column
// of its first tile at position 0 (positions `slab` apart), count = its tiles (up to Lanes).
template <int M, int Lanes, class Block>
AMCT_TILE_INLINE void input_row_blocks(const float* x, const WinogradGeometry& g, std::size_t first, std::size_t last,
                                       float* v, Block block) {
  const int hp = g.th * M + 2;
  const int blocks = (g.tw + Lanes - 1) / Lanes;
  const int wp = blocks * Lanes * M + Lanes;
  const std::size_t tiles = static_cast<std::size_t>(g.th) * g.tw;
  const std::size_t cols = static_cast<std::size_t>(g.n) * tiles;
  std::vector<float> pad(static_cast<std::size_t>(hp) * wp, 0.0f);
  const int rows = std::min(g.h, hp - g.ph), width = std::min(g.w, g.tw * M + 2 - g.pw);
  for (std::size_t pl = first; pl < last; ++pl) {
    const std::size_t img = pl / g.c, ch = pl % g.c;
    const float* xp = x + pl * static_cast<std::size_t>(g.h) * g.w;
    for (int r = 0; r < rows; ++r) {  // the same interior every plane: the border stays zero
      std::copy(xp + static_cast<std::size_t>(r) * g.w, xp + static_cast<std::size_t>(r) * g.w + width,
                pad.data() + static_cast<std::size_t>(r + g.ph) * wp + g.pw);
    }
    for (int ty = 0; ty < g.th; ++ty) {
      float* dst = v + ch * cols + img * tiles + static_cast<std::size_t>(ty) * g.tw;
      for (int tx0 = 0; tx0 < g.tw; tx0 += Lanes) {
        block(pad.data() + static_cast<std::size_t>(ty * M) * wp + tx0 * M, static_cast<std::size_t>(wp), dst + tx0,
              g.tw - tx0);
      }
    }
  }
}

// The output transform's walk over planes [first, last) (plane = image * O + channel) by blocks of `Lanes`
// tiles of one tile row: block(src, oc, out, rows, count, valid) with src = M's column of the block's first
// tile at position 0, oc its channel, out = its first output (row ty*M, column tx0*M), rows the output
// rows inside the map (up to M), count its tiles, valid the outputs of a row inside the map.
template <int M, int Lanes, class Block>
AMCT_TILE_INLINE void output_row_blocks(const float* mm, float* y, const WinogradGeometry& g, std::size_t first,
                                        std::size_t last, Block block) {
  const std::size_t tiles = static_cast<std::size_t>(g.th) * g.tw;
  const std::size_t cols = static_cast<std::size_t>(g.n) * tiles;
  for (std::size_t pl = first; pl < last; ++pl) {
    const std::size_t img = pl / g.o, oc = pl % g.o;
    float* yp = y + pl * static_cast<std::size_t>(g.ho) * g.wo;
    for (int ty = 0; ty < g.th; ++ty) {
      const float* src = mm + oc * cols + img * tiles + static_cast<std::size_t>(ty) * g.tw;
      const int rows = std::min(M, g.ho - ty * M);
      for (int tx0 = 0; tx0 < g.tw; tx0 += Lanes) {
        block(src + tx0, oc, yp + static_cast<std::size_t>(ty * M) * g.wo + tx0 * M, rows, g.tw - tx0,
              std::min(Lanes * M, g.wo - tx0 * M));
      }
    }
  }
}

#undef AMCT_TILE_INLINE

}  // namespace winograd_tile
}  // namespace amct
