// The Winograd transforms' arithmetic on vectors of tiles (one tile per lane), for any GCC vector type
// (__m256, __m512): B^T d B and A^T M A term for term as the portable bt4 / bt6 / at4 / at6 of
// winograd.cpp, the same float32 operations in the same order (the core is built with
// -ffp-contract=off), so the same bytes. Written with the vector operators and always inlined, so that
// each caller compiles them for its own vector width (csrc/src/winograd_avx2.cpp, winograd_avx512.cpp);
// the loads and stores, which differ per instruction set, are the callers' functors.
#pragma once

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

#undef AMCT_TILE_INLINE

}  // namespace winograd_tile
}  // namespace amct
