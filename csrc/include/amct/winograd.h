// Winograd minimal filtering F(m x m, 3 x 3) for stride-1 3x3 convolutions (Lavin & Gray, 2015):
// the input and output transforms; the products in between are GEMMs run by the caller
// (amct_caffe/runtime/layers/winograd.py holds the math, the weight transform and the references).
//
// Tiles: output tile (ty, tx) covers outputs [ty*m, ty*m + m) x [tx*m, tx*m + m); it needs the
// alpha x alpha input tile (alpha = m + 2) starting at (ty*m - ph, tx*m - pw), zero outside x.
//
//   V[xi, nu][c][n*T + t] = (B^T d B)[xi, nu]          (input transform, T = th * tw tiles per image)
//   M[xi, nu] = U[xi, nu] @ V[xi, nu]                    (caller: U = G g G^T, (O, C) per (xi, nu))
//   y[n, o, tile] = max((A^T M A) * a[o] + b[o], 0)      (output transform and epilogue, cropped)
//
// m is 2 or 4. Every value is computed by one thread in a fixed order, so the results do not depend
// on the thread count.
#pragma once

#include <cstddef>

namespace amct {

struct WinogradGeometry {
  int n, c, h, w;   // input (N, C, H, W)
  int o, ho, wo;    // output (N, O, Ho, Wo)
  int ph, pw;       // padding of the 3x3 stride-1 convolution
  int m;            // output tile side: 2 or 4
  int th, tw;       // tiles per column / row: ceil(Ho / m), ceil(Wo / m)
};

// x (N, C, H, W) -> v ((m+2)^2, C, N*th*tw).
void winograd_input(const float* x, float* v, const WinogradGeometry& g, int threads);

// mm ((m+2)^2, O, N*th*tw) -> y (N, O, Ho, Wo); a, b (O,) or null (skipped), then ReLU if relu.
void winograd_output(const float* mm, float* y, const WinogradGeometry& g, const float* a, const float* b, bool relu,
                     int threads);

// Vector code path of both transforms: 0 portable, 1 AVX2 (eight tiles at a time), 2 AVX-512 (sixteen),
// the same bytes (NaN payloads aside where two different NaNs meet).
// amct/cpu.h's set_simd_limit caps it (tests compare the paths).
int winograd_simd_level();

}  // namespace amct
