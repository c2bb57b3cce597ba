// im2col and col2im of a 2-D convolution (Caffe's im2col_cpu / col2im_cpu, src/caffe/util/im2col.cpp)
// for every image of a batch in one call.
//
// The column matrix has one row per (channel, tap), r = (c*kh + i)*kw + j (K = C*kh*kw rows), and
// one column per output pixel p = oy*wo + ox of each image. Two layouts:
//
//   batch_last: cols[r][n][p]  (K x N*P: the images side by side, one GEMM for the batch)
//   otherwise:  cols[n][r][p]  (N stacked K x P matrices: Caffe's per-image matrix)
//
// im2col:  cols[r, n, p] = x[n, c, oy*sh - ph + i*dh, ox*sw - pw + j*dw], 0 outside the input.
// col2im:  x[n, c, y, x] = sum over (r, p) reading (y, x) of cols[r, n, p], added in Caffe's order
//          (channel, then tap row-major, then output pixel) onto zero; so each cell's sum is Caffe's.
//
// `threads` workers split the (image, channel) planes; every value is written by one worker, so the
// bytes do not depend on `threads`.
#pragma once

#include "amct/depthwise.h"  // Conv2dGeometry

namespace amct {

void im2col_2d(const float* x, float* cols, const Conv2dGeometry& g, bool batch_last, int threads);
void col2im_2d(const float* cols, float* x, const Conv2dGeometry& g, bool batch_last, int threads);

}  // namespace amct
